//! The command-line entry of `lain dns`: loads and checks the configuration, sets up
//! logging and the runtime, and runs the server until SIGTERM or SIGINT.

use std::path::PathBuf;

use lain_common::{RunError, Shutdown};

use crate::config::Config;

/// Arguments of `lain dns`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML); built-in defaults when absent.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 64 with every error otherwise.
    #[arg(long)]
    pub check_config: bool,
}

/// Loads the configuration named by `args`, or the defaults.
pub fn load(args: &Args) -> Result<Config, RunError> {
    match &args.config {
        Some(path) => Ok(lain_common::load_config(path)?),
        None => Ok(lain_common::parse_config("(defaults)", "")?),
    }
}

/// The log filter when neither `LAIN_LOG` nor `RUST_LOG` is set. hickory's server logs
/// every query at info level, which would cost more than answering it.
const DEFAULT_LOG_FILTER: &str =
    "info,hickory_server=warn,hickory_proto=warn,hickory_net=warn,hickory_resolver=warn";

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("LAIN_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the component until it is shut down.
pub fn run(args: Args) -> Result<(), RunError> {
    let cfg = load(&args)?;
    if args.check_config {
        return Ok(());
    }
    init_logging(cfg.log_json);
    lain_common::limits::raise_open_files_limit();
    let threads = if cfg.worker_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.worker_threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let shutdown = Shutdown::on_signals();
        crate::server::serve(cfg, shutdown)
            .await
            .map_err(|e| RunError::Failed(e.to_string()))
    })
}

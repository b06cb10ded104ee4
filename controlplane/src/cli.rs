//! The command-line entry of `lain controlplane`: load and check the config, connect to etcd,
//! start the engine and the admin listener, and run until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use lain_common::{RunError, Shutdown};

use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// Arguments of `lain controlplane`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 64 with every error otherwise.
    #[arg(long)]
    pub check_config: bool,
}

/// Runs the component until it is shut down.
pub fn run(args: Args) -> Result<(), RunError> {
    let Some(path) = args.config else {
        return Err(RunError::Failed("--config FILE is required".into()));
    };
    let config: Config = lain_common::load_config(&path)?;
    if args.check_config {
        return Ok(());
    }
    lain_common::telemetry::init(lain_common::telemetry::LogFormat::Text);
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), RunError> {
    let shutdown = Shutdown::on_signals();
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry);
    let client = etcd_client::Client::connect(&config.etcd_endpoints, None)
        .await
        .map_err(|e| RunError::Failed(format!("cannot connect to etcd: {e}")))?;
    let (engine, task) = Engine::start(
        config.engine_settings(),
        client,
        config.node_specs(),
        metrics,
        shutdown.clone(),
    )
    .await
    .map_err(|e| RunError::Failed(e.to_string()))?;
    let admin = lain_common::admin::Admin::new(registry).health(Arc::new(|| Ok(())));
    let addr = admin
        .serve(config.admin_listen, shutdown.clone())
        .await
        .map_err(|e| RunError::Failed(format!("cannot bind admin listener: {e}")))?;
    lain_common::announce_listener("admin", addr);
    tracing::info!(%addr, "lain controlplane running");
    shutdown.wait().await;
    drop(engine);
    let _ = task.await;
    Ok(())
}

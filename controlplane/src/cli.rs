//! The command-line entry of `lain controlplane`: load and check the config, connect to etcd,
//! start the engine and the admin listener, and run until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    let leading = Arc::new(AtomicBool::new(false));
    let page_flag = leading.clone();
    // Standby replicas serve the admin listener too; `/leader` tells which one leads.
    let admin = lain_common::admin::Admin::new(registry).page(
        "/leader",
        Arc::new(move || {
            let body = if page_flag.load(Ordering::Relaxed) {
                "leader\n"
            } else {
                "standby\n"
            };
            (http::StatusCode::OK, "text/plain", body.to_string())
        }),
    );
    let addr = admin
        .serve(config.admin_listen, shutdown.clone())
        .await
        .map_err(|e| RunError::Failed(format!("cannot bind admin listener: {e}")))?;
    lain_common::announce_listener("admin", addr);
    let client = etcd_client::Client::connect(&config.etcd_endpoints, None)
        .await
        .map_err(|e| RunError::Failed(format!("cannot connect to etcd: {e}")))?;
    let settings = config.engine_settings();
    let id = format!("{}-{}", std::process::id(), addr);
    tracing::info!(%id, "campaigning for leadership");
    let leadership = match crate::leader::campaign(
        &client,
        &settings.keyspace,
        &id,
        Duration::from_secs(config.election_ttl_secs),
        &shutdown,
    )
    .await
    {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(()),
        Err(e) => return Err(RunError::Failed(format!("leader election failed: {e}"))),
    };
    leading.store(true, Ordering::Relaxed);
    tracing::info!(%id, "leading; starting the engine");
    let engine_stop = shutdown.child();
    let (engine, task) = Engine::start(
        settings,
        client,
        config.node_specs(),
        metrics,
        engine_stop.clone(),
    )
    .await
    .map_err(|e| RunError::Failed(e.to_string()))?;
    let lost = leadership.lost.clone();
    let result = tokio::select! {
        _ = shutdown.wait() => Ok(()),
        _ = lost.wait() => Err(RunError::Failed("lost the leader lease; stopping".into())),
    };
    engine_stop.trigger();
    drop(engine);
    let _ = task.await;
    leadership.resign().await;
    result
}

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
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// A one-off task instead of running the control plane.
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// The configuration file (TOML).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 64 with every error otherwise.
    #[arg(long)]
    pub check_config: bool,
}

/// One-off tasks of `lain controlplane`.
#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Creates the first admin user and token (printed once on stdout) and the secret key
    /// file if it is configured and missing. Refuses when an admin exists.
    Init {
        /// The configuration file (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// The admin user's name.
        #[arg(long, default_value = "admin")]
        user: String,
    },
}

/// Runs the component until it is shut down.
pub fn run(args: Args) -> Result<(), RunError> {
    if let Some(Sub::Init { config, user }) = args.command {
        let config: Config = lain_common::load_config(&config)?;
        let rt = tokio::runtime::Runtime::new()
            .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
        return rt.block_on(init(config, &user));
    }
    let Some(path) = args.config else {
        return Err(RunError::Failed("--config FILE is required".into()));
    };
    let config: Config = lain_common::load_config(&path)?;
    if args.check_config {
        return Ok(());
    }
    lain_common::telemetry::init(lain_common::telemetry::LogFormat::Text);
    lain_common::limits::raise_open_files_limit();
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(serve(config))
}

async fn init(config: Config, user: &str) -> Result<(), RunError> {
    if let Some(path) = &config.secret_key_file {
        match crate::secrets::SecretBox::create_key_file(path) {
            Ok(true) => eprintln!("created secret key file {}", path.display()),
            Ok(false) => {}
            Err(e) => return Err(RunError::Failed(e.to_string())),
        }
    }
    if !crate::api::auth::valid_user_name(user) {
        return Err(RunError::Failed(format!(
            "{user:?} is not a valid user name"
        )));
    }
    let client = etcd_client::Client::connect(&config.etcd_endpoints, Some(etcd_options()))
        .await
        .map_err(|e| RunError::Failed(format!("cannot connect to etcd: {e}")))?;
    let ks = lain_state::Keyspace::new(&config.prefix);
    let failed = |e: crate::api::ApiError| RunError::Failed(e.message);
    if crate::api::auth::admin_exists(&client, &ks)
        .await
        .map_err(failed)?
    {
        return Err(RunError::Failed(
            "an admin user exists already; ask an admin for a token (`lain token create`)".into(),
        ));
    }
    if !crate::api::auth::create_user(&client, &ks, user, true)
        .await
        .map_err(failed)?
    {
        return Err(RunError::Failed(format!("user {user:?} exists already")));
    }
    let (_, token) = crate::api::auth::create_token(&client, &ks, user, "created by init")
        .await
        .map_err(failed)?;
    eprintln!("created admin user {user:?}; its token follows (shown only once):");
    println!("{token}");
    Ok(())
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
    let client = etcd_client::Client::connect(&config.etcd_endpoints, Some(etcd_options()))
        .await
        .map_err(|e| RunError::Failed(format!("cannot connect to etcd: {e}")))?;
    let mut settings = config.engine_settings();
    if let Some(path) = &config.secret_key_file {
        let secrets = crate::secrets::SecretBox::load(path)
            .map_err(|e| RunError::Failed(format!("{e} (`lain controlplane init` creates it)")))?;
        settings.secrets = Some(secrets);
    }
    let api_state = crate::api::ApiState::new(
        client.clone(),
        settings.keyspace.clone(),
        settings.cluster_domains.clone(),
        leading.clone(),
        settings.secrets.clone(),
    );
    let api_addr = crate::api::serve(config.api_listen, api_state.clone(), shutdown.clone())
        .await
        .map_err(|e| RunError::Failed(format!("cannot bind API listener: {e}")))?;
    lain_common::announce_listener("api", api_addr);
    let reachable = if api_addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::IpAddr::from([127, 0, 0, 1]), api_addr.port())
    } else {
        api_addr
    };
    let id = format!("{}-{}", std::process::id(), addr);
    // Standbys forward API calls to the address the leader campaigned with.
    let value = serde_json::to_string(&crate::api::ElectionValue {
        id: id.clone(),
        api: format!("http://{reachable}"),
    })
    .unwrap_or_else(|_| id.clone());
    tracing::info!(%id, "campaigning for leadership");
    let leadership = match crate::leader::campaign(
        &client,
        &settings.keyspace,
        &value,
        Duration::from_secs(config.election_ttl_secs),
        &shutdown,
    )
    .await
    {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(()),
        Err(e) => return Err(RunError::Failed(format!("leader election failed: {e}"))),
    };
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
    api_state.set_engine(Some(engine.clone()));
    // Leading is announced only once the engine can take API calls.
    leading.store(true, Ordering::Relaxed);
    let lost = leadership.lost.clone();
    let result = tokio::select! {
        _ = shutdown.wait() => Ok(()),
        _ = lost.wait() => Err(RunError::Failed("lost the leader lease; stopping".into())),
    };
    api_state.set_engine(None);
    leading.store(false, Ordering::Relaxed);
    engine_stop.trigger();
    drop(engine);
    let _ = task.await;
    leadership.resign().await;
    result
}

/// The control plane's etcd client options. HTTP/2 pings notice a member that stopped
/// answering without closing the connection (the election lease's keep-alive stream is
/// always open, so they run; on a connection without a stream etcd counts pings as abuse).
/// There is no per-request timeout: a standby's campaign waits as long as the leader leads.
fn etcd_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false)
}

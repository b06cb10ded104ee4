//! The command-line entry of `lain proxy`.

use std::path::PathBuf;

use lain_common::{ConfigError, ConfigErrors, RunError, load_config};

use crate::config::Config;

/// Arguments of `lain proxy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 64 with every error otherwise.
    #[arg(long)]
    pub check_config: bool,
    /// Serve routes and endpoints from this file (YAML or JSON) instead of etcd; it is
    /// re-read when it changes.
    #[arg(long)]
    pub routes: Option<PathBuf>,
    /// Take over the listeners of the proxy running at `listen.upgrade_socket_path`; it
    /// stops accepting and drains once this one serves.
    #[arg(long)]
    pub upgrade: bool,
}

/// Runs the component until it is shut down.
pub fn run(args: Args) -> Result<(), RunError> {
    let name = args
        .config
        .as_ref()
        .map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
    let mut config: Config = match &args.config {
        Some(path) => load_config(path)?,
        None => Config::default(),
    };
    if let Some(routes) = args.routes {
        config.state.routes_file = Some(routes);
        config.state.etcd_endpoints.clear();
    }
    if config.state.etcd_endpoints.is_empty() && config.state.routes_file.is_none() {
        return Err(RunError::Config(ConfigErrors {
            file: name,
            errors: vec![ConfigError::at(
                "state",
                "set state.etcd_endpoints or state.routes_file, or pass --routes FILE",
            )],
        }));
    }
    if args.upgrade && config.listen.upgrade_socket_path.is_none() {
        return Err(RunError::Config(ConfigErrors {
            file: name,
            errors: vec![ConfigError::at(
                "listen.upgrade_socket_path",
                "--upgrade needs the socket the running proxy hands its listeners over",
            )],
        }));
    }
    let files = crate::tls::load_files(&config.tls.certs).map_err(|errors| {
        RunError::Config(ConfigErrors {
            file: name.clone(),
            errors,
        })
    })?;
    if args.check_config {
        eprintln!("{name}: configuration is valid");
        return Ok(());
    }
    lain_common::telemetry::init(lain_common::telemetry::LogFormat::Text);
    lain_common::limits::raise_open_files_limit();
    crate::server::run(config, files, args.upgrade)
}

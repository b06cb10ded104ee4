//! Plumbing every lain component shares: logging, metrics, configuration and shutdown.
//!
//! Each component follows one lifecycle, in the manner of linkerd2-proxy:
//! `Config` (parsed with unknown keys rejected) → `validate` (pure, every error collected)
//! → `build` (binds sockets and connects; IO starts here) → `run` → `drain` on shutdown.
//! A config that fails to load or validate makes the process exit with [`EX_CONFIG`].

pub mod admin;
pub mod config;
pub mod limits;
pub mod shutdown;
pub mod telemetry;

/// The exit code for a bad configuration (`EX_CONFIG` from sysexits.h).
pub const EX_CONFIG: i32 = 64;

pub use config::{ConfigError, ConfigErrors, Validate, load_config, parse_config};
pub use shutdown::Shutdown;

/// Announces a bound listener on stdout as one JSON line, so that tests and scripts that
/// asked for port 0 can read back the real address.
pub fn announce_listener(name: &str, addr: std::net::SocketAddr) {
    println!(
        "{}",
        serde_json::json!({ "listening": { "name": name, "addr": addr.to_string() } })
    );
}

/// Why a component stopped with a failure; tells the binary which exit code to use.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration did not load or validate; exit code 64.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Anything else that stopped the component; exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => EX_CONFIG,
            RunError::Failed(_) => 1,
        }
    }
}

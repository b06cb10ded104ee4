//! The command-line entry of `lain dns`.

use std::path::PathBuf;

use lain_common::RunError;

/// Arguments of `lain dns`.
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
    let _ = args;
    Err(RunError::Failed(
        "lain dns is not available in this build".into(),
    ))
}

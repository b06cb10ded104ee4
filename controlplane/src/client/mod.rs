//! The `lain` command-line client of the HTTP API (docs/api.md): `lain login`, `lain app`,
//! `lain deploy`, `lain ps`, ... and `lain build`, which needs only a Docker engine.
//!
//! `commands` holds the clap definitions and what each command does, `config` the config
//! file and how the server and token are chosen, `http` the API client, `output` tables and
//! JSON, and `progress` the live display of a rollout.

pub mod commands;
pub mod config;
pub mod http;
pub mod output;
pub mod progress;

use std::process::ExitCode;

pub use commands::Command;

/// Exit code: a failure not covered by another code.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the command line is wrong (also clap's code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the app, proc, node, secret, token or route does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: no valid token, or the token may not do this.
pub const EXIT_AUTH: u8 = 4;
/// Exit code: the server cannot be reached or cannot act now.
pub const EXIT_UNREACHABLE: u8 = 5;
/// Exit code: a deploy, rollback or scale did not reach its goal.
pub const EXIT_DEPLOY_FAILED: u8 = 6;
/// Exit code: local input (lain.yaml, a file, the config file) is invalid.
pub const EXIT_LOCAL_INPUT: u8 = 64;

/// Why a CLI command failed: the message printed and the process exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The exit code (see the `EXIT_*` constants).
    pub code: u8,
    /// What went wrong and what to do next.
    pub message: String,
}

impl CliError {
    fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
    /// Exit code 1.
    pub fn failed(m: impl Into<String>) -> CliError {
        Self::new(EXIT_FAILED, m)
    }
    /// Exit code 2.
    pub fn usage(m: impl Into<String>) -> CliError {
        Self::new(EXIT_USAGE, m)
    }
    /// Exit code 3.
    pub fn not_found(m: impl Into<String>) -> CliError {
        Self::new(EXIT_NOT_FOUND, m)
    }
    /// Exit code 4.
    pub fn auth(m: impl Into<String>) -> CliError {
        Self::new(EXIT_AUTH, m)
    }
    /// Exit code 5.
    pub fn unreachable(m: impl Into<String>) -> CliError {
        Self::new(EXIT_UNREACHABLE, m)
    }
    /// Exit code 6.
    pub fn deploy_failed(m: impl Into<String>) -> CliError {
        Self::new(EXIT_DEPLOY_FAILED, m)
    }
    /// Exit code 64.
    pub fn local(m: impl Into<String>) -> CliError {
        Self::new(EXIT_LOCAL_INPUT, m)
    }
}

/// Runs one client command and returns the process exit code; errors are printed to
/// stderr as `lain: MESSAGE`.
pub fn main(cmd: Command) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lain: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match rt.block_on(commands::run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lain: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

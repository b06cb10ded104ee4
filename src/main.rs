//! The `lain` binary: parses the command line and hands over to one component's library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the proxy and the DNS server allocate and free small
/// objects on every request from several threads, where glibc's arenas spent about a tenth
/// of the proxy's CPU time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// lain: edge proxy, cluster DNS, log shipper and control plane of a container PaaS.
#[derive(Debug, Parser)]
#[command(name = "lain", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge proxy.
    Proxy(lain_proxy::cli::Args),
    /// Run the cluster DNS server.
    Dns(lain_dns::cli::Args),
    /// Run the log shipper.
    Logship(lain_logship::cli::Args),
    /// Print an app's log lines from Elasticsearch or the local log files.
    Logs(lain_logship::logs_cli::Args),
    /// Run the control plane.
    Controlplane(lain_controlplane::cli::Args),
    #[command(flatten)]
    Client(lain_controlplane::client::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Client(cmd) => return lain_controlplane::client::main(cmd),
        Command::Proxy(args) => lain_proxy::cli::run(args),
        Command::Dns(args) => lain_dns::cli::run(args),
        Command::Logship(args) => lain_logship::cli::run(args),
        Command::Logs(args) => lain_logship::logs_cli::run(args),
        Command::Controlplane(args) => lain_controlplane::cli::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lain: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

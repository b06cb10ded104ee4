//! The client subcommands of the `lain` binary (clap definitions) and what each one does:
//! one or a few API calls, then a table or JSON.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::Method;

use super::CliError;
use super::config::{self, ClientConfig};
use super::http::ApiClient;
use super::output::{self, Format, Table, bytes, opt, short_version, yes_no};
use super::progress::{self, Goal};
use crate::api::types::*;

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// The API server (`http://host:port`); overrides the config file.
    #[arg(long, env = "LAIN_SERVER", global = true)]
    pub server: Option<String>,
    /// The bearer token; overrides the config file.
    #[arg(long, env = "LAIN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "table",
        global = true
    )]
    pub output: Format,
    /// Seconds to wait for one API answer.
    #[arg(long, default_value_t = 30, global = true)]
    pub timeout_secs: u64,
}

impl Global {
    fn client(&self) -> Result<ApiClient, CliError> {
        let file = ClientConfig::load(&config::config_path())?;
        let target = config::resolve(self.server.as_deref(), self.token.as_deref(), &file)?;
        ApiClient::new(target, Duration::from_secs(self.timeout_secs.max(1)))
    }
    fn json(&self) -> bool {
        self.output == Format::Json
    }
}

/// Options of the commands that start a rollout.
#[derive(Debug, Clone, clap::Args)]
pub struct Wait {
    /// Return as soon as the server accepted the request, without following the rollout.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to follow the rollout before giving up (the rollout itself goes on).
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// The client commands, flattened into the `lain` binary's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a token against a server and save both in the config file.
    Login(LoginArgs),
    /// Show who the configured token belongs to.
    Whoami(Plain),
    /// Register, list, show and remove apps.
    App(AppArgs),
    /// Build the release image of an app directory on a Docker engine.
    Build(BuildArgs),
    /// Deploy a version of an app and follow the rollout.
    Deploy(DeployArgs),
    /// Go back to the version deployed before the current one.
    Rollback(RollbackArgs),
    /// Change a proc's instances, CPU or memory.
    Scale(ScaleArgs),
    /// List an app's instances: node, address, health, restarts.
    Ps(AppOnly),
    /// Show an app's event history.
    Events(EventsArgs),
    /// Manage an app's secret files.
    Secret(SecretArgs),
    /// Manage an app's maintainers.
    Maintainer(MaintainerArgs),
    /// Manage the cluster's Docker engines.
    Node(NodeArgs),
    /// List the cluster's HTTP routes.
    Routes(Plain),
    /// Upload and list TLS certificates.
    Cert(CertArgs),
    /// Create, list and revoke API tokens.
    Token(TokenArgs),
    /// Create users.
    User(UserArgs),
}

/// Only the global options.
#[derive(Debug, clap::Args)]
pub struct Plain {
    #[command(flatten)]
    g: Global,
}

/// An app name.
#[derive(Debug, clap::Args)]
pub struct AppOnly {
    #[command(flatten)]
    g: Global,
    /// The app.
    app: String,
}

/// `lain login`.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    #[command(flatten)]
    g: Global,
}

/// `lain app`.
#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: AppCmd,
}

#[derive(Debug, clap::Subcommand)]
enum AppCmd {
    /// Register an app (or update its lain.yaml) from a directory or a lain.yaml file.
    Create {
        /// The app directory or its lain.yaml.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// List the apps.
    Ls,
    /// Show an app's procs and lain.yaml.
    Show {
        /// The app.
        app: String,
    },
    /// Remove an app and stop its instances.
    Rm {
        /// The app.
        app: String,
    },
}

/// `lain build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    g: Global,
    /// The app directory, holding lain.yaml, inside a git work tree.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The Docker engine; `DOCKER_HOST`, then the config file's `docker_host`, then the
    /// local socket.
    #[arg(long)]
    docker_host: Option<String>,
    /// Push the release image to this registry (`host:port`) afterwards.
    #[arg(long)]
    push: Option<String>,
    /// Build even with uncommitted changes.
    #[arg(long)]
    allow_dirty: bool,
}

/// `lain deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    #[command(flatten)]
    g: Global,
    #[command(flatten)]
    wait: Wait,
    /// The app.
    app: String,
    /// The version; the newest `{app}:release-*` image on the nodes when omitted.
    #[arg(short = 'v', long)]
    version: Option<String>,
    /// The image; `{app}:release-{version}` by default.
    #[arg(long)]
    image: Option<String>,
}

/// `lain rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    g: Global,
    #[command(flatten)]
    wait: Wait,
    /// The app.
    app: String,
}

/// `lain scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    g: Global,
    #[command(flatten)]
    wait: Wait,
    /// The app.
    app: String,
    /// The proc.
    proc_name: String,
    /// How many instances run.
    #[arg(short = 'n', long)]
    num_instances: Option<u32>,
    /// LAIN's CPU level, 0–8.
    #[arg(short = 'c', long)]
    cpu: Option<u8>,
    /// The memory limit (`64m`, `1g`).
    #[arg(short = 'm', long)]
    memory: Option<String>,
}

/// `lain events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    g: Global,
    /// The app.
    app: String,
    /// Show only the newest N events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// `lain secret`.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: SecretCmd,
}

#[derive(Debug, clap::Subcommand)]
enum SecretCmd {
    /// Set a secret file from --file or standard input.
    Set {
        /// The app.
        app: String,
        /// The proc it is mounted into.
        proc_name: String,
        /// Its path in the container (relative paths are below /lain/app).
        path: String,
        /// Read the content from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List an app's secret files (never their content).
    Ls {
        /// The app.
        app: String,
    },
    /// Remove a secret file.
    Rm {
        /// The app.
        app: String,
        /// The proc.
        proc_name: String,
        /// Its path in the container.
        path: String,
    },
}

/// `lain maintainer`.
#[derive(Debug, clap::Args)]
pub struct MaintainerArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: MaintainerCmd,
}

#[derive(Debug, clap::Subcommand)]
enum MaintainerCmd {
    /// Make a user a maintainer of an app.
    Add {
        /// The app.
        app: String,
        /// The user.
        user: String,
    },
    /// List an app's maintainers.
    Ls {
        /// The app.
        app: String,
    },
    /// Remove a maintainer.
    Rm {
        /// The app.
        app: String,
        /// The user.
        user: String,
    },
}

/// `lain node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: NodeCmd,
}

#[derive(Debug, clap::Subcommand)]
enum NodeCmd {
    /// Add a Docker engine.
    Add {
        /// The node name.
        name: String,
        /// `unix:///path` or `tcp://127.0.0.1:port`.
        docker_host: String,
        /// Where its instances are reached (127.0.0.1 by default).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// A label matched by lain.yaml `filters:`, `KEY=VALUE`; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// CPU capacity in cores.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory capacity in bytes.
        #[arg(long)]
        memory_bytes: Option<u64>,
    },
    /// List the nodes.
    Ls,
    /// Move every instance off a node.
    Drain {
        /// The node name.
        name: String,
    },
    /// Remove a node.
    Rm {
        /// The node name.
        name: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `lain cert`.
#[derive(Debug, clap::Args)]
pub struct CertArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: CertCmd,
}

#[derive(Debug, clap::Subcommand)]
enum CertCmd {
    /// Upload a certificate and its key (PEM files).
    Add {
        /// The certificate's name.
        name: String,
        /// The PEM certificate chain, leaf first.
        #[arg(long)]
        cert: PathBuf,
        /// The PEM private key.
        #[arg(long)]
        key: PathBuf,
    },
    /// List the certificates.
    Ls,
}

/// `lain token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCmd {
    /// Create a token (for yourself unless a user is named; others need an admin).
    Create {
        /// The user the token is for.
        user: Option<String>,
        /// A note telling tokens apart.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (yours, or all for an admin).
    Ls,
    /// Revoke a token by its id.
    Revoke {
        /// The token id.
        id: String,
    },
}

/// `lain user`.
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    #[command(flatten)]
    g: Global,
    #[command(subcommand)]
    cmd: UserCmd,
}

#[derive(Debug, clap::Subcommand)]
enum UserCmd {
    /// Create a user (admin only); give them a token with `lain token create USER`.
    Add {
        /// The user name.
        name: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
    },
}

/// Runs one client command.
pub async fn run(cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Login(a) => login(a).await,
        Command::Whoami(a) => whoami(&a.g).await,
        Command::App(a) => app(a).await,
        Command::Build(a) => build(a).await,
        Command::Deploy(a) => deploy(a).await,
        Command::Rollback(a) => rollback(a).await,
        Command::Scale(a) => scale(a).await,
        Command::Ps(a) => ps(&a.g, &a.app).await,
        Command::Events(a) => events(a).await,
        Command::Secret(a) => secret(a).await,
        Command::Maintainer(a) => maintainer(a).await,
        Command::Node(a) => node(a).await,
        Command::Routes(a) => routes(&a.g).await,
        Command::Cert(a) => cert(a).await,
        Command::Token(a) => token(a).await,
        Command::User(a) => user(a).await,
    }
}

/// An app or proc name as a path segment: lain's names are letters, digits and `-`, so
/// anything else is refused here instead of producing a different URL.
fn seg(kind: &str, s: &str) -> Result<String, CliError> {
    if !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
    {
        Ok(s.to_string())
    } else {
        Err(CliError::usage(format!(
            "{kind} {s:?} is not a valid name (letters, digits, '-', '_', '.')"
        )))
    }
}

async fn login(a: LoginArgs) -> Result<(), CliError> {
    let path = config::config_path();
    let mut file = ClientConfig::load(&path)?;
    let server =
        a.g.server
            .clone()
            .or_else(|| file.server.clone())
            .ok_or_else(|| {
                CliError::usage("pass --server URL (the lain controlplane's API address)")
            })?;
    let token = a.g.token.clone().ok_or_else(|| {
        CliError::usage("pass --token TOKEN (from `lain controlplane init` or `lain token create`)")
    })?;
    let target = config::Target {
        server: config::normalize_server(&server)?,
        token,
    };
    let client = ApiClient::new(target.clone(), Duration::from_secs(a.g.timeout_secs.max(1)))?;
    let me: WhoAmI = client.get("/whoami").await?;
    file.server = Some(target.server.clone());
    file.token = Some(target.token);
    file.save(&path)?;
    if a.g.json() {
        output::print_json(&me);
    } else {
        println!(
            "logged in to {} as {}{}; saved in {}",
            target.server,
            me.user,
            if me.admin { " (admin)" } else { "" },
            path.display()
        );
    }
    Ok(())
}

async fn whoami(g: &Global) -> Result<(), CliError> {
    let me: WhoAmI = g.client()?.get("/whoami").await?;
    if g.json() {
        output::print_json(&me);
    } else {
        println!("user:   {}", me.user);
        println!("admin:  {}", yes_no(me.admin));
        println!(
            "apps:   {}",
            if me.apps.is_empty() {
                "-".to_string()
            } else {
                me.apps.join(", ")
            }
        );
    }
    Ok(())
}

fn procs_cell(procs: &[ProcSummary]) -> String {
    procs
        .iter()
        .map(|p| format!("{}×{}", p.name, p.num_instances))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a lain.yaml from a directory or file and validates it locally, so mistakes are
/// reported with their lines before anything is sent.
fn read_lain_yaml(path: &Path) -> Result<String, CliError> {
    let file = if path.is_dir() {
        path.join("lain.yaml")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| CliError::local(format!("cannot read {}: {e}", file.display())))?;
    if let Err(errors) = crate::LainConf::parse(
        &file.display().to_string(),
        &text,
        &["lain.local".to_string()],
    ) {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        return Err(CliError::local(format!(
            "{} is invalid:\n{}",
            file.display(),
            lines.join("\n")
        )));
    }
    Ok(text)
}

async fn app(a: AppArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        AppCmd::Create { path } => {
            let text = read_lain_yaml(&path)?;
            let client = g.client()?;
            let app: AppDetail = client
                .call(
                    Method::POST,
                    "/apps",
                    &RegisterAppRequest { lain_yaml: text },
                )
                .await?;
            if g.json() {
                output::print_json(&app);
            } else {
                println!(
                    "app {} registered with procs {}; deploy it with `lain deploy {}`",
                    app.name,
                    app.procs
                        .iter()
                        .map(|p| format!("{}×{}", p.name, p.num_instances))
                        .collect::<Vec<_>>()
                        .join(" "),
                    app.name
                );
            }
        }
        AppCmd::Ls => {
            let apps: Vec<AppSummary> = g.client()?.get("/apps").await?;
            if g.json() {
                output::print_json(&apps);
            } else {
                let mut t = Table::new(&["NAME", "TYPE", "VERSION", "PROCS"]);
                for a in &apps {
                    t.row(vec![
                        a.name.clone(),
                        a.apptype.clone(),
                        a.version.as_deref().map_or("-".into(), short_version),
                        procs_cell(&a.procs),
                    ]);
                }
                output::print_table(&t, "no apps; register one with `lain app create DIR`");
            }
        }
        AppCmd::Show { app } => {
            let d: AppDetail = g
                .client()?
                .get(&format!("/apps/{}", seg("app", &app)?))
                .await?;
            if g.json() {
                output::print_json(&d);
            } else {
                println!("app:      {}", d.name);
                println!("type:     {}", d.apptype);
                println!("version:  {}", d.version.as_deref().unwrap_or("-"));
                println!();
                let mut t = Table::new(&[
                    "PROC",
                    "TYPE",
                    "INSTANCES",
                    "CPU",
                    "MEMORY",
                    "PORT",
                    "MOUNTPOINTS",
                ]);
                for p in &d.procs {
                    t.row(vec![
                        p.name.clone(),
                        p.proc_type.clone(),
                        p.num_instances.to_string(),
                        p.cpu.to_string(),
                        p.memory.clone(),
                        opt(&p.port),
                        p.mountpoints.join(" "),
                    ]);
                }
                output::print_table(&t, "no procs");
            }
        }
        AppCmd::Rm { app } => {
            g.client()?
                .call_empty::<()>(
                    Method::DELETE,
                    &format!("/apps/{}", seg("app", &app)?),
                    None,
                    &[],
                )
                .await?;
            if !g.json() {
                println!("app {app} removed; its instances are being stopped");
            }
        }
    }
    Ok(())
}

async fn build(a: BuildArgs) -> Result<(), CliError> {
    let file = ClientConfig::load(&config::config_path())?;
    let docker_host = a
        .docker_host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .or(file.docker_host)
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let opts = crate::build::BuildOptions {
        dir: a.dir.clone(),
        docker_host: docker_host.clone(),
        push: a.push.clone(),
        allow_dirty: a.allow_dirty,
    };
    let json = a.g.json();
    // Progress goes to stderr so that `-o json` leaves stdout to the result alone.
    let result = crate::build::build(&opts, |e| {
        use crate::build::BuildEvent as E;
        match e {
            E::Version(v) => eprintln!("==> version {v} (on {docker_host})"),
            E::Step {
                stage,
                index,
                command,
            } => eprintln!("==> build.{stage}[{index}]: {command}"),
            E::Output(line) => eprintln!("    {line}"),
            E::Copy { src, dest } => eprintln!("==> release.copy {src} -> {dest}"),
            E::Tagged(t) => eprintln!("==> tagged {t}"),
            E::Pushed(t) => eprintln!("==> pushed {t}"),
        }
    })
    .await;
    match result {
        Ok(out) => {
            if json {
                output::print_json(&serde_json::json!({
                    "app": out.app,
                    "version": out.version,
                    "image": out.image,
                    "build_image": out.build_image,
                    "pushed": out.pushed,
                }));
            } else {
                println!(
                    "built {}; deploy it with `lain deploy {} -v {}`",
                    out.image, out.app, out.version
                );
            }
            Ok(())
        }
        Err(e) => {
            use crate::build::BuildError as B;
            let code = match &e {
                B::Read { .. }
                | B::Invalid(_)
                | B::NoBuild(_)
                | B::Dirty { .. }
                | B::Git { .. } => super::EXIT_LOCAL_INPUT,
                B::DockerHost(_) => super::EXIT_USAGE,
                B::Docker {
                    source:
                        bollard::errors::Error::HyperResponseError { .. }
                        | bollard::errors::Error::IOError { .. }
                        | bollard::errors::Error::SocketNotFoundError(_),
                    ..
                } => super::EXIT_UNREACHABLE,
                _ => super::EXIT_FAILED,
            };
            Err(CliError {
                code,
                message: format!("build failed: {e}"),
            })
        }
    }
}

async fn deploy(a: DeployArgs) -> Result<(), CliError> {
    let client = a.g.client()?;
    let app = seg("app", &a.app)?;
    let watcher = progress::Watcher::start(&client, &app).await?;
    let entry: DeployEntry = client
        .call(
            Method::POST,
            &format!("/apps/{app}/deploys"),
            &DeployRequest {
                version: a.version.clone(),
                image: a.image.clone(),
            },
        )
        .await?;
    finish_rollout(&a.g, &a.wait, watcher, entry, "deploy").await
}

async fn rollback(a: RollbackArgs) -> Result<(), CliError> {
    let client = a.g.client()?;
    let app = seg("app", &a.app)?;
    let watcher = progress::Watcher::start(&client, &app).await?;
    let entry: DeployEntry = client.post_empty(&format!("/apps/{app}/rollback")).await?;
    finish_rollout(&a.g, &a.wait, watcher, entry, "rollback").await
}

async fn finish_rollout(
    g: &Global,
    wait: &Wait,
    watcher: progress::Watcher,
    entry: DeployEntry,
    what: &str,
) -> Result<(), CliError> {
    if wait.no_wait {
        if g.json() {
            output::print_json(&entry);
        } else {
            println!(
                "{what} #{} of version {} accepted; follow it with `lain ps {}`",
                entry.seq, entry.version, watcher.app
            );
        }
        return Ok(());
    }
    if !g.json() {
        eprintln!(
            "{what} #{}: version {} ({})",
            entry.seq, entry.version, entry.image
        );
    }
    let outcome = watcher
        .follow(
            Goal::Deploy {
                seq: entry.seq,
                version: entry.version.clone(),
            },
            Duration::from_secs(wait.wait_secs),
            !g.json(),
        )
        .await?;
    if g.json() {
        output::print_json(&outcome.entry);
    }
    outcome.into_result(what)
}

async fn scale(a: ScaleArgs) -> Result<(), CliError> {
    if a.num_instances.is_none() && a.cpu.is_none() && a.memory.is_none() {
        return Err(CliError::usage(
            "nothing to change: pass -n INSTANCES, -c CPU or -m MEMORY",
        ));
    }
    let client = a.g.client()?;
    let app = seg("app", &a.app)?;
    let proc_name = seg("proc", &a.proc_name)?;
    let watcher = progress::Watcher::start(&client, &app).await?;
    let p: serde_json::Value = client
        .call(
            Method::PATCH,
            &format!("/apps/{app}/procs/{proc_name}"),
            &ScaleRequest {
                num_instances: a.num_instances,
                cpu: a.cpu,
                memory: a.memory.clone(),
            },
        )
        .await?;
    let wanted = p
        .get("num_instances")
        .and_then(|n| n.as_u64())
        .map(|n| n as u32)
        .or(a.num_instances);
    if a.wait.no_wait || wanted.is_none() {
        if a.g.json() {
            output::print_json(&p);
        } else {
            println!("{app}.{proc_name} scaled; follow it with `lain ps {app}`");
        }
        return Ok(());
    }
    let outcome = watcher
        .follow(
            Goal::Scale {
                proc_name: proc_name.clone(),
                instances: wanted.unwrap_or(0),
            },
            Duration::from_secs(a.wait.wait_secs),
            !a.g.json(),
        )
        .await?;
    if a.g.json() {
        output::print_json(&p);
    }
    outcome.into_result("scale")
}

async fn ps(g: &Global, app: &str) -> Result<(), CliError> {
    let app = seg("app", app)?;
    let list: Vec<InstanceInfo> = g.client()?.get(&format!("/apps/{app}/instances")).await?;
    if g.json() {
        output::print_json(&list);
        return Ok(());
    }
    let mut t = Table::new(&[
        "PROC", "#", "NODE", "ADDRESS", "VERSION", "HEALTHY", "SERVING", "RESTARTS", "STATUS",
    ]);
    for i in &list {
        let address = match (&i.address, i.port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.clone(),
            _ => "-".into(),
        };
        let status = match (&i.pending, &i.last_exit) {
            (Some(p), _) => format!("pending: {p}"),
            (None, Some(e)) if i.container_id.is_none() => format!("exited: {e}"),
            (None, Some(e)) => format!("running (last exit: {e})"),
            (None, None) if i.container_id.is_some() => "running".into(),
            (None, None) => "-".into(),
        };
        t.row(vec![
            i.proc_name.clone(),
            i.instance.to_string(),
            opt(&i.node),
            address,
            i.version.as_deref().map_or("-".into(), short_version),
            yes_no(i.healthy),
            yes_no(i.serving),
            i.restarts.to_string(),
            status,
        ]);
    }
    output::print_table(
        &t,
        &format!("{app} has no instances; deploy it with `lain deploy {app}`"),
    );
    Ok(())
}

async fn events(a: EventsArgs) -> Result<(), CliError> {
    let app = seg("app", &a.app)?;
    let mut list: Vec<EventEntry> = a.g.client()?.get(&format!("/apps/{app}/events")).await?;
    if list.len() > a.limit {
        list.drain(..list.len() - a.limit);
    }
    if a.g.json() {
        output::print_json(&list);
        return Ok(());
    }
    let mut t = Table::new(&["TIME", "KIND", "INSTANCE", "MESSAGE"]);
    for e in &list {
        t.row(vec![
            e.at.clone(),
            e.kind.clone(),
            progress::instance_label(e),
            e.message.clone(),
        ]);
    }
    output::print_table(&t, &format!("no events for {app}"));
    Ok(())
}

async fn secret(a: SecretArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        SecretCmd::Set {
            app,
            proc_name,
            path,
            file,
        } => {
            let content = match &file {
                Some(f) => std::fs::read(f)
                    .map_err(|e| CliError::local(format!("cannot read {}: {e}", f.display())))?,
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| CliError::local(format!("cannot read standard input: {e}")))?;
                    buf
                }
            };
            let app = seg("app", &app)?;
            g.client()?
                .call_empty(
                    Method::PUT,
                    &format!("/apps/{app}/secrets"),
                    Some(&PutSecretRequest {
                        proc: proc_name.clone(),
                        path: path.clone(),
                        content_b64: base64::engine::general_purpose::STANDARD.encode(&content),
                    }),
                    &[],
                )
                .await?;
            if !g.json() {
                println!(
                    "secret {path} of {app}.{proc_name} set ({} bytes); it is mounted at the next deploy",
                    content.len()
                );
            }
        }
        SecretCmd::Ls { app } => {
            let app = seg("app", &app)?;
            let list: Vec<SecretInfo> = g.client()?.get(&format!("/apps/{app}/secrets")).await?;
            if g.json() {
                output::print_json(&list);
            } else {
                let mut t = Table::new(&["PROC", "PATH", "SIZE", "UPDATED"]);
                for s in &list {
                    t.row(vec![
                        s.proc.clone(),
                        s.path.clone(),
                        s.size.to_string(),
                        s.updated_at.clone(),
                    ]);
                }
                output::print_table(&t, &format!("{app} has no secrets"));
            }
        }
        SecretCmd::Rm {
            app,
            proc_name,
            path,
        } => {
            let app = seg("app", &app)?;
            let proc_seg = seg("proc", &proc_name)?;
            g.client()?
                .call_empty::<()>(
                    Method::DELETE,
                    &format!("/apps/{app}/secrets/{proc_seg}"),
                    None,
                    &[("path", path.as_str())],
                )
                .await?;
            if !g.json() {
                println!("secret {path} of {app}.{proc_name} removed");
            }
        }
    }
    Ok(())
}

async fn maintainer(a: MaintainerArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        MaintainerCmd::Add { app, user } => {
            let path = format!(
                "/apps/{}/maintainers/{}",
                seg("app", &app)?,
                seg("user", &user)?
            );
            g.client()?
                .call_empty::<()>(Method::PUT, &path, None, &[])
                .await?;
            if !g.json() {
                println!("{user} maintains {app}");
            }
        }
        MaintainerCmd::Ls { app } => {
            let list: Vec<MaintainerInfo> = g
                .client()?
                .get(&format!("/apps/{}/maintainers", seg("app", &app)?))
                .await?;
            if g.json() {
                output::print_json(&list);
            } else {
                let mut t = Table::new(&["USER"]);
                for m in &list {
                    t.row(vec![m.user.clone()]);
                }
                output::print_table(&t, &format!("{app} has no maintainers"));
            }
        }
        MaintainerCmd::Rm { app, user } => {
            let path = format!(
                "/apps/{}/maintainers/{}",
                seg("app", &app)?,
                seg("user", &user)?
            );
            g.client()?
                .call_empty::<()>(Method::DELETE, &path, None, &[])
                .await?;
            if !g.json() {
                println!("{user} no longer maintains {app}");
            }
        }
    }
    Ok(())
}

async fn node(a: NodeArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        NodeCmd::Add {
            name,
            docker_host,
            address,
            labels,
            cpus,
            memory_bytes,
        } => {
            let req = AddNodeRequest {
                name: name.clone(),
                docker_host,
                address,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                cpus,
                memory_bytes,
            };
            let v: serde_json::Value = g.client()?.call(Method::POST, "/nodes", &req).await?;
            if g.json() {
                output::print_json(&v);
            } else {
                println!("node {name} added");
            }
        }
        NodeCmd::Ls => {
            let list: Vec<NodeInfo> = g.client()?.get("/nodes").await?;
            if g.json() {
                output::print_json(&list);
            } else {
                let mut t = Table::new(&[
                    "NAME",
                    "STATE",
                    "LEASE",
                    "DOCKER HOST",
                    "ADDRESS",
                    "CPUS",
                    "MEMORY",
                    "LABELS",
                ]);
                for n in &list {
                    t.row(vec![
                        n.name.clone(),
                        n.state.clone(),
                        if n.lease_alive { "alive" } else { "expired" }.to_string(),
                        n.docker_host.clone(),
                        n.address.clone(),
                        n.cpus.to_string(),
                        bytes(n.memory_bytes),
                        n.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]);
                }
                output::print_table(
                    &t,
                    "no nodes; add one with `lain node add NAME DOCKER_HOST`",
                );
            }
        }
        NodeCmd::Drain { name } => {
            g.client()?
                .call_empty::<()>(
                    Method::POST,
                    &format!("/nodes/{}/drain", seg("node", &name)?),
                    None,
                    &[],
                )
                .await?;
            if !g.json() {
                println!("node {name} is draining; its instances move to other nodes");
            }
        }
        NodeCmd::Rm { name } => {
            g.client()?
                .call_empty::<()>(
                    Method::DELETE,
                    &format!("/nodes/{}", seg("node", &name)?),
                    None,
                    &[],
                )
                .await?;
            if !g.json() {
                println!("node {name} removed");
            }
        }
    }
    Ok(())
}

async fn routes(g: &Global) -> Result<(), CliError> {
    let client = g.client()?;
    if g.json() {
        output::print_json(&client.get_value("/routes").await?);
        return Ok(());
    }
    let list: Vec<RouteInfo> = client.get("/routes").await?;
    let mut t = Table::new(&["HOST", "PATH", "APP", "PROC", "HTTPS ONLY"]);
    for r in &list {
        t.row(vec![
            r.host.clone(),
            r.path.clone(),
            r.app.clone(),
            r.proc.clone(),
            yes_no(r.https_only),
        ]);
    }
    output::print_table(&t, "no routes");
    Ok(())
}

async fn cert(a: CertArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        CertCmd::Add { name, cert, key } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| CliError::local(format!("cannot read {}: {e}", p.display())))
            };
            let req = UploadCertRequest {
                name,
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
            };
            let c: CertInfo = g.client()?.call(Method::POST, "/certs", &req).await?;
            if g.json() {
                output::print_json(&c);
            } else {
                println!(
                    "certificate {} for {} (valid until {}) uploaded",
                    c.name,
                    c.hosts.join(", "),
                    c.not_after
                );
            }
        }
        CertCmd::Ls => {
            let list: Vec<CertInfo> = g.client()?.get("/certs").await?;
            if g.json() {
                output::print_json(&list);
            } else {
                let mut t = Table::new(&["NAME", "HOSTS", "NOT AFTER"]);
                for c in &list {
                    t.row(vec![c.name.clone(), c.hosts.join(","), c.not_after.clone()]);
                }
                output::print_table(&t, "no certificates");
            }
        }
    }
    Ok(())
}

async fn token(a: TokenArgs) -> Result<(), CliError> {
    let g = &a.g;
    let client = g.client()?;
    match a.cmd {
        TokenCmd::Create { user, description } => {
            let user = match user {
                Some(u) => u,
                None => client.get::<WhoAmI>("/whoami").await?.user,
            };
            let t: CreatedToken = client
                .call(
                    Method::POST,
                    "/tokens",
                    &CreateTokenRequest { user, description },
                )
                .await?;
            if g.json() {
                output::print_json(&t);
            } else {
                println!("token {} for {}:", t.id, t.user);
                println!("{}", t.token);
                eprintln!(
                    "it is shown only now; use it with `lain login --server {} --token TOKEN`",
                    client.server()
                );
            }
        }
        TokenCmd::Ls => {
            let list: Vec<TokenInfo> = client.get("/tokens").await?;
            if g.json() {
                output::print_json(&list);
            } else {
                let mut t = Table::new(&["ID", "USER", "CREATED", "DESCRIPTION"]);
                for k in &list {
                    t.row(vec![
                        k.id.clone(),
                        k.user.clone(),
                        k.created_at.clone(),
                        k.description.clone(),
                    ]);
                }
                output::print_table(&t, "no tokens");
            }
        }
        TokenCmd::Revoke { id } => {
            client
                .call_empty::<()>(
                    Method::DELETE,
                    &format!("/tokens/{}", seg("token id", &id)?),
                    None,
                    &[],
                )
                .await?;
            if !g.json() {
                println!("token {id} revoked");
            }
        }
    }
    Ok(())
}

async fn user(a: UserArgs) -> Result<(), CliError> {
    let g = &a.g;
    match a.cmd {
        UserCmd::Add { name, admin } => {
            let u: UserInfo = g
                .client()?
                .call(
                    Method::POST,
                    "/users",
                    &CreateUserRequest {
                        name: name.clone(),
                        admin,
                    },
                )
                .await?;
            if g.json() {
                output::print_json(&u);
            } else {
                println!(
                    "user {}{} created; give them a token with `lain token create {}`",
                    u.name,
                    if u.admin { " (admin)" } else { "" },
                    u.name
                );
            }
        }
    }
    Ok(())
}

//! `lain build`: turns an app directory with a lain.yaml into a release image on a Docker
//! engine, the way LAIN's lain-cli did: the app is copied to `/lain/app` in `build.base`,
//! `build.prepare.script` and `build.script` run there one line at a time, and the release
//! image is `release.dest_base` with the `release.copy` entries taken from the build result
//! (or the build result itself when there is no `release:`). The image is tagged
//! `{app}:release-{version}` with LAIN's version string `{commit-unix-time}-{commit-sha}`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptions, CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    LogsOptionsBuilder, PushImageOptionsBuilder, RemoveContainerOptionsBuilder,
    TagImageOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::StreamExt;

use crate::docker::{LABEL_APP, LABEL_VERSION};
use crate::lainyaml::{APP_DIR, LainConf, LocatedError};

/// The label holding the full commit the image was built from.
pub const LABEL_COMMIT: &str = "lain.commit";

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The app directory, holding `lain.yaml`; it must be inside a git work tree.
    pub dir: PathBuf,
    /// The Docker engine: `unix:///path` or `tcp://host:port`.
    pub docker_host: String,
    /// Push the release image to this registry (`host:port`) after building it.
    pub push: Option<String>,
    /// Build even when the directory has uncommitted changes; the version then names a
    /// commit that does not hold exactly what was built.
    pub allow_dirty: bool,
}

/// Progress reported while building, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// The version was computed from git.
    Version(String),
    /// A build step starts: `stage` is `prepare` or `script`, `index` counts from 1.
    Step {
        /// `prepare` or `script`.
        stage: &'static str,
        /// The 1-based line number within the stage.
        index: usize,
        /// The shell line.
        command: String,
    },
    /// One line the step printed (stdout and stderr).
    Output(String),
    /// A `release.copy` entry is copied into the release image.
    Copy {
        /// Path in the build image.
        src: String,
        /// Path in the release image.
        dest: String,
    },
    /// An image was tagged.
    Tagged(String),
    /// The release image was pushed to a registry under this name.
    Pushed(String),
}

/// What a successful build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// The app name from lain.yaml.
    pub app: String,
    /// LAIN's version, `{commit-unix-time}-{commit-sha}`.
    pub version: String,
    /// The release image, `{app}:release-{version}`.
    pub image: String,
    /// The build image, `{app}:build-{version}`.
    pub build_image: String,
    /// The name the release image was pushed under, if it was.
    pub pushed: Option<String>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `lain.yaml` could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// `lain.yaml` is invalid; every error is listed.
    #[error("lain.yaml is invalid:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<LocatedError>),
    /// lain.yaml has no `build:` section.
    #[error("{0}: lain.yaml has no build: section, so there is nothing to build (add build.base)")]
    NoBuild(String),
    /// The version could not be taken from git.
    #[error("cannot compute the version from git in {}: {message}", .dir.display())]
    Git {
        /// The app directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The work tree has changes that are not committed.
    #[error(
        "{} has uncommitted changes, so the version would not name what is built; commit them or pass --allow-dirty:\n{}",
        .dir.display(), .files.join("\n")
    )]
    Dirty {
        /// The app directory.
        dir: PathBuf,
        /// `git status --porcelain` lines.
        files: Vec<String>,
    },
    /// The app directory could not be packed.
    #[error("cannot pack {}: {source}", .path.display())]
    Pack {
        /// The file or directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The Docker host is not a supported address.
    #[error("docker host {0:?} is neither unix:// nor tcp://")]
    DockerHost(String),
    /// A Docker call failed.
    #[error("docker: {what}: {source}")]
    Docker {
        /// The operation.
        what: String,
        /// The bollard error.
        #[source]
        source: bollard::errors::Error,
    },
    /// A build step exited non-zero.
    #[error("build.{stage}[{index}] `{command}` failed with exit code {code}")]
    Step {
        /// `prepare` or `script`.
        stage: &'static str,
        /// The 1-based line number within the stage.
        index: usize,
        /// The shell line.
        command: String,
        /// Its exit code.
        code: i64,
    },
    /// A `release.copy` source does not exist in the build image.
    #[error("release.copy: {src} does not exist in the build image ({message})")]
    Copy {
        /// The source path.
        src: String,
        /// Docker's message.
        message: String,
    },
    /// Pushing the release image failed.
    #[error("pushing {image} failed: {message}")]
    Push {
        /// The image name in the registry.
        image: String,
        /// The registry's message.
        message: String,
    },
}

fn docker_err(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Docker { what, source }
}

/// Connects (lazily) to the engine at `host`.
pub fn connect(host: &str) -> Result<Docker, BuildError> {
    let err = docker_err(format!("connecting to {host}"));
    if host.starts_with("unix://") {
        Docker::connect_with_unix(host, 600, bollard::API_DEFAULT_VERSION).map_err(err)
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        Docker::connect_with_http(&format!("http://{addr}"), 600, bollard::API_DEFAULT_VERSION)
            .map_err(err)
    } else {
        Err(BuildError::DockerHost(host.to_string()))
    }
}

/// Reads and validates `{dir}/lain.yaml`.
pub fn read_lain_yaml(dir: &Path) -> Result<LainConf, BuildError> {
    let path = dir.join("lain.yaml");
    let text = std::fs::read_to_string(&path).map_err(|source| BuildError::Read {
        path: path.clone(),
        source,
    })?;
    // The build does not depend on the cluster's domains; any valid domain expands the
    // mountpoints well enough to validate the file.
    LainConf::parse("lain.yaml", &text, &["lain.local".to_string()]).map_err(BuildError::Invalid)
}

/// LAIN's version of the commit checked out in `dir`: `{commit-unix-time}-{commit-sha}`.
/// Fails when `dir` is not in a git work tree, and when it has uncommitted changes unless
/// `allow_dirty`.
pub fn git_version(dir: &Path, allow_dirty: bool) -> Result<String, BuildError> {
    let git = |args: &[&str]| -> Result<String, BuildError> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .map_err(|e| BuildError::Git {
                dir: dir.to_path_buf(),
                message: format!("cannot run git: {e}"),
            })?;
        if !out.status.success() {
            return Err(BuildError::Git {
                dir: dir.to_path_buf(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let version = git(&["log", "-1", "--format=%ct-%H"])?;
    if !valid_version(&version) {
        return Err(BuildError::Git {
            dir: dir.to_path_buf(),
            message: format!("unexpected `git log` output {version:?}"),
        });
    }
    if !allow_dirty {
        let status = git(&["status", "--porcelain", "--", "."])?;
        if !status.is_empty() {
            return Err(BuildError::Dirty {
                dir: dir.to_path_buf(),
                files: status.lines().map(str::to_string).collect(),
            });
        }
    }
    Ok(version)
}

fn valid_version(v: &str) -> bool {
    match v.split_once('-') {
        Some((t, sha)) => {
            !t.is_empty()
                && t.chars().all(|c| c.is_ascii_digit())
                && sha.len() >= 40
                && sha.chars().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Packs `dir` (without `.git`) as a tar whose entries sit under `lain/app/`, to be
/// extracted at `/` so `/lain/app` need not exist in the base image.
pub fn pack_app(dir: &Path) -> Result<Vec<u8>, BuildError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let root = Path::new(APP_DIR.trim_start_matches('/'));
    let pack = |path: &Path, source| BuildError::Pack {
        path: path.to_path_buf(),
        source,
    };
    b.append_dir(root, dir).map_err(|e| pack(dir, e))?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries = std::fs::read_dir(&d)
            .map_err(|e| pack(&d, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pack(&d, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            if d == dir && e.file_name() == ".git" {
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            let name = root.join(rel);
            let ft = e.file_type().map_err(|err| pack(&path, err))?;
            if ft.is_dir() {
                b.append_dir(&name, &path).map_err(|err| pack(&path, err))?;
                stack.push(path);
            } else {
                b.append_path_with_name(&path, &name)
                    .map_err(|err| pack(&path, err))?;
            }
        }
    }
    b.into_inner().map_err(|e| pack(dir, e))
}

/// Rewrites a tar that Docker's archive endpoint returned for a path (whose entries start
/// with the path's last component) so its entries start with `dest` instead, relative to `/`.
fn rebase_tar(data: &[u8], dest: &str) -> std::io::Result<Vec<u8>> {
    let dest = Path::new(dest.trim_start_matches('/'));
    let mut out = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let mut comps = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir));
        comps.next();
        let rest: PathBuf = comps.collect();
        let name = if rest.as_os_str().is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(rest)
        };
        let mut header = entry.header().clone();
        let link = entry.link_name()?.map(|l| l.into_owned());
        match link {
            Some(link) => out.append_link(&mut header, &name, link)?,
            None => out.append_data(&mut header, &name, &mut entry)?,
        }
    }
    out.into_inner()
}

/// Builds the release image of the app in `opts.dir`, reporting progress to `on_event`.
pub async fn build(
    opts: &BuildOptions,
    mut on_event: impl FnMut(BuildEvent),
) -> Result<BuildOutput, BuildError> {
    let conf = read_lain_yaml(&opts.dir)?;
    let Some(b) = conf.build.clone() else {
        return Err(BuildError::NoBuild(opts.dir.display().to_string()));
    };
    let version = git_version(&opts.dir, opts.allow_dirty)?;
    on_event(BuildEvent::Version(version.clone()));
    let app_tar = Bytes::from(pack_app(&opts.dir)?);
    let docker = connect(&opts.docker_host)?;
    let env: Vec<String> = b.build_arg.clone();

    // The app is copied into the base image without running anything, so every step,
    // prepare and script alike, starts from an image that holds it.
    let base_cmd = image_cmd(&docker, &b.base).await?;
    let seed = create(
        &docker,
        &conf.appname,
        &b.base,
        vec!["/bin/sh".into()],
        &env,
        HashMap::new(),
    )
    .await?;
    let seeded = async {
        docker
            .upload_to_container(
                &seed,
                Some(UploadToContainerOptionsBuilder::new().path("/").build()),
                bollard::body_full(app_tar),
            )
            .await
            .map_err(docker_err("copying the app into the build container"))?;
        commit(&docker, &seed, None, None, &base_cmd, HashMap::new()).await
    }
    .await;
    remove(&docker, &seed).await;
    let mut image = seeded?;

    let prepare = b.prepare.iter().flat_map(|p| p.script.iter());
    let steps = prepare
        .enumerate()
        .map(|(i, c)| ("prepare", i + 1, c.clone()))
        .chain(
            b.script
                .iter()
                .enumerate()
                .map(|(i, c)| ("script", i + 1, c.clone())),
        );
    for (stage, index, command) in steps {
        on_event(BuildEvent::Step {
            stage,
            index,
            command: command.clone(),
        });
        image = run_step(
            &docker,
            &conf.appname,
            &image,
            (stage, index, &command),
            &env,
            &base_cmd,
            &mut on_event,
        )
        .await?;
    }
    let build_image = format!("{}:build-{version}", conf.appname);
    docker
        .tag_image(
            &image,
            Some(
                TagImageOptionsBuilder::new()
                    .repo(&conf.appname)
                    .tag(&format!("build-{version}"))
                    .build(),
            ),
        )
        .await
        .map_err(docker_err(format!("tagging {build_image}")))?;
    on_event(BuildEvent::Tagged(build_image.clone()));

    let labels = HashMap::from([
        (LABEL_APP.to_string(), conf.appname.clone()),
        (LABEL_VERSION.to_string(), version.clone()),
        (
            LABEL_COMMIT.to_string(),
            version
                .split_once('-')
                .map(|v| v.1)
                .unwrap_or("")
                .to_string(),
        ),
    ]);
    let release = conf.release.clone().unwrap_or_default();
    let dest_base = release.dest_base.clone().unwrap_or_else(|| image.clone());
    let dest_cmd = if release.dest_base.is_some() {
        image_cmd(&docker, &dest_base).await?
    } else {
        base_cmd.clone()
    };
    let tag = format!("release-{version}");
    let src = create(
        &docker,
        &conf.appname,
        &image,
        vec!["/bin/sh".into()],
        &[],
        HashMap::new(),
    )
    .await?;
    let dest = match create(
        &docker,
        &conf.appname,
        &dest_base,
        dest_cmd.clone(),
        &[],
        labels.clone(),
    )
    .await
    {
        Ok(d) => d,
        Err(e) => {
            remove(&docker, &src).await;
            return Err(e);
        }
    };
    let released = async {
        for c in &release.copy {
            let from = absolute(&c.src);
            let to = absolute(&c.dest);
            on_event(BuildEvent::Copy {
                src: from.clone(),
                dest: to.clone(),
            });
            let mut stream = docker.download_from_container(
                &src,
                Some(
                    DownloadFromContainerOptionsBuilder::new()
                        .path(&from)
                        .build(),
                ),
            );
            let mut data = Vec::new();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        message,
                    }) => {
                        return Err(BuildError::Copy {
                            src: from.clone(),
                            message,
                        });
                    }
                    Err(e) => return Err(docker_err(format!("reading {from}"))(e)),
                }
            }
            let data = rebase_tar(&data, &to).map_err(|e| BuildError::Pack {
                path: PathBuf::from(&from),
                source: e,
            })?;
            docker
                .upload_to_container(
                    &dest,
                    Some(UploadToContainerOptionsBuilder::new().path("/").build()),
                    bollard::body_full(Bytes::from(data)),
                )
                .await
                .map_err(docker_err(format!("copying {from} to {to}")))?;
        }
        commit(
            &docker,
            &dest,
            Some(&conf.appname),
            Some(&tag),
            &dest_cmd,
            labels.clone(),
        )
        .await
    }
    .await;
    remove(&docker, &src).await;
    remove(&docker, &dest).await;
    released?;
    let release_image = format!("{}:{tag}", conf.appname);
    on_event(BuildEvent::Tagged(release_image.clone()));

    let pushed = match &opts.push {
        Some(registry) => {
            let name = push(&docker, registry, &conf.appname, &tag).await?;
            on_event(BuildEvent::Pushed(name.clone()));
            Some(name)
        }
        None => None,
    };
    Ok(BuildOutput {
        app: conf.appname,
        version,
        image: release_image,
        build_image,
        pushed,
    })
}

/// A path in the build container: relative paths are relative to `/lain/app`.
fn absolute(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{APP_DIR}/{}", p.trim_start_matches("./"))
    }
}

/// The command of an image, so committed step images get it back instead of the step's.
async fn image_cmd(docker: &Docker, image: &str) -> Result<Vec<String>, BuildError> {
    let i = docker.inspect_image(image).await.map_err(|e| match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => BuildError::Docker {
            what: format!(
                "image {image} is not on the engine (import or pull it first, e.g. tests/services/docker.sh start imports lain/busybox:latest)"
            ),
            source: e,
        },
        e => docker_err(format!("inspecting {image}"))(e),
    })?;
    Ok(i.config
        .and_then(|c| c.cmd)
        .unwrap_or_else(|| vec!["/bin/sh".into()]))
}

async fn create(
    docker: &Docker,
    app: &str,
    image: &str,
    cmd: Vec<String>,
    env: &[String],
    labels: HashMap<String, String>,
) -> Result<String, BuildError> {
    // Named after the app, so a build's leftovers are easy to find and remove.
    let name = format!("lain-build-{app}-{}", uuid_like());
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(cmd),
        env: Some(env.to_vec()),
        labels: Some(labels),
        working_dir: Some(APP_DIR.to_string()),
        host_config: Some(HostConfig {
            // The engines lain uses have no bridge network; build steps share the host's.
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await
        .map(|r| r.id)
        .map_err(docker_err(format!("creating a container from {image}")))
}

fn uuid_like() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

async fn remove(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    if let Err(e) = docker.remove_container(id, Some(opts)).await {
        tracing::warn!(container = id, error = %e, "cannot remove a build container");
    }
}

async fn commit(
    docker: &Docker,
    id: &str,
    repo: Option<&str>,
    tag: Option<&str>,
    cmd: &[String],
    labels: HashMap<String, String>,
) -> Result<String, BuildError> {
    let opts = CommitContainerOptions {
        container: Some(id.to_string()),
        repo: repo.map(str::to_string),
        tag: tag.map(str::to_string),
        pause: false,
        ..Default::default()
    };
    let config = ContainerConfig {
        cmd: Some(cmd.to_vec()),
        labels: (!labels.is_empty()).then_some(labels),
        working_dir: Some(APP_DIR.to_string()),
        ..Default::default()
    };
    docker
        .commit_container(opts, config)
        .await
        .map(|r| r.id)
        .map_err(docker_err("committing a build step"))
}

async fn run_step(
    docker: &Docker,
    app: &str,
    image: &str,
    (stage, index, command): (&'static str, usize, &str),
    env: &[String],
    base_cmd: &[String],
    on_event: &mut impl FnMut(BuildEvent),
) -> Result<String, BuildError> {
    let cmd = vec!["/bin/sh".into(), "-c".into(), command.to_string()];
    let id = create(docker, app, image, cmd, env, HashMap::new()).await?;
    let result = async {
        docker
            .start_container(&id, None)
            .await
            .map_err(docker_err(format!("starting build.{stage}[{index}]")))?;
        let mut logs = docker.logs(
            &id,
            Some(
                LogsOptionsBuilder::new()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        let mut pending = String::new();
        while let Some(chunk) = logs.next().await {
            let Ok(chunk) = chunk else { break };
            pending.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            while let Some(i) = pending.find('\n') {
                let line: String = pending.drain(..=i).collect();
                on_event(BuildEvent::Output(line.trim_end().to_string()));
            }
        }
        if !pending.is_empty() {
            on_event(BuildEvent::Output(pending.trim_end().to_string()));
        }
        let mut wait = docker.wait_container(
            &id,
            Some(
                WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build(),
            ),
        );
        let code = match wait.next().await {
            Some(Ok(r)) => r.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(docker_err(format!("waiting for build.{stage}[{index}]"))(e));
            }
            None => 0,
        };
        if code != 0 {
            return Err(BuildError::Step {
                stage,
                index,
                command: command.to_string(),
                code,
            });
        }
        commit(docker, &id, None, None, base_cmd, HashMap::new()).await
    }
    .await;
    remove(docker, &id).await;
    result
}

/// Tags `{app}:{tag}` as `{registry}/{app}:{tag}` and pushes it; returns the pushed name.
pub async fn push(
    docker: &Docker,
    registry: &str,
    app: &str,
    tag: &str,
) -> Result<String, BuildError> {
    let repo = format!("{}/{app}", registry.trim_end_matches('/'));
    let name = format!("{repo}:{tag}");
    docker
        .tag_image(
            &format!("{app}:{tag}"),
            Some(TagImageOptionsBuilder::new().repo(&repo).tag(tag).build()),
        )
        .await
        .map_err(docker_err(format!("tagging {name}")))?;
    // Recent engines refuse a push without an X-Registry-Auth header, even an empty one.
    let mut stream = docker.push_image(
        &repo,
        Some(PushImageOptionsBuilder::new().tag(tag).build()),
        Some(bollard::auth::DockerCredentials::default()),
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    return Err(BuildError::Push {
                        image: name,
                        message: detail.message.unwrap_or_default(),
                    });
                }
            }
            Err(e) => {
                return Err(BuildError::Push {
                    image: name,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_paths() {
        assert!(valid_version(
            "1700000000-0123456789abcdef0123456789abcdef01234567"
        ));
        assert!(!valid_version("1700000000"));
        assert!(!valid_version("x-0123456789abcdef0123456789abcdef01234567"));
        assert!(!valid_version("1700000000-short"));
        assert_eq!(absolute("www"), "/lain/app/www");
        assert_eq!(absolute("./www"), "/lain/app/www");
        assert_eq!(absolute("/usr/bin/x"), "/usr/bin/x");
    }

    #[test]
    fn rebased_entries_land_at_the_destination() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "www", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(2);
        b.append_data(&mut h, "www/index.html", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let out = rebase_tar(&data, "/srv/site").unwrap();
        let mut a = tar::Archive::new(&out[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["srv/site", "srv/site/index.html"]);
    }

    #[test]
    fn packing_skips_git_and_roots_at_lain_app() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".git/objects")).unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("lain.yaml"), "appname: x\n").unwrap();
        let data = pack_app(dir.path()).unwrap();
        let mut a = tar::Archive::new(&data[..]);
        let mut names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "lain/app",
                "lain/app/lain.yaml",
                "lain/app/sub",
                "lain/app/sub/a.txt"
            ]
        );
    }
}

//! The Docker source: finds containers through the Docker API (a list, then the events
//! stream) and tails each one's json-file log from its `LogPath` with the file source in
//! Docker format, so container logs get the same checkpoints and rotation handling as files.
//!
//! Metadata comes from the labels the control plane sets: `lain.app`, `lain.proc`,
//! `lain.podgroup`, `lain.instance`, `lain.version`.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures::StreamExt;
use lain_common::Shutdown;
use tokio::task::JoinHandle;

use crate::checkpoint::Checkpoints;
use crate::event::Meta;
use crate::metrics::Metrics;
use crate::pipeline::Dispatcher;
use crate::source::file::{self, FileSourceSettings, Format};

/// The container labels lain reads, as the control plane sets them.
pub const LABEL_APP: &str = "lain.app";
/// See [`LABEL_APP`].
pub const LABEL_PROC: &str = "lain.proc";
/// See [`LABEL_APP`].
pub const LABEL_PODGROUP: &str = "lain.podgroup";
/// See [`LABEL_APP`].
pub const LABEL_INSTANCE: &str = "lain.instance";
/// See [`LABEL_APP`].
pub const LABEL_VERSION: &str = "lain.version";

/// Where the control plane mounts an instance's log volume (`logs:` of lain.yaml).
pub const LOG_DIR: &str = "/lain/logs";
/// An optional label listing the declared log files, comma-separated and relative to
/// [`LOG_DIR`]; without it every file of the log volume is shipped.
pub const LABEL_LOGS: &str = "lain.logs";
/// The source name (metric label) of files in instances' log volumes.
pub const LOG_DIR_SOURCE: &str = "lain-logs";

/// Settings of the Docker source.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// `unix:///path` of the engine's socket.
    pub host: String,
    /// Only containers carrying the `lain.app` label.
    pub only_lain: bool,
    /// Settings every container's reader starts from (paths and meta are filled in).
    pub template: FileSourceSettings,
}

/// Builds a container's metadata from its labels.
pub fn container_meta(
    template: &Meta,
    id: &str,
    name: &str,
    image: Option<&str>,
    labels: &HashMap<String, String>,
) -> Meta {
    let l = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
    let mut m = template.clone();
    m.app = l(LABEL_APP);
    m.proc_name = l(LABEL_PROC);
    m.podgroup = l(LABEL_PODGROUP);
    m.instance = l(LABEL_INSTANCE);
    m.version = l(LABEL_VERSION);
    m.container_id = Some(id.to_string());
    m.container_name = Some(name.trim_start_matches('/').to_string());
    m.image = image.map(str::to_string);
    if let Some(pg) = &m.podgroup {
        m.dataset = pg.clone();
    }
    m
}

/// Runs the Docker source until shutdown.
pub async fn run(
    settings: DockerSettings,
    dispatcher: Dispatcher,
    checkpoints: Checkpoints,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let mut tails: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut dirs: HashMap<String, LogDirTail> = HashMap::new();
    let mut attempt = 0;
    let mut first_listing = true;
    while !shutdown.is_triggered() {
        let docker = match Docker::connect_with_unix(
            &settings.host,
            30,
            bollard::API_DEFAULT_VERSION,
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(host = %settings.host, error = %e, "cannot connect to Docker; retrying");
                crate::sink::backoff(attempt).await;
                attempt += 1;
                continue;
            }
        };
        // Older engines refuse a newer API version than theirs; agree on one first.
        let docker = match docker.negotiate_version().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(host = %settings.host, error = %e, "cannot reach Docker; retrying");
                crate::sink::backoff(attempt).await;
                attempt += 1;
                continue;
            }
        };
        // Subscribe before listing so a container started in between is not missed.
        let mut filters = HashMap::new();
        filters.insert("type".to_string(), vec!["container".to_string()]);
        filters.insert("event".to_string(), vec!["start".to_string()]);
        let mut events = docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                // Stopped containers too: their last lines may not be shipped yet.
                all: true,
                ..Default::default()
            }))
            .await;
        match listed {
            Ok(list) => {
                attempt = 0;
                // Only containers there when logship starts may start at the end of their
                // logs (`read_from_end`); later ones were started since and are read whole.
                for c in list {
                    if let Some(id) = c.id {
                        start(
                            &docker,
                            &id,
                            &settings,
                            first_listing,
                            &mut tails,
                            &mut dirs,
                            &dispatcher,
                            &checkpoints,
                            &metrics,
                            &shutdown,
                        )
                        .await;
                    }
                }
                first_listing = false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers; retrying");
                crate::sink::backoff(attempt).await;
                attempt += 1;
                continue;
            }
        }
        loop {
            let ev = tokio::select! {
                _ = shutdown.wait() => break,
                ev = events.next() => ev,
            };
            match ev {
                Some(Ok(ev)) => {
                    if let Some(id) = ev.actor.and_then(|a| a.id) {
                        start(
                            &docker,
                            &id,
                            &settings,
                            false,
                            &mut tails,
                            &mut dirs,
                            &dispatcher,
                            &checkpoints,
                            &metrics,
                            &shutdown,
                        )
                        .await;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Docker events stream failed; reconnecting");
                    break;
                }
                None => break,
            }
            tails.retain(|_, t| !t.is_finished());
        }
        if !shutdown.is_triggered() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    for (_, t) in tails {
        let _ = t.await;
    }
    for (_, d) in dirs {
        let _ = d.task.await;
    }
}

/// The reader of one instance's log volume, and the container whose metadata it uses.
struct LogDirTail {
    container: String,
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// The paths to read in a log volume mounted from `dir`: the declared files of the
/// `lain.logs` label (and their rotated copies), else every file in it.
pub fn log_dir_paths(dir: &str, declared: Option<&str>) -> Vec<String> {
    let dir = dir.trim_end_matches('/');
    let declared: Vec<&str> = declared
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        // The control plane refuses absolute paths and `..`; never read outside the volume.
        .filter(|f| !f.is_empty() && !f.starts_with('/') && !f.split('/').any(|s| s == ".."))
        .collect();
    if declared.is_empty() {
        return vec![format!("{dir}/*")];
    }
    declared
        .iter()
        .flat_map(|f| [format!("{dir}/{f}"), format!("{dir}/{f}.*")])
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn start(
    docker: &Docker,
    id: &str,
    settings: &DockerSettings,
    at_start: bool,
    tails: &mut HashMap<String, JoinHandle<()>>,
    dirs: &mut HashMap<String, LogDirTail>,
    dispatcher: &Dispatcher,
    checkpoints: &Checkpoints,
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    if tails.get(id).is_some_and(|t| !t.is_finished()) {
        return;
    }
    let info = match docker.inspect_container(id, None).await {
        Ok(i) => i,
        Err(e) => {
            // Removed between the event and the inspection: nothing to read.
            tracing::debug!(container = id, error = %e, "cannot inspect container");
            return;
        }
    };
    let log_path = info.log_path.clone().filter(|p| !p.is_empty());
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    if settings.only_lain && !labels.contains_key(LABEL_APP) {
        return;
    }
    let image = info.config.as_ref().and_then(|c| c.image.clone());
    let meta = container_meta(
        &settings.template.meta,
        id,
        info.name.as_deref().unwrap_or(id),
        image.as_deref(),
        &labels,
    );
    // The instance's log volume: the files lain.yaml declares under /lain/logs. The volume
    // outlives the container, so its reader keeps going after the container is gone (the
    // next container of the instance takes it over with fresh metadata, resuming from the
    // checkpoints).
    let log_dir = info
        .mounts
        .as_ref()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m.destination.as_deref() == Some(LOG_DIR))
                .and_then(|m| m.source.clone())
        })
        .filter(|d| !d.is_empty());
    if let Some(dir) = log_dir
        && dirs
            .get(&dir)
            .is_none_or(|d| d.container != id || d.task.is_finished())
    {
        let mut s = settings.template.clone();
        s.read_from_end = settings.template.read_from_end && at_start;
        s.meta = meta.clone();
        s.meta.source = LOG_DIR_SOURCE.into();
        s.paths = log_dir_paths(&dir, labels.get(LABEL_LOGS).map(String::as_str));
        s.format = Format::Plain;
        s.exit_when_idle = false;
        let stop = shutdown.child();
        let previous = dirs.remove(&dir);
        let (d, c, m, st) = (
            dispatcher.clone(),
            checkpoints.clone(),
            metrics.clone(),
            stop.clone(),
        );
        tracing::info!(container = id, dir = %dir, "tailing the instance's log volume");
        let task = tokio::spawn(async move {
            // Hand over from the previous container's reader once it has let go.
            if let Some(p) = previous {
                p.stop.trigger();
                let _ = p.task.await;
            }
            file::run(s, d, c, m, st).await;
        });
        dirs.insert(
            dir,
            LogDirTail {
                container: id.to_string(),
                stop,
                task,
            },
        );
    }
    let Some(log_path) = log_path else {
        tracing::info!(
            container = id,
            "container has no json-file log; not shipping its output"
        );
        return;
    };
    let mut s = settings.template.clone();
    s.read_from_end = settings.template.read_from_end && at_start;
    s.meta = meta;
    // The live log and the copies Docker's rotation renames it to.
    s.paths = vec![log_path.clone(), format!("{log_path}.*")];
    s.format = Format::DockerJson;
    s.exit_when_idle = true;
    tracing::info!(container = id, log = %log_path, "tailing container log");
    let task = tokio::spawn(file::run(
        s,
        dispatcher.clone(),
        checkpoints.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tails.insert(id.to_string(), task);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_lain_fields() {
        let mut labels = HashMap::new();
        labels.insert(LABEL_APP.to_string(), "hello".to_string());
        labels.insert(LABEL_PROC.to_string(), "web".to_string());
        labels.insert(LABEL_PODGROUP.to_string(), "hello.web.web".to_string());
        labels.insert(LABEL_INSTANCE.to_string(), "2".to_string());
        labels.insert(LABEL_VERSION.to_string(), "".to_string());
        let t = Meta {
            source: "docker".into(),
            dataset: "docker".into(),
            host: "node1".into(),
            ..Meta::default()
        };
        let m = container_meta(&t, "abc", "/hello.web.web.2", Some("busybox"), &labels);
        assert_eq!(m.app.as_deref(), Some("hello"));
        assert_eq!(m.podgroup.as_deref(), Some("hello.web.web"));
        assert_eq!(m.instance.as_deref(), Some("2"));
        assert_eq!(m.version, None);
        assert_eq!(m.container_name.as_deref(), Some("hello.web.web.2"));
        assert_eq!(m.dataset, "hello.web.web");
        assert_eq!(m.key(), "hello.web.web.2");
    }

    #[test]
    fn log_volume_paths() {
        assert_eq!(log_dir_paths("/v/logs/", None), vec!["/v/logs/*"]);
        assert_eq!(
            log_dir_paths("/v/logs", Some("app.log, sub/x.log,/etc/passwd,../y,")),
            vec![
                "/v/logs/app.log",
                "/v/logs/app.log.*",
                "/v/logs/sub/x.log",
                "/v/logs/sub/x.log.*"
            ]
        );
    }
}

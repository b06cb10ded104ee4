//! Docker engines as nodes: listing the containers lain runs (found by their labels),
//! creating them with LAIN's names, environment and limits, and stopping and removing them.
//! Every call goes through bollard.

use std::collections::HashMap;
use std::net::IpAddr;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures::Stream;

/// The label naming the app; logship and the data plane rely on these label keys.
pub const LABEL_APP: &str = "lain.app";
/// The label naming the proc.
pub const LABEL_PROC: &str = "lain.proc";
/// The label naming the podgroup.
pub const LABEL_PODGROUP: &str = "lain.podgroup";
/// The label holding the instance number.
pub const LABEL_INSTANCE: &str = "lain.instance";
/// The label holding the app version.
pub const LABEL_VERSION: &str = "lain.version";
/// The label holding the proc type.
pub const LABEL_PROC_TYPE: &str = "lain.proc_type";
/// The label holding the drift (how often the instance moved).
pub const LABEL_DRIFT: &str = "lain.drift";
/// The label holding the instance's `PORT`, so an adopted container keeps its port.
pub const LABEL_PORT: &str = "lain.port";
/// The label holding the cluster's key prefix, so clusters sharing engines ignore each other.
pub const LABEL_CLUSTER: &str = "lain.cluster";

/// LAIN's container name: `{podgroup}.v{version}-i{n}-d{drift}`.
pub fn container_name(podgroup: &str, version: &str, instance: u32, drift: u32) -> String {
    format!("{podgroup}.v{version}-i{instance}-d{drift}")
}

/// LAIN's CPU level as a CFS quota per 100 ms period: level 0 is unlimited.
pub fn cpu_quota(level: u8) -> Option<i64> {
    (level > 0).then(|| i64::from(level) * 100_000 / 4)
}

/// Splits `repo:tag` (the tag defaulting to `latest`); a registry port is not a tag.
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Why a Docker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The address is not `unix://` or `tcp://`.
    #[error("docker host {0:?} is neither unix:// nor tcp://")]
    Address(String),
    /// The engine answered with an error or did not answer.
    #[error("docker {node}: {source}")]
    Api {
        /// The node.
        node: String,
        /// The bollard error.
        #[source]
        source: bollard::errors::Error,
    },
}

/// A container lain runs, as found on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Actual {
    /// The node it runs on.
    pub node: String,
    /// The container id.
    pub id: String,
    /// The container name, without the leading `/`.
    pub name: String,
    /// The app.
    pub app: String,
    /// The proc name.
    pub proc_name: String,
    /// The proc type.
    pub proc_type: String,
    /// The instance number.
    pub instance: u32,
    /// The app version.
    pub version: String,
    /// The drift.
    pub drift: u32,
    /// The instance's `PORT`.
    pub port: Option<u16>,
    /// Its address on a Docker network (bridge mode); `None` in host mode.
    pub ip: Option<IpAddr>,
    /// Whether it is running.
    pub running: bool,
}

/// What the control plane asks a node to run.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The container name.
    pub name: String,
    /// The image.
    pub image: String,
    /// The command, the image's when empty.
    pub cmd: Vec<String>,
    /// The entrypoint, the image's when empty.
    pub entrypoint: Vec<String>,
    /// `NAME=VALUE` environment.
    pub env: Vec<String>,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Memory limit in bytes; swap is the same, so no swap is used.
    pub memory_bytes: u64,
    /// LAIN's CPU level.
    pub cpu: u8,
    /// `host:container` bind mounts.
    pub binds: Vec<String>,
    /// `host`, or the name of the Docker network the container joins.
    pub network_mode: String,
    /// The user.
    pub user: Option<String>,
    /// The working directory.
    pub workdir: Option<String>,
    /// Seconds between SIGTERM and SIGKILL.
    pub kill_timeout_secs: u32,
}

/// How a container ended, from `docker inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code.
    pub code: i64,
    /// Whether the kernel's OOM killer ended it.
    pub oom_killed: bool,
    /// Docker's error message, if any.
    pub error: String,
}

/// One Docker engine.
#[derive(Debug, Clone)]
pub struct NodeClient {
    /// The node name.
    pub name: String,
    /// `unix://...` or `tcp://...`.
    pub docker_host: String,
    /// Where its instances are reached.
    pub address: IpAddr,
    /// The registry (`host:port`) images missing on this node are pulled from.
    pub registry: Option<String>,
    docker: Docker,
}

impl NodeClient {
    /// Connects (lazily: bollard opens connections per request) to an engine.
    pub fn connect(
        name: &str,
        docker_host: &str,
        address: IpAddr,
    ) -> Result<NodeClient, DockerError> {
        let api = |source| DockerError::Api {
            node: name.to_string(),
            source,
        };
        let docker = if docker_host.starts_with("unix://") {
            Docker::connect_with_unix(docker_host, 30, bollard::API_DEFAULT_VERSION).map_err(api)?
        } else if let Some(addr) = docker_host.strip_prefix("tcp://") {
            Docker::connect_with_http(&format!("http://{addr}"), 30, bollard::API_DEFAULT_VERSION)
                .map_err(api)?
        } else {
            return Err(DockerError::Address(docker_host.to_string()));
        };
        Ok(NodeClient {
            name: name.to_string(),
            docker_host: docker_host.to_string(),
            address,
            registry: None,
            docker,
        })
    }

    /// Pulls images this node lacks from `registry` (`host:port`) before running them.
    pub fn with_registry(mut self, registry: Option<String>) -> NodeClient {
        self.registry = registry;
        self
    }

    /// Pulls `{registry}/{image}` and tags it `{image}`, so containers name the image as
    /// lain.yaml and the deploy do, whichever node built it.
    async fn pull_from_registry(&self, registry: &str, image: &str) -> Result<(), DockerError> {
        use futures::StreamExt;
        let (repo, tag) = split_image(image);
        let remote = format!("{}/{repo}", registry.trim_end_matches('/'));
        tracing::info!(node = %self.name, image, registry, "pulling a missing image");
        let opts = CreateImageOptionsBuilder::new()
            .from_image(&remote)
            .tag(tag)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.api(e))?;
            if let Some(detail) = info.error_detail {
                return Err(self.api(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    message: format!(
                        "pulling {remote}:{tag}: {}",
                        detail.message.unwrap_or_default()
                    ),
                }));
            }
        }
        let opts = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
        self.docker
            .tag_image(&format!("{remote}:{tag}"), Some(opts))
            .await
            .map_err(|e| self.api(e))
    }

    fn api(&self, source: bollard::errors::Error) -> DockerError {
        DockerError::Api {
            node: self.name.clone(),
            source,
        }
    }

    /// Changes the memory limit and CPU level of a running container.
    pub async fn update_limits(
        &self,
        id: &str,
        memory_bytes: u64,
        cpu: u8,
    ) -> Result<(), DockerError> {
        let memory = i64::try_from(memory_bytes).ok();
        let body = bollard::models::ContainerUpdateBody {
            memory,
            memory_swap: memory,
            cpu_period: cpu_quota(cpu).map(|_| 100_000),
            cpu_quota: cpu_quota(cpu),
            ..Default::default()
        };
        self.docker
            .update_container(id, body)
            .await
            .map_err(|e| self.api(e))
    }

    /// The tags `{app}:release-*` present on this engine with their creation time (Unix
    /// seconds).
    pub async fn release_images(&self, app: &str) -> Result<Vec<(String, i64)>, DockerError> {
        let filters = HashMap::from([("reference".to_string(), vec![format!("{app}:release-*")])]);
        let opts = bollard::query_parameters::ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(opts))
            .await
            .map_err(|e| self.api(e))?;
        let prefix = format!("{app}:release-");
        Ok(images
            .into_iter()
            .flat_map(|i| {
                let created = i.created;
                i.repo_tags
                    .into_iter()
                    .filter(|t| t.starts_with(&prefix))
                    .map(move |t| (t, created))
            })
            .collect())
    }

    /// Checks the engine answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| self.api(e))
    }

    /// Every container of `cluster` on this node, running or not.
    pub async fn list(&self, cluster: &str) -> Result<Vec<Actual>, DockerError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_CLUSTER}={cluster}")])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.api(e))?;
        let mut out = Vec::new();
        for c in list {
            let labels = c.labels.unwrap_or_default();
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let Ok(instance) = get(LABEL_INSTANCE).parse::<u32>() else {
                continue;
            };
            let Some(id) = c.id else { continue };
            // In bridge mode the instance is reached at its address on its network; host
            // networking gives it none.
            let ip = c
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|nets| {
                    nets.into_values()
                        .filter_map(|e| e.ip_address)
                        .find_map(|a| a.parse::<IpAddr>().ok())
                });
            out.push(Actual {
                node: self.name.clone(),
                name: c
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                id,
                app: get(LABEL_APP),
                proc_name: get(LABEL_PROC),
                proc_type: get(LABEL_PROC_TYPE),
                instance,
                version: get(LABEL_VERSION),
                drift: get(LABEL_DRIFT).parse().unwrap_or(0),
                port: get(LABEL_PORT).parse().ok(),
                ip,
                running: matches!(
                    c.state,
                    Some(
                        ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING
                    )
                ),
            });
        }
        Ok(out)
    }

    /// Creates and starts a container; returns its id. A container left over under the same
    /// name (from a crash between create and start) is removed first.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            entrypoint: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            user: spec.user.clone(),
            working_dir: spec.workdir.clone(),
            stop_timeout: Some(i64::from(spec.kill_timeout_secs)),
            host_config: Some(HostConfig {
                memory: i64::try_from(spec.memory_bytes).ok(),
                memory_swap: i64::try_from(spec.memory_bytes).ok(),
                cpu_period: cpu_quota(spec.cpu).map(|_| 100_000),
                cpu_quota: cpu_quota(spec.cpu),
                binds: Some(spec.binds.clone()),
                network_mode: Some(spec.network_mode.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let mut created = self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await;
        // A node that lacks the image gets it from the registry, when there is one.
        if let (
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }),
            Some(registry),
        ) = (&created, &self.registry)
        {
            self.pull_from_registry(registry, &spec.image).await?;
            created = self
                .docker
                .create_container(Some(opts.clone()), body.clone())
                .await;
        }
        let created = match created {
            Ok(c) => c,
            Err(
                e @ bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                },
            ) => {
                // Only a leftover of this cluster is removed: clusters sharing an engine
                // must never remove each other's containers.
                let cluster = spec.labels.get(LABEL_CLUSTER);
                let ours = self
                    .docker
                    .inspect_container(&spec.name, None)
                    .await
                    .ok()
                    .and_then(|c| c.config)
                    .and_then(|c| c.labels)
                    .is_some_and(|l| l.get(LABEL_CLUSTER) == cluster);
                if !ours {
                    return Err(self.api(e));
                }
                self.remove(&spec.name).await?;
                self.docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(|e| self.api(e))?
            }
            Err(e) => return Err(self.api(e)),
        };
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(self.api(e));
        }
        Ok(created.id)
    }

    /// Stops a container, giving it `timeout_secs` after SIGTERM.
    pub async fn stop(&self, id: &str, timeout_secs: u32) -> Result<(), DockerError> {
        let opts = StopContainerOptionsBuilder::new()
            .t(i32::try_from(timeout_secs).unwrap_or(10))
            .build();
        match self.docker.stop_container(id, Some(opts)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(self.api(e)),
        }
    }

    /// Removes a container, running or not; a container already gone is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(self.api(e)),
        }
    }

    /// How a stopped container ended.
    pub async fn exit_info(&self, id: &str) -> Result<ExitInfo, DockerError> {
        let c = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| self.api(e))?;
        let s = c.state.unwrap_or_default();
        Ok(ExitInfo {
            code: s.exit_code.unwrap_or(0),
            oom_killed: s.oom_killed.unwrap_or(false),
            error: s.error.unwrap_or_default(),
        })
    }

    /// The engine's container events for `cluster`, as a stream of container ids.
    pub fn events(&self, cluster: &str) -> impl Stream<Item = Result<String, DockerError>> + use<> {
        use futures::StreamExt;
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", vec![format!("{LABEL_CLUSTER}={cluster}")]),
        ]);
        let opts = EventsOptionsBuilder::new().filters(&filters).build();
        let name = self.name.clone();
        self.docker.events(Some(opts)).map(move |e| match e {
            Ok(m) => Ok(m.actor.and_then(|a| a.id).unwrap_or_default()),
            Err(source) => Err(DockerError::Api {
                node: name.clone(),
                source,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lain_names_and_quotas() {
        assert_eq!(
            container_name("hello.web.web", "3", 2, 0),
            "hello.web.web.v3-i2-d0"
        );
        assert_eq!(cpu_quota(0), None);
        assert_eq!(cpu_quota(4), Some(100_000));
        assert!(NodeClient::connect("n", "ssh://x", "127.0.0.1".parse().unwrap()).is_err());
        assert_eq!(split_image("hello:release-1-ab"), ("hello", "release-1-ab"));
        assert_eq!(split_image("lain/busybox"), ("lain/busybox", "latest"));
        assert_eq!(
            split_image("127.0.0.1:23500/hello"),
            ("127.0.0.1:23500/hello", "latest")
        );
    }
}

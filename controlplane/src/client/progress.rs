//! The live display of a deploy, rollback or scale: polls the app's instances, deploys and
//! events, prints each new event as it happens and one status line (new instances
//! starting and healthy, old ones draining), and ends with the outcome.
//!
//! On a terminal the status line is redrawn in place on stderr; otherwise it is printed
//! only when it changes, so logs of CI jobs stay readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::CliError;
use super::http::ApiClient;
use crate::api::types::{DeployEntry, EventEntry, InstanceInfo};

/// How often the server is asked.
const POLL: Duration = Duration::from_millis(500);

/// What the rollout must reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// The deploy entry `seq` reaches `succeeded` (or fails).
    Deploy {
        /// The deploy's sequence number.
        seq: u64,
        /// The version being rolled out.
        version: String,
    },
    /// The proc runs exactly `instances` healthy instances.
    Scale {
        /// The proc.
        proc_name: String,
        /// The wanted number of instances.
        instances: u32,
    },
}

/// How a followed rollout ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether the goal was reached.
    pub ok: bool,
    /// A one-line summary.
    pub summary: String,
    /// The final deploy entry, for deploys.
    pub entry: Option<DeployEntry>,
}

impl Outcome {
    /// Exit 0 with the summary printed, or exit code 6 with it as the error.
    pub fn into_result(self, what: &str) -> Result<(), CliError> {
        if self.ok {
            println!("{what} {}", self.summary);
            Ok(())
        } else {
            Err(CliError::deploy_failed(format!("{what} {}", self.summary)))
        }
    }
}

/// Follows one app.
#[derive(Debug)]
pub struct Watcher {
    client: ApiClient,
    /// The app.
    pub app: String,
    last_event: u64,
}

/// `web#2` for an event about an instance, `web` for one about a proc, `-` otherwise.
pub fn instance_label(e: &EventEntry) -> String {
    match (&e.proc_name, e.instance) {
        (Some(p), Some(i)) => format!("{p}#{i}"),
        (Some(p), None) => p.clone(),
        _ => "-".into(),
    }
}

/// Counts of the instances for the status line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Instances of the new version (or of the proc, when scaling) that have a container.
    pub running: u32,
    /// Of those, how many pass their health check.
    pub healthy: u32,
    /// Of those, how many are published.
    pub serving: u32,
    /// Instances of other versions still present.
    pub old: u32,
    /// Instances waiting for a node.
    pub pending: u32,
}

/// Counts `list` against the goal.
pub fn count(list: &[InstanceInfo], goal: &Goal) -> Counts {
    let mut c = Counts::default();
    for i in list {
        if i.pending.is_some() && i.container_id.is_none() {
            c.pending += 1;
            continue;
        }
        if i.container_id.is_none() {
            continue;
        }
        let current = match goal {
            Goal::Deploy { version, .. } => i.version.as_deref() == Some(version.as_str()),
            Goal::Scale { proc_name, .. } => &i.proc_name == proc_name,
        };
        if current {
            c.running += 1;
            c.healthy += u32::from(i.healthy);
            c.serving += u32::from(i.serving);
        } else if matches!(goal, Goal::Deploy { .. }) {
            c.old += 1;
        }
    }
    c
}

impl Watcher {
    /// Starts watching `app`: remembers the newest event so only later ones are shown.
    /// Fails (404) when the app does not exist, before anything is changed.
    pub async fn start(client: &ApiClient, app: &str) -> Result<Watcher, CliError> {
        let events: Vec<EventEntry> = client.get(&format!("/apps/{app}/events")).await?;
        Ok(Watcher {
            client: client.clone(),
            app: app.to_string(),
            last_event: events.iter().map(|e| e.seq).max().unwrap_or(0),
        })
    }

    /// Polls until the goal is reached, fails, or `limit` passes; prints progress to
    /// stderr when `show`.
    pub async fn follow(
        mut self,
        goal: Goal,
        limit: Duration,
        show: bool,
    ) -> Result<Outcome, CliError> {
        let tty = show && std::io::stderr().is_terminal();
        let start = Instant::now();
        let mut last_line = String::new();
        let mut last_failure = String::new();
        let app = self.app.clone();
        loop {
            let events: Vec<EventEntry> = self.client.get(&format!("/apps/{app}/events")).await?;
            let seen = self.last_event;
            for e in events.iter().filter(|e| e.seq > seen) {
                if e.kind == "deploy-failed" || e.kind == "crashed" || e.kind == "oom-killed" {
                    last_failure = format!("{} {}: {}", e.kind, instance_label(e), e.message);
                }
                if show {
                    let clear = if tty { "\r\x1b[K" } else { "" };
                    eprintln!(
                        "{clear}  {}  {:<12} {:<10} {}",
                        e.at.get(11..19).unwrap_or(&e.at),
                        e.kind,
                        instance_label(e),
                        e.message
                    );
                }
                self.last_event = self.last_event.max(e.seq);
            }
            let list: Vec<InstanceInfo> =
                self.client.get(&format!("/apps/{app}/instances")).await?;
            let c = count(&list, &goal);
            let (done, entry) = match &goal {
                Goal::Deploy { seq, .. } => {
                    let deploys: Vec<DeployEntry> =
                        self.client.get(&format!("/apps/{app}/deploys")).await?;
                    let entry = deploys.into_iter().find(|d| d.seq == *seq);
                    let done = entry
                        .as_ref()
                        .map(|d| d.outcome.as_str())
                        .filter(|o| *o != "started")
                        .map(|o| o == "succeeded");
                    (done, entry)
                }
                Goal::Scale {
                    proc_name,
                    instances,
                } => {
                    let beyond = list.iter().any(|i| {
                        &i.proc_name == proc_name
                            && i.instance > *instances
                            && i.container_id.is_some()
                    });
                    let reached = c.running == *instances && c.healthy == *instances && !beyond;
                    (reached.then_some(true), None)
                }
            };
            let line = status_line(&goal, &c, start.elapsed());
            if show && line != last_line {
                if tty {
                    eprint!("\r\x1b[K{line}");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("{line}");
                }
                last_line = line.clone();
            }
            if let Some(ok) = done {
                if tty {
                    eprintln!();
                }
                let summary = match (&goal, &entry) {
                    (Goal::Deploy { seq, version }, Some(_)) if ok => {
                        format!(
                            "#{seq} of version {version} succeeded: {} healthy",
                            c.healthy
                        )
                    }
                    (Goal::Deploy { seq, version }, Some(d)) => format!(
                        "#{seq} of version {version} {}{}; the previous version keeps serving (see `lain events {app}`)",
                        d.outcome,
                        if last_failure.is_empty() {
                            String::new()
                        } else {
                            format!(" ({last_failure})")
                        }
                    ),
                    (
                        Goal::Scale {
                            proc_name,
                            instances,
                        },
                        _,
                    ) => {
                        format!("of {app}.{proc_name} done: {instances} healthy")
                    }
                    _ => String::new(),
                };
                return Ok(Outcome { ok, summary, entry });
            }
            if start.elapsed() >= limit {
                if tty {
                    eprintln!();
                }
                return Ok(Outcome {
                    ok: false,
                    summary: format!(
                        "did not finish within {}s ({line}); it goes on on the server: follow it with `lain ps {app}` and `lain events {app}`",
                        limit.as_secs()
                    ),
                    entry,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn status_line(goal: &Goal, c: &Counts, elapsed: Duration) -> String {
    let mut s = match goal {
        Goal::Deploy { .. } => format!(
            "[{:>3}s] new: {} started, {} healthy, {} serving; old: {} draining",
            elapsed.as_secs(),
            c.running,
            c.healthy,
            c.serving,
            c.old
        ),
        Goal::Scale { instances, .. } => format!(
            "[{:>3}s] {}/{} running, {} healthy",
            elapsed.as_secs(),
            c.running,
            instances,
            c.healthy
        ),
    };
    if c.pending > 0 {
        s.push_str(&format!("; {} pending", c.pending));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(proc_name: &str, n: u32, version: &str, healthy: bool) -> InstanceInfo {
        InstanceInfo {
            proc_name: proc_name.into(),
            instance: n,
            node: Some("node1".into()),
            container_id: Some(format!("c{n}{version}")),
            container_name: None,
            version: Some(version.into()),
            address: Some("127.0.0.1".into()),
            port: Some(20000),
            healthy,
            serving: healthy,
            restarts: 0,
            last_exit: None,
            pending: None,
        }
    }

    #[test]
    fn counts_split_new_and_old_versions() {
        let list = vec![
            inst("web", 1, "v2", true),
            inst("web", 2, "v2", false),
            inst("web", 1, "v1", true),
            InstanceInfo {
                container_id: None,
                pending: Some("no node has room".into()),
                ..inst("web", 3, "v2", false)
            },
        ];
        let goal = Goal::Deploy {
            seq: 2,
            version: "v2".into(),
        };
        let c = count(&list, &goal);
        assert_eq!(
            c,
            Counts {
                running: 2,
                healthy: 1,
                serving: 1,
                old: 1,
                pending: 1
            }
        );
        let line = status_line(&goal, &c, Duration::from_secs(3));
        assert_eq!(
            line,
            "[  3s] new: 2 started, 1 healthy, 1 serving; old: 1 draining; 1 pending"
        );
        let scale = Goal::Scale {
            proc_name: "web".into(),
            instances: 3,
        };
        assert_eq!(count(&list, &scale).running, 3);
    }
}

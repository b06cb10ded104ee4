//! The command-line entry of `lain logship`: Config → validate → build → run → drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lain_common::admin::Admin;
use lain_common::{RunError, Shutdown};

use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::event::{Meta, Processing};
use crate::metrics::Metrics;
use crate::pipeline::Dispatcher;
use crate::sink;
use crate::source::file::FileSourceSettings;

/// Arguments of `lain logship`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 64 with every error otherwise.
    #[arg(long)]
    pub check_config: bool,
    /// Run as the indexer: consume the Kafka topics of `[indexer]` into Elasticsearch.
    #[arg(long)]
    pub indexer: bool,
}

/// Runs the component until it is shut down.
pub fn run(args: Args) -> Result<(), RunError> {
    lain_common::telemetry::init(lain_common::telemetry::LogFormat::Text);
    let Some(path) = args.config else {
        return Err(RunError::Config(lain_common::ConfigErrors {
            file: "(command line)".into(),
            errors: vec![lain_common::ConfigError::at(
                "",
                "--config FILE is required",
            )],
        }));
    };
    let config: Config = lain_common::load_config(&path)?;
    if args.indexer && config.indexer.is_none() {
        return Err(RunError::Config(lain_common::ConfigErrors {
            file: path.display().to_string(),
            errors: vec![lain_common::ConfigError::at(
                "indexer",
                "--indexer needs an [indexer] section",
            )],
        }));
    }
    if args.check_config {
        println!("{}: configuration is valid", path.display());
        return Ok(());
    }
    lain_common::limits::raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(run_config(config, args.indexer))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A configured sink, before it runs.
struct SinkStart {
    /// The metric label and buffer directory name.
    name: &'static str,
    /// Its disk buffer's size; 0 for none.
    buffer_max_bytes: u64,
    /// Spawns the sink on the receiving end of its queue.
    start: Box<dyn FnOnce(crate::pipeline::BatchReceiver) -> tokio::task::JoinHandle<()>>,
}

fn failed(what: &str) -> impl Fn(String) -> RunError + '_ {
    move |e| RunError::Failed(format!("{what}: {e}"))
}

/// Builds every part from a validated config and runs until SIGTERM or SIGINT.
pub async fn run_config(config: Config, indexer: bool) -> Result<(), RunError> {
    let shutdown = Shutdown::on_signals();
    // Build: IO starts here.
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| failed("cannot create state_dir")(e.to_string()))?;
    let checkpoints = Checkpoints::load(&config.state_dir.join("checkpoints.json"))
        .map_err(|e| RunError::Failed(e.to_string()))?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry);
    let node = config.node.clone().unwrap_or_else(host_name);
    let limits = &config.limits;

    let mut sinks: Vec<SinkStart> = Vec::new();
    let dead_dir = config.state_dir.join("dead-letters");
    if let Some(k) = config.sinks.kafka.as_ref().filter(|_| !indexer) {
        let settings = sink::kafka::KafkaSinkSettings {
            brokers: k.brokers.clone(),
            topic: k.topic.clone(),
            compression: k.compression.clone(),
            linger_ms: k.linger_ms,
            message_timeout_secs: k.message_timeout_secs,
            inflight_batches: k.inflight_batches,
            dead_letter_path: k
                .dead_letter_path
                .clone()
                .unwrap_or_else(|| dead_dir.join("kafka.ndjson")),
            properties: k.properties.clone().into_iter().collect(),
        };
        let producer = sink::kafka::producer(&settings)
            .map_err(|e| failed("cannot create the Kafka producer")(e.to_string()))?;
        let m = metrics.clone();
        sinks.push(SinkStart {
            name: "kafka",
            buffer_max_bytes: k.buffer_max_bytes,
            start: Box::new(move |rx| tokio::spawn(sink::kafka::run(producer, settings, rx, m))),
        });
    }
    if let Some(e) = &config.sinks.elasticsearch {
        let settings = sink::elasticsearch::EsSinkSettings {
            url: e.url.clone(),
            index_prefix: e.index_prefix.clone(),
            bulk_max_bytes: e.bulk_max_bytes,
            flush_interval: Duration::from_millis(e.flush_interval_ms),
            timeout: Duration::from_secs(e.timeout_secs),
            dead_letter_path: e
                .dead_letter_path
                .clone()
                .unwrap_or_else(|| dead_dir.join("elasticsearch.ndjson")),
        };
        let es = sink::elasticsearch::EsSink::connect(settings, metrics.clone())
            .await
            .map_err(failed("cannot set up Elasticsearch"))?;
        sinks.push(SinkStart {
            name: "elasticsearch",
            buffer_max_bytes: e.buffer_max_bytes,
            start: Box::new(move |rx| tokio::spawn(es.run(rx))),
        });
    }
    let file_sink = match (&config.sinks.file, sinks.is_empty() && !indexer) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => Some(crate::config::FileSink {
            path: None,
            max_bytes: 256 * 1024 * 1024,
            max_files: 4,
            fsync: true,
        }),
        (None, false) => None,
    };
    if let Some(f) = file_sink {
        let settings = sink::file::FileSinkSettings {
            path: f
                .path
                .unwrap_or_else(|| config.state_dir.join("out").join("logship.ndjson")),
            max_bytes: f.max_bytes,
            max_files: f.max_files,
            fsync: f.fsync,
        };
        let m = metrics.clone();
        // A local file needs no disk buffer in front of it.
        sinks.push(SinkStart {
            name: "file",
            buffer_max_bytes: 0,
            start: Box::new(move |rx| tokio::spawn(sink::file::run(settings, rx, m))),
        });
    }
    // In agent mode a sink with a disk buffer gets a stage in front of it; the stage takes
    // one batch at a time from the dispatcher and holds the sink's queue itself. In indexer
    // mode Kafka is the buffer: nothing is committed before Elasticsearch acknowledged it.
    let buffered = |s: &SinkStart| s.buffer_max_bytes > 0 && !indexer;
    let capacities: Vec<usize> = sinks
        .iter()
        .map(|s| if buffered(s) { 1 } else { limits.queue_batches })
        .collect();
    let (dispatcher, receivers) = Dispatcher::new(&capacities, metrics.buffer_events.clone());
    let mut sink_tasks = Vec::new();
    for (s, rx) in sinks.into_iter().zip(receivers) {
        if !buffered(&s) {
            sink_tasks.push((s.start)(rx));
            continue;
        }
        let dir = config.state_dir.join("buffer").join(s.name);
        let disk = crate::buffer::DiskBuffer::open(
            &dir,
            s.buffer_max_bytes,
            crate::buffer::SEGMENT_MAX_BYTES,
        )
        .map_err(|e| failed("cannot open the disk buffer")(e.to_string()))?;
        let (tx, sink_rx) = tokio::sync::mpsc::channel(limits.queue_batches.max(1));
        let gauges = crate::buffer::BufferGauges {
            bytes: metrics.disk_buffer_bytes.with_label_values(&[s.name]),
            events: metrics.disk_buffer_events.with_label_values(&[s.name]),
            spilled: metrics.disk_buffer_spilled.with_label_values(&[s.name]),
        };
        let settings = crate::buffer::StageSettings {
            spill_after: Duration::from_millis(limits.buffer_spill_after_ms),
            drain: Duration::from_secs(limits.drain_timeout_secs.min(5)),
        };
        sink_tasks.push(tokio::spawn(crate::buffer::run_stage(
            rx,
            tx,
            disk,
            settings,
            metrics.buffer_events.clone(),
            gauges,
        )));
        sink_tasks.push((s.start)(sink_rx));
    }

    let pages = checkpoints.clone();
    let admin_addr = config
        .admin
        .listen
        .parse()
        .map_err(|_| RunError::Failed("admin.listen is not an address".into()))?;
    let addr = Admin::new(registry)
        .page(
            "/files",
            Arc::new(move || {
                (
                    http::StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&pages.entries()).unwrap_or_default(),
                )
            }),
        )
        .serve(admin_addr, shutdown.clone())
        .await
        .map_err(|e| failed("cannot bind the admin listener")(e.to_string()))?;
    lain_common::announce_listener("admin", addr);

    // Checkpoints: advanced and written about once a second, until the drain is over.
    let flusher_stop = Shutdown::new();
    let flusher = {
        let c = checkpoints.clone();
        let m = metrics.clone();
        let stop = flusher_stop.clone();
        let every = Duration::from_millis(limits.checkpoint_interval_ms);
        tokio::spawn(async move {
            loop {
                flush_checkpoints(&c, &m);
                tokio::select! {
                    _ = stop.wait() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
    };

    let mut sources = Vec::new();
    let mut indexer_task = None;
    if let Some(x) = config.indexer.as_ref().filter(|_| indexer) {
        let settings = crate::indexer::IndexerSettings {
            brokers: x.brokers.clone(),
            group_id: x.group_id.clone(),
            topics: x.topics.clone(),
            batch_max_events: limits.batch_max_events,
            batch_wait: Duration::from_millis(x.batch_wait_ms),
        };
        indexer_task = Some(tokio::spawn(crate::indexer::run(
            settings,
            dispatcher.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    for f in config.files.iter().filter(|_| !indexer) {
        let meta = Meta {
            source: f.name.clone(),
            dataset: f.dataset.clone().unwrap_or_else(|| match f.format {
                crate::config::LineFormat::ProxyAccess => "lain.access".into(),
                crate::config::LineFormat::Plain => f.name.clone(),
            }),
            host: node.clone(),
            path: None,
            app: f.app.clone(),
            proc_name: f.proc.clone(),
            podgroup: f.podgroup.clone(),
            instance: f.instance.clone(),
            version: f.version.clone(),
            // LAIN named the access-log topic after the node: `{host}.access`.
            topic: f.topic.clone().or_else(|| {
                (f.format == crate::config::LineFormat::ProxyAccess)
                    .then(|| "{host}.access".to_string())
            }),
            ..Meta::default()
        };
        let settings = FileSourceSettings {
            paths: f.paths.clone(),
            meta,
            multiline_start: f
                .multiline_start
                .as_deref()
                .and_then(|r| regex::bytes::Regex::new(r).ok()),
            multiline_timeout: Duration::from_millis(limits.multiline_timeout_ms),
            max_line_bytes: limits.max_line_bytes,
            processing: Processing {
                parse_json: f.parse_json,
                access_log: f.format == crate::config::LineFormat::ProxyAccess,
            },
            read_from_end: f.read_from_end,
            batch_max_events: limits.batch_max_events,
            batch_max_bytes: limits.batch_max_bytes,
            poll_interval: Duration::from_millis(limits.poll_interval_ms),
            scan_interval: Duration::from_millis(limits.scan_interval_ms),
            rotate_wait: Duration::from_millis(limits.rotate_wait_ms),
            format: crate::source::file::Format::Plain,
            exit_when_idle: false,
        };
        sources.push(tokio::spawn(crate::source::file::run(
            settings,
            dispatcher.clone(),
            checkpoints.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(d) = config.docker.as_ref().filter(|_| !indexer) {
        let template = FileSourceSettings {
            paths: Vec::new(),
            meta: Meta {
                source: "docker".into(),
                dataset: "docker".into(),
                host: node.clone(),
                ..Meta::default()
            },
            multiline_start: None,
            multiline_timeout: Duration::from_millis(limits.multiline_timeout_ms),
            max_line_bytes: limits.max_line_bytes,
            processing: Processing {
                parse_json: true,
                access_log: false,
            },
            read_from_end: d.read_from_end,
            batch_max_events: limits.batch_max_events,
            batch_max_bytes: limits.batch_max_bytes,
            poll_interval: Duration::from_millis(limits.poll_interval_ms),
            scan_interval: Duration::from_millis(limits.scan_interval_ms),
            rotate_wait: Duration::from_millis(limits.rotate_wait_ms),
            format: crate::source::file::Format::DockerJson,
            exit_when_idle: true,
        };
        sources.push(tokio::spawn(crate::source::docker::run(
            crate::source::docker::DockerSettings {
                host: d.host.clone(),
                only_lain: d.only_lain,
                template,
            },
            dispatcher.clone(),
            checkpoints.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    drop(dispatcher);
    tracing::info!(node = %node, sources = sources.len(), "lain logship running");

    if let Some(t) = indexer_task.as_mut() {
        tokio::select! {
            _ = shutdown.wait() => {}
            r = t => {
                if let Ok(Err(e)) = r {
                    return Err(RunError::Failed(e));
                }
                shutdown.trigger();
            }
        }
    }
    shutdown.wait().await;
    // Drain: sources stop reading and hand over what they have; the sink channels close
    // when the last source is gone; each sink delivers what it holds.
    let grace = Duration::from_secs(limits.drain_timeout_secs);
    let drained = lain_common::shutdown::with_grace(grace, async {
        for s in sources {
            let _ = s.await;
        }
        if let Some(t) = indexer_task
            && !t.is_finished()
        {
            let _ = t.await;
        }
        for s in sink_tasks {
            let _ = s.await;
        }
    })
    .await;
    if drained.is_none() {
        tracing::warn!("drain timed out; undelivered lines will be read again after the restart");
    }
    flusher_stop.trigger();
    let _ = flusher.await;
    flush_checkpoints(&checkpoints, &metrics);
    tracing::info!("lain logship stopped");
    Ok(())
}

fn flush_checkpoints(c: &Checkpoints, m: &Metrics) {
    c.advance();
    match c.write() {
        Ok(true) => m.checkpoints.inc(),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot write checkpoints"),
    }
    for (source, lag) in c.lag() {
        m.lag_bytes
            .with_label_values(&[source.as_str()])
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }
}

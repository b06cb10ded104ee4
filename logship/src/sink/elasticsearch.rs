//! The Elasticsearch sink: bulk `create` requests with deterministic ids into daily indices
//! `<prefix>-YYYY.MM.DD`, batched by size and time, with every item's status checked.
//!
//! Item outcomes: 2xx is done; 409 on `create` means the document is already there (a
//! retried batch); 429 and 5xx are retried with backoff; any other 4xx (such as a mapping
//! conflict) goes to the dead-letter file with the reason and is counted. The client crate
//! does not retry on its own; this module does.
//!
//! Daily indices, not a data stream: they behave the same on Elasticsearch and OpenSearch,
//! and `create` with an explicit `_id` deduplicates in both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::transport::Transport;
use serde_json::{Value, json};

use super::DeadLetters;
use crate::metrics::Metrics;
use crate::pipeline::{Batch, BatchReceiver};

/// Settings of the Elasticsearch sink.
#[derive(Debug, Clone)]
pub struct EsSinkSettings {
    /// Base URL.
    pub url: String,
    /// Index name prefix.
    pub index_prefix: String,
    /// Bulk request size at which it is sent.
    pub bulk_max_bytes: usize,
    /// Longest wait of an event before its bulk request is sent.
    pub flush_interval: Duration,
    /// Request timeout.
    pub timeout: Duration,
    /// Refused events.
    pub dead_letter_path: std::path::PathBuf,
}

/// Errors setting the sink up.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// The URL or transport is invalid.
    #[error("invalid Elasticsearch URL: {0}")]
    Url(String),
    /// A request failed.
    #[error("request to Elasticsearch failed: {0}")]
    Request(String),
    /// Elasticsearch answered with an error.
    #[error("Elasticsearch answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The response body.
        body: String,
    },
}

/// The index template: ECS fields typed, other strings as keywords, so Kibana works without
/// mapping by hand.
pub fn index_template(prefix: &str) -> Value {
    let kw = json!({"type": "keyword", "ignore_above": 1024});
    json!({
        "index_patterns": [format!("{prefix}-*")],
        "priority": 200,
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": {
                "dynamic_templates": [
                    {"strings_as_keywords": {"match_mapping_type": "string", "mapping": kw}}
                ],
                "properties": {
                    "@timestamp": {"type": "date"},
                    "message": {"type": "text"},
                    "stream": kw,
                    "tags": kw,
                    "log": {"properties": {
                        "level": kw,
                        "offset": {"type": "long"},
                        "file": {"properties": {"path": kw}}
                    }},
                    "service": {"properties": {"name": kw}},
                    "host": {"properties": {"name": kw}},
                    "event": {"properties": {"dataset": kw, "duration": {"type": "long"}}},
                    // The proxy's access lines (`format = "proxy_access"`), typed so that
                    // Kibana can filter on status ranges and client networks.
                    "source": {"properties": {"ip": {"type": "ip", "ignore_malformed": true}}},
                    "http": {"properties": {
                        "request": {"properties": {
                            "method": kw, "id": kw,
                            "body": {"properties": {"bytes": {"type": "long"}}}
                        }},
                        "response": {"properties": {
                            "status_code": {"type": "long"},
                            "body": {"properties": {"bytes": {"type": "long"}}}
                        }}
                    }},
                    "url": {"properties": {
                        "domain": kw, "original": kw, "path": kw, "query": kw
                    }},
                    "user_agent": {"properties": {"original": kw}},
                    "error": {"properties": {"message": {"type": "text"}}},
                    "container": {"properties": {
                        "id": kw, "name": kw, "image": {"properties": {"name": kw}}
                    }},
                    "lain": {"properties": {
                        "app": kw, "proc": kw, "podgroup": kw, "instance": kw, "version": kw,
                        "proxy": {"properties": {
                            "upstream": kw, "route": kw, "upstream_ms": {"type": "double"}
                        }}
                    }}
                }
            }
        }
    })
}

/// The search Kibana Discover sends, for `lain logs`: newest first, a time range on
/// `@timestamp`, an optional query string and term filters on the LAIN fields.
pub fn discover_query(
    app: &str,
    proc_name: Option<&str>,
    since: Duration,
    query: Option<&str>,
) -> Value {
    let mut filter = vec![
        json!({"range": {"@timestamp": {
            "gte": format!("now-{}s", since.as_secs().max(1)),
            "lte": "now",
            "format": "strict_date_optional_time"
        }}}),
        json!({"term": {"lain.app": app}}),
    ];
    if let Some(p) = proc_name {
        filter.push(json!({"term": {"lain.proc": p}}));
    }
    let must: Vec<Value> = query
        .filter(|q| !q.trim().is_empty())
        .map(|q| json!({"query_string": {"query": q, "analyze_wildcard": true, "default_field": "message"}}))
        .into_iter()
        .collect();
    json!({
        "size": 500,
        "sort": [{"@timestamp": {"order": "desc", "unmapped_type": "boolean"}}],
        "query": {"bool": {"must": must, "filter": filter}}
    })
}

/// The Elasticsearch sink.
#[derive(Debug)]
pub struct EsSink {
    client: Elasticsearch,
    settings: EsSinkSettings,
    metrics: Metrics,
    dead: DeadLetters,
}

/// What became of one bulk item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Indexed, or already there.
    Done,
    /// Try again later.
    Retry(String),
    /// Refused for good.
    Dead(String),
}

/// Classifies a bulk item's status and error.
pub fn classify(status: u16, error: Option<&Value>) -> ItemOutcome {
    let reason = || {
        error.map_or_else(
            || format!("status {status}"),
            |e| format!("status {status}: {e}"),
        )
    };
    match status {
        200..=299 | 409 => ItemOutcome::Done,
        429 | 500..=599 => ItemOutcome::Retry(reason()),
        _ => ItemOutcome::Dead(reason()),
    }
}

impl EsSink {
    /// Creates the client. No request is sent yet.
    pub async fn connect(settings: EsSinkSettings, metrics: Metrics) -> Result<EsSink, String> {
        let transport = Transport::single_node(&settings.url)
            .map_err(|e| EsError::Url(e.to_string()).to_string())?;
        Ok(EsSink {
            client: Elasticsearch::new(transport),
            dead: DeadLetters::new(&settings.dead_letter_path),
            settings,
            metrics,
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        ctype: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, EsError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        let resp = self
            .client
            .send(
                method,
                path,
                headers,
                None::<&()>,
                body,
                Some(self.settings.timeout),
            )
            .await
            .map_err(|e| EsError::Request(e.to_string()))?;
        let status = resp.status_code();
        let text = resp
            .text()
            .await
            .map_err(|e| EsError::Request(e.to_string()))?;
        if !status.is_success() {
            return Err(EsError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| EsError::Request(format!("invalid response: {e}")))
    }

    /// Installs the index template.
    pub async fn install_template(&self) -> Result<(), EsError> {
        let path = format!("/_index_template/{}", self.settings.index_prefix);
        let body =
            serde_json::to_vec(&index_template(&self.settings.index_prefix)).unwrap_or_default();
        self.request(Method::Put, &path, "application/json", Some(body))
            .await
            .map(|_| ())
    }

    fn index_of(&self, t: &chrono::DateTime<chrono::Utc>) -> String {
        format!("{}-{}", self.settings.index_prefix, t.format("%Y.%m.%d"))
    }

    /// Runs until the channel closes and every batch is delivered.
    pub async fn run(self, mut rx: BatchReceiver) {
        let mut attempt = 0;
        while let Err(e) = self.install_template().await {
            tracing::warn!(error = %e, "cannot install the index template; retrying");
            self.metrics
                .retries
                .with_label_values(&["elasticsearch"])
                .inc();
            super::backoff(attempt).await;
            attempt += 1;
        }
        let mut pending: Vec<Arc<Batch>> = Vec::new();
        let mut bytes = 0usize;
        let mut oldest: Option<Instant> = None;
        let mut open = true;
        while open || !pending.is_empty() {
            let deadline = oldest.map(|o| o + self.settings.flush_interval);
            let full = bytes >= self.settings.bulk_max_bytes;
            let due = deadline.is_some_and(|d| Instant::now() >= d);
            if !pending.is_empty() && (full || due || !open) {
                self.deliver(&pending).await;
                for b in pending.drain(..) {
                    b.ack.ack();
                }
                bytes = 0;
                oldest = None;
                continue;
            }
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), rx.recv()).await.ok(),
                    None => Some(rx.recv().await),
                }
            };
            match next.await {
                Some(Some(b)) => {
                    bytes += b.events.iter().map(|e| e.body.len() + 100).sum::<usize>();
                    oldest.get_or_insert_with(Instant::now);
                    pending.push(b);
                }
                Some(None) => open = false,
                None => {}
            }
        }
    }

    /// Delivers every event of the batches; returns when each is indexed or dead-lettered.
    async fn deliver(&self, batches: &[Arc<Batch>]) {
        let events: Vec<&crate::event::Event> =
            batches.iter().flat_map(|b| b.events.iter()).collect();
        // Requests still to make, in order; a refused request may be split in two.
        let mut requests: std::collections::VecDeque<Vec<usize>> =
            std::collections::VecDeque::from([(0..events.len()).collect::<Vec<usize>>()]);
        let mut attempt = 0u32;
        while let Some(todo) = requests.pop_front() {
            if todo.is_empty() {
                continue;
            }
            let mut body = Vec::with_capacity(todo.len() * 512);
            for &i in &todo {
                let e = events[i];
                let action = json!({"create": {"_index": self.index_of(&e.time), "_id": e.id}});
                body.extend_from_slice(&serde_json::to_vec(&action).unwrap_or_default());
                body.push(b'\n');
                body.extend_from_slice(&e.body);
                body.push(b'\n');
            }
            let sent = body.len() as u64;
            let resp = self
                .request(Method::Post, "/_bulk", "application/x-ndjson", Some(body))
                .await;
            let mut retry = Vec::new();
            match resp {
                Ok(v) => {
                    let items = v
                        .get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    if items.len() != todo.len() {
                        tracing::warn!(
                            sent = todo.len(),
                            got = items.len(),
                            "bulk response has the wrong number of items; retrying all"
                        );
                        retry = todo.clone();
                    } else {
                        let mut ok = 0u64;
                        for (item, &i) in items.iter().zip(&todo) {
                            let r = item.as_object().and_then(|o| o.values().next());
                            let status = r
                                .and_then(|r| r.get("status"))
                                .and_then(Value::as_u64)
                                .unwrap_or(0);
                            let outcome = classify(
                                u16::try_from(status).unwrap_or(0),
                                r.and_then(|r| r.get("error")),
                            );
                            match outcome {
                                ItemOutcome::Done => ok += 1,
                                ItemOutcome::Retry(_) => retry.push(i),
                                ItemOutcome::Dead(reason) => {
                                    self.dead_letter(&reason, &events[i].body).await
                                }
                            }
                        }
                        self.metrics
                            .lines_out
                            .with_label_values(&["elasticsearch"])
                            .inc_by(ok);
                        self.metrics
                            .bytes_out
                            .with_label_values(&["elasticsearch"])
                            .inc_by(sent);
                    }
                }
                Err(EsError::Status { status, .. })
                    if (status == 400 || status == 413) && todo.len() > 1 =>
                {
                    // The whole request was refused, not an item: too large for something
                    // in front of the cluster (413), or one line broke the request's
                    // framing (400). Halves are sent on their own until the request that
                    // is refused holds one event, which alone goes to the dead letters.
                    tracing::warn!(
                        status,
                        events = todo.len(),
                        "bulk request refused; sending it again in halves"
                    );
                    let (a, b) = todo.split_at(todo.len() / 2);
                    requests.push_front(b.to_vec());
                    requests.push_front(a.to_vec());
                }
                Err(EsError::Status { status, body })
                    if status != 429 && status < 500 && ![401, 403, 404, 408].contains(&status) =>
                {
                    // Refused as a request although it holds one event: that event is the
                    // cause, and it will not change on retry.
                    for &i in &todo {
                        self.dead_letter(
                            &format!("bulk request refused with {status}: {body}"),
                            &events[i].body,
                        )
                        .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bulk request failed; retrying");
                    retry = todo.clone();
                }
            }
            // Timeouts, throttling, server errors, and 401/403/404 (credentials or a proxy
            // being changed: nothing about the events) are tried again until they pass.
            if !retry.is_empty() {
                self.metrics
                    .retries
                    .with_label_values(&["elasticsearch"])
                    .inc_by(retry.len() as u64);
                super::backoff(attempt).await;
                attempt += 1;
                requests.push_front(retry);
            }
        }
    }

    async fn dead_letter(&self, reason: &str, body: &[u8]) {
        let mut attempt = 0;
        while let Err(err) = self.dead.write(reason, body) {
            tracing::error!(error = %err, "cannot write elasticsearch dead letter; retrying");
            super::backoff(attempt).await;
            attempt += 1;
        }
        self.metrics
            .dead_letters
            .with_label_values(&["elasticsearch"])
            .inc();
        self.dead.warn("elasticsearch", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_statuses_are_classified() {
        assert_eq!(classify(201, None), ItemOutcome::Done);
        assert_eq!(classify(409, None), ItemOutcome::Done);
        assert!(matches!(classify(429, None), ItemOutcome::Retry(_)));
        assert!(matches!(classify(503, None), ItemOutcome::Retry(_)));
        let e = json!({"type": "mapper_parsing_exception"});
        match classify(400, Some(&e)) {
            ItemOutcome::Dead(r) => assert!(r.contains("mapper_parsing_exception"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn discover_query_has_kibanas_shape() {
        let q = discover_query(
            "hello",
            Some("web"),
            Duration::from_secs(900),
            Some("level:error"),
        );
        let f = &q["query"]["bool"]["filter"];
        assert_eq!(f[0]["range"]["@timestamp"]["gte"], "now-900s");
        assert_eq!(f[1]["term"]["lain.app"], "hello");
        assert_eq!(f[2]["term"]["lain.proc"], "web");
        assert_eq!(
            q["query"]["bool"]["must"][0]["query_string"]["query"],
            "level:error"
        );
        assert_eq!(q["sort"][0]["@timestamp"]["order"], "desc");
        let bare = discover_query("hello", None, Duration::from_secs(60), None);
        assert_eq!(bare["query"]["bool"]["filter"].as_array().unwrap().len(), 2);
        assert!(bare["query"]["bool"]["must"].as_array().unwrap().is_empty());
    }
}

//! `lain logs`: prints an app's log lines, from Elasticsearch with the search Kibana Discover
//! sends, or from the local file sink's NDJSON files when no Elasticsearch is given;
//! `--follow` keeps polling for newer lines.

use std::collections::HashSet;
use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lain_common::RunError;
use serde_json::{Value, json};

/// Arguments of `lain logs`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The app whose lines are printed (`lain.app`).
    pub app: String,
    /// A Lucene query string on the lines, as typed in Kibana (`level:error AND timeout`).
    pub query: Option<String>,
    /// Only this proc (`lain.proc`).
    #[arg(long = "proc")]
    pub proc_name: Option<String>,
    /// Only this instance number (`lain.instance`).
    #[arg(long)]
    pub instance: Option<String>,
    /// How far back to look: `30s`, `15m`, `2h`, `1d`.
    #[arg(long, default_value = "15m", value_parser = parse_since)]
    pub since: Duration,
    /// Print at most this many of the newest lines.
    #[arg(short = 'n', long = "lines", default_value_t = 100)]
    pub lines: usize,
    /// Keep printing new lines, polling every `--poll-interval-ms`.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// With `--follow`: stop after this many seconds instead of running until interrupted.
    #[arg(long)]
    pub follow_timeout_secs: Option<u64>,
    /// With `--follow`: the polling interval.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Elasticsearch or OpenSearch base URL; `LAIN_LOGS_ES` by default.
    #[arg(long, env = "LAIN_LOGS_ES")]
    pub es: Option<String>,
    /// The index prefix the shipper writes (`<prefix>-YYYY.MM.DD`).
    #[arg(long, default_value = "lain-logs")]
    pub index_prefix: String,
    /// Without Elasticsearch: the local file sink's output file (rotated copies `.1`, `.2`
    /// are read too).
    #[arg(long, default_value = "/var/lib/lain/logship/out/logship.ndjson")]
    pub file: PathBuf,
}

/// Parses `90`, `30s`, `15m`, `2h`, `1d` into a duration.
pub fn parse_since(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 15m, 2h or 1d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// One line as printed: `TIME INSTANCE [STREAM] MESSAGE`.
pub fn format_line(doc: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let time = s(&doc["@timestamp"]);
    let who = match (
        doc["lain"]["podgroup"].as_str(),
        doc["lain"]["instance"].as_str(),
    ) {
        (Some(pg), Some(i)) => format!("{pg}.{i}"),
        _ => doc["container"]["name"]
            .as_str()
            .or(doc["log"]["file"]["path"].as_str())
            .unwrap_or("-")
            .to_string(),
    };
    let message = s(&doc["message"]);
    match doc["stream"].as_str() {
        Some("stderr") => format!("{time} {who} [stderr] {message}"),
        _ => format!("{time} {who} {message}"),
    }
}

/// The Discover-shaped search of these arguments, narrowed to an instance when asked.
pub fn search_body(args: &Args) -> Value {
    let mut q = crate::discover_query(
        &args.app,
        args.proc_name.as_deref(),
        args.since,
        args.query.as_deref(),
    );
    if let Some(i) = &args.instance
        && let Some(f) = q["query"]["bool"]["filter"].as_array_mut()
    {
        f.push(json!({"term": {"lain.instance": i}}));
    }
    q["size"] = json!(args.lines.clamp(1, 10_000));
    q["sort"] = sort("desc");
    q
}

/// Newest or oldest first. Elasticsearch keeps `@timestamp` to the millisecond, so lines of one
/// file read within the same millisecond are ordered by their offset in it.
fn sort(order: &str) -> Value {
    json!([
        {"@timestamp": {"order": order, "unmapped_type": "boolean"}},
        {"log.offset": {"order": order, "unmapped_type": "long"}}
    ])
}

/// Runs `lain logs`, printing to stdout.
pub fn run(args: Args) -> Result<(), RunError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.es.clone() {
        Some(es) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
            rt.block_on(from_es(&args, &es, &mut out))
        }
        None => from_file(&args, &mut out),
    }
}

fn failed(e: impl std::fmt::Display) -> RunError {
    RunError::Failed(e.to_string())
}

async fn search(
    client: &elasticsearch::Elasticsearch,
    index: &str,
    body: &Value,
) -> Result<Vec<Value>, RunError> {
    use elasticsearch::http::Method;
    use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
    // A 503 while an index's shards are still starting and a 429 under load are transient,
    // so they are retried a few times before the command gives up.
    let mut attempt = 0;
    let (status, text) = loop {
        attempt += 1;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let resp = client
            .send(
                Method::Post,
                &format!("/{index}/_search?ignore_unavailable=true&allow_no_indices=true"),
                headers,
                None::<&()>,
                Some(serde_json::to_vec(body).unwrap_or_default()),
                Some(Duration::from_secs(30)),
            )
            .await
            .map_err(|e| failed(format!("cannot reach Elasticsearch: {e}")))?;
        let status = resp.status_code();
        let text = resp.text().await.map_err(failed)?;
        if matches!(status.as_u16(), 429 | 503) && attempt < 5 {
            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            continue;
        }
        break (status, text);
    };
    if !status.is_success() {
        return Err(failed(format!(
            "Elasticsearch answered {}: {text}",
            status.as_u16()
        )));
    }
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| failed(format!("invalid answer from Elasticsearch: {e}")))?;
    Ok(v["hits"]["hits"].as_array().cloned().unwrap_or_default())
}

/// The newest time printed and the ids printed at that millisecond.
#[derive(Debug, Default)]
struct Seen {
    last_ms: Option<i64>,
    at_last: HashSet<String>,
}

impl Seen {
    fn print(&mut self, hits: &[Value], out: &mut impl Write) -> Result<(), RunError> {
        for h in hits {
            let id = h["_id"].as_str().unwrap_or_default().to_string();
            let ms = h["sort"][0].as_i64();
            if ms.is_some() && ms == self.last_ms && self.at_last.contains(&id) {
                continue;
            }
            if ms != self.last_ms {
                self.at_last.clear();
                self.last_ms = ms;
            }
            self.at_last.insert(id);
            writeln!(out, "{}", format_line(&h["_source"])).map_err(failed)?;
        }
        out.flush().map_err(failed)
    }
}

async fn from_es(args: &Args, es: &str, out: &mut impl Write) -> Result<(), RunError> {
    let transport = elasticsearch::http::transport::Transport::single_node(es)
        .map_err(|e| failed(format!("invalid Elasticsearch URL {es:?}: {e}")))?;
    let client = elasticsearch::Elasticsearch::new(transport);
    let index = format!("{}-*", args.index_prefix);
    let body = search_body(args);
    let mut hits = search(&client, &index, &body).await?;
    // Discover sorts newest first; a terminal shows the oldest first.
    hits.reverse();
    // `--follow` asks for lines at or after the newest time seen and skips the ids already
    // printed at that time, so lines sharing a millisecond are neither lost nor repeated.
    let mut seen = Seen::default();
    seen.print(&hits, out)?;
    if !args.follow {
        return Ok(());
    }
    let stop = args
        .follow_timeout_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    while stop.is_none_or(|s| Instant::now() < s) {
        tokio::time::sleep(Duration::from_millis(args.poll_interval_ms.max(50))).await;
        let mut body = search_body(args);
        body["sort"] = sort("asc");
        body["size"] = json!(1000);
        if let Some(ms) = seen.last_ms
            && let Some(f) = body["query"]["bool"]["filter"].as_array_mut()
        {
            f[0] = json!({"range": {"@timestamp": {"gte": ms, "format": "epoch_millis"}}});
        }
        let hits = search(&client, &index, &body).await?;
        seen.print(&hits, out)?;
    }
    Ok(())
}

/// Whether a document of the file sink matches the filters.
fn matches(args: &Args, doc: &Value, since: chrono::DateTime<chrono::Utc>) -> bool {
    let field = |a: &str, b: &str| doc[a][b].as_str();
    if field("lain", "app") != Some(args.app.as_str()) {
        return false;
    }
    if args.proc_name.is_some() && field("lain", "proc") != args.proc_name.as_deref() {
        return false;
    }
    if args.instance.is_some() && field("lain", "instance") != args.instance.as_deref() {
        return false;
    }
    let recent = doc["@timestamp"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t >= since);
    // Without Elasticsearch the query is a plain substring of the message.
    let text = args
        .query
        .as_deref()
        .is_none_or(|q| doc["message"].as_str().is_some_and(|m| m.contains(q)));
    recent && text
}

fn read_matching(
    args: &Args,
    path: &Path,
    from: u64,
    since: chrono::DateTime<chrono::Utc>,
    found: &mut Vec<Value>,
) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut r = std::io::BufReader::new(f);
    let mut pos = from;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        // A line still being written is read again on the next poll.
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(pos);
        }
        pos += n as u64;
        if let Ok(doc) = serde_json::from_slice::<Value>(&line)
            && matches(args, &doc, since)
        {
            found.push(doc);
        }
    }
}

fn from_file(args: &Args, out: &mut impl Write) -> Result<(), RunError> {
    let since = chrono::Utc::now()
        - chrono::Duration::from_std(args.since).unwrap_or(chrono::Duration::days(36500));
    let mut found = Vec::new();
    // Oldest rotated copy first: `.N` ... `.1`, then the live file.
    let mut copies: Vec<(u32, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (args.file.parent(), args.file.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        for e in std::fs::read_dir(dir)
            .map_err(|e| failed(format!("cannot read {}: {e}", dir.display())))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = n.strip_prefix(&prefix).and_then(|i| i.parse().ok()) {
                copies.push((i, e.path()));
            }
        }
    }
    copies.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (_, p) in &copies {
        // A copy rotated away meanwhile is simply skipped.
        let _ = read_matching(args, p, 0, since, &mut found);
    }
    let mut pos = read_matching(args, &args.file, 0, since, &mut found)
        .map_err(|e| failed(format!("cannot read {}: {e}", args.file.display())))?;
    found.sort_by(|a, b| a["@timestamp"].as_str().cmp(&b["@timestamp"].as_str()));
    let skip = found.len().saturating_sub(args.lines);
    for d in &found[skip..] {
        writeln!(out, "{}", format_line(d)).map_err(failed)?;
    }
    out.flush().map_err(failed)?;
    if !args.follow {
        return Ok(());
    }
    let stop = args
        .follow_timeout_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    while stop.is_none_or(|s| Instant::now() < s) {
        std::thread::sleep(Duration::from_millis(args.poll_interval_ms.max(50)));
        let size = std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0);
        if size < pos {
            // The sink rotated: the live file is new.
            pos = 0;
        }
        let mut new = Vec::new();
        pos = read_matching(args, &args.file, pos, since, &mut new).unwrap_or(pos);
        for d in &new {
            writeln!(out, "{}", format_line(d)).map_err(failed)?;
        }
        out.flush().map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_since("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_since("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_since("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_since("45").unwrap(), Duration::from_secs(45));
        assert!(parse_since("5y").is_err());
        assert!(parse_since("m").is_err());
        assert!(parse_since("99999999999999999999d").is_err());
    }

    #[test]
    fn lines_are_formatted_with_their_instance() {
        let d = json!({"@timestamp": "2024-05-01T10:00:00Z", "message": "hi",
            "lain": {"podgroup": "hello.web.web", "instance": "2"}, "stream": "stderr"});
        assert_eq!(
            format_line(&d),
            "2024-05-01T10:00:00Z hello.web.web.2 [stderr] hi"
        );
        let d = json!({"@timestamp": "t", "message": "m", "container": {"name": "c1"}});
        assert_eq!(format_line(&d), "t c1 m");
    }
}

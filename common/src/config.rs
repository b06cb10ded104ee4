//! Configuration loading: TOML files whose unknown keys and wrong types are rejected, with
//! every problem reported at once and located by file, line and column.
//!
//! serde stops at the first error, so the loader deserialises repeatedly: after each error
//! it records the error, removes the offending key from the parsed tree, and tries again.
//! Semantic checks then run through [`Validate`], and their errors are located the same way.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// The most errors one file reports, so a pathological file cannot loop for long.
const MAX_ERRORS: usize = 100;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key path, e.g. `admin.listen` or `upstreams[2].port`; empty for the root.
    pub path: String,
    /// 1-based line, when the key could be found in the text.
    pub line: Option<usize>,
    /// 1-based column, when the key could be found in the text.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error at a dotted key path (`a.b[1].c`), located later by the loader.
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file name, as given.
    pub file: String,
    /// The problems, in file order where known.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "{}: {n} configuration error{}",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "  {}", self.file)?;
            if let (Some(l), Some(c)) = (e.line, e.column) {
                write!(f, ":{l}:{c}")?;
            }
            if e.path.is_empty() {
                writeln!(f, ": {}", e.message)?;
            } else {
                writeln!(f, ": {}: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

/// Semantic checks of a parsed config. Pure: no IO, so `--check-config` can run it anywhere.
pub trait Validate {
    /// Pushes every problem found; an empty list means the config may be built.
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        let _ = errors;
    }
}

/// Reads and parses a config file.
pub fn load_config<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: name.clone(),
        errors: vec![ConfigError::at("", format!("cannot read file: {e}"))],
    })?;
    parse_config(&name, &text)
}

/// Parses config text; `name` is used in messages.
pub fn parse_config<T: DeserializeOwned + Validate>(
    name: &str,
    text: &str,
) -> Result<T, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: name.to_string(),
        errors,
    };
    let doc = match toml_edit::Document::parse(text.to_string()) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unzip();
            return Err(fail(vec![ConfigError {
                path: String::new(),
                line,
                column,
                message: e.message().trim().to_string(),
            }]));
        }
    };
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            return Err(fail(vec![ConfigError::at(
                "",
                e.message().trim().to_string(),
            )]));
        }
    };
    let mut errors = Vec::new();
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    let parsed = loop {
        match serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table.clone())) {
            Ok(value) => break Some(value),
            Err(e) => {
                let mut segs: Vec<Seg> = e.path().iter().filter_map(Seg::from_segment).collect();
                let message = e.inner().message().trim().to_string();
                if let Some(field) = quoted_after(&message, "unknown field `")
                    && segs.last() != Some(&Seg::Key(field.clone()))
                {
                    segs.push(Seg::Key(field));
                }
                // A required key removed for having the wrong type is then reported missing;
                // that is the same problem, already listed.
                let duplicate = quoted_after(&message, "missing field `").is_some_and(|f| {
                    let mut p = segs.clone();
                    p.push(Seg::Key(f));
                    removed.contains(&p)
                });
                if !duplicate {
                    errors.push(locate(&doc, text, &segs, message));
                }
                if errors.len() >= MAX_ERRORS || !remove(&mut table, &segs) {
                    break None;
                }
                removed.push(segs);
            }
        }
    };
    match parsed {
        Some(value) if errors.is_empty() => {
            let mut semantic = Vec::new();
            value.validate(&mut semantic);
            if semantic.is_empty() {
                return Ok(value);
            }
            for e in semantic {
                let segs = parse_path(&e.path);
                let mut located = locate(&doc, text, &segs, e.message);
                located.path = e.path;
                errors.push(located);
            }
            Err(fail(errors))
        }
        _ => {
            // Deserialisation visits keys in sorted order; report them in file order.
            errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
            Err(fail(errors))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn from_segment(s: &Segment) -> Option<Seg> {
        match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        }
    }
}

fn render(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn parse_path(path: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            segs.push(Seg::Key(rest[..b].to_string()));
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(end) = stripped.find(']') else { break };
                if let Ok(i) = stripped[..end].parse() {
                    segs.push(Seg::Index(i));
                }
                rest = &stripped[end + 1..];
            }
        } else {
            segs.push(Seg::Key(rest.to_string()));
        }
    }
    segs
}

fn quoted_after(message: &str, marker: &str) -> Option<String> {
    let start = message.find(marker)? + marker.len();
    let end = message[start..].find('`')?;
    Some(message[start..start + end].to_string())
}

/// Removes the value at `segs`; `false` when there is nothing there to remove.
fn remove(table: &mut toml::Table, segs: &[Seg]) -> bool {
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = TomlRef::Table(table);
    for s in parents {
        cur = match (cur, s) {
            (TomlRef::Table(t), Seg::Key(k)) => match t.get_mut(k) {
                Some(v) => TomlRef::from_value(v),
                None => return false,
            },
            (TomlRef::Array(a), Seg::Index(i)) => match a.get_mut(*i) {
                Some(v) => TomlRef::from_value(v),
                None => return false,
            },
            _ => return false,
        };
    }
    match (cur, last) {
        (TomlRef::Table(t), Seg::Key(k)) => t.remove(k).is_some(),
        (TomlRef::Array(a), Seg::Index(i)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

enum TomlRef<'a> {
    Table(&'a mut toml::Table),
    Array(&'a mut toml::value::Array),
    Other,
}

impl<'a> TomlRef<'a> {
    fn from_value(v: &'a mut toml::Value) -> TomlRef<'a> {
        match v {
            toml::Value::Table(t) => TomlRef::Table(t),
            toml::Value::Array(a) => TomlRef::Array(a),
            _ => TomlRef::Other,
        }
    }
}

/// Finds the deepest existing key of `segs` in the document and turns it into a located error.
fn locate(
    doc: &toml_edit::Document<String>,
    text: &str,
    segs: &[Seg],
    message: String,
) -> ConfigError {
    let mut span: Option<std::ops::Range<usize>> = None;
    let mut item: Option<&toml_edit::Item> = None;
    for s in segs {
        match s {
            Seg::Key(k) => {
                let table = match item {
                    None => Some(doc.as_table() as &dyn toml_edit::TableLike),
                    Some(i) => i.as_table_like(),
                };
                let Some((key, next)) = table.and_then(|t| t.get_key_value(k)) else {
                    break;
                };
                span = key.span().or(span);
                item = Some(next);
            }
            Seg::Index(i) => {
                let next = item.and_then(|it| match it {
                    toml_edit::Item::ArrayOfTables(a) => a.get(*i).map(|t| (t.span(), None)),
                    toml_edit::Item::Value(toml_edit::Value::Array(a)) => a
                        .get(*i)
                        .map(|v| (v.span(), v.as_inline_table().map(|_| ()))),
                    _ => None,
                });
                let Some((s, _)) = next else { break };
                span = s.or(span);
                // Descending into array elements is rare in lain's configs; keep the element's
                // position and stop refining.
                break;
            }
        }
    }
    let (line, column) = span.map(|s| line_col(text, s.start)).unzip();
    ConfigError {
        path: render(segs),
        line,
        column,
        message,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Admin {
        listen: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        admin: Admin,
        #[serde(default)]
        workers: u32,
        #[serde(default)]
        name: String,
    }

    impl Validate for Cfg {
        fn validate(&self, errors: &mut Vec<ConfigError>) {
            if self.workers > 64 {
                errors.push(ConfigError::at("workers", "must be at most 64"));
            }
            if self.admin.listen.is_empty() {
                errors.push(ConfigError::at("admin.listen", "must not be empty"));
            }
        }
    }

    #[test]
    fn reports_every_type_and_unknown_key_error_with_location() {
        let text =
            "workers = \"two\"\nbogus = 1\n[admin]\nlisten = \"127.0.0.1:0\"\nextra = true\n";
        let err = parse_config::<Cfg>("lain.toml", text).unwrap_err();
        let got: Vec<(String, Option<usize>)> = err
            .errors
            .iter()
            .map(|e| (e.path.clone(), e.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("workers".to_string(), Some(1)),
                ("bogus".to_string(), Some(2)),
                ("admin.extra".to_string(), Some(5)),
            ],
            "{err}"
        );
        let shown = err.to_string();
        assert!(
            shown.contains("lain.toml:2:1: bogus: unknown field `bogus`"),
            "{shown}"
        );
        assert!(
            shown.starts_with("lain.toml: 3 configuration errors"),
            "{shown}"
        );
    }

    #[test]
    fn syntax_error_is_located() {
        let err = parse_config::<Cfg>("x.toml", "[admin\nlisten=1").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert_eq!(err.errors[0].line, Some(1), "{err}");
    }

    #[test]
    fn missing_required_key_is_reported_once() {
        let err = parse_config::<Cfg>("x.toml", "[admin]\nlisten = 5\n").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "admin.listen");
        assert_eq!(err.errors[0].line, Some(2));
    }

    #[test]
    fn semantic_errors_are_all_reported_and_located() {
        let err =
            parse_config::<Cfg>("x.toml", "workers = 100\n[admin]\nlisten = \"\"\n").unwrap_err();
        let got: Vec<(String, Option<usize>)> = err
            .errors
            .iter()
            .map(|e| (e.path.clone(), e.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("workers".into(), Some(1)),
                ("admin.listen".into(), Some(3))
            ]
        );
    }

    #[test]
    fn valid_config_parses() {
        let cfg = parse_config::<Cfg>("x.toml", "[admin]\nlisten = \"127.0.0.1:9\"\n").unwrap();
        assert_eq!(cfg.admin.listen, "127.0.0.1:9");
        assert_eq!(cfg.name, "");
    }
}

//! How the CLI prints results: aligned tables for people (`-o table`, the default) and the
//! API's JSON for scripts (`-o json`).

use std::fmt::Write as _;

use serde::Serialize;

/// The output format chosen with `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a header.
    #[default]
    Table,
    /// Pretty-printed JSON, as the API returned it.
    Json,
}

/// A table of text cells, printed with columns aligned on character counts.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty and extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, the last column not padded.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths = vec![0usize; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    let _ = write!(line, "{c}{}  ", " ".repeat(widths[i] - c.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("lain: cannot encode the answer as JSON: {e}"),
    }
}

/// Prints a table, or `empty` when it has no rows.
pub fn print_table(t: &Table, empty: &str) {
    if t.is_empty() {
        println!("{empty}");
    } else {
        print!("{}", t.render());
    }
}

/// A version shortened for tables: `{time}-{first 7 of the sha}` for LAIN versions.
pub fn short_version(v: &str) -> String {
    match v.split_once('-') {
        Some((t, sha))
            if t.chars().all(|c| c.is_ascii_digit())
                && sha.len() > 12
                && sha.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            format!("{t}-{}", &sha[..7])
        }
        _ => v.to_string(),
    }
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// An optional cell, `-` when absent.
pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Bytes as a short size (`512Mi`, `8Gi`).
pub fn bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (u, size) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{u}", n / size);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_characters() {
        let mut t = Table::new(&["NAME", "PROCS", "VERSION"]);
        t.row(vec!["hello".into(), "web×2".into(), "1-abc".into()]);
        t.row(vec!["a-much-longer-name".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME                PROCS  VERSION\n\
             hello               web×2  1-abc\n\
             a-much-longer-name\n"
        );
        assert_eq!(
            short_version("1700000000-0123456789abcdef0123456789abcdef01234567"),
            "1700000000-0123456"
        );
        assert_eq!(short_version("v2"), "v2");
        assert_eq!(bytes(8 << 30), "8Gi");
        assert_eq!(bytes(1000), "1000");
    }
}

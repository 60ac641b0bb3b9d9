//! Rendering results: aligned tables for people, JSON for programs, and
//! progress lines on a terminal only.

use std::io::IsTerminal;
use std::time::Instant;

use serde::Serialize;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// A table: a header row and rows of cells, rendered with columns padded to
/// their widest cell (the last column is not padded).
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 < cols {
                    let pad = widths[i] - c.chars().count();
                    line.push_str(c);
                    line.push_str(&" ".repeat(pad + 2));
                } else {
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Pretty JSON of `value` with a final newline.
pub fn json<T: Serialize>(value: &T) -> String {
    match serde_json::to_string_pretty(value) {
        Ok(s) => s + "\n",
        Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
    }
}

/// `1.5 GiB`-style sizes (binary units).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

/// Progress lines on stderr when it is a terminal; silent otherwise (so
/// scripts and logs see only results and errors).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }

    /// Silent progress (for background processes).
    pub fn quiet() -> Self {
        Progress {
            enabled: false,
            start: Instant::now(),
        }
    }

    pub fn step(&self, what: &str) {
        if self.enabled {
            eprintln!("[{:6.1}s] {what}...", self.start.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", "STATUS", "CREATED"]);
        t.row(vec![
            "dev".into(),
            "running".into(),
            "2026-03-07 09:05:01".into(),
        ]);
        t.row(vec![
            "a-much-longer-name".into(),
            "stopped".into(),
            "-".into(),
        ]);
        assert_eq!(
            t.render(),
            "NAME                STATUS   CREATED\n\
             dev                 running  2026-03-07 09:05:01\n\
             a-much-longer-name  stopped  -\n"
        );
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn json_and_sizes() {
        #[derive(Serialize)]
        struct R {
            name: &'static str,
            size_bytes: u64,
        }
        let text = json(&vec![R {
            name: "a",
            size_bytes: 5,
        }]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[0]["name"], "a");
        assert_eq!(v[0]["size_bytes"], 5);
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(300 << 20), "300 MiB");
        assert_eq!(human_size(5 << 30), "5.0 GiB");
    }
}

//! Watching a guest's serial log for boot markers, and reading the kernel's
//! own printk timestamps (`[    2.670000] ...`) off the lines found.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A marker seen in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// Index of the marker in the list watched for.
    pub marker: usize,
    /// Wall time from the watch's start to the poll that saw it.
    pub wall: Duration,
    /// The printk timestamp of the line, in seconds, when it has one.
    pub kernel_secs: Option<f64>,
    pub line: String,
}

/// Incremental reader of a growing log file.
#[derive(Debug)]
pub struct LogWatch {
    path: PathBuf,
    start: Instant,
    text: String,
    read: u64,
}

impl LogWatch {
    /// Watches `path` (it may not exist yet); times count from `start`.
    pub fn new(path: &Path, start: Instant) -> Self {
        Self {
            path: path.to_path_buf(),
            start,
            text: String::new(),
            read: 0,
        }
    }

    /// Reads what was appended since the last poll; returns whether the log
    /// grew.
    pub fn poll(&mut self) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return false;
        };
        if f.seek(SeekFrom::Start(self.read)).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() || buf.is_empty() {
            return false;
        }
        self.read += buf.len() as u64;
        self.text.push_str(&String::from_utf8_lossy(&buf));
        true
    }

    /// Everything read so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first complete line containing `marker`, if read yet.
    pub fn find(&self, marker: &str) -> Option<&str> {
        complete_lines(&self.text).find(|l| l.contains(marker))
    }

    /// The first complete line of any content.
    pub fn first_line(&self) -> Option<&str> {
        complete_lines(&self.text).next()
    }

    /// A [`Seen`] for `line` at the current wall time.
    pub fn seen(&self, marker: usize, line: &str) -> Seen {
        Seen {
            marker,
            wall: self.start.elapsed(),
            kernel_secs: printk_secs(line),
            line: line.trim_end().to_string(),
        }
    }

    /// Last few lines, for error messages.
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }
}

fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    // A line is complete once its newline has arrived.
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// The printk timestamp at the start of a console line, in seconds.
pub fn printk_secs(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, _) = rest.split_once(']')?;
    stamp.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn printk_timestamps() {
        assert_eq!(
            printk_secs("[    2.670000] Freeing SMP alternatives memory: 12K"),
            Some(2.67)
        );
        assert_eq!(printk_secs("[16.2] x"), Some(16.2));
        assert_eq!(printk_secs("no stamp"), None);
        assert_eq!(printk_secs("[abc] x"), None);
    }

    #[test]
    fn watch_reads_increments_and_ignores_partial_lines() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("serial.log");
        let mut w = LogWatch::new(&path, Instant::now());
        assert!(!w.poll(), "missing file is not an error");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"[    0.000000] Linux version 6.1\n[    1.5] VFS: Cannot")
            .unwrap();
        assert!(w.poll());
        assert_eq!(w.first_line(), Some("[    0.000000] Linux version 6.1"));
        assert!(w.find("VFS:").is_none(), "line not complete yet");
        f.write_all(b" open root\n").unwrap();
        assert!(w.poll());
        assert!(!w.poll());
        let line = w.find("VFS:").unwrap();
        let seen = w.seen(1, line);
        assert_eq!(seen.kernel_secs, Some(1.5));
        assert_eq!(seen.line, "[    1.5] VFS: Cannot open root");
        assert!(w.tail(1).contains("open root"));
    }
}

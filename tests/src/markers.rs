//! Reading the `KEY=VALUE` markers of a nested run, and one nested run shared by the tests of a
//! binary.
//!
//! A scenario script prints markers and the Rust tests compare them, so a failure names the
//! value that differed and shows the serial log. Every accessor panics with the log tail when a
//! marker is missing: a missing marker is a failed scenario, never a pass.

use std::sync::OnceLock;

use crate::nested::NestedRun;
use crate::scratch::heavy;

/// Lines in which scenario scripts report on a VMM that died (exit status, stderr, console),
/// shown with a failure.
const DIAGNOSTIC_TAGS: [&str; 3] = ["_DIED=", "_STDERR=", "_CONSOLE: "];

impl NestedRun {
    /// The value of `KEY=`, which must be present.
    pub fn get(&self, key: &str) -> String {
        self.marker(key)
            .unwrap_or_else(|| panic!("{}", self.failure(&format!("no {key}= marker"))))
    }

    /// The `i`th whitespace-separated word of a marker ("" when it has fewer words).
    pub fn word(&self, key: &str, i: usize) -> String {
        self.get(key)
            .split_whitespace()
            .nth(i)
            .unwrap_or("")
            .to_string()
    }

    /// The first word of a marker as a number.
    pub fn num(&self, key: &str) -> u64 {
        let v = self.word(key, 0);
        v.parse()
            .unwrap_or_else(|_| panic!("{}", self.failure(&format!("{key}={v} is not a number"))))
    }

    /// The JSON that follows the first `skip` words of a marker.
    pub fn json_after(&self, key: &str, skip: usize) -> serde_json::Value {
        let v = self.get(key);
        let text = v
            .split_whitespace()
            .skip(skip)
            .collect::<Vec<_>>()
            .join(" ");
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{}",
                self.failure(&format!("{key}: not JSON after {skip} words ({e}): {v}"))
            )
        })
    }

    /// Panics with `what`, the log tail and the script's VMM diagnostics unless `ok`.
    pub fn check(&self, ok: bool, what: &str) {
        if ok {
            return;
        }
        let diag: Vec<&str> = self
            .lines
            .iter()
            .map(|l| l.text.as_str())
            .filter(|l| DIAGNOSTIC_TAGS.iter().any(|t| l.contains(t)))
            .collect();
        panic!(
            "{}\n--- VMM diagnostics ---\n{}",
            self.failure(what),
            diag.join("\n")
        );
    }
}

/// One nested run serving several tests of a binary (an L1 boot costs minutes). The first test
/// to ask runs it; a harness failure is kept as text so every test reports it instead of booting
/// L1 again.
pub struct SharedNestedRun {
    cell: OnceLock<Result<NestedRun, String>>,
    what: &'static str,
}

impl SharedNestedRun {
    /// A run described as `what` in messages.
    pub const fn new(what: &'static str) -> Self {
        SharedNestedRun {
            cell: OnceLock::new(),
            what,
        }
    }

    /// The run (started by `start` on first use, under the heavy-test lock), which must have
    /// printed `SCRIPT_DONE=` and exited 0.
    pub fn get(&'static self, start: impl FnOnce() -> NestedRun) -> &'static NestedRun {
        let result = {
            let _heavy = heavy();
            self.cell.get_or_init(|| {
                let run =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).map_err(|e| {
                        e.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| format!("nested {} run panicked", self.what))
                    });
                if let Ok(run) = &run {
                    eprintln!(
                        "nested {} run: {:.1}s total, script from {:.1}s to {:.1}s (log {})",
                        self.what,
                        run.elapsed.as_secs_f64(),
                        run.time_of("NESTED-RUN-START")
                            .unwrap_or_default()
                            .as_secs_f64(),
                        run.time_of("SCRIPT_DONE").unwrap_or_default().as_secs_f64(),
                        run.log_path.display()
                    );
                }
                run
            })
        };
        let run = result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        if run.marker("SCRIPT_DONE").is_none() || run.exit_code != Some(0) {
            panic!(
                "{}",
                run.failure(&format!("the {} script did not finish", self.what))
            );
        }
        run
    }
}

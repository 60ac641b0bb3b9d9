//! The harness's error type: every failure names what was being done, so a
//! failed scenario's row in the report says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a scenario (or the harness) failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("vmm: {0}")]
    Vmm(String),
    #[error("the guest stopped: {0}")]
    GuestStopped(String),
    #[error("firecracker: {0}")]
    Firecracker(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("child process {what} failed: {detail}")]
    Child { what: String, detail: String },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Readme {
        path: PathBuf,
        source: crate::readme::MarkerError,
    },
    #[error("nested test host: {0}")]
    Nested(String),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    /// An I/O error on a file, with the file's path.
    pub fn file(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| BenchError::File { what, path, source }
    }

    /// An I/O error with a description of the operation.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }

    /// Any vmm library error, with what was being done.
    pub fn vmm<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> Self {
        move |e| BenchError::Vmm(format!("{context}: {e}"))
    }
}

/// Result alias of the harness.
pub type Result<T> = std::result::Result<T, BenchError>;

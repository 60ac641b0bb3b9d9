//! Errors of the harness. Public entry points turn them into panics with this context, because a
//! broken harness is a failed test; the typed error keeps the context (paths, commands) exact.

use std::path::PathBuf;

/// Something the harness could not do.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// An I/O operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted ("open", "read", ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command ran but failed.
    #[error("{command} failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The tail of its output.
        output: String,
    },
    /// A command's output was not what the harness expects.
    #[error("{command}: unexpected output: {detail}")]
    BadOutput {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// A path cannot be stored in a cpio archive.
    #[error("cpio: {detail}")]
    Cpio {
        /// What was wrong.
        detail: String,
    },
}

impl HarnessError {
    /// Wraps an I/O error with the operation and path it concerns.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HarnessError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Result of harness operations.
pub type Result<T> = std::result::Result<T, HarnessError>;

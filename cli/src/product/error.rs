//! The product commands' error: one clear line for the user and an exit code
//! (3 when the named sandbox or snapshot does not exist, 1 otherwise).

use std::path::{Path, PathBuf};

/// Exit code for "no such sandbox or snapshot".
pub const EXIT_NOT_FOUND: i32 = 3;

/// Everything a product command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no sandbox named {0:?}")]
    NoSandbox(String),
    #[error("no snapshot named {0:?}")]
    NoSnapshot(String),
    /// Creating a sandbox or snapshot under a name already taken.
    #[error("{what} {name} already exists")]
    Exists { what: &'static str, name: String },
    /// The user asked for something that cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The control API of a sandbox's VMM refused or failed a request.
    #[error("sandbox {sandbox}: {request}: {message}")]
    Api {
        sandbox: String,
        request: String,
        message: String,
    },
    #[error("sandbox {sandbox}: guest agent: {message}")]
    Agent { sandbox: String, message: String },
    /// The guest agent of a (re)started sandbox did not answer in time;
    /// `then` says what became of the sandbox.
    #[error("sandbox {sandbox}: the guest agent did not answer within {secs}s ({cause}); {then}")]
    AgentTimeout {
        sandbox: String,
        secs: u64,
        cause: String,
        then: String,
    },
    /// A snapshot was written completely but its source sandbox could not be
    /// put back in its run state afterwards (the snapshot is kept).
    #[error("snapshot {snapshot} is ready, but sandbox {sandbox} could not be resumed: {cause}")]
    NotResumed {
        snapshot: String,
        sandbox: String,
        cause: Box<Error>,
    },
    /// A runtime failure with its context already in the message.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NoSandbox(_) | Error::NoSnapshot(_) => EXIT_NOT_FOUND,
            _ => 1,
        }
    }

    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_messages() {
        assert_eq!(Error::NoSandbox("a".into()).exit_code(), 3);
        assert_eq!(Error::NoSnapshot("a".into()).exit_code(), 3);
        assert_eq!(Error::Invalid("x".into()).exit_code(), 1);
        let e = Error::io(
            "reading",
            Path::new("/x/meta.json"),
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(e.to_string().starts_with("reading /x/meta.json: "), "{e}");
        assert_eq!(
            Error::NoSandbox("dev".into()).to_string(),
            "no sandbox named \"dev\""
        );
    }
}

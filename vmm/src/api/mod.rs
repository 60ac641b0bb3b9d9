//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, shaped like
//! Firecracker's where the two overlap.
//!
//! The server runs on its own thread ("api") and never touches the VM: it
//! parses and validates each request, turns it into an [`ApiRequest`], sends
//! it over a channel and writes an eventfd so the VMM's event loop (which owns
//! the VM) wakes, then waits for the [`ApiReply`] and writes the response.
//! `GET /version` is the only route the server answers by itself.
//!
//! The route list and bodies are described for users in `vmm/api/openapi.yaml`.

mod http;
mod routes;
mod server;
mod types;

#[cfg(test)]
mod e2e_tests;

use std::path::PathBuf;
use std::sync::mpsc::Sender;

pub use server::{ApiServer, ApiServerHandle};
pub use types::{
    ActionBody, ActionType, CreateSnapshotParams, DriveOverride, Fault, LoadSnapshotParams,
    MemBackend, MemBackendType, MergeDiffParams, NetworkOverride, PatchVm, SnapshotType,
    VersionInfo, VmStateChange, VsockOverride, WorkingSetParams,
};

/// Version of the API shapes; bumped on incompatible changes.
pub const API_VERSION: &str = "1";

/// Largest request line plus headers, in bytes (431 beyond).
pub const MAX_HEAD_SIZE: usize = 16 * 1024;

/// Largest request body, in bytes (413 beyond).
pub const MAX_BODY_SIZE: usize = 1024 * 1024;

/// What the user asked the VMM to do; every body is already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAction {
    /// `GET /vm`: describe the VM (state, configuration).
    GetVm,
    /// `PATCH /vm {"state": "Paused"}`.
    Pause,
    /// `PATCH /vm {"state": "Resumed"}`.
    Resume,
    /// `PUT /snapshot/create`.
    CreateSnapshot(CreateSnapshotParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(LoadSnapshotParams),
    /// `PUT /snapshot/merge`: apply a diff memory file onto its base.
    MergeDiff(MergeDiffParams),
    /// `PUT /actions {"action_type": "Stop"}`: end the VMM gracefully.
    Stop,
    /// `PUT /actions {"action_type": "SaveWorkingSet"}`.
    SaveWorkingSet,
    /// `GET /snapshot/memory-stats`: the page server's counters.
    MemoryStats,
}

/// What the VMM answers: a JSON body (`Value::Null` means 204 No Content), or
/// a failure with its HTTP status.
pub type ApiReply = Result<serde_json::Value, ApiFailure>;

/// One request for the VMM, with the channel its answer goes back on.
///
/// The server stops waiting after a generous timeout (504); a reply sent
/// after that fails to send, which the VMM should ignore.
#[derive(Debug)]
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: Sender<ApiReply>,
}

/// A failed request: the HTTP status (4xx or 5xx) and a message for the user,
/// sent as `{"fault_message": message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

impl ApiFailure {
    /// A failure with any status; statuses outside 400..=599 are sent as 500.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request cannot be done as asked (wrong VM state, bad file).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 500: the VMM failed while doing a valid request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {}: another server is answering there", path.display())]
    InUse { path: PathBuf },
    #[error("API socket {}: the path exists and is not a socket; refusing to remove it", path.display())]
    NotASocket { path: PathBuf },
    #[error("API socket {}: cannot check for a live server: {source}", path.display())]
    Probe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {}: cannot remove the stale socket: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {}: cannot bind: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {}: cannot set up the listener: {source}", path.display())]
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

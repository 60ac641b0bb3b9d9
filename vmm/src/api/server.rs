//! The API server thread: binds the socket, serves one connection at a time,
//! hands actions to the VMM and writes its answers back.
//!
//! One connection at a time keeps the VM's control strictly sequential. So a
//! client cannot hold the server: a partial request must complete within
//! `request` time (else 408), an idle keep-alive connection is closed as soon
//! as another client is waiting (or after `idle` time), and writes time out.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::http::{Parser, Progress, Request, Response, CONTINUE};
use super::routes::{route, Routed};
use super::{ApiError, ApiRequest};

/// How long the server waits, per kind of wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From the first byte of a request to its last.
    pub request: Duration,
    /// An idle keep-alive connection, when no other client waits.
    pub idle: Duration,
    /// For the VMM's reply (504 after).
    pub reply: Duration,
    /// For the client to take a response.
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(5),
            idle: Duration::from_secs(60),
            reply: Duration::from_secs(120),
            write: Duration::from_secs(5),
        }
    }
}

/// How often a wait for the VMM's reply checks for shutdown.
const REPLY_POLL: Duration = Duration::from_millis(100);
/// Pause after a failed accept (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Read chunk size.
const READ_CHUNK: usize = 8192;

/// The control API server.
pub struct ApiServer;

/// The running server. Dropping it stops the thread and removes the socket.
pub struct ApiServerHandle {
    path: PathBuf,
    /// Device and inode of the socket we bound, so drop never removes a file
    /// someone else put there since.
    ident: (u64, u64),
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the handle and the thread share: the stop request.
struct Shared {
    stopping: AtomicBool,
    /// Written once on stop; the thread polls it and never reads it.
    stop_evt: EventFd,
}

impl ApiServer {
    /// Binds `socket_path` (replacing a stale socket, refusing a live one)
    /// and starts the "api" thread. Each request becomes an [`ApiRequest`]
    /// on `requests`, followed by a write to `wake`.
    pub fn spawn(
        socket_path: &Path,
        requests: Sender<ApiRequest>,
        wake: EventFd,
    ) -> Result<ApiServerHandle, ApiError> {
        Self::spawn_with(socket_path, requests, wake, Timeouts::default())
    }

    pub(crate) fn spawn_with(
        socket_path: &Path,
        requests: Sender<ApiRequest>,
        wake: EventFd,
        timeouts: Timeouts,
    ) -> Result<ApiServerHandle, ApiError> {
        let path = socket_path.to_path_buf();
        let setup = |source| ApiError::Setup {
            path: path.clone(),
            source,
        };
        let listener = bind(&path)?;
        let ident = std::fs::symlink_metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(setup)?;
        let remove = || {
            let _ = std::fs::remove_file(&path);
        };
        let prepare = || -> io::Result<Arc<Shared>> {
            // The API controls the VM: only the owner may connect.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            listener.set_nonblocking(true)?;
            Ok(Arc::new(Shared {
                stopping: AtomicBool::new(false),
                stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            }))
        };
        let shared = prepare().map_err(|e| {
            remove();
            setup(e)
        })?;
        let worker = Worker {
            listener,
            shared: shared.clone(),
            requests,
            wake,
            timeouts,
        };
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Before the first client; without its filter no request is
                // served (the VMM sees the request channel close).
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
                    log::error!("API server not started: {e}");
                    return;
                }
                worker.run()
            })
            .map_err(|e| {
                remove();
                ApiError::Thread(e)
            })?;
        log::info!("API server listening on {}", path.display());
        Ok(ApiServerHandle {
            path,
            ident,
            shared,
            thread: Some(thread),
        })
    }
}

/// Binds the socket, first removing a stale one (a socket file nobody answers
/// on). A live server or a file that is not a socket is left alone.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiError::NotASocket { path: owned() })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse { path: owned() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                match std::fs::remove_file(path) {
                    Ok(()) => log::info!("removed stale API socket {}", path.display()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ApiError::RemoveStale {
                            path: owned(),
                            source,
                        })
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApiError::Probe {
                    path: owned(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Probe {
                path: owned(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: owned(),
        source,
    })
}

impl ApiServerHandle {
    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.stop_evt.write(1) {
            log::error!("cannot wake the API thread to stop it: {e}");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove API socket {}: {e}", self.path.display());
            }
        }
    }
}

/// The thread's state.
struct Worker {
    listener: UnixListener,
    shared: Arc<Shared>,
    requests: Sender<ApiRequest>,
    wake: EventFd,
    timeouts: Timeouts,
}

/// Readiness of the descriptors a wait watched, in order.
type Ready = [bool; 3];

impl Worker {
    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Whether another client is waiting to connect.
    fn client_waiting(&self) -> bool {
        wait(&[self.listener.as_raw_fd()], Some(Duration::ZERO)).is_ok_and(|r| r[0])
    }

    fn run(self) {
        let fds = [self.listener.as_raw_fd(), self.shared.stop_evt.as_raw_fd()];
        while !self.stopping() {
            match wait(&fds, None) {
                Ok(_) => {}
                Err(e) => {
                    log::error!("API server: poll failed, stopping: {e}");
                    return;
                }
            }
            if self.stopping() {
                break;
            }
            match self.listener.accept() {
                Ok((conn, _)) => self.serve(conn),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log::warn!("API server: accept failed: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
        log::debug!("API server stopped");
    }

    /// Serves one connection until it closes, misbehaves, idles while another
    /// client waits, or the server stops.
    fn serve(&self, mut conn: UnixStream) {
        let setup = conn
            .set_nonblocking(false)
            .and_then(|()| conn.set_write_timeout(Some(self.timeouts.write)));
        if let Err(e) = setup {
            log::warn!("API connection setup failed: {e}");
            return;
        }
        let mut parser = Parser::new();
        let mut request_deadline: Option<Instant> = None;
        let mut idle_deadline = Instant::now() + self.timeouts.idle;
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            // Answer everything complete in the buffer (pipelining).
            loop {
                let progress = match parser.poll() {
                    Ok(p) => p,
                    Err(e) => {
                        let mut resp = Response::fault(e.status, &e.message);
                        resp.close = true;
                        log::debug!("API: refused request: {} {}", e.status, e.message);
                        let _ = send_all(&conn, &resp.encode());
                        return;
                    }
                };
                match progress {
                    Progress::Incomplete => break,
                    Progress::SendContinue => {
                        if send_all(&conn, CONTINUE).is_err() {
                            return;
                        }
                    }
                    Progress::Request(req) => {
                        request_deadline = None;
                        let mut resp = self.answer(req);
                        // Take turns: a client that always has its next
                        // request half sent is never idle, so hand over
                        // after this answer when someone else waits.
                        if self.client_waiting() {
                            resp.close = true;
                        }
                        if let Err(e) = send_all(&conn, &resp.encode()) {
                            log::debug!("API: cannot write a response: {e}");
                            return;
                        }
                        if resp.close {
                            return;
                        }
                        idle_deadline = Instant::now() + self.timeouts.idle;
                    }
                }
            }
            if self.stopping() {
                return;
            }

            let now = Instant::now();
            let partial = !parser.is_empty();
            let deadline = if partial {
                *request_deadline.get_or_insert(now + self.timeouts.request)
            } else {
                idle_deadline
            };
            if now >= deadline {
                if partial {
                    let mut resp = Response::fault(408, "the request took too long to arrive");
                    resp.close = true;
                    let _ = send_all(&conn, &resp.encode());
                }
                return;
            }
            // While idle, a waiting client takes over; mid-request it must
            // not (and must not wake the poll either).
            let listener = if partial {
                None
            } else {
                Some(self.listener.as_raw_fd())
            };
            let fds: Vec<RawFd> = [
                Some(conn.as_raw_fd()),
                Some(self.shared.stop_evt.as_raw_fd()),
                listener,
            ]
            .into_iter()
            .flatten()
            .collect();
            let ready = match wait(&fds, Some(deadline - now)) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("API: poll failed: {e}");
                    return;
                }
            };
            if ready[1] {
                return;
            }
            if ready[0] {
                match conn.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => parser.feed(chunk.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("API: read failed: {e}");
                        return;
                    }
                }
            } else if ready[2] {
                log::debug!("API: closing an idle connection for a waiting client");
                return;
            }
        }
    }

    /// The response to one complete request.
    fn answer(&self, req: Request) -> Response {
        let mut resp = match route(&req) {
            Routed::Local(resp) => resp,
            Routed::Vmm(action) => self.forward(action),
        };
        log::debug!("API: {} {} -> {}", req.method, req.path, resp.status);
        // A HEAD client would not read the body; closing keeps framing sane.
        resp.close |= !req.keep_alive || req.method == "HEAD";
        resp
    }

    /// Hands an action to the VMM and waits for its reply.
    fn forward(&self, action: super::ApiAction) -> Response {
        let (reply, answer) = mpsc::channel();
        if self.requests.send(ApiRequest { action, reply }).is_err() {
            return Response::fault(503, "the VMM is no longer taking requests");
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("API: cannot wake the VMM event loop: {e}");
        }
        let start = Instant::now();
        loop {
            let left = self.timeouts.reply.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Response::fault(
                    504,
                    &format!(
                        "the VMM did not answer within {} s",
                        self.timeouts.reply.as_secs_f32()
                    ),
                );
            }
            match answer.recv_timeout(left.min(REPLY_POLL)) {
                Ok(Ok(body)) => return Response::json(&body),
                Ok(Err(f)) => return Response::fault(f.status, &f.message),
                Err(RecvTimeoutError::Disconnected) => {
                    return Response::fault(500, "the VMM dropped the request without answering")
                }
                Err(RecvTimeoutError::Timeout) if self.stopping() => {
                    let mut resp = Response::fault(503, "the API server is shutting down");
                    resp.close = true;
                    return resp;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes.
/// Returns readiness per descriptor; all false on timeout or a signal.
fn wait(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Ready> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        // Round up so a short wait does not spin at 0 ms.
        Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
        None => -1,
    };
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()`
    // pollfd structs for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; 3]);
        }
        return Err(e);
    }
    let mut ready = [false; 3];
    for (slot, p) in ready.iter_mut().zip(&pfds) {
        *slot = p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    }
    Ok(ready)
}

/// Writes all of `bytes`, without SIGPIPE if the client is gone (the VMM
/// must not die because a client hung up). Honors the socket's write timeout.
fn send_all(conn: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe the live `bytes` slice and
        // the descriptor belongs to `conn`, open for the whole call.
        let n = unsafe {
            libc::send(
                conn.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

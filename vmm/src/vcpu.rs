//! vCPU threads and their state machine.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and is either `Running`,
//! `Paused` or `Exited`. The VMM talks to it through a request channel; to
//! get its attention while it is inside `KVM_RUN`, the request is followed by
//! a signal whose handler (on the vCPU thread itself) sets the `kvm_run`
//! `immediate_exit` flag, so a request is never lost whether the signal lands
//! in the guest, in the VMM, or just before the next `KVM_RUN`. Before
//! reporting `Paused`, the vCPU enters `KVM_RUN` once more with
//! `immediate_exit` set, which completes an in-flight port or MMIO read
//! without running guest code, so saved registers are consistent.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::stop::{StopReason, VmStop};

/// A closure run on a paused vCPU's file descriptor.
pub type VcpuFdFn = Box<dyn FnOnce(&mut VcpuFd) -> Result<(), String> + Send>;

/// What the VMM asks of a vCPU thread.
pub enum VcpuRequest {
    /// Leave the guest and wait.
    Pause,
    /// Continue running the guest.
    Resume,
    /// Run a closure on the vCPU's file descriptor while paused (state
    /// save/restore), returning its result as a string error on failure.
    WithFd(VcpuFdFn),
    /// End the thread.
    Exit,
}

/// A vCPU thread's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Done,
    Error(String),
    /// The vCPU already stopped (the guest ended or crashed).
    Exited,
}

/// The vCPU's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Exited,
}

/// Why talking to a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    #[error("vCPU {index} did not answer {what} within {ms} ms")]
    Timeout {
        index: u8,
        what: &'static str,
        ms: u128,
    },
    #[error("vCPU {index}: {message}")]
    Failed { index: u8, message: String },
    #[error("cannot start vCPU {index} thread: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` points into this thread's kvm_run mapping, set by
            // the vCPU loop and cleared before the mapping goes away; a byte
            // store is async-signal-safe.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    (*ONCE
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)))
    .map_err(VcpuError::Signal)
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    stop: Arc<VmStop>,
}

impl Vcpu {
    /// Wraps a configured vCPU fd with the buses it dispatches to.
    pub fn new(index: u8, fd: VcpuFd, pio: Bus, mmio: Bus, stop: Arc<VmStop>) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            stop,
        }
    }

    /// Starts the vCPU thread, running or paused.
    pub fn start(self, start_paused: bool) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut state = if start_paused {
                    VcpuState::Paused
                } else {
                    VcpuState::Running
                };
                // Before the guest runs; without its filter it never does.
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    self.stop
                        .report(StopReason::VmmError(format!("vCPU {index}: {e}")));
                    state = VcpuState::Exited;
                }
                VcpuLoop {
                    vcpu: self,
                    requests: req_rx,
                    responses: resp_tx,
                    state,
                }
                .run()
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            requests: req_tx,
            responses: resp_rx,
            thread: Some(thread),
        })
    }
}

/// What one `KVM_RUN` exit means for the loop.
enum Emulation {
    Continue,
    Interrupted,
    Stop(StopReason),
}

struct VcpuLoop {
    vcpu: Vcpu,
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
    state: VcpuState,
}

impl VcpuLoop {
    fn run(mut self) {
        let flag: *mut u8 = &mut self.vcpu.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(flag));
        loop {
            match self.state {
                VcpuState::Running => match self.run_once() {
                    Emulation::Continue => {}
                    Emulation::Interrupted => {
                        self.vcpu.fd.set_kvm_immediate_exit(0);
                        if !self.drain_requests() {
                            break;
                        }
                    }
                    Emulation::Stop(reason) => {
                        self.vcpu.stop.report(reason);
                        self.state = VcpuState::Exited;
                    }
                },
                VcpuState::Paused | VcpuState::Exited => match self.requests.recv() {
                    Ok(req) => {
                        if !self.handle(req) {
                            break;
                        }
                    }
                    Err(_) => break,
                },
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Handles queued requests; false when the thread must end.
    fn drain_requests(&mut self) -> bool {
        while let Ok(req) = self.requests.try_recv() {
            if !self.handle(req) {
                return false;
            }
        }
        true
    }

    fn respond(&self, r: VcpuResponse) {
        // The VMM side may have given up waiting; nothing to do then.
        let _ = self.responses.send(r);
    }

    fn handle(&mut self, req: VcpuRequest) -> bool {
        match (req, self.state) {
            (VcpuRequest::Exit, _) => {
                self.respond(VcpuResponse::Exited);
                return false;
            }
            (_, VcpuState::Exited) => self.respond(VcpuResponse::Exited),
            (VcpuRequest::Pause, VcpuState::Running) => {
                self.complete_inflight_io();
                self.state = VcpuState::Paused;
                self.respond(VcpuResponse::Paused);
            }
            (VcpuRequest::Pause, _) => self.respond(VcpuResponse::Paused),
            (VcpuRequest::Resume, _) => {
                self.state = VcpuState::Running;
                self.respond(VcpuResponse::Resumed);
            }
            (VcpuRequest::WithFd(_), VcpuState::Running) => {
                self.respond(VcpuResponse::Error("vCPU must be paused".into()));
            }
            (VcpuRequest::WithFd(f), VcpuState::Paused) => {
                let r = f(&mut self.vcpu.fd);
                self.respond(match r {
                    Ok(()) => VcpuResponse::Done,
                    Err(e) => VcpuResponse::Error(e),
                });
            }
        }
        true
    }

    /// Enters KVM_RUN with immediate_exit set: KVM finishes the emulation
    /// of a pending port/MMIO read and returns EINTR without guest code
    /// running.
    fn complete_inflight_io(&mut self) {
        self.vcpu.fd.set_kvm_immediate_exit(1);
        match self.vcpu.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!("vCPU {}: completing I/O before pause: {e}", self.vcpu.index),
            Ok(_) => log::warn!(
                "vCPU {}: unexpected exit while completing I/O",
                self.vcpu.index
            ),
        }
        self.vcpu.fd.set_kvm_immediate_exit(0);
    }

    fn run_once(&mut self) -> Emulation {
        let index = self.vcpu.index;
        let exit = match self.vcpu.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Emulation::Interrupted
            }
            Err(e) => {
                return Emulation::Stop(StopReason::VcpuError {
                    vcpu: index,
                    exit: format!("KVM_RUN failed: {e}"),
                    rip: None,
                })
            }
        };
        let crash = |exit: String| {
            Emulation::Stop(StopReason::VcpuError {
                vcpu: index,
                exit,
                rip: None,
            })
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.vcpu.pio.read(u64::from(port), data) {
                    // Nothing there: a floating bus reads as all ones.
                    data.fill(0xff);
                }
                Emulation::Continue
            }
            VcpuExit::IoOut(port, data) => {
                self.vcpu.pio.write(u64::from(port), data);
                Emulation::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.vcpu.mmio.read(addr, data) {
                    data.fill(0);
                }
                Emulation::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.vcpu.mmio.write(addr, data);
                Emulation::Continue
            }
            VcpuExit::Hlt => Emulation::Stop(StopReason::GuestHalted { vcpu: index }),
            VcpuExit::Shutdown => Emulation::Stop(StopReason::TripleFault {
                vcpu: index,
                rip: None,
            }),
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Emulation::Stop(StopReason::GuestReset)
                }
                other => crash(format!("KVM_EXIT_SYSTEM_EVENT type {other}")),
            },
            VcpuExit::InternalError => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the exit union is the one KVM filled.
                let internal = unsafe { self.vcpu.fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                crash(format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {} data {:x?}",
                    internal.suberror,
                    &internal.data[..n]
                ))
            }
            VcpuExit::FailEntry(reason, cpu) => crash(format!(
                "KVM_EXIT_FAIL_ENTRY hardware reason {reason:#x} on host cpu {cpu}"
            )),
            other => crash(format!("unhandled exit {other:?}")),
        }
        .with_rip(&self.vcpu.fd)
    }
}

impl Emulation {
    /// Fills in the guest RIP of a crash, read after the exit.
    fn with_rip(self, fd: &VcpuFd) -> Self {
        match self {
            Emulation::Stop(reason) => {
                Emulation::Stop(reason.with_rip(|| fd.get_regs().ok().map(|r| r.rip)))
            }
            other => other,
        }
    }
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to answer a request before the VMM gives up.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends a request and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.requests
            .send(req)
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.kick();
        Ok(())
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread id belongs to a thread we have not joined
            // yet, so it is valid; the signal's handler is installed.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Waits for the answer to a request sent with [`Self::send`].
    pub fn receive(
        &self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<VcpuResponse, VcpuError> {
        match self.responses.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                index: self.index,
                what,
                ms: timeout.as_millis(),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Sends a request and waits for its answer.
    pub fn request(&self, req: VcpuRequest, what: &'static str) -> Result<VcpuResponse, VcpuError> {
        self.send(req)?;
        self.receive(what, RESPONSE_TIMEOUT)
    }

    /// Runs `f` on the paused vCPU's fd.
    pub fn with_fd(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut VcpuFd) -> Result<(), String> + Send + 'static,
    ) -> Result<(), VcpuError> {
        match self.request(VcpuRequest::WithFd(Box::new(f)), what)? {
            VcpuResponse::Done => Ok(()),
            VcpuResponse::Error(message) => Err(VcpuError::Failed {
                index: self.index,
                message: format!("{what}: {message}"),
            }),
            other => Err(VcpuError::Failed {
                index: self.index,
                message: format!("{what}: unexpected answer {other:?}"),
            }),
        }
    }

    /// Ends the thread and waits for it.
    /// A thread that does not answer in time (stuck in KVM, e.g. on a page
    /// nobody will serve) is left behind rather than waited for forever;
    /// the process is about to end anyway.
    pub fn exit(mut self) {
        let answered =
            self.send(VcpuRequest::Exit).is_ok() && self.receive("exit", RESPONSE_TIMEOUT).is_ok();
        match self.thread.take() {
            Some(t) if answered => {
                let _ = t.join();
            }
            Some(_) => log::error!("vCPU {} did not stop; leaving its thread", self.index),
            None => {}
        }
    }
}

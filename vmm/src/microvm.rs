//! A built VM and its lifecycle: start the vCPUs, run the event loop until
//! the guest or the user ends it, pause and resume.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::Serial;
use devices::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::builder::BuildError;
use crate::config::VmConfig;
use crate::console::Console;
use crate::device_manager::DeviceManager;
use crate::lazy::LazyMemory;
use crate::stop::{StopReason, VmStop};
use crate::vcpu::{Vcpu, VcpuError, VcpuHandle, VcpuRequest, VcpuResponse};
use crate::vm::Vm;

/// After the console shows a kernel panic, how long to wait for the guest's
/// own reboot (`panic=N`) before stopping the VM anyway.
const PANIC_GRACE: Duration = Duration::from_secs(10);
/// Event loop tick: flushes partial console lines, checks the panic grace.
const TICK_MS: i32 = 100;
const LIVE_TICK_MS: i32 = 2;

/// Shared subscriber type of the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
}

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("the VM is {0:?}; this needs it {1}")]
    State(VmState, &'static str),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {index} answered {answer:?} to {what}")]
    Unexpected {
        index: u8,
        what: &'static str,
        answer: VcpuResponse,
    },
}

/// The pieces a builder assembles into a [`Microvm`].
pub(crate) struct MicrovmParts {
    pub config: VmConfig,
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub devices: DeviceManager,
    pub console: Console,
    pub stop: Arc<VmStop>,
    pub vcpus: Vec<Vcpu>,
    pub msr_indices: Arc<Vec<u32>>,
    pub lazy: Option<LazyMemory>,
}

/// A VM ready to run or running.
pub struct Microvm {
    pub(crate) config: VmConfig,
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) devices: DeviceManager,
    console: Console,
    stop: Arc<VmStop>,
    unstarted: Vec<Vcpu>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    events: EventManager<Subscriber>,
    state: VmState,
    /// MSRs saved with each vCPU (KVM_GET_MSR_INDEX_LIST).
    pub(crate) msr_indices: Arc<Vec<u32>>,
    /// The page server, for a lazily restored VM.
    pub(crate) lazy: Option<LazyMemory>,
    /// A live snapshot being written.
    pub(crate) live: Option<crate::live_snapshot::LiveSnapshot>,
    /// The snapshot this VM's dirty pages are counted from: the last one
    /// taken, or the one it was restored from.
    pub(crate) dirty_baseline: Option<snapshot::SnapshotId>,
    /// Dirty pages a snapshot took from KVM's log but did not save.
    pub(crate) carried_dirty: Option<snapshot::DirtyBitmap>,
}

impl Microvm {
    pub(crate) fn new(parts: MicrovmParts) -> Result<Self, BuildError> {
        let mut events =
            EventManager::<Subscriber>::new().map_err(|e| BuildError::EventLoop(e.to_string()))?;
        let watcher = StopWatcher::new(parts.stop.clone())?;
        events.add_subscriber(Arc::new(Mutex::new(watcher)));
        events.add_subscriber(Arc::new(Mutex::new(SerialInput {
            serial: parts.devices.serial.clone(),
        })));
        for device in parts.devices.subscribers() {
            events.add_subscriber(device);
        }
        Ok(Self {
            config: parts.config,
            vm: parts.vm,
            mem: parts.mem,
            devices: parts.devices,
            console: parts.console,
            stop: parts.stop,
            unstarted: parts.vcpus,
            vcpus: Vec::new(),
            events,
            state: VmState::NotStarted,
            msr_indices: parts.msr_indices,
            lazy: parts.lazy,
            live: None,
            dirty_baseline: None,
            carried_dirty: None,
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Current lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Adds a subscriber (a device, the API server) to the event loop.
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.events.add_subscriber(s);
    }

    /// Starts the vCPU threads, running.
    pub fn start(&mut self) -> Result<(), LifecycleError> {
        self.start_vcpus(false)
    }

    /// Starts the vCPU threads paused (a restored VM waiting for resume).
    pub fn start_paused(&mut self) -> Result<(), LifecycleError> {
        self.start_vcpus(true)
    }

    fn start_vcpus(&mut self, paused: bool) -> Result<(), LifecycleError> {
        if self.state != VmState::NotStarted {
            return Err(LifecycleError::State(self.state, "not started"));
        }
        for vcpu in self.unstarted.drain(..) {
            self.vcpus.push(vcpu.start(paused)?);
        }
        if !paused {
            if let Some(lazy) = self.lazy.as_mut() {
                lazy.start_background_fill();
            }
        }
        self.state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        Ok(())
    }

    /// Asks every vCPU to pause and waits until all have; returns how long
    /// that took.
    pub fn pause(&mut self) -> Result<Duration, LifecycleError> {
        if self.state != VmState::Running {
            return Err(LifecycleError::State(self.state, "running"));
        }
        let t = Instant::now();
        self.broadcast(|| VcpuRequest::Pause, "pause", VcpuResponse::Paused)?;
        self.state = VmState::Paused;
        Ok(t.elapsed())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        if self.state != VmState::Paused {
            return Err(LifecycleError::State(self.state, "paused"));
        }
        self.broadcast(|| VcpuRequest::Resume, "resume", VcpuResponse::Resumed)?;
        if let Some(lazy) = self.lazy.as_mut() {
            lazy.start_background_fill();
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Sends a request to all vCPUs at once, then collects the answers, so
    /// the vCPUs stop together rather than one after another.
    fn broadcast(
        &self,
        req: impl Fn() -> VcpuRequest,
        what: &'static str,
        expected: VcpuResponse,
    ) -> Result<(), LifecycleError> {
        for v in &self.vcpus {
            v.send(req())?;
        }
        for v in &self.vcpus {
            match v.receive(what, crate::vcpu::RESPONSE_TIMEOUT)? {
                r if r == expected => {}
                answer => {
                    return Err(LifecycleError::Unexpected {
                        index: v.index(),
                        what,
                        answer,
                    })
                }
            }
        }
        Ok(())
    }

    /// Runs one round of the event loop (at most one tick long); returns the
    /// stop reason once the VM must end.
    pub fn run_once(&mut self) -> Option<StopReason> {
        // Tick fast while a live snapshot copies, to answer as soon as it ends.
        let tick = if self.live.is_some() {
            LIVE_TICK_MS
        } else {
            TICK_MS
        };
        self.run_once_for(Duration::from_millis(tick as u64))
    }

    /// [`Microvm::run_once`] with a tick of at most `timeout`.
    pub fn run_once_for(&mut self, timeout: Duration) -> Option<StopReason> {
        let tick = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        if let Err(e) = self.events.run_with_timeout(tick) {
            self.stop
                .report(StopReason::VmmError(format!("event loop: {e}")));
        }
        if let Err(e) = self.console.sync() {
            log::warn!("console output: {e}");
        }
        if let Some(lazy) = self.lazy.as_mut() {
            if let Err(e) = lazy.tick() {
                self.stop.report(StopReason::VmmError(e));
            }
        }
        let panic = self.console.panic();
        if let Some((line, since)) = &panic {
            if since.elapsed() >= PANIC_GRACE {
                self.stop.report(StopReason::GuestPanic(line.clone()));
            }
        }
        let reason = self.stop.reason()?;
        // A panicking kernel reboots (panic=N): report the panic, not the
        // reboot.
        Some(match (reason, panic) {
            (StopReason::GuestReset, Some((line, _))) => StopReason::GuestPanic(line),
            (reason, _) => reason,
        })
    }

    /// Starts the VM if needed and runs it until it stops; then stops every
    /// vCPU and returns why the VM ended.
    pub fn run(mut self) -> StopReason {
        if self.state == VmState::NotStarted {
            if let Err(e) = self.start() {
                return StopReason::VmmError(e.to_string());
            }
        }
        let reason = loop {
            if let Some(reason) = self.run_once() {
                break reason;
            }
        };
        self.shutdown();
        reason
    }

    /// Stops all vCPU threads and flushes the console.
    pub fn shutdown(&mut self) {
        for v in self.vcpus.drain(..) {
            v.exit();
        }
        if let Ok(mut serial) = self.devices.serial.lock() {
            let _ = serial.flush();
        }
        let _ = self.console.sync();
    }

    /// The page server of a lazily restored VM.
    pub fn lazy_memory(&mut self) -> Option<&mut LazyMemory> {
        self.lazy.as_mut()
    }

    /// Records a stop requested from outside (signal, API).
    pub fn request_stop(&self) {
        self.stop.report(StopReason::Requested);
    }
}

/// Wakes the event loop on a stop, and turns termination signals into stop
/// reasons.
struct StopWatcher {
    stop: Arc<VmStop>,
    term_evt: EventFd,
}

/// The eventfd SIGTERM/SIGINT write to (raw fd, for the signal handler).
static TERM_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = TERM_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer is
        // a valid 8-byte value.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

impl StopWatcher {
    fn new(stop: Arc<VmStop>) -> Result<Self, BuildError> {
        let err = |e: std::io::Error| BuildError::EventLoop(e.to_string());
        let term_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
        let raw = term_evt.try_clone().map_err(err)?;
        // The clone's fd stays open for the life of the process so the
        // handler never writes to a reused descriptor.
        let fd = raw.as_raw_fd();
        std::mem::forget(raw);
        TERM_FD.store(fd, Ordering::SeqCst);
        for sig in [libc::SIGTERM, libc::SIGINT] {
            vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                .map_err(|e| BuildError::EventLoop(format!("signal handler: {e}")))?;
        }
        Ok(Self { stop, term_evt })
    }
}

const EV_STOP: u32 = 0;
const EV_TERM: u32 = 1;

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EV_STOP => {
                let _ = self.stop.eventfd().read();
            }
            EV_TERM => {
                let _ = self.term_evt.read();
                self.stop.report(StopReason::Requested);
            }
            other => log::warn!("stop watcher: unexpected event {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let add = [
            Events::with_data(self.stop.eventfd(), EV_STOP, EventSet::IN),
            Events::with_data(&self.term_evt, EV_TERM, EventSet::IN),
        ];
        for e in add {
            if let Err(err) = ops.add(e) {
                self.stop.report(StopReason::VmmError(format!(
                    "event loop registration: {err}"
                )));
            }
        }
    }
}

/// Feeds the VMM's standard input to the guest's serial console.
struct SerialInput {
    serial: Arc<Mutex<Serial>>,
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let stdin = std::io::stdin();
        let n = if events.event_set().contains(EventSet::IN) {
            stdin.lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching stdin.
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.enqueue_input(&buf[..n]) {
            log::warn!("serial input: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Only an interactive terminal is forwarded; a pipe or /dev/null
        // (tests, services) is left alone.
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
                log::warn!("cannot watch stdin: {e}");
            }
        }
    }
}

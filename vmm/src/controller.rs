//! The top of a VMM process: at most one VM, the control API, and the loop
//! that drives both. API requests arrive on a channel from the API thread,
//! which also writes an eventfd so a sleeping event loop wakes at once.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{
    ApiAction, ApiError, ApiFailure, ApiReply, ApiRequest, ApiServer, ApiServerHandle,
    CreateSnapshotParams, LoadSnapshotParams, MemBackendType, MergeDiffParams,
};
use crate::config::SerialOutput;
use crate::device_manager::RestoreOverrides;
use crate::lazy::LazyOptions;
use crate::microvm::Microvm;
use crate::snapshot::{build_from_snapshot, merge_diff_snapshot, MemoryBackend, RestoreParams};
use crate::stop::StopReason;

/// The API server and the VMM's end of its channel.
struct Api {
    _server: ApiServerHandle,
    requests: Receiver<ApiRequest>,
    wake: EventFd,
}

/// Drains the API wake eventfd inside a VM's event loop; the requests
/// themselves are handled by the controller after each loop round.
struct ApiWake(EventFd);

impl MutEventSubscriber for ApiWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the API wake eventfd: {e}");
        }
    }
}

/// Owns the VM (once there is one) and the API.
pub struct Controller {
    vm: Option<Microvm>,
    api: Option<Api>,
    /// Console destination for a VM loaded through the API.
    serial: SerialOutput,
    stop: Option<StopReason>,
    /// Who to answer when the live snapshot in progress ends.
    live_reply: Option<std::sync::mpsc::Sender<ApiReply>>,
}

impl Controller {
    /// A controller for `vm` (or none yet: one is loaded through the API),
    /// with an API server on `api_sock` when given.
    pub fn new(
        vm: Option<Microvm>,
        api_sock: Option<&Path>,
        serial: SerialOutput,
    ) -> Result<Self, ApiError> {
        let api = match api_sock {
            Some(path) => {
                let (tx, rx) = mpsc::channel();
                let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| ApiError::Setup {
                    path: path.to_path_buf(),
                    source,
                })?;
                let server_wake = wake.try_clone().map_err(|source| ApiError::Setup {
                    path: path.to_path_buf(),
                    source,
                })?;
                let server = ApiServer::spawn(path, tx, server_wake)?;
                Some(Api {
                    _server: server,
                    requests: rx,
                    wake,
                })
            }
            None => None,
        };
        let mut controller = Self {
            vm: None,
            api,
            serial,
            stop: None,
            live_reply: None,
        };
        if let Some(vm) = vm {
            controller.adopt(vm);
        }
        Ok(controller)
    }

    /// Takes ownership of a VM, starts it if it is fresh, and lets API
    /// wake-ups reach its event loop.
    fn adopt(&mut self, mut vm: Microvm) {
        if vm.state() == crate::microvm::VmState::NotStarted {
            if let Err(e) = vm.start() {
                self.stop = Some(StopReason::VmmError(format!("cannot start the VM: {e}")));
            }
        }
        if let Some(api) = &self.api {
            match api.wake.try_clone() {
                Ok(wake) => vm.add_subscriber(Arc::new(Mutex::new(ApiWake(wake)))),
                Err(e) => log::error!("API wake-ups will be late: {e}"),
            }
        }
        self.vm = Some(vm);
    }

    /// Runs until the VM ends or a stop is requested; returns why.
    /// The VMM thread's seccomp filter is installed first.
    pub fn run(mut self) -> StopReason {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vmm) {
            if let Some(vm) = self.vm.as_mut() {
                vm.shutdown();
            }
            return StopReason::VmmError(e.to_string());
        }
        loop {
            match self.vm.as_mut() {
                Some(vm) => {
                    if let Some(reason) = vm.run_once() {
                        self.stop.get_or_insert(reason);
                    }
                    if let Some(result) = vm.poll_live_snapshot() {
                        let reply = result
                            .map_err(|e| ApiFailure::internal(e.to_string()))
                            .and_then(|stats| {
                                serde_json::to_value(&stats)
                                    .map_err(|e| ApiFailure::internal(e.to_string()))
                            });
                        if let Some(tx) = self.live_reply.take() {
                            let _ = tx.send(reply);
                        }
                    }
                }
                None => self.wait_for_api(),
            }
            self.drain_api();
            if let Some(reason) = self.stop.take() {
                if let Some(vm) = self.vm.as_mut() {
                    vm.shutdown();
                }
                return reason;
            }
        }
    }

    /// With no VM, sleeps until an API request arrives.
    fn wait_for_api(&mut self) {
        let Some(api) = &self.api else {
            self.stop = Some(StopReason::VmmError("no VM and no API to load one".into()));
            return;
        };
        match api.requests.recv_timeout(Duration::from_millis(100)) {
            Ok(req) => self.handle(req),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                self.stop = Some(StopReason::VmmError("the API server stopped".into()));
            }
        }
    }

    fn drain_api(&mut self) {
        loop {
            let Some(req) = self
                .api
                .as_ref()
                .and_then(|api| api.requests.try_recv().ok())
            else {
                return;
            };
            self.handle(req);
        }
    }

    fn handle(&mut self, req: ApiRequest) {
        if let ApiAction::MergeDiff(p) = &req.action {
            // Gigabytes of file I/O: on a thread of its own, so a running
            // VM's devices and the API are served meanwhile.
            let (p, reply) = (p.clone(), req.reply);
            let spawned = std::thread::Builder::new()
                .name("merge".into())
                .spawn(move || {
                    let _ = reply.send(merge(&p));
                });
            if let Err(e) = spawned {
                log::error!("cannot start a merge thread: {e}");
            }
            return;
        }
        if let ApiAction::CreateSnapshot(p) = &req.action {
            if p.snapshot_type == crate::snapshot::SnapshotType::Live {
                // Answered when the copy ends; the loop keeps running.
                match self.begin_live(p) {
                    Ok(()) => self.live_reply = Some(req.reply),
                    Err(e) => {
                        let _ = req.reply.send(Err(e));
                    }
                }
                return;
            }
        }
        let is_stop = req.action == ApiAction::Stop;
        let reply = self.dispatch(req.action);
        // The client may have given up; the VMM goes on regardless.
        let _ = req.reply.send(reply);
        if is_stop {
            self.stop.get_or_insert(StopReason::Requested);
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Microvm, ApiFailure> {
        self.vm
            .as_mut()
            .ok_or_else(|| ApiFailure::bad_request("no VM is loaded; PUT /snapshot/load first"))
    }

    fn dispatch(&mut self, action: ApiAction) -> ApiReply {
        match action {
            ApiAction::GetVm => Ok(match &self.vm {
                Some(vm) => json!({ "state": vm.state(), "config": vm.config() }),
                None => json!({ "state": "NotLoaded" }),
            }),
            ApiAction::Pause => {
                let took = self
                    .vm_mut()?
                    .pause()
                    .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
                Ok(json!({ "pause_us": took.as_micros() as u64 }))
            }
            ApiAction::Resume => {
                self.vm_mut()?
                    .resume()
                    .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
                Ok(Value::Null)
            }
            ApiAction::CreateSnapshot(p) => self.create_snapshot(&p),
            ApiAction::LoadSnapshot(p) => self.load_snapshot(&p),
            // Handled on its own thread (`handle`); kept here for completeness.
            ApiAction::MergeDiff(p) => merge(&p),
            ApiAction::Stop => Ok(Value::Null),
            ApiAction::SaveWorkingSet => {
                let lazy = self.vm_mut()?.lazy_memory().ok_or_else(|| {
                    ApiFailure::bad_request("this VM was not restored with the Uffd backend")
                })?;
                let pages = lazy
                    .save_working_set()
                    .map_err(|e| ApiFailure::internal(e.to_string()))?;
                Ok(json!({ "pages": pages }))
            }
            ApiAction::MemoryStats => {
                let lazy = self.vm_mut()?.lazy_memory().ok_or_else(|| {
                    ApiFailure::bad_request("this VM was not restored with the Uffd backend")
                })?;
                serde_json::to_value(lazy.stats()).map_err(|e| ApiFailure::internal(e.to_string()))
            }
        }
    }

    fn begin_live(&mut self, p: &CreateSnapshotParams) -> Result<(), ApiFailure> {
        check_output_dirs(p)?;
        let vm = self.vm_mut()?;
        vm.begin_live_snapshot(&p.snapshot_path, &p.mem_file_path)
            .map(|_| ())
            .map_err(|e| match e {
                crate::snapshot::SnapshotError::LiveNeedsRunning
                | crate::snapshot::SnapshotError::LiveInProgress
                | crate::snapshot::SnapshotError::Live(_) => ApiFailure::bad_request(e.to_string()),
                other => ApiFailure::internal(other.to_string()),
            })
    }

    fn create_snapshot(&mut self, p: &CreateSnapshotParams) -> ApiReply {
        check_output_dirs(p)?;
        let vm = self.vm_mut()?;
        let stats = vm
            .snapshot(p.snapshot_type, &p.snapshot_path, &p.mem_file_path)
            .map_err(|e| match e {
                crate::snapshot::SnapshotError::NotPaused(_)
                | crate::snapshot::SnapshotError::NoDirtyTracking
                | crate::snapshot::SnapshotError::NoDiffBase => {
                    ApiFailure::bad_request(e.to_string())
                }
                other => ApiFailure::internal(other.to_string()),
            })?;
        serde_json::to_value(&stats).map_err(|e| ApiFailure::internal(e.to_string()))
    }

    fn load_snapshot(&mut self, p: &LoadSnapshotParams) -> ApiReply {
        if self.vm.is_some() {
            return Err(ApiFailure::bad_request(
                "a VM is already running in this VMM; load a snapshot into a new VMM process",
            ));
        }

        let params = RestoreParams {
            state_path: p.snapshot_path.clone(),
            memory: match p.mem_backend.backend_type {
                MemBackendType::File => MemoryBackend::File(p.mem_backend.backend_path.clone()),
                MemBackendType::Uffd => MemoryBackend::Uffd {
                    path: p.mem_backend.backend_path.clone(),
                    options: LazyOptions {
                        prefetch: p.working_set.prefetch,
                        record_ms: p.working_set.record_ms,
                        background_fill: p.working_set.background_fill,
                    },
                },
            },
            track_dirty_pages: p.track_dirty_pages,
            serial: self.serial.clone(),
            overrides: RestoreOverrides {
                drives: p
                    .drive_overrides
                    .iter()
                    .map(|d| (d.drive_id.clone(), d.path_on_host.clone()))
                    .collect(),
                taps: p
                    .network_overrides
                    .iter()
                    .map(|n| (n.iface_id.clone(), n.host_dev_name.clone()))
                    .collect(),
                vsock_uds: p.vsock_override.as_ref().map(|v| v.uds_path.clone()),
            },
        };
        let mut vm =
            build_from_snapshot(&params).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
        let started = if p.resume_vm {
            vm.start()
        } else {
            vm.start_paused()
        };
        started.map_err(|e| ApiFailure::internal(e.to_string()))?;
        self.adopt(vm);
        Ok(Value::Null)
    }
}

/// The snapshot's files go into existing directories: a typo is the
/// caller's error, said before anything is taken.
fn check_output_dirs(p: &CreateSnapshotParams) -> Result<(), ApiFailure> {
    for (what, path) in [
        ("snapshot_path", &p.snapshot_path),
        ("mem_file_path", &p.mem_file_path),
    ] {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(ApiFailure::bad_request(format!(
                "{what} {}: directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
        if path.is_dir() {
            return Err(ApiFailure::bad_request(format!(
                "{what} {} is a directory",
                path.display()
            )));
        }
    }
    Ok(())
}

fn merge(p: &MergeDiffParams) -> ApiReply {
    let stats = merge_diff_snapshot(
        &p.snapshot_path,
        &p.base_mem_file_path,
        &p.diff_mem_file_path,
    )
    .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    serde_json::to_value(&stats).map_err(|e| ApiFailure::internal(e.to_string()))
}

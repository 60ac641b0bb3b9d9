//! Firecracker as a peer target, driven through its API socket: a guest is
//! configured with `PUT /boot-source`, `/machine-config`, `/actions`
//! InstanceStart; paused and resumed with `PATCH /vm`; snapshotted with
//! `PUT /snapshot/create`; restored by a fresh process with
//! `PUT /snapshot/load` (`mem_backend` File, `resume_vm`). Its serial
//! console is its standard output, sent to a log file.
//!
//! Timings include the API round trip (the vmm is measured in-process):
//! that is the cost a Firecracker user pays.

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{BenchError, Result};
use crate::process::ChildGuard;
use crate::serial::LogWatch;
use crate::signals;
use crate::target::{
    ClonesTiming, DenseDiff, LiveTiming, RestoreTiming, SnapKind, SnapshotDetail, SnapshotFiles,
    Target, UffdTiming,
};
use crate::vmm_target::{GuestSpec, WarmOutcome, WarmSpec};
use http::ApiClient;

/// How long one API request may take (a full snapshot of a large guest is
/// one request).
const API_TIMEOUT: Duration = Duration::from_secs(300);

/// One Firecracker process and its API.
pub struct FcProcess {
    child: ChildGuard,
    api: ApiClient,
    socket: PathBuf,
}

impl FcProcess {
    /// Spawns `bin` with its API on `<work>/<name>.sock` and its console in
    /// `serial`, and waits for the socket to accept connections.
    pub fn spawn(
        bin: &Path,
        work: &Path,
        name: &str,
        serial: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let socket = work.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let out = std::fs::File::create(serial).map_err(BenchError::file("creating", serial))?;
        let err_path = work.join(format!("{name}.stderr"));
        let err =
            std::fs::File::create(&err_path).map_err(BenchError::file("creating", &err_path))?;
        let child = Command::new(bin)
            .arg("--api-sock")
            .arg(&socket)
            .arg("--no-seccomp")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(BenchError::file("spawning firecracker", bin))?;
        let mut process = Self {
            child: ChildGuard(child),
            api: ApiClient::new(&socket, API_TIMEOUT),
            socket,
        };
        process.wait_for_api(timeout, &err_path)?;
        Ok(process)
    }

    fn wait_for_api(&mut self, timeout: Duration, err_path: &Path) -> Result<()> {
        let t = Instant::now();
        loop {
            signals::check()?;
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                let stderr = std::fs::read_to_string(err_path).unwrap_or_default();
                return Err(BenchError::Child {
                    what: "firecracker".into(),
                    detail: format!(
                        "exited with {status} before its API came up: {}",
                        stderr.trim()
                    ),
                });
            }
            if t.elapsed() > timeout {
                return Err(BenchError::Timeout {
                    what: format!("firecracker's API socket {}", self.socket.display()),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One API call; a non-2xx answer is an error.
    pub fn call(&self, method: &str, path: &str, body: serde_json::Value) -> Result<()> {
        self.api
            .call(method, path, Some(&body))
            .map(|_| ())
            .map_err(|e| BenchError::Firecracker(e.to_string()))
    }

    /// Whether the guest is running (`GET /` instance info).
    pub fn is_running(&self) -> Result<bool> {
        let r = self
            .api
            .call("GET", "/", None)
            .map_err(|e| BenchError::Firecracker(e.to_string()))?;
        let info: serde_json::Value = serde_json::from_str(&r.body)
            .map_err(|e| BenchError::Firecracker(format!("instance info {:?}: {e}", r.body)))?;
        Ok(info.get("state").and_then(|s| s.as_str()) == Some("Running"))
    }

    /// Loads a snapshot into this (fresh) process and resumes the guest.
    pub fn load_snapshot(&self, files: &SnapshotFiles) -> Result<()> {
        self.call("PUT", "/snapshot/load", load_body(files))
    }
}

/// Body of `PUT /snapshot/load`.
pub fn load_body(files: &SnapshotFiles) -> serde_json::Value {
    json!({
        "snapshot_path": files.state,
        "mem_backend": {"backend_type": "File", "backend_path": files.mem},
        "resume_vm": true,
    })
}

/// Body of `PUT /snapshot/create`.
pub fn create_body(kind: SnapKind, files: &SnapshotFiles) -> serde_json::Value {
    json!({
        "snapshot_type": match kind { SnapKind::Full => "Full", SnapKind::Diff => "Diff" },
        "snapshot_path": files.state,
        "mem_file_path": files.mem,
    })
}

/// Bodies that configure and start a guest: (method, path, body) in order.
pub fn boot_requests(
    spec: &GuestSpec,
    cmdline: &str,
    rootfs: Option<&Path>,
    track_dirty_pages: bool,
) -> Vec<(&'static str, &'static str, serde_json::Value)> {
    let mut reqs = vec![
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": spec.kernel, "boot_args": cmdline}),
        ),
        (
            "PUT",
            "/machine-config",
            json!({
                "vcpu_count": spec.vcpus,
                "mem_size_mib": spec.mem_mib,
                "track_dirty_pages": track_dirty_pages,
            }),
        ),
    ];
    if let Some(rootfs) = rootfs {
        reqs.push((
            "PUT",
            "/drives/rootfs",
            json!({
                "drive_id": "rootfs",
                "path_on_host": rootfs,
                "is_root_device": true,
                "is_read_only": false,
            }),
        ));
    }
    reqs.push(("PUT", "/actions", json!({"action_type": "InstanceStart"})));
    reqs
}

/// Firecracker with one booted guest.
pub struct FirecrackerTarget {
    bin: PathBuf,
    vm: Option<FcProcess>,
    launch_timeout: Duration,
}

impl FirecrackerTarget {
    /// Starts Firecracker, boots the guest with `cmdline` (the same one the
    /// vmm gives its guest), runs it per `warm`, and leaves it paused.
    pub fn boot(
        bin: &Path,
        spec: &GuestSpec,
        cmdline: &str,
        warm: &WarmSpec,
        work: &Path,
        launch_timeout: Duration,
    ) -> Result<(Self, WarmOutcome)> {
        let serial = work.join("fc-base-serial.log");
        let start = Instant::now();
        let fc = FcProcess::spawn(bin, work, "fc-base", &serial, launch_timeout)?;
        for (method, path, body) in boot_requests(spec, cmdline, None, true) {
            fc.call(method, path, body)?;
        }
        let mut log = LogWatch::new(&serial, start);
        let marker_seen = warm.wait(&mut log, start, |log| {
            if !fc.is_running()? {
                return Err(BenchError::GuestStopped(format!(
                    "firecracker guest not running during warm-up; console: {}",
                    log.tail(3)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })?;
        fc.call("PATCH", "/vm", json!({"state": "Paused"}))?;
        let outcome = WarmOutcome::new(warm, marker_seen, start, &log);
        Ok((
            Self {
                bin: bin.to_path_buf(),
                vm: Some(fc),
                launch_timeout,
            },
            outcome,
        ))
    }

    fn vm(&self) -> Result<&FcProcess> {
        self.vm
            .as_ref()
            .ok_or_else(|| BenchError::Setup("the firecracker guest was shut down".into()))
    }

    /// Spawns a fresh process and loads `files` into it.
    fn restore_one(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        name: &str,
    ) -> Result<(FcProcess, RestoreTiming)> {
        let t0 = Instant::now();
        let serial = work.join(format!("{name}-serial.log"));
        let fc = FcProcess::spawn(&self.bin, work, name, &serial, self.launch_timeout)?;
        let t_api = t0.elapsed();
        fc.load_snapshot(files)?;
        let total = t0.elapsed();
        Ok((
            fc,
            RestoreTiming {
                to_running: total,
                phases: vec![("spawn_to_api", t_api), ("load_resume", total - t_api)],
            },
        ))
    }
}

impl Target for FirecrackerTarget {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn pause(&mut self) -> Result<()> {
        self.vm()?.call("PATCH", "/vm", json!({"state": "Paused"}))
    }

    fn resume(&mut self) -> Result<()> {
        self.vm()?.call("PATCH", "/vm", json!({"state": "Resumed"}))
    }

    fn snapshot(&mut self, kind: SnapKind, files: &SnapshotFiles) -> Result<SnapshotDetail> {
        self.vm()?
            .call("PUT", "/snapshot/create", create_body(kind, files))?;
        Ok(SnapshotDetail::default())
    }

    fn run_for(&mut self, d: Duration) -> Result<()> {
        std::thread::sleep(d);
        if self.vm()?.is_running()? {
            Ok(())
        } else {
            Err(BenchError::GuestStopped(
                "firecracker guest not running".into(),
            ))
        }
    }

    fn live_snapshot(&mut self, _files: &SnapshotFiles) -> Result<Option<LiveTiming>> {
        // Firecracker has no live snapshots.
        Ok(None)
    }

    fn restore_uffd(
        &self,
        _files: &SnapshotFiles,
        _work: &Path,
        _prefetch: bool,
    ) -> Result<Option<UffdTiming>> {
        // Its Uffd backend needs an external page-fault handler process.
        Ok(None)
    }

    fn dense_diff(
        &mut self,
        _base: &SnapshotFiles,
        _work: &Path,
        _fraction: f64,
        _seed: u64,
    ) -> Result<Option<DenseDiff>> {
        // Its guest memory lives in another process.
        Ok(None)
    }

    fn touch_memory(&mut self, _fraction: f64, _seed: u64) -> Result<Option<u64>> {
        // Its guest memory lives in another process; writes there would
        // bypass Firecracker's dirty tracking anyway.
        Ok(None)
    }

    fn restore(
        &self,
        files: &SnapshotFiles,
        work: &Path,
        check: Option<Duration>,
    ) -> Result<RestoreTiming> {
        let (fc, timing) = self.restore_one(files, work, "fc-restore")?;
        if let Some(d) = check {
            std::thread::sleep(d);
            if !fc.is_running()? {
                return Err(BenchError::GuestStopped(
                    "restored firecracker guest not running".into(),
                ));
            }
        }
        Ok(timing)
    }

    fn restore_process(
        &self,
        _files: &SnapshotFiles,
        _work: &Path,
    ) -> Result<Option<RestoreTiming>> {
        // `restore` already starts a new process.
        Ok(None)
    }

    fn clones(&self, files: &SnapshotFiles, n: usize, work: &Path) -> Result<ClonesTiming> {
        let start = Instant::now();
        let results: Vec<Result<(FcProcess, RestoreTiming, Duration)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    s.spawn(move || {
                        self.restore_one(files, work, &format!("fc-clone-{i}"))
                            .map(|(fc, t)| (fc, t, start.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BenchError::Setup("a clone thread panicked".into()))
                    })
                })
                .collect()
        });
        // All clones were running together; they end here.
        let mut total = Duration::ZERO;
        let mut per_vm = Vec::with_capacity(n);
        let mut running = Vec::with_capacity(n);
        for r in results {
            let (fc, timing, done) = r?;
            total = total.max(done);
            per_vm.push(timing.to_running);
            running.push(fc);
        }
        Ok(ClonesTiming { total, per_vm })
    }

    fn shutdown(&mut self) {
        self.vm = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_follow_the_api() {
        let files = SnapshotFiles::in_dir(Path::new("/s"), "base");
        let load = load_body(&files);
        assert_eq!(load["snapshot_path"], "/s/base.state");
        assert_eq!(load["mem_backend"]["backend_type"], "File");
        assert_eq!(load["mem_backend"]["backend_path"], "/s/base.mem");
        assert_eq!(load["resume_vm"], true);
        let create = create_body(SnapKind::Diff, &files);
        assert_eq!(create["snapshot_type"], "Diff");
        assert_eq!(create["mem_file_path"], "/s/base.mem");

        let spec = GuestSpec {
            kernel: "/k/vmlinux".into(),
            mem_mib: 128,
            vcpus: 2,
            cmdline: None,
        };
        let reqs = boot_requests(&spec, "console=ttyS0", Some(Path::new("/r.ext4")), true);
        let paths: Vec<&str> = reqs.iter().map(|r| r.1).collect();
        assert_eq!(
            paths,
            [
                "/boot-source",
                "/machine-config",
                "/drives/rootfs",
                "/actions"
            ]
        );
        assert_eq!(reqs[0].2["boot_args"], "console=ttyS0");
        assert_eq!(reqs[1].2["mem_size_mib"], 128);
        assert_eq!(reqs[1].2["vcpu_count"], 2);
        assert_eq!(reqs[2].2["is_root_device"], true);
        assert_eq!(reqs[3].2["action_type"], "InstanceStart");
    }

    /// Drives the target against a fake Firecracker (a shell script that
    /// serves nothing) to check spawn errors are reported, not hung on.
    #[test]
    fn spawn_reports_a_binary_that_exits() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let err = FcProcess::spawn(
            Path::new("/bin/false"),
            dir.path(),
            "fc",
            &dir.path().join("serial.log"),
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(matches!(err, BenchError::Child { .. }), "{err}");
    }
}

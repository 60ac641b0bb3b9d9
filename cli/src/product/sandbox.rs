//! Sandboxes: a named background VMM with its own disk copy, vsock and API
//! sockets and logs. Created by booting the default guest or by restoring a
//! snapshot; stopped (the VMM ends, the disk stays) and started again (a
//! fresh boot from its disk); removed.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::api::ApiClient;
use super::clock;
use super::config::DEFAULT_CMDLINE;
use super::disk;
use super::error::{Error, Result};
use super::guest;
use super::process::{self, arg};
use super::schedule::{SANDBOX_FLAG, STATE_FLAG};
use super::snapshot::{SnapKind, SnapshotMeta};
use super::store::{read_json, write_json_atomic, META_FILE};
use super::Ctx;

/// Guest CID of every sandbox (each has its own vsock device and socket).
const GUEST_CID: u32 = 3;

/// How a sandbox came to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// Booted from a copy of this root filesystem image.
    Boot { rootfs: PathBuf },
    /// Restored from this snapshot.
    Snapshot { snapshot: String },
}

/// A snapshot schedule of a sandbox, run by its VMM process (see
/// schedule.rs). Metadata of older versions also has the `pid` of a
/// separate scheduler process: unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleMeta {
    pub spec: String,
    pub kind: SnapKind,
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// `sandboxes/NAME/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub name: String,
    pub created: i64,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub origin: Origin,
    /// The named image a booted sandbox was created from (`use --image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The VMM process while one was started (check with `status`).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub started: Option<i64>,
    /// The snapshot the VM's dirty-page log counts from: the parent of the
    /// next diff snapshot (none right after a boot).
    #[serde(default)]
    pub mem_baseline: Option<String>,
    #[serde(default)]
    pub schedule: Option<ScheduleMeta>,
}

/// What a sandbox is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Paused,
    Stopped,
    /// The VMM process lives but its API does not answer.
    Unresponsive,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Unresponsive => "unresponsive",
        }
    }
}

/// Files of one sandbox.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub meta: PathBuf,
    pub disk: PathBuf,
    pub api_sock: PathBuf,
    pub vsock: PathBuf,
    pub serial: PathBuf,
    pub vmm_log: PathBuf,
    pub history: PathBuf,
    /// A restored-from-diff sandbox's merged state and memory.
    pub vmstate: PathBuf,
    pub memory: PathBuf,
}

impl Paths {
    pub fn new(dir: PathBuf) -> Self {
        Paths {
            meta: dir.join(META_FILE),
            disk: dir.join("disk.ext4"),
            api_sock: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
            serial: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
            history: dir.join("history.log"),
            vmstate: dir.join("vmstate"),
            memory: dir.join("memory"),
            dir,
        }
    }
}

/// A sandbox as found in the store.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub meta: SandboxMeta,
    pub paths: Paths,
}

/// What a new sandbox boots.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The image name when the guest came from `--image`.
    pub image: Option<String>,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub cmdline: Option<String>,
}

impl Sandbox {
    /// Loads a sandbox; `Error::NoSandbox` when it does not exist.
    pub fn load(ctx: &Ctx, name: &str) -> Result<Self> {
        let paths = Paths::new(ctx.store.sandbox_dir(name));
        match read_json::<SandboxMeta>(&paths.meta)? {
            Some(meta) => Ok(Sandbox { meta, paths }),
            None => Err(Error::NoSandbox(name.to_string())),
        }
    }

    pub fn exists(ctx: &Ctx, name: &str) -> bool {
        ctx.store.sandbox_dir(name).join(META_FILE).is_file()
    }

    pub fn save(&self) -> Result<()> {
        write_json_atomic(&self.paths.meta, &self.meta)
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&self.paths.api_sock, &self.meta.name)
    }

    /// Whether the sandbox's VMM process is alive.
    pub fn vmm_alive(&self) -> bool {
        let sock = arg(&self.paths.api_sock);
        self.meta
            .pid
            .is_some_and(|pid| process::alive(pid, &[&sock]))
    }

    /// Whether the VMM process this command started still runs (its
    /// arguments may not be visible yet right after the start).
    fn vmm_running(&self) -> bool {
        self.meta.pid.is_some_and(|pid| process::alive(pid, &[]))
    }

    pub fn status(&self) -> Status {
        if !self.vmm_alive() {
            return Status::Stopped;
        }
        match self.api().vm_state().as_deref() {
            Ok("Running") => Status::Running,
            Ok("Paused") => Status::Paused,
            _ => Status::Unresponsive,
        }
    }

    /// A new sandbox booted from a copy of `spec.rootfs`. The caller holds
    /// the sandbox's lock and has checked the name is free.
    pub fn create_boot(ctx: &Ctx, name: &str, spec: &BootSpec) -> Result<Self> {
        let paths = Paths::new(ctx.store.sandbox_dir(name));
        make_dir(&paths.dir)?;
        let result = (|| {
            ctx.progress
                .step(&format!("copying {}", spec.rootfs.display()));
            disk::copy_file(&spec.rootfs, &paths.disk)?;
            let mut sb = Sandbox {
                meta: SandboxMeta {
                    name: name.to_string(),
                    created: clock::now(),
                    kernel: spec.kernel.clone(),
                    cmdline: spec
                        .cmdline
                        .clone()
                        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                    vcpus: spec.vcpus,
                    mem_mib: spec.mem_mib,
                    origin: Origin::Boot {
                        rootfs: spec.rootfs.clone(),
                    },
                    image: spec.image.clone(),
                    pid: None,
                    started: None,
                    mem_baseline: None,
                    schedule: None,
                },
                paths: paths.clone(),
            };
            sb.save()?;
            sb.boot(ctx)?;
            Ok(sb)
        })();
        if result.is_err() {
            discard(&paths);
        }
        result
    }

    /// A new sandbox from a ready snapshot: its disk, and (unless the
    /// snapshot is disk-only) its memory and devices, so processes continue.
    pub fn create_from_snapshot(ctx: &Ctx, name: &str, snap: &SnapshotMeta) -> Result<Self> {
        let paths = Paths::new(ctx.store.sandbox_dir(name));
        make_dir(&paths.dir)?;
        let result = (|| {
            let snap_dir = ctx.store.snapshot_dir(&snap.name);
            ctx.progress
                .step(&format!("copying the disk of snapshot {}", snap.name));
            let method = disk::copy_file(&snap_dir.join("disk"), &paths.disk)?;
            log::debug!("disk copy by {method:?}");
            let mut sb = Sandbox {
                meta: SandboxMeta {
                    name: name.to_string(),
                    created: clock::now(),
                    kernel: snap.kernel.clone(),
                    cmdline: snap.cmdline.clone(),
                    vcpus: snap.vcpus,
                    mem_mib: snap.mem_mib,
                    origin: Origin::Snapshot {
                        snapshot: snap.name.clone(),
                    },
                    image: None,
                    pid: None,
                    started: None,
                    mem_baseline: None,
                    schedule: None,
                },
                paths: paths.clone(),
            };
            sb.save()?;
            if snap.kind == SnapKind::Disk {
                sb.boot(ctx)?;
            } else {
                sb.restore(ctx, snap)?;
            }
            Ok(sb)
        })();
        if result.is_err() {
            discard(&paths);
        }
        result
    }

    /// Starts a VMM process with `args` (`run ...`), records its pid. The
    /// VMM also runs the sandbox's snapshot schedule (schedule.rs).
    fn spawn(&mut self, ctx: &Ctx, mut args: Vec<OsString>) -> Result<()> {
        for sock in [&self.paths.api_sock, &self.paths.vsock] {
            let _ = std::fs::remove_file(sock);
        }
        args.extend([
            SANDBOX_FLAG.into(),
            self.meta.name.clone().into(),
            STATE_FLAG.into(),
            ctx.store.root().as_os_str().to_owned(),
        ]);
        let pid = process::spawn_detached(&args, &self.paths.dir, &self.paths.vmm_log)?;
        self.meta.pid = Some(pid);
        self.meta.started = Some(clock::now());
        self.save()
    }

    /// Boots the sandbox's kernel on its disk and waits for the agent.
    pub fn boot(&mut self, ctx: &Ctx) -> Result<()> {
        let p = &self.paths;
        let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into()];
        args.push(self.meta.kernel.clone().into());
        args.extend([
            "--rootfs".into(),
            p.disk.clone().into(),
            "--cmdline".into(),
            self.meta.cmdline.clone().into(),
            "--vcpus".into(),
            self.meta.vcpus.to_string().into(),
            "--mem-mib".into(),
            self.meta.mem_mib.to_string().into(),
            "--vsock".into(),
            format!("cid={GUEST_CID},uds={}", p.vsock.display()).into(),
            "--api-sock".into(),
            p.api_sock.clone().into(),
            "--serial-log".into(),
            p.serial.clone().into(),
            "--track-dirty-pages".into(),
        ]);
        ctx.progress
            .step(&format!("booting sandbox {}", self.meta.name));
        self.meta.mem_baseline = None;
        self.spawn(ctx, args)?;
        self.wait_api()?;
        self.wait_agent(ctx.config.boot_timeout())?;
        Ok(())
    }

    /// Restores `snap` into a fresh VMM process and waits for the agent.
    fn restore(&mut self, ctx: &Ctx, snap: &SnapshotMeta) -> Result<()> {
        let (state, memory) = super::snapshot::loadable_files(ctx, snap, &self.paths)?;
        let args: Vec<OsString> = vec![
            "run".into(),
            "--api-sock".into(),
            self.paths.api_sock.clone().into(),
            "--serial-log".into(),
            self.paths.serial.clone().into(),
        ];
        ctx.progress
            .step(&format!("restoring snapshot {}", snap.name));
        let t0 = Instant::now();
        self.spawn(ctx, args)?;
        self.wait_api()?;
        let loaded = self
            .api()
            .load_snapshot(&state, &memory, &self.paths.disk, &self.paths.vsock);
        if let Err(e) = loaded {
            self.kill();
            return Err(e);
        }
        self.meta.mem_baseline = Some(snap.name.clone());
        self.save()?;
        log::debug!("restore took {:?}", t0.elapsed());
        self.wait_agent(ctx.config.boot_timeout())?;
        // The guest's clock stopped when the snapshot was taken.
        guest::set_clock(self);
        Ok(())
    }

    /// Waits for the API socket to answer (the VMM is up).
    fn wait_api(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.api().call::<()>("GET", "/version", None).is_ok() {
                return Ok(());
            }
            if !self.vmm_running() {
                return Err(self.died("while starting"));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::Failed(format!(
                    "sandbox {}: the VMM did not open its API socket within 20s",
                    self.meta.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the guest agent, failing early if the VMM dies.
    pub fn wait_agent(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = (Instant::now() + Duration::from_secs(1)).min(deadline);
            match guest::wait_ready(self, slice) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Failed(format!(
                        "sandbox {}: the guest agent did not answer within {}s ({e}); \
                         the sandbox is left running, see `vmm logs {}`",
                        self.meta.name,
                        timeout.as_secs(),
                        self.meta.name
                    )))
                }
                Err(_) => {}
            }
            if !self.vmm_running() {
                return Err(self.died("before its guest agent answered"));
            }
        }
    }

    /// An error saying the VMM ended, with the last line it logged.
    fn died(&self, when: &str) -> Error {
        let log = std::fs::read_to_string(&self.paths.vmm_log).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Error::Failed(format!(
            "sandbox {}: the VMM exited {when}: {}",
            self.meta.name,
            if last.is_empty() {
                "(no message)"
            } else {
                last
            }
        ))
    }

    /// Makes sure the VM runs: boots a stopped sandbox, resumes a paused one.
    pub fn ensure_running(&mut self, ctx: &Ctx) -> Result<()> {
        match self.status() {
            Status::Running => Ok(()),
            Status::Paused => self.api().resume(),
            Status::Stopped => {
                if let Some(line) = crash_line(&self.paths.vmm_log) {
                    eprintln!(
                        "vmm: sandbox {} had stopped ({line}); booting it again from its disk \
                         (what was only in its memory is gone; `vmm logs {}` has the console)",
                        self.meta.name, self.meta.name
                    );
                }
                self.boot(ctx)
            }
            Status::Unresponsive => Err(Error::Failed(format!(
                "sandbox {} does not answer on its API socket; `vmm stop -f {}` ends it",
                self.meta.name, self.meta.name
            ))),
        }
    }

    /// Ends the VMM: gracefully (guest filesystems synced, then the VMM
    /// stops), or at once with `force`.
    /// The VMM's scheduler thread ends with it.
    pub fn stop(&mut self, ctx: &Ctx, force: bool) -> Result<()> {
        if !self.vmm_alive() {
            return Ok(());
        }
        if force {
            self.kill();
        } else {
            if self.status() == Status::Paused {
                self.api().resume()?;
            }
            ctx.progress
                .step(&format!("syncing and stopping {}", self.meta.name));
            if let Err(e) = guest::sync(self, Duration::from_secs(10)) {
                log::warn!("sandbox {}: {e}; stopping anyway", self.meta.name);
            }
            self.api().stop()?;
            let pid = self.meta.pid.unwrap_or(0);
            if !process::wait_gone(pid, &[&arg(&self.paths.api_sock)], Duration::from_secs(15)) {
                return Err(Error::Failed(format!(
                    "sandbox {} did not stop within 15s; `vmm stop -f {}` kills it",
                    self.meta.name, self.meta.name
                )));
            }
        }
        self.meta.pid = None;
        self.meta.mem_baseline = None;
        self.save()
    }

    /// SIGKILLs the VMM and waits for it to go.
    pub fn kill(&self) {
        if let Some(pid) = self.meta.pid {
            let sock = arg(&self.paths.api_sock);
            if process::alive(pid, &[&sock]) {
                process::signal(pid, libc::SIGKILL);
                process::wait_gone(pid, &[&sock], Duration::from_secs(10));
            }
        }
    }

    /// Removes the sandbox's files (the VMM must be gone).
    pub fn remove_files(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.paths.dir)
            .map_err(|e| Error::io("removing", &self.paths.dir, e))
    }

    /// Appends one exec record to the history log.
    pub fn record_exec(&self, argv: &[String], code: i32, took: Duration) {
        use std::io::Write;
        let line = format!(
            "{} exit={code} time={:.3}s {}\n",
            clock::format_utc(clock::now()),
            took.as_secs_f64(),
            shell_words(argv)
        );
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.history);
        if let Ok(mut f) = file {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Bytes the sandbox's files occupy.
    pub fn disk_usage(&self) -> u64 {
        disk::dir_allocated_bytes(&self.paths.dir)
    }
}

/// Creates a sandbox directory; an existing one is a name clash.
fn make_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Invalid(format!("{} already exists", dir.display()))
        } else {
            Error::io("creating", dir, e)
        }
    })
}

/// Removes what a failed creation left, killing its VMM.
fn discard(paths: &Paths) {
    if let Ok(Some(meta)) = read_json::<SandboxMeta>(&paths.meta) {
        Sandbox {
            meta,
            paths: paths.clone(),
        }
        .kill();
    }
    let _ = std::fs::remove_dir_all(&paths.dir);
}

/// Arguments joined for display, quoted where a shell would need it.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The VMM's last line when its process ended with an error (`vmm run`
/// prints one `vmm: ...` line before exiting 1 or 2); None after a clean
/// stop or reboot, which print nothing.
fn crash_line(vmm_log: &Path) -> Option<String> {
    // The log is appended to across boots: read only its end.
    let mut f = std::fs::File::open(vmm_log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let last = String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())?
        .trim()
        .to_string();
    last.starts_with("vmm: ").then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_line_is_the_last_vmm_error_line_only() {
        let dir = super::super::store::tests::TempDir::new("crash-line");
        let log = dir.0.join("vmm.log");
        assert_eq!(crash_line(&log), None, "no log");
        let mut text = "x".repeat(10_000);
        text.push_str("\nvmm[main] warn: noise\nvmm: vCPU 0: guest triple fault\n\n");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(
            crash_line(&log).as_deref(),
            Some("vmm: vCPU 0: guest triple fault")
        );
        std::fs::write(&log, "vmm: old crash\nvmm[main] info: guest rebooted\n").unwrap();
        assert_eq!(crash_line(&log), None, "a clean end after an old crash");
    }

    #[test]
    fn quoting_and_meta_format() {
        assert_eq!(
            shell_words(&["sh".into(), "-c".into(), "echo 'hi' > /x".into(), "".into()]),
            r#"sh -c 'echo '\''hi'\'' > /x' ''"#
        );
        let m: SandboxMeta = serde_json::from_str(
            r#"{"name":"a","created":1,"kernel":"/k","cmdline":"c","vcpus":1,"mem_mib":128,
                "origin":{"kind":"snapshot","snapshot":"s"}}"#,
        )
        .unwrap();
        assert_eq!(
            m.origin,
            Origin::Snapshot {
                snapshot: "s".into()
            }
        );
        assert!(m.pid.is_none() && m.schedule.is_none() && m.image.is_none());
        // Fields of older versions (a scheduler process's pid) are ignored.
        let old: SandboxMeta = serde_json::from_str(
            r#"{"name":"a","created":1,"kernel":"/k","cmdline":"c","vcpus":1,"mem_mib":128,
                "origin":{"kind":"boot","rootfs":"/r"},"pid":7,
                "schedule":{"spec":"@hourly","kind":"full","pid":8}}"#,
        )
        .unwrap();
        assert_eq!(old.schedule.map(|s| s.spec).as_deref(), Some("@hourly"));
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            text.contains(r#""origin":{"kind":"snapshot","snapshot":"s"}"#),
            "{text}"
        );
    }
}

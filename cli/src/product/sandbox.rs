//! Sandboxes: a named background VMM with its own disk copy, vsock and API
//! sockets, logs and optionally a TAP network interface. Created by booting
//! the default guest or by restoring a snapshot; stopped (the VMM ends, the
//! disk stays) and started again (a fresh boot from its disk); removed.
//!
//! Creation (and what a failed or interrupted one leaves) is in
//! sandbox/create.rs.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::api::ApiClient;
use super::clock;
use super::disk;
use super::error::{Error, Result};
use super::guest;
use super::names;
use super::net::NetMeta;
use super::process::{self, arg};
use super::schedule::{SANDBOX_FLAG, STATE_FLAG};
use super::snap_remove::Pinned;
use super::snapshot::{self, SnapKind};
use super::store::{check_entry_name, read_json, write_json_atomic, Kind, Lock, META_FILE};
use super::Ctx;

mod create;

pub use create::{BootSpec, Guest};

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

/// Where a sandbox's creation stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Being created by `creator_pid` (if that process is gone, the
    /// creation was interrupted).
    Creating,
    /// Created (metadata of older versions has no lifecycle: ready).
    #[default]
    Ready,
    /// Creation failed; kept for its logs until removed.
    Failed,
}

/// `sandboxes/NAME/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub name: String,
    pub created: i64,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// The process creating the sandbox, while it is creating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_pid: Option<u32>,
    /// Why creation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub origin: Origin,
    /// The named image a booted sandbox was created from (`use --image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The network interface (`--tap`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMeta>,
    /// The VMM process while one was started (check with `status`).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub started: Option<i64>,
    /// The snapshot the VM's dirty-page log counts from: the parent of the
    /// next diff snapshot (none right after a boot).
    #[serde(default)]
    pub mem_baseline: Option<String>,
    /// That snapshot's id: a name can be reused by another snapshot, which a
    /// diff must not be stored against (none from older versions: no diff).
    #[serde(default)]
    pub mem_baseline_id: Option<String>,
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
    /// Being created.
    Creating,
    /// Its creation failed or was interrupted: only `logs` and `rm` apply.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Unresponsive => "unresponsive",
            Status::Creating => "creating",
            Status::Failed => "failed",
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

impl Sandbox {
    /// Loads a sandbox (checking the name first); `Error::NoSandbox` when
    /// it does not exist, an error when its metadata is another sandbox's.
    pub fn load(ctx: &Ctx, name: &str) -> Result<Self> {
        names::validate("sandbox", name)?;
        let paths = Paths::new(ctx.store.sandbox_dir(name));
        match read_json::<SandboxMeta>(&paths.meta)? {
            Some(meta) => {
                check_entry_name(Kind::Sandbox, name, &meta.name, &paths.meta)?;
                Ok(Sandbox { meta, paths })
            }
            None if paths.dir.is_dir() => Ok(Sandbox {
                meta: SandboxMeta::broken(name, &paths.dir),
                paths,
            }),
            None => Err(Error::NoSandbox(name.to_string())),
        }
    }

    /// Whether the name is taken (also by a failed or broken sandbox).
    pub fn exists(ctx: &Ctx, name: &str) -> bool {
        ctx.store.sandbox_dir(name).symlink_metadata().is_ok()
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

    /// Whether the process that is creating the sandbox still runs.
    fn creator_alive(&self) -> bool {
        self.meta
            .creator_pid
            .is_some_and(|pid| process::alive(pid, &[]))
    }

    pub fn status(&self) -> Status {
        match self.meta.lifecycle {
            Lifecycle::Ready => {}
            Lifecycle::Creating if self.creator_alive() => return Status::Creating,
            Lifecycle::Creating | Lifecycle::Failed => return Status::Failed,
        }
        if !self.vmm_alive() {
            return Status::Stopped;
        }
        match self.api().vm_state().as_deref() {
            Ok("Running") => Status::Running,
            Ok("Paused") => Status::Paused,
            _ => Status::Unresponsive,
        }
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
        if let Some(net) = &self.meta.net {
            args.extend(["--net".into(), net.run_arg().into()]);
        }
        ctx.progress
            .step(&format!("booting sandbox {}", self.meta.name));
        self.meta.mem_baseline = None;
        self.meta.mem_baseline_id = None;
        self.spawn(ctx, args)?;
        self.wait_api()?;
        self.wait_agent(ctx.config.boot_timeout())?;
        Ok(())
    }

    /// Restores the pinned snapshot into a fresh VMM process (the pin is
    /// released once the VMM has its files) and waits for the agent.
    fn restore(&mut self, ctx: &Ctx, pin: Pinned) -> Result<()> {
        let snap = &pin.meta;
        let (state, memory) = snapshot::loadable_files(ctx, &pin, &self.paths)?;
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
        let tap = self.meta.net.as_ref().map(|n| n.tap.as_str());
        let loaded =
            self.api()
                .load_snapshot(&state, &memory, &self.paths.disk, &self.paths.vsock, tap);
        if let Err(e) = loaded {
            self.kill();
            return Err(e);
        }
        self.meta.mem_baseline = Some(snap.name.clone());
        self.meta.mem_baseline_id = snap.id.clone();
        drop(pin);
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

    /// Waits for the guest agent, failing early if the VMM dies. On a
    /// timeout the error says what becomes of the sandbox: a new one is kept
    /// as failed with its VMM stopped (see [`Sandbox::create`]), an existing
    /// one is left running.
    pub fn wait_agent(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = (Instant::now() + Duration::from_secs(1)).min(deadline);
            match guest::wait_ready(self, slice) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    let name = &self.meta.name;
                    let console = match last_line(&self.paths.serial) {
                        Some(line) => format!(" (its last line: {line:?})"),
                        None => " (empty)".to_string(),
                    };
                    let then = if self.meta.lifecycle == Lifecycle::Creating {
                        format!(
                            "the new sandbox is kept as failed, its VMM stopped: `vmm logs \
                             {name}` shows its console{console}, `vmm rm {name}` removes it"
                        )
                    } else {
                        format!(
                            "the sandbox is left running: `vmm logs {name}` shows its \
                             console{console}, `vmm stop {name}` stops it"
                        )
                    };
                    return Err(Error::AgentTimeout {
                        sandbox: name.clone(),
                        secs: timeout.as_secs(),
                        cause: match e {
                            Error::Agent { message, .. } => message,
                            other => other.to_string(),
                        },
                        then,
                    });
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
            Status::Creating | Status::Failed => self.require_ready(),
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
        self.meta.mem_baseline_id = None;
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

    /// Removes sandbox `name` (as asked, not as read from its metadata) and
    /// its files; `lock` is its lock and its VMM must be gone. The files are
    /// deleted after the store lock is released: other commands need not
    /// wait for a large disk to go.
    pub fn remove(ctx: &Ctx, name: &str, lock: &Lock) -> Result<()> {
        let trash = {
            let store = ctx.store.lock_store()?;
            ctx.store.take_entry(Kind::Sandbox, name, &store, lock)?
        };
        trash.delete()
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
    last_line(vmm_log).filter(|l| l.starts_with("vmm: "))
}

/// The last non-empty line of a log (appended to across boots: only its end
/// is read), without control characters and at most 200 characters long.
fn last_line(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let clean: String = line.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim();
    Some(match clean.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &clean[..cut]),
        None => clean.to_string(),
    })
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

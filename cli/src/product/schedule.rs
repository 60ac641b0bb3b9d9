//! Automatic snapshots. A schedule lives in the sandbox's metadata
//! (`snapshot schedule` writes it under the sandbox's lock) and is run by the
//! sandbox's own VMM process: `vmm run --sandbox NAME --sandbox-state DIR`
//! starts a scheduler thread that re-reads the metadata every second (a
//! small JSON file: cheaper to parse than to reason about mtimes), follows
//! schedule changes within that second, and on a tick takes the same
//! snapshot `vmm snapshot save` does, through the VMM's own API socket, so
//! there is one snapshot code path. Stopping or removing the sandbox ends
//! the VMM and the thread with it; nothing else runs in the background.
//!
//! A tick is skipped when the sandbox is busy (a snapshot or another change
//! holds its lock: a scheduled snapshot never runs beside another), when it
//! is not running or paused, or when this VMM is not the one its metadata
//! records. Missed ticks (a host suspend, a long snapshot) collapse into one.
//! Scheduled snapshots leave the sandbox as they found it (running or
//! paused), and are followed by a reaper pass.

use std::path::Path;
use std::time::Duration;

use super::clock::{self, format_utc};
use super::cron::Schedule;
use super::error::{Error, Result};
use super::process;
use super::sandbox::{Sandbox, ScheduleMeta, Status};
use super::snap_remove;
use super::snapshot::{self, GuestSync, SaveOptions, SnapKind, SnapshotMeta};
use super::Ctx;

/// `vmm run` flag naming the sandbox whose schedule the VMM runs.
pub const SANDBOX_FLAG: &str = "--sandbox";
/// `vmm run` flag giving that sandbox's state directory.
pub const STATE_FLAG: &str = "--sandbox-state";

/// How often the scheduler thread looks at the clock and the metadata.
const POLL: Duration = Duration::from_secs(1);

/// Sets (replacing) or, with `spec` None, removes the schedule of a sandbox;
/// returns the first fire time. The sandbox's VMM picks the change up.
pub fn set(
    ctx: &Ctx,
    name: &str,
    spec: Option<&str>,
    kind: SnapKind,
    expires_in: Option<Duration>,
) -> Result<Option<i64>> {
    let next = match spec {
        Some(s) => Some(
            Schedule::parse(s)?
                .next_after(clock::now())
                .ok_or_else(|| Error::Invalid(format!("schedule {s:?} never fires")))?,
        ),
        None => None,
    };
    // Found before locking: no lock file for a name that does not exist.
    Sandbox::load(ctx, name)?;
    let _lock = ctx.store.lock_sandbox(name)?;
    let mut sb = Sandbox::load(ctx, name)?;
    sb.meta.schedule = spec.map(|s| ScheduleMeta {
        spec: s.to_string(),
        kind,
        expires_in_secs: expires_in.map(|d| d.as_secs()),
    });
    sb.save()?;
    if spec.is_some() && sb.vmm_alive() && !runs_schedules(&sb) {
        log::warn!(
            "sandbox {name}'s VMM was started by an older vmm without a scheduler; \
             the schedule applies from its next start (`vmm stop {name}`, then `vmm use {name}`)"
        );
    }
    Ok(next)
}

/// Whether the sandbox's VMM process runs a scheduler thread.
fn runs_schedules(sb: &Sandbox) -> bool {
    sb.meta
        .pid
        .is_some_and(|pid| process::alive(pid, &[SANDBOX_FLAG, &sb.meta.name]))
}

/// A change of the schedule the thread follows, for its log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// A schedule (new or replaced) whose first tick is at `.1`.
    Armed(String, i64),
    Removed,
    /// The metadata holds a schedule that cannot run.
    Unusable(String),
}

/// The schedule being followed and its next fire time.
#[derive(Debug, Clone)]
struct Armed {
    meta: ScheduleMeta,
    schedule: Schedule,
    next: i64,
}

/// The tick decisions of the scheduler thread, apart from the clock and the
/// store so they can be tested.
#[derive(Debug, Default)]
struct Plan {
    /// The schedule last seen in the metadata (also when unusable, so an
    /// unusable one is reported once).
    seen: Option<ScheduleMeta>,
    armed: Option<Armed>,
}

impl Plan {
    /// Follows the sandbox's current schedule at `now`; says what changed.
    fn follow(&mut self, wanted: Option<&ScheduleMeta>, now: i64) -> Option<Change> {
        if self.seen.as_ref() == wanted {
            return None;
        }
        self.seen = wanted.cloned();
        self.armed = None;
        let Some(meta) = wanted.cloned() else {
            return Some(Change::Removed);
        };
        let schedule = match Schedule::parse(&meta.spec) {
            Ok(s) => s,
            Err(e) => return Some(Change::Unusable(e.to_string())),
        };
        let Some(next) = schedule.next_after(now) else {
            return Some(Change::Unusable(format!("{:?} never fires", meta.spec)));
        };
        let change = Change::Armed(meta.spec.clone(), next);
        self.armed = Some(Armed {
            meta,
            schedule,
            next,
        });
        Some(change)
    }

    /// The schedule to run when a tick is due at `now`; the next fire time
    /// moves past `now`, so ticks missed meanwhile make one, not a burst.
    fn due(&mut self, now: i64) -> Option<ScheduleMeta> {
        let armed = self.armed.as_mut()?;
        if now < armed.next {
            return None;
        }
        let after = armed
            .schedule
            .next_after(armed.next)
            .filter(|&t| t > now)
            .or_else(|| armed.schedule.next_after(now));
        let meta = armed.meta.clone();
        match after {
            Some(t) => armed.next = t,
            None => self.armed = None,
        }
        Some(meta)
    }

    fn next(&self) -> Option<i64> {
        self.armed.as_ref().map(|a| a.next)
    }
}

/// What a due tick does, given the sandbox's state (its lock already won).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Skip(String),
    Save { kind: SnapKind, resume: bool },
}

/// The pure part of a tick: `ours` says whether the metadata records this
/// process as the sandbox's VMM; `has_baseline` whether a diff has a ready
/// parent in this run (the very snapshot its dirty log counts from).
fn decide(ours: bool, status: Status, wanted: SnapKind, has_baseline: bool) -> Decision {
    if !ours {
        return Decision::Skip("the sandbox's metadata records another VMM process".into());
    }
    if !matches!(status, Status::Running | Status::Paused) {
        return Decision::Skip(format!("the sandbox is {}", status.as_str()));
    }
    // A diff needs an earlier snapshot in this run; the first one is full.
    let kind = match wanted {
        SnapKind::Diff if !has_baseline => SnapKind::Full,
        k => k,
    };
    Decision::Save {
        kind,
        resume: status == Status::Running,
    }
}

/// How a due tick ended.
#[derive(Debug)]
enum Outcome {
    Skipped(String),
    /// Saved, and the error of resuming the sandbox afterwards if that
    /// failed.
    Saved(Box<SnapshotMeta>, Option<Error>),
    Failed(Error),
}

/// One due tick: the sandbox's lock if free (else skipped: a snapshot or
/// another change is in flight), then the decision, then the save.
fn tick(ctx: &Ctx, name: &str, s: &ScheduleMeta) -> Outcome {
    let _lock = match ctx.store.try_lock_sandbox(name) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Outcome::Skipped(
                "a snapshot or another change of the sandbox is in flight".into(),
            )
        }
        Err(e) => return Outcome::Failed(e),
    };
    let sb = match Sandbox::load(ctx, name) {
        Ok(sb) => sb,
        Err(e) => return Outcome::Failed(e),
    };
    let ours = sb.meta.pid == Some(std::process::id());
    let status = if ours { sb.status() } else { Status::Stopped };
    let has_baseline = snapshot::diff_parent(ctx, &sb).is_ok();
    match decide(ours, status, s.kind, has_baseline) {
        Decision::Skip(why) => Outcome::Skipped(why),
        Decision::Save { kind, resume } => {
            let opts = SaveOptions {
                name: None,
                kind,
                resume_source: resume,
                guest_sync: GuestSync::BestEffort,
                expires_in: s.expires_in_secs.map(Duration::from_secs),
            };
            match snapshot::save(ctx, name, &opts) {
                Ok((m, not_resumed)) => Outcome::Saved(Box::new(m), not_resumed),
                Err(e) => Outcome::Failed(e),
            }
        }
    }
}

/// One line in the VMM's log (its stderr, `vmm.log`), whatever `VMM_LOG`.
fn say(msg: &str) {
    eprintln!("{} vmm[scheduler]: {msg}", format_utc(clock::now()));
}

/// Starts the scheduler thread of sandbox `name` in this VMM process.
///
/// Call it before any other thread starts: seccomp filters are per thread
/// and inherited at creation, so this thread starts unfiltered and installs
/// its own [`vmm::seccomp::ThreadKind::Scheduler`] filter. It is not given
/// the VMM thread's filter (which allows KVM ioctls and kills on anything
/// unlisted) because it runs product code, and it is not left unfiltered
/// because it shares the address space with threads that handle guest
/// input: a compromised device or vCPU thread could otherwise hijack it to
/// make any syscall. Its own guest-facing input is the guest agent's answer
/// to `sync`, the same message `vmm snapshot save` reads.
pub fn spawn_in_vmm(state_dir: &Path, name: &str) -> Result<()> {
    let ctx = Ctx::at(state_dir)?;
    let owned = name.to_string();
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Scheduler) {
                say(&format!("not running schedules: {e}"));
                return;
            }
            run(&ctx, &owned);
        })
        .map(|_| ())
        .map_err(|e| Error::io("starting the scheduler thread of", Path::new(&name), e))
}

/// The scheduler thread's loop; returns when the sandbox is removed.
fn run(ctx: &Ctx, name: &str) {
    let mut plan = Plan::default();
    let mut load_error: Option<String> = None;
    loop {
        let now = clock::now();
        let change = match Sandbox::load(ctx, name) {
            Ok(sb) => {
                load_error = None;
                plan.follow(sb.meta.schedule.as_ref(), now)
            }
            Err(Error::NoSandbox(_)) => {
                say(&format!("sandbox {name} was removed; scheduler ends"));
                return;
            }
            Err(e) => {
                // Keep the plan: a metadata write may be half-way.
                let text = e.to_string();
                if load_error.as_ref() != Some(&text) {
                    say(&format!("cannot read the schedule: {text}"));
                }
                load_error = Some(text);
                None
            }
        };
        match change {
            Some(Change::Armed(spec, next)) => {
                say(&format!("schedule {spec:?}: next at {}", format_utc(next)))
            }
            Some(Change::Removed) => say("schedule removed"),
            Some(Change::Unusable(why)) => say(&format!("schedule not run: {why}")),
            None => {}
        }
        if let Some(s) = plan.due(clock::now()) {
            match tick(ctx, name, &s) {
                Outcome::Saved(m, not_resumed) => {
                    say(&format!(
                        "snapshot {} ({}) ready in {} ms",
                        m.name,
                        m.kind.as_str(),
                        m.took_ms.unwrap_or(0)
                    ));
                    if let Some(e) = not_resumed {
                        say(&e.to_string());
                    }
                }
                Outcome::Skipped(why) => say(&format!("tick skipped: {why}")),
                Outcome::Failed(e) => say(&format!("snapshot failed: {e}")),
            }
            match snap_remove::reap(ctx) {
                Ok(gone) if !gone.is_empty() => say(&format!("expired: {}", gone.join(" "))),
                Ok(_) => {}
                Err(e) => say(&format!("reaper: {e}")),
            }
            if let Some(next) = plan.next() {
                log::debug!("scheduler: next tick at {}", format_utc(next));
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::super::sandbox::{Origin, SandboxMeta};
    use super::super::store::{tests::TempDir, Kind};
    use super::*;

    fn every(secs: u64, kind: SnapKind) -> ScheduleMeta {
        ScheduleMeta {
            spec: format!("@every {secs}s"),
            kind,
            expires_in_secs: None,
        }
    }

    #[test]
    fn fires_on_time_and_follows_changes() {
        let mut p = Plan::default();
        let s = every(5, SnapKind::Full);
        assert_eq!(p.follow(None, 100), None);
        assert_eq!(p.due(100), None);
        assert_eq!(
            p.follow(Some(&s), 100),
            Some(Change::Armed("@every 5s".into(), 105))
        );
        // The same schedule read again changes nothing.
        assert_eq!(p.follow(Some(&s), 101), None);
        assert_eq!(p.due(104), None);
        assert_eq!(p.due(105), Some(s.clone()));
        assert_eq!(p.next(), Some(110));
        assert_eq!(p.due(106), None);
        // Replaced: re-armed from the time of the change.
        let t = every(60, SnapKind::Diff);
        assert_eq!(
            p.follow(Some(&t), 107),
            Some(Change::Armed("@every 60s".into(), 167))
        );
        assert_eq!(p.due(110), None);
        assert_eq!(p.follow(None, 120), Some(Change::Removed));
        assert_eq!(p.due(1000), None);
        assert_eq!(p.follow(None, 1001), None);
    }

    #[test]
    fn missed_ticks_collapse_into_one() {
        let mut p = Plan::default();
        let s = every(5, SnapKind::Full);
        p.follow(Some(&s), 0);
        // Asleep from 5 to 62: one tick, then the next one after now.
        assert_eq!(p.due(62), Some(s));
        assert!(
            p.next().is_some_and(|n| n > 62 && n <= 67),
            "{:?}",
            p.next()
        );
        assert_eq!(p.due(63), None);
    }

    #[test]
    fn cron_schedules_fire_on_the_minute() {
        let mut p = Plan::default();
        let s = ScheduleMeta {
            spec: "*/2 * * * *".into(),
            kind: SnapKind::Full,
            expires_in_secs: Some(60),
        };
        let Some(Change::Armed(_, next)) = p.follow(Some(&s), 1_000_000) else {
            panic!("not armed");
        };
        assert!(
            next > 1_000_000 && next <= 1_000_120 && next % 60 == 0,
            "{next}"
        );
        assert_eq!(p.due(next - 1), None);
        assert_eq!(p.due(next), Some(s));
        assert!(p.next().is_some_and(|n| n > next && n <= next + 120 + 3600));
    }

    #[test]
    fn unusable_schedules_are_reported_once() {
        let mut p = Plan::default();
        let bad = ScheduleMeta {
            spec: "61 * * * *".into(),
            kind: SnapKind::Full,
            expires_in_secs: None,
        };
        assert!(matches!(p.follow(Some(&bad), 0), Some(Change::Unusable(_))));
        assert_eq!(p.follow(Some(&bad), 1), None);
        assert_eq!(p.due(1_000_000), None);
    }

    #[test]
    fn decisions() {
        use SnapKind::*;
        assert!(
            matches!(decide(false, Status::Running, Full, true), Decision::Skip(w) if w.contains("another VMM"))
        );
        for st in [Status::Stopped, Status::Unresponsive] {
            assert!(
                matches!(decide(true, st, Full, true), Decision::Skip(w) if w.contains(st.as_str()))
            );
        }
        assert_eq!(
            decide(true, Status::Running, Diff, false),
            Decision::Save {
                kind: Full,
                resume: true
            }
        );
        assert_eq!(
            decide(true, Status::Paused, Diff, true),
            Decision::Save {
                kind: Diff,
                resume: false
            }
        );
        assert_eq!(
            decide(true, Status::Running, Disk, false),
            Decision::Save {
                kind: Disk,
                resume: true
            }
        );
    }

    fn sandbox_in(ctx: &Ctx, name: &str, pid: Option<u32>) {
        let dir = ctx.store.sandbox_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let guest = super::super::sandbox::Guest {
            kernel: "/k".into(),
            cmdline: "c".into(),
            vcpus: 1,
            mem_mib: 128,
            image: None,
        };
        let origin = Origin::Boot {
            rootfs: "/r".into(),
        };
        let mut meta = SandboxMeta::creating(name, guest, origin, None);
        meta.lifecycle = super::super::sandbox::Lifecycle::Ready;
        meta.creator_pid = None;
        meta.pid = pid;
        meta.schedule = Some(every(5, SnapKind::Full));
        let sb = Sandbox {
            meta,
            paths: super::super::sandbox::Paths::new(dir),
        };
        sb.save().unwrap();
    }

    #[test]
    fn a_tick_is_skipped_while_the_sandbox_is_busy() {
        let t = TempDir::new("sched-busy");
        let ctx = Ctx::at(&t.0).unwrap();
        sandbox_in(&ctx, "dev", Some(std::process::id()));
        let held = ctx.store.lock_sandbox("dev").unwrap();
        let out = tick(&ctx, "dev", &every(5, SnapKind::Full));
        assert!(
            matches!(&out, Outcome::Skipped(w) if w.contains("in flight")),
            "{out:?}"
        );
        drop(held);
        // Free now, but the metadata names another VMM: still no snapshot.
        sandbox_in(&ctx, "dev", Some(u32::MAX));
        let out = tick(&ctx, "dev", &every(5, SnapKind::Full));
        assert!(
            matches!(&out, Outcome::Skipped(w) if w.contains("another VMM")),
            "{out:?}"
        );
        assert!(snapshot::list(&ctx).unwrap().is_empty());
        // The lock was released by the tick.
        assert!(ctx.store.try_lock_sandbox("dev").unwrap().is_some());
    }

    /// The product work of a tick, on a thread under the scheduler's
    /// seccomp filter (an unlisted syscall fails with EPERM, so a gap in the
    /// allow-list shows up as an error here).
    #[test]
    fn store_work_passes_the_scheduler_filter() {
        use std::io::{Read, Write};
        let t = TempDir::new("sched-seccomp");
        let sock = t.0.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut chunk).unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":\"Running\"}")
                .unwrap();
        });
        let root = t.0.clone();
        let worker = std::thread::spawn(move || {
            vmm::seccomp::install(vmm::seccomp::ThreadKind::Scheduler).unwrap();
            let ctx = Ctx::at(&root).unwrap();
            sandbox_in(&ctx, "dev", Some(std::process::id()));
            let lock = ctx.store.try_lock_sandbox("dev").unwrap().unwrap();
            let sb = Sandbox::load(&ctx, "dev").unwrap();
            // Not our VMM's arguments: stopped, found without the API.
            assert_eq!(sb.status(), Status::Stopped);
            let v = super::super::api::ApiClient::new(&sock, "dev")
                .call::<()>("GET", "/vm", None)
                .unwrap();
            assert_eq!(v["state"], "Running");
            std::fs::write(&sb.paths.disk, vec![7u8; 3 << 20]).unwrap();
            std::fs::create_dir(ctx.store.snapshot_dir("s1")).unwrap();
            let to = ctx.store.snapshot_dir("s1").join("disk");
            super::super::disk::copy_file(&sb.paths.disk, &to).unwrap();
            assert_eq!(std::fs::metadata(&to).unwrap().len(), 3 << 20);
            assert_eq!(
                snapshot::list(&ctx).unwrap().len(),
                1,
                "s1, without metadata"
            );
            std::fs::remove_dir_all(ctx.store.snapshot_dir("s1")).unwrap();
            // Entries are made and removed by renames; ids from /dev/urandom.
            let mut m = super::super::snapshot::tests::meta("s2", None);
            m.id = Some(super::super::names::random_id().unwrap());
            ctx.store.create_entry(Kind::Snapshot, "s2", &m).unwrap();
            let pin = snap_remove::pin(&ctx, "s2").unwrap();
            drop(pin);
            // Removal unlinks the snapshot's lock file too.
            super::super::store::tests::remove(&ctx.store, Kind::Snapshot, "s2").unwrap();
            assert!(!root.join("locks/snapshot-s2.lock").exists());
            assert!(snap_remove::reap(&ctx).unwrap().is_empty());
            let _ = clock::LocalTime::local(clock::now());
            say("filtered scheduler thread");
            drop(lock);
            std::thread::sleep(Duration::from_millis(1));
        });
        worker.join().unwrap();
        server.join().unwrap();
    }

    #[test]
    fn legacy_schedule_fields_are_ignored() {
        let m: ScheduleMeta =
            serde_json::from_str(r#"{"spec":"@hourly","kind":"diff","pid":1234}"#).unwrap();
        assert_eq!(m.kind, SnapKind::Diff);
        assert_eq!(m.expires_in_secs, None);
    }
}

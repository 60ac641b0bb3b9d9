//! Automatic snapshots. A schedule lives in the sandbox's metadata and is run
//! by a small detached process per sandbox (`vmm snapshot __scheduler`, its
//! pid in the metadata, its log in `scheduler.log`) while the sandbox's VMM
//! runs: stopping or removing the sandbox ends it, starting it again brings
//! it back. A tick is skipped when the sandbox is busy (a snapshot or another
//! change holds its lock) or stopped. Scheduled snapshots leave the sandbox
//! as they found it (running or paused) and are followed by a reaper pass.

use std::ffi::OsString;
use std::time::Duration;

use super::clock::{self, format_utc};
use super::cron::Schedule;
use super::error::{Error, Result};
use super::process::{self, arg};
use super::sandbox::{Sandbox, ScheduleMeta, Status};
use super::snapshot::{self, GuestSync, SaveOptions, SnapKind};
use super::Ctx;

/// The hidden subcommand name of the scheduler process.
pub const DAEMON_COMMAND: &str = "__scheduler";

/// Sets (replacing) or, with `spec` None, removes the schedule of a sandbox.
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
    let _lock = ctx.store.lock_sandbox(name)?;
    let mut sb = Sandbox::load(ctx, name)?;
    kill(ctx, &sb);
    sb.meta.schedule = spec.map(|s| ScheduleMeta {
        spec: s.to_string(),
        kind,
        expires_in_secs: expires_in.map(|d| d.as_secs()),
        pid: None,
    });
    sb.save()?;
    respawn(ctx, &mut sb)?;
    Ok(next)
}

fn markers(ctx: &Ctx, name: &str) -> [String; 3] {
    [
        DAEMON_COMMAND.to_string(),
        arg(ctx.store.root()),
        name.to_string(),
    ]
}

/// Starts the scheduler of a sandbox whose VMM runs, if it has a schedule.
pub fn respawn(ctx: &Ctx, sb: &mut Sandbox) -> Result<()> {
    if sb.meta.schedule.is_none() || !sb.vmm_alive() {
        return Ok(());
    }
    let args: Vec<OsString> = vec![
        "snapshot".into(),
        DAEMON_COMMAND.into(),
        "--state-dir".into(),
        ctx.store.root().as_os_str().to_owned(),
        sb.meta.name.clone().into(),
    ];
    let pid = process::spawn_detached(&args, &sb.paths.dir, &sb.paths.scheduler_log)?;
    if let Some(s) = sb.meta.schedule.as_mut() {
        s.pid = Some(pid);
    }
    sb.save()
}

/// Ends a sandbox's scheduler process, if one runs.
pub fn kill(ctx: &Ctx, sb: &Sandbox) {
    let Some(pid) = sb.meta.schedule.as_ref().and_then(|s| s.pid) else {
        return;
    };
    let m = markers(ctx, &sb.meta.name);
    let m: Vec<&str> = m.iter().map(String::as_str).collect();
    if process::alive(pid, &m) {
        process::signal(pid, libc::SIGTERM);
        process::wait_gone(pid, &m, Duration::from_secs(5));
    }
}

/// Whether this scheduler process should go on.
fn wanted(ctx: &Ctx, name: &str) -> Option<(Sandbox, ScheduleMeta)> {
    let sb = Sandbox::load(ctx, name).ok()?;
    let s = sb.meta.schedule.clone()?;
    let me = std::process::id();
    if s.pid.is_some_and(|p| p != me) || !sb.vmm_alive() {
        return None;
    }
    Some((sb, s))
}

fn say(msg: &str) {
    println!("{} {msg}", format_utc(clock::now()));
}

/// The scheduler process's loop; returns when the schedule is removed or
/// replaced, or the sandbox stops or disappears.
pub fn daemon(ctx: &Ctx, name: &str) -> Result<()> {
    let Some((_, first)) = wanted(ctx, name) else {
        return Ok(());
    };
    let schedule = Schedule::parse(&first.spec)?;
    say(&format!("scheduler for {name} started: {:?}", first.spec));
    let mut last = clock::now();
    loop {
        let Some(mut next) = schedule.next_after(last) else {
            say("the schedule never fires again; exiting");
            return Ok(());
        };
        // After a long stall (host suspend), fire once, not for every miss.
        let now = clock::now();
        if next < now {
            next = schedule.next_after(now - 1).unwrap_or(now);
        }
        loop {
            let now = clock::now();
            if now >= next {
                break;
            }
            let left = u64::try_from(next - now).unwrap_or(1).min(1);
            std::thread::sleep(Duration::from_secs(left));
            if wanted(ctx, name).is_none() {
                say("schedule removed or sandbox stopped; exiting");
                return Ok(());
            }
        }
        last = next;
        let Some((_, current)) = wanted(ctx, name) else {
            return Ok(());
        };
        tick(ctx, name, &current);
    }
}

fn tick(ctx: &Ctx, name: &str, s: &ScheduleMeta) {
    let lock = match ctx.store.try_lock_sandbox(name) {
        Ok(Some(l)) => l,
        Ok(None) => {
            say("tick skipped: a snapshot or another change of the sandbox is in flight");
            return;
        }
        Err(e) => {
            say(&format!("tick skipped: {e}"));
            return;
        }
    };
    let (status, has_baseline) = match Sandbox::load(ctx, name) {
        Ok(sb) => {
            let base_ready = sb.meta.mem_baseline.as_deref().is_some_and(|b| {
                snapshot::SnapshotMeta::load(ctx, b)
                    .is_ok_and(|m| m.status == snapshot::SnapStatus::Ready)
            });
            (sb.status(), base_ready)
        }
        Err(e) => {
            say(&format!("tick skipped: {e}"));
            return;
        }
    };
    if !matches!(status, Status::Running | Status::Paused) {
        say(&format!("tick skipped: sandbox is {}", status.as_str()));
        return;
    }
    // A diff needs an earlier snapshot in this run; the first one is full.
    let kind = match s.kind {
        SnapKind::Diff if !has_baseline => SnapKind::Full,
        k => k,
    };
    let opts = SaveOptions {
        name: None,
        kind,
        resume_source: status == Status::Running,
        guest_sync: GuestSync::BestEffort,
        expires_in: s.expires_in_secs.map(Duration::from_secs),
    };
    match snapshot::save(ctx, name, &opts) {
        Ok(m) => say(&format!(
            "snapshot {} ({}) ready in {} ms",
            m.name,
            m.kind.as_str(),
            m.took_ms.unwrap_or(0)
        )),
        Err(e) => say(&format!("snapshot failed: {e}")),
    }
    drop(lock);
    match snapshot::reap(ctx) {
        Ok(gone) if !gone.is_empty() => say(&format!("expired: {}", gone.join(" "))),
        Ok(_) => {}
        Err(e) => say(&format!("reaper: {e}")),
    }
}

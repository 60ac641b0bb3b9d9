//! Named snapshots of sandboxes: one directory each (`vmstate`, `memory`,
//! `disk`, `meta.json`), with a status that goes creating → ready, or
//! failed with the reason kept.
//!
//! Types: `full` (all memory, device and vCPU state, and the disk), `diff`
//! (only the memory pages written and the disk chunks changed since the
//! sandbox's previous snapshot, its parent; restoring merges the chain, see
//! disk/diff.rs), `disk` (the disk alone; restoring boots it).
//!
//! Guest consistency: memory snapshots capture the VM paused, memory and disk
//! at the same instant, so the pair is exact; the agent only `sync`s first so
//! the disk copy is also clean on its own. A frozen filesystem is not baked
//! into memory images on purpose (every restored copy would start frozen).
//! Disk-only snapshots sync and freeze the guest's filesystems around the
//! copy, then thaw.
//!
//! The source sandbox is left paused after a snapshot unless
//! `--resume-source` is given (scheduled snapshots always resume it); any
//! `vmm use` resumes a paused sandbox. A snapshot written completely stays
//! ready even when putting the source back in its run state fails.
//!
//! Every snapshot has a random id besides its name; a diff records its
//! parent's, and a sandbox the id of the snapshot its dirty-page log counts
//! from, so a diff is never stored against (or merged onto) another
//! snapshot that was later given the same name.
//!
//! Removal and expiry, and the pins that keep a snapshot while a sandbox is
//! made from it, are in snap_remove.rs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::api::SnapshotType;

use super::clock::{self, LocalTime};
use super::disk::diff::{self as disk_diff, DiskChain};
use super::disk::{self, CopyMethod};
use super::error::{Error, Result};
use super::guest;
use super::names;
use super::net::NetMeta;
use super::process;
use super::sandbox::{Paths, Sandbox, Status};
use super::snap_remove::{self, Pinned};
use super::store::{check_entry_name, read_json, write_json_atomic, Kind, META_FILE};
use super::Ctx;

/// How long the agent keeps filesystems frozen if nobody thaws them.
const AUTO_THAW: Duration = Duration::from_secs(120);

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SnapKind {
    Full,
    Diff,
    Disk,
}

impl SnapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapKind::Full => "full",
            SnapKind::Diff => "diff",
            SnapKind::Disk => "disk",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapStatus {
    Creating,
    Ready,
    Failed,
}

impl SnapStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapStatus::Creating => "creating",
            SnapStatus::Ready => "ready",
            SnapStatus::Failed => "failed",
        }
    }
}

/// What to do about guest filesystems before the disk is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestSync {
    /// Fail the snapshot if the agent cannot sync (and freeze).
    Required,
    /// Try; note a failure in the snapshot's metadata and go on.
    BestEffort,
    /// Do not contact the guest.
    Skip,
}

/// `snapshots/NAME/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub name: String,
    /// Random, 128 bits in hex (none from older versions).
    #[serde(default)]
    pub id: Option<String>,
    pub sandbox: String,
    pub kind: SnapKind,
    pub status: SnapStatus,
    #[serde(default)]
    pub reason: Option<String>,
    /// The snapshot a diff applies to.
    #[serde(default)]
    pub parent: Option<String>,
    /// Its id when the diff was taken.
    #[serde(default)]
    pub parent_id: Option<String>,
    pub created: i64,
    #[serde(default)]
    pub expires: Option<i64>,
    #[serde(default)]
    pub size_bytes: u64,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The VM's network interface (its source sandbox's TAP then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMeta>,
    pub creator_pid: u32,
    /// What the guest agent did: "synced", "frozen", "skipped", "failed: ...".
    #[serde(default)]
    pub guest_sync: Option<String>,
    #[serde(default)]
    pub disk_copy: Option<CopyMethod>,
    /// Bytes the snapshot's disk part occupies (a diff's changed chunks and
    /// map, or the copy).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Disk chunks a diff stores.
    #[serde(default)]
    pub disk_changed_chunks: Option<u64>,
    #[serde(default)]
    pub took_ms: Option<u64>,
}

/// Options of `vmm snapshot save`.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub name: Option<String>,
    pub kind: SnapKind,
    pub resume_source: bool,
    pub guest_sync: GuestSync,
    pub expires_in: Option<Duration>,
}

impl SnapshotMeta {
    /// Loads a snapshot's metadata (checking the name first); a directory
    /// without any (left by an older version) loads as a failed snapshot;
    /// metadata of another snapshot (a directory copied by hand) is refused.
    pub fn load(ctx: &Ctx, name: &str) -> Result<Self> {
        names::validate("snapshot", name)?;
        let dir = ctx.store.snapshot_dir(name);
        let path = dir.join(META_FILE);
        match read_json::<Self>(&path)? {
            Some(meta) => {
                check_entry_name(Kind::Snapshot, name, &meta.name, &path)?;
                Ok(meta)
            }
            None if dir.is_dir() => Ok(Self::broken(name)),
            None => Err(Error::NoSnapshot(name.to_string())),
        }
    }

    fn broken(name: &str) -> Self {
        SnapshotMeta {
            name: name.to_string(),
            id: None,
            sandbox: "-".into(),
            kind: SnapKind::Full,
            status: SnapStatus::Failed,
            reason: Some("its directory has no metadata (an interrupted save)".into()),
            parent: None,
            parent_id: None,
            created: 0,
            expires: None,
            size_bytes: 0,
            kernel: PathBuf::new(),
            cmdline: String::new(),
            vcpus: 0,
            mem_mib: 0,
            net: None,
            creator_pid: 0,
            guest_sync: None,
            disk_copy: None,
            disk_bytes: None,
            disk_changed_chunks: None,
            took_ms: None,
        }
    }

    pub fn save(&self, ctx: &Ctx) -> Result<()> {
        write_json_atomic(&ctx.store.snapshot_dir(&self.name).join(META_FILE), self)
    }

    /// Ready to restore, or an error saying why not.
    pub fn require_ready(&self) -> Result<()> {
        match self.status {
            SnapStatus::Ready => Ok(()),
            SnapStatus::Creating => Err(Error::Invalid(format!(
                "snapshot {} is still being created",
                self.name
            ))),
            SnapStatus::Failed => Err(Error::Invalid(format!(
                "snapshot {} failed: {}",
                self.name,
                self.reason.as_deref().unwrap_or("unknown reason")
            ))),
        }
    }

    /// A "creating" snapshot whose creator died is failed.
    pub fn interrupted(&self) -> bool {
        self.status == SnapStatus::Creating && !process::alive(self.creator_pid, &[])
    }
}

/// Every snapshot, sorted by creation time then name.
pub fn list(ctx: &Ctx) -> Result<Vec<SnapshotMeta>> {
    collect(ctx, Err)
}

/// [`list`] for listings: a snapshot whose metadata cannot be read is named
/// on stderr and left out instead of hiding every other one.
pub fn list_readable(ctx: &Ctx) -> Result<Vec<SnapshotMeta>> {
    collect(ctx, |e| {
        eprintln!("vmm: snapshot left out: {e}");
        Ok(())
    })
}

/// Every snapshot; `broken` decides about one that cannot be read.
fn collect(ctx: &Ctx, broken: impl Fn(Error) -> Result<()>) -> Result<Vec<SnapshotMeta>> {
    let mut out = Vec::new();
    for name in ctx.store.names(Kind::Snapshot)? {
        match SnapshotMeta::load(ctx, &name) {
            Ok(m) => out.push(m),
            Err(Error::NoSnapshot(_)) => {} // removed meanwhile
            Err(e) => broken(e)?,
        }
    }
    out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(out)
}

/// A free automatic name for a snapshot of `sandbox` now.
fn auto_name(ctx: &Ctx, sandbox: &str) -> String {
    let base = names::auto_snapshot_name(sandbox, &LocalTime::local(clock::now()));
    if !ctx.store.snapshot_dir(&base).exists() {
        return base;
    }
    (2..)
        .map(|i| {
            let suffix = format!("-{i}");
            let cut = base.len().min(names::MAX_NAME_LEN - suffix.len());
            format!("{}{suffix}", &base[..cut])
        })
        .find(|n| !ctx.store.snapshot_dir(n).exists())
        .unwrap_or(base)
}

/// Takes a snapshot of `sandbox`. The caller holds the sandbox's lock.
/// Returns the ready snapshot and, when the sandbox could not be put back
/// in its run state afterwards, that error ([`Error::NotResumed`]).
pub fn save(ctx: &Ctx, sandbox: &str, opts: &SaveOptions) -> Result<(SnapshotMeta, Option<Error>)> {
    let mut sb = Sandbox::load(ctx, sandbox)?;
    let status = sb.status();
    match (opts.kind, status) {
        (_, Status::Unresponsive) => {
            return Err(Error::Failed(format!(
                "sandbox {sandbox} does not answer on its API socket"
            )))
        }
        (_, Status::Creating | Status::Failed) => {
            sb.require_ready()?;
            return Err(Error::Invalid(format!(
                "sandbox {sandbox} is being created"
            )));
        }
        (SnapKind::Full | SnapKind::Diff, Status::Stopped) => {
            return Err(Error::Invalid(format!(
                "sandbox {sandbox} is stopped: it has no memory to snapshot; \
                 `--type disk` snapshots its disk"
            )))
        }
        _ => {}
    }
    // A diff's parent chain is pinned until the diff is stored.
    let parent = match opts.kind {
        SnapKind::Diff => Some(diff_parent(ctx, &sb)?),
        _ => None,
    };
    let name = match &opts.name {
        Some(n) => {
            names::validate("snapshot", n)?;
            n.clone()
        }
        None => auto_name(ctx, sandbox),
    };
    let now = clock::now();
    let mut meta = SnapshotMeta {
        name: name.clone(),
        id: Some(names::random_id()?),
        sandbox: sandbox.to_string(),
        kind: opts.kind,
        status: SnapStatus::Creating,
        reason: None,
        parent: parent.as_ref().map(|p| p.meta.name.clone()),
        parent_id: parent.as_ref().and_then(|p| p.meta.id.clone()),
        created: now,
        expires: opts
            .expires_in
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        size_bytes: 0,
        kernel: sb.meta.kernel.clone(),
        cmdline: sb.meta.cmdline.clone(),
        vcpus: sb.meta.vcpus,
        mem_mib: sb.meta.mem_mib,
        net: sb.meta.net.clone(),
        creator_pid: std::process::id(),
        guest_sync: None,
        disk_copy: None,
        disk_bytes: None,
        disk_changed_chunks: None,
        took_ms: None,
    };
    let dir = ctx.store.create_entry(Kind::Snapshot, &name, &meta)?;
    let t0 = Instant::now();
    let result = take(ctx, &sb, &dir, &mut meta, status, opts, parent.as_ref());
    drop(parent);
    meta.took_ms = Some(u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX));
    match result {
        Ok(not_resumed) => {
            meta.status = SnapStatus::Ready;
            meta.size_bytes = disk::dir_allocated_bytes(&dir);
            meta.disk_bytes = Some(
                [disk_diff::DISK_FILE, disk_diff::MAP_FILE]
                    .iter()
                    .map(|f| disk::allocated_bytes(&dir.join(f)))
                    .sum(),
            );
            meta.save(ctx)?;
            if opts.kind != SnapKind::Disk {
                sb.meta.mem_baseline = Some(name.clone());
                sb.meta.mem_baseline_id = meta.id.clone();
                sb.save()?;
            }
            let not_resumed = not_resumed.map(|cause| Error::NotResumed {
                snapshot: name,
                sandbox: sandbox.to_string(),
                cause: Box::new(cause),
            });
            Ok((meta, not_resumed))
        }
        Err(e) => {
            meta.status = SnapStatus::Failed;
            meta.reason = Some(e.to_string());
            for f in [
                "vmstate",
                "memory",
                disk_diff::DISK_FILE,
                disk_diff::MAP_FILE,
            ] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let _ = meta.save(ctx);
            if opts.kind != SnapKind::Disk {
                // The VMM may have reset its dirty log: a diff against the
                // old baseline would miss pages.
                sb.meta.mem_baseline = None;
                sb.meta.mem_baseline_id = None;
                let _ = sb.save();
            }
            Err(e)
        }
    }
}

/// The parent of a diff, pinned: the snapshot the sandbox's dirty log counts
/// from, if it is still that very snapshot (same id) and ready.
pub fn diff_parent(ctx: &Ctx, sb: &Sandbox) -> Result<Pinned> {
    let name = &sb.meta.name;
    let refuse = |why: String| {
        Error::Invalid(format!(
            "sandbox {name} cannot take a diff snapshot: {why}; take a full snapshot \
             (`--type full`)"
        ))
    };
    let (Some(base), Some(id)) = (&sb.meta.mem_baseline, &sb.meta.mem_baseline_id) else {
        return Err(refuse(
            "no earlier snapshot of its current run is known to diff against".into(),
        ));
    };
    let pin = snap_remove::pin(ctx, base).map_err(|_| {
        refuse(format!(
            "snapshot {base}, which it would build on, is gone or not ready"
        ))
    })?;
    if pin.meta.id.as_deref() != Some(id.as_str()) {
        return Err(refuse(format!(
            "snapshot {base} is not the one its memory was saved to (that one was removed \
             and the name reused)"
        )));
    }
    Ok(pin)
}

/// The steps of a snapshot, restoring the source's run state on the way out.
/// Returns the error of putting the source back in its run state, if only
/// that failed.
fn take(
    ctx: &Ctx,
    sb: &Sandbox,
    dir: &Path,
    meta: &mut SnapshotMeta,
    status: Status,
    opts: &SaveOptions,
    parent: Option<&Pinned>,
) -> Result<Option<Error>> {
    let api = sb.api();
    let was_running = status == Status::Running;
    let live = status != Status::Stopped;
    let mut frozen = false;
    let mut resumed_for_sync = false;
    if live && opts.guest_sync != GuestSync::Skip {
        if status == Status::Paused {
            api.resume()?;
            resumed_for_sync = true;
        }
        ctx.progress.step("syncing guest filesystems");
        let synced = if opts.kind == SnapKind::Disk {
            guest::freeze(sb, Duration::from_secs(10), AUTO_THAW).map(|fs| {
                frozen = true;
                format!("frozen: {}", fs.join(" "))
            })
        } else {
            guest::sync(sb, Duration::from_secs(10)).map(|()| "synced".to_string())
        };
        meta.guest_sync = Some(match synced {
            Ok(s) => s,
            Err(e) if opts.guest_sync == GuestSync::Required => {
                if resumed_for_sync {
                    let _ = api.pause();
                }
                return Err(Error::Failed(format!(
                    "guest sync is required and failed: {e}"
                )));
            }
            Err(e) => {
                log::warn!("{e}; snapshotting without it");
                format!("failed: {e}")
            }
        });
    } else {
        meta.guest_sync = Some("skipped".into());
    }
    let mut steps = || -> Result<()> {
        if live {
            api.pause()?;
        }
        if opts.kind != SnapKind::Disk {
            ctx.progress.step("writing memory and device state");
            let kind = match opts.kind {
                SnapKind::Diff => SnapshotType::Diff,
                _ => SnapshotType::Full,
            };
            api.create_snapshot(kind, &dir.join("vmstate"), &dir.join("memory"))?;
        }
        if let Some(parent) = parent.filter(|_| opts.kind == SnapKind::Diff) {
            ctx.progress
                .step("storing the disk chunks changed since the parent");
            let chain = disk_chain(ctx, &parent.chain)?;
            let summary = disk_diff::save_diff(&sb.paths.disk, &chain, dir)?;
            meta.disk_copy = Some(CopyMethod::Diff);
            meta.disk_changed_chunks = Some(summary.changed_chunks);
        } else {
            ctx.progress.step("copying the disk");
            meta.disk_copy = Some(disk::copy_file(
                &sb.paths.disk,
                &dir.join(disk_diff::DISK_FILE),
            )?);
        }
        Ok(())
    };
    let result = steps();
    if !live {
        return result.map(|()| None);
    }
    // Run state afterwards: running if asked (or if it ran and the snapshot
    // failed), else as the snapshot left it, paused; a frozen guest must run
    // to be thawed first.
    let run_after = if result.is_ok() {
        opts.resume_source
    } else {
        was_running
    };
    let after = (|| -> Result<()> {
        if frozen || run_after {
            api.resume()?;
        }
        if frozen {
            if let Err(e) = guest::thaw(sb, Duration::from_secs(10)) {
                log::warn!(
                    "{e}; the agent thaws by itself within {}s",
                    AUTO_THAW.as_secs()
                );
            }
            if !run_after {
                api.pause()?;
            }
        }
        Ok(())
    })();
    match (result, after) {
        (Ok(()), after) => Ok(after.err()),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(again)) => {
            log::warn!(
                "sandbox {}: after the failed snapshot: {again}",
                sb.meta.name
            );
            Err(e)
        }
    }
}

/// The state and memory files to load the pinned snapshot from: its own for
/// a full snapshot; for a diff, its chain merged into `paths.vmstate` and
/// `paths.memory` of the new sandbox.
pub fn loadable_files(ctx: &Ctx, pin: &Pinned, paths: &Paths) -> Result<(PathBuf, PathBuf)> {
    let snap = &pin.meta;
    let dir = ctx.store.snapshot_dir(&snap.name);
    match snap.kind {
        SnapKind::Full => return Ok((dir.join("vmstate"), dir.join("memory"))),
        SnapKind::Disk => {
            return Err(Error::Invalid(format!(
                "snapshot {} holds only a disk; it is booted, not restored",
                snap.name
            )))
        }
        SnapKind::Diff => {}
    }
    let mut chain = pin.chain.clone();
    let disk = disk_chain(ctx, &chain)?;
    let Some(base) = chain.pop() else {
        return Err(Error::Invalid(format!(
            "snapshot {}: empty chain",
            snap.name
        )));
    };
    ctx.progress.step(&format!(
        "merging {} diff(s) onto {}",
        chain.len(),
        base.name
    ));
    disk::copy_file(
        &ctx.store.snapshot_dir(&base.name).join("memory"),
        &paths.memory,
    )?;
    for diff in chain.iter().rev() {
        let d = ctx.store.snapshot_dir(&diff.name);
        let _ = std::fs::remove_file(&paths.vmstate);
        disk::copy_file(&d.join("vmstate"), &paths.vmstate)?;
        vmm::snapshot::merge_diff_snapshot(&paths.vmstate, &paths.memory, &d.join("memory"))
            .map_err(|e| Error::Failed(format!("merging snapshot {}: {e}", diff.name)))?;
    }
    // The sandbox was given a copy of the snapshot's own `disk`: for a diff
    // disk that is only the changed chunks.
    if !disk.diffs.is_empty() {
        ctx.progress.step(&format!(
            "applying {} disk diff(s) onto {}",
            disk.diffs.len(),
            disk.base.display()
        ));
        disk_diff::rebuild(&disk, &paths.disk)?;
    }
    Ok((paths.vmstate.clone(), paths.memory.clone()))
}

/// `snap` and its parents back to the full snapshot they build on (last),
/// each ready and each the very snapshot its child was taken on (by id).
pub fn ancestry(ctx: &Ctx, snap: &SnapshotMeta) -> Result<Vec<SnapshotMeta>> {
    let mut chain = vec![snap.clone()];
    while let Some(child) = chain.last().cloned() {
        let Some(parent) = child.parent.as_deref() else {
            break;
        };
        if chain.len() > 1000 {
            return Err(Error::Invalid(format!(
                "snapshot {}: diff chain too long",
                snap.name
            )));
        }
        let m = SnapshotMeta::load(ctx, parent).map_err(|_| {
            Error::Invalid(format!(
                "snapshot {} builds on {parent}, which no longer exists",
                child.name
            ))
        })?;
        if child.parent_id.is_some() && m.id != child.parent_id {
            return Err(Error::Invalid(format!(
                "snapshot {} builds on a snapshot named {parent} that was removed; the \
                 snapshot now named {parent} is another one",
                child.name
            )));
        }
        m.require_ready()?;
        chain.push(m);
    }
    if chain.last().map(|b| b.kind) != Some(SnapKind::Full) {
        return Err(Error::Invalid(format!(
            "snapshot {}: its chain does not start at a full snapshot",
            snap.name
        )));
    }
    Ok(chain)
}

/// The disk of the newest snapshot in `ancestry` (newest first): the newest
/// snapshot holding a whole disk (a full one, or a diff saved before diffs
/// stored disk chunks) and the diff disks above it.
fn disk_chain(ctx: &Ctx, ancestry: &[SnapshotMeta]) -> Result<DiskChain> {
    let dirs: Vec<PathBuf> = ancestry
        .iter()
        .map(|s| ctx.store.snapshot_dir(&s.name))
        .collect();
    let Some(cut) = dirs.iter().position(|d| !disk_diff::is_diff(d)) else {
        let name = ancestry.first().map_or("?", |s| s.name.as_str());
        return Err(Error::Invalid(format!(
            "snapshot {name}: no snapshot in its chain holds a whole disk"
        )));
    };
    Ok(DiskChain {
        base: dirs[cut].join(disk_diff::DISK_FILE),
        diffs: dirs[..cut].iter().rev().cloned().collect(),
    })
}

/// A missing file of a snapshot (removed behind the store's back) is that
/// snapshot not existing, not an I/O error.
pub fn vanished(ctx: &Ctx, e: Error) -> Error {
    let snapshots = ctx.store.entries_dir(Kind::Snapshot);
    match &e {
        Error::Io { path, source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            match path
                .strip_prefix(&snapshots)
                .ok()
                .and_then(|p| p.iter().next())
            {
                Some(name) => Error::NoSnapshot(name.to_string_lossy().into_owned()),
                None => e,
            }
        }
        _ => e,
    }
}

#[cfg(test)]
pub(crate) mod tests;

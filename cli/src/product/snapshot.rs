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
//! `vmm use` resumes a paused sandbox.

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
use super::process;
use super::sandbox::{Paths, Sandbox, Status};
use super::store::{read_json, write_json_atomic, Kind, META_FILE};
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
    pub sandbox: String,
    pub kind: SnapKind,
    pub status: SnapStatus,
    #[serde(default)]
    pub reason: Option<String>,
    /// The snapshot a diff applies to.
    #[serde(default)]
    pub parent: Option<String>,
    pub created: i64,
    #[serde(default)]
    pub expires: Option<i64>,
    #[serde(default)]
    pub size_bytes: u64,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
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
    pub fn load(ctx: &Ctx, name: &str) -> Result<Self> {
        read_json(&ctx.store.snapshot_dir(name).join(META_FILE))?
            .ok_or_else(|| Error::NoSnapshot(name.to_string()))
    }

    fn save(&self, ctx: &Ctx) -> Result<()> {
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
    fn interrupted(&self) -> bool {
        self.status == SnapStatus::Creating && !process::alive(self.creator_pid, &[])
    }
}

/// Every snapshot, sorted by creation time then name.
pub fn list(ctx: &Ctx) -> Result<Vec<SnapshotMeta>> {
    let mut out = Vec::new();
    for name in ctx.store.names(Kind::Snapshot)? {
        match SnapshotMeta::load(ctx, &name) {
            Ok(m) => out.push(m),
            Err(Error::NoSnapshot(_)) => {} // removed meanwhile
            Err(e) => return Err(e),
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
pub fn save(ctx: &Ctx, sandbox: &str, opts: &SaveOptions) -> Result<SnapshotMeta> {
    let mut sb = Sandbox::load(ctx, sandbox)?;
    let status = sb.status();
    match (opts.kind, status) {
        (_, Status::Unresponsive) => {
            return Err(Error::Failed(format!(
                "sandbox {sandbox} does not answer on its API socket"
            )))
        }
        (SnapKind::Full | SnapKind::Diff, Status::Stopped) => {
            return Err(Error::Invalid(format!(
                "sandbox {sandbox} is stopped: it has no memory to snapshot; \
                 `--type disk` snapshots its disk"
            )))
        }
        _ => {}
    }
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
    let dir = ctx.store.snapshot_dir(&name);
    std::fs::create_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Invalid(format!("snapshot {name} already exists"))
        } else {
            Error::io("creating", &dir, e)
        }
    })?;
    let now = clock::now();
    let mut meta = SnapshotMeta {
        name: name.clone(),
        sandbox: sandbox.to_string(),
        kind: opts.kind,
        status: SnapStatus::Creating,
        reason: None,
        parent,
        created: now,
        expires: opts
            .expires_in
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        size_bytes: 0,
        kernel: sb.meta.kernel.clone(),
        cmdline: sb.meta.cmdline.clone(),
        vcpus: sb.meta.vcpus,
        mem_mib: sb.meta.mem_mib,
        creator_pid: std::process::id(),
        guest_sync: None,
        disk_copy: None,
        disk_bytes: None,
        disk_changed_chunks: None,
        took_ms: None,
    };
    meta.save(ctx)?;
    let t0 = Instant::now();
    let result = take(ctx, &sb, &dir, &mut meta, status, opts);
    meta.took_ms = Some(u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX));
    match result {
        Ok(()) => {
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
                sb.meta.mem_baseline = Some(name);
                sb.save()?;
            }
            Ok(meta)
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
                let _ = sb.save();
            }
            Err(e)
        }
    }
}

/// The parent of a diff: the snapshot the sandbox's dirty log counts from.
fn diff_parent(ctx: &Ctx, sb: &Sandbox) -> Result<String> {
    let name = &sb.meta.name;
    let Some(base) = sb.meta.mem_baseline.clone() else {
        return Err(Error::Invalid(format!(
            "sandbox {name} has no earlier snapshot in its current run to diff against; \
             take a full snapshot first"
        )));
    };
    match SnapshotMeta::load(ctx, &base) {
        Ok(m) if m.status == SnapStatus::Ready => Ok(base),
        _ => Err(Error::Invalid(format!(
            "snapshot {base}, which a diff of {name} would build on, is gone or not ready; \
             take a full snapshot"
        ))),
    }
}

/// The steps of a snapshot, restoring the source's run state on the way out.
fn take(
    ctx: &Ctx,
    sb: &Sandbox,
    dir: &Path,
    meta: &mut SnapshotMeta,
    status: Status,
    opts: &SaveOptions,
) -> Result<()> {
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
        if let Some(parent) = meta
            .parent
            .as_deref()
            .filter(|_| opts.kind == SnapKind::Diff)
        {
            ctx.progress
                .step("storing the disk chunks changed since the parent");
            let parent = SnapshotMeta::load(ctx, parent)?;
            let chain = disk_chain(ctx, &ancestry(ctx, &parent)?)?;
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
    if live {
        // Run state afterwards: running if asked (or if it ran and the
        // snapshot failed), else as the snapshot left it, paused; a frozen
        // guest must run to be thawed first.
        let run_after = if result.is_ok() {
            opts.resume_source
        } else {
            was_running
        };
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
    }
    result
}

/// The state and memory files to load `snap` from: its own for a full
/// snapshot; for a diff, its chain merged into `paths.vmstate` and
/// `paths.memory` of the new sandbox.
pub fn loadable_files(ctx: &Ctx, snap: &SnapshotMeta, paths: &Paths) -> Result<(PathBuf, PathBuf)> {
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
    let mut chain = ancestry(ctx, snap)?;
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
/// each ready.
fn ancestry(ctx: &Ctx, snap: &SnapshotMeta) -> Result<Vec<SnapshotMeta>> {
    let mut chain = vec![snap.clone()];
    while let Some(parent) = chain.last().and_then(|s| s.parent.clone()) {
        if chain.len() > 1000 {
            return Err(Error::Invalid(format!(
                "snapshot {}: diff chain too long",
                snap.name
            )));
        }
        let m = SnapshotMeta::load(ctx, &parent).map_err(|_| {
            Error::Invalid(format!(
                "snapshot {} builds on {parent}, which no longer exists",
                snap.name
            ))
        })?;
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

/// Snapshots whose parent is `name`.
fn dependents(all: &[SnapshotMeta], name: &str) -> Vec<String> {
    all.iter()
        .filter(|s| s.parent.as_deref() == Some(name))
        .map(|s| s.name.clone())
        .collect()
}

/// Removes snapshots. Without `force`, refuses one that diffs depend on;
/// with it, removes those too. Returns what was removed.
pub fn remove(ctx: &Ctx, names_: &[String], force: bool) -> Result<Vec<String>> {
    let _lock = ctx.store.lock_store()?;
    let mut removed = Vec::new();
    for name in names_ {
        let all = list(ctx)?;
        let Some(meta) = all.iter().find(|s| &s.name == name) else {
            if removed.contains(name) {
                continue;
            }
            return Err(Error::NoSnapshot(name.clone()));
        };
        if meta.status == SnapStatus::Creating && !meta.interrupted() {
            return Err(Error::Invalid(format!(
                "snapshot {name} is being created (by pid {})",
                meta.creator_pid
            )));
        }
        let deps = dependents(&all, name);
        if !deps.is_empty() && !force {
            return Err(Error::Invalid(format!(
                "snapshot {name} has diff snapshots built on it ({}); -f removes them too",
                deps.join(", ")
            )));
        }
        // Dependents first (depth first), then the snapshot itself.
        let mut stack = vec![name.clone()];
        let mut order = Vec::new();
        while let Some(n) = stack.pop() {
            stack.extend(dependents(&all, &n));
            order.push(n);
        }
        for n in order.into_iter().rev() {
            remove_dir(ctx, &n)?;
            removed.push(n);
        }
    }
    Ok(removed)
}

fn remove_dir(ctx: &Ctx, name: &str) -> Result<()> {
    let dir = ctx.store.snapshot_dir(name);
    // Metadata first, so a crash leaves a directory listing ignores.
    let _ = std::fs::remove_file(dir.join(META_FILE));
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))
}

/// The reaper: marks snapshots whose creator died as failed and removes
/// expired snapshots no unexpired diff depends on. Returns what it removed.
pub fn reap(ctx: &Ctx) -> Result<Vec<String>> {
    let _lock = ctx.store.lock_store()?;
    let now = clock::now();
    let mut removed = Vec::new();
    loop {
        let all = list(ctx)?;
        let mut changed = false;
        for s in &all {
            if s.interrupted() {
                let mut m = s.clone();
                m.status = SnapStatus::Failed;
                m.reason = Some("interrupted: the process creating it ended".into());
                m.save(ctx)?;
                continue;
            }
            let expired = s.expires.is_some_and(|e| e <= now);
            if expired && s.status != SnapStatus::Creating && dependents(&all, &s.name).is_empty() {
                remove_dir(ctx, &s.name)?;
                removed.push(s.name.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, parent: Option<&str>) -> SnapshotMeta {
        SnapshotMeta {
            name: name.into(),
            sandbox: "dev".into(),
            kind: if parent.is_some() {
                SnapKind::Diff
            } else {
                SnapKind::Full
            },
            status: SnapStatus::Ready,
            reason: None,
            parent: parent.map(str::to_string),
            created: 1,
            expires: None,
            size_bytes: 0,
            kernel: "/k".into(),
            cmdline: "c".into(),
            vcpus: 1,
            mem_mib: 128,
            creator_pid: std::process::id(),
            guest_sync: None,
            disk_copy: None,
            disk_bytes: None,
            disk_changed_chunks: None,
            took_ms: None,
        }
    }

    /// A store holding full snapshot `a` and diffs `b` (on a) and `c` (on
    /// b) whose disks are diffs of three successive disk states.
    #[test]
    fn disk_chains_follow_parents_and_rebuild_exactly() {
        use super::super::config::ProductConfig;
        use super::super::output::Progress;
        use super::super::store::{tests::TempDir, Store};
        use std::os::unix::fs::FileExt;

        let t = TempDir::new("snap-chain");
        let store = Store::open(&t.0.join("state")).unwrap();
        let ctx = Ctx {
            config: ProductConfig::load(&store).unwrap(),
            store,
            progress: Progress::quiet(),
        };
        let disk = t.0.join("sandbox.ext4");
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"v1", 0).unwrap();
        let metas = [meta("a", None), meta("b", Some("a")), meta("c", Some("b"))];
        let mut states = Vec::new();
        for (i, m) in metas.iter().enumerate() {
            std::fs::create_dir(ctx.store.snapshot_dir(&m.name)).unwrap();
            m.save(&ctx).unwrap();
            let dir = ctx.store.snapshot_dir(&m.name);
            if let Some(parent) = &m.parent {
                let parent = SnapshotMeta::load(&ctx, parent).unwrap();
                let chain = disk_chain(&ctx, &ancestry(&ctx, &parent).unwrap()).unwrap();
                disk_diff::save_diff(&disk, &chain, &dir).unwrap();
            } else {
                disk::copy_file(&disk, &dir.join("disk")).unwrap();
            }
            states.push(std::fs::read(&disk).unwrap());
            f.write_all_at(format!("v{}", i + 2).as_bytes(), (i as u64 + 1) << 20)
                .unwrap();
        }
        let c = ancestry(&ctx, &metas[2]).unwrap();
        assert_eq!(
            c.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        let chain = disk_chain(&ctx, &c).unwrap();
        let dir = |n: &str| ctx.store.snapshot_dir(n);
        assert_eq!(chain.base, dir("a").join("disk"));
        assert_eq!(chain.diffs, [dir("b"), dir("c")]);
        let out = t.0.join("out");
        disk_diff::rebuild(&chain, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), states[2]);

        // A diff from before diff disks (a whole `disk`, no map) is a base.
        std::fs::remove_file(dir("b").join(disk_diff::MAP_FILE)).unwrap();
        std::fs::write(dir("b").join("disk"), &states[1]).unwrap();
        let chain = disk_chain(&ctx, &c).unwrap();
        assert_eq!(chain.base, dir("b").join("disk"));
        assert_eq!(chain.diffs, [dir("c")]);
        disk_diff::rebuild(&chain, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), states[2]);

        // A missing parent breaks the chain with a clear error.
        remove_dir(&ctx, "b").unwrap();
        let e = ancestry(&ctx, &metas[2]).unwrap_err().to_string();
        assert!(e.contains("builds on b, which no longer exists"), "{e}");
    }

    #[test]
    fn dependents_and_meta_format() {
        let all = vec![meta("a", None), meta("b", Some("a")), meta("c", Some("b"))];
        assert_eq!(dependents(&all, "a"), ["b"]);
        assert!(dependents(&all, "c").is_empty());
        let text = serde_json::to_string(&all[1]).unwrap();
        assert!(
            text.contains(r#""kind":"diff""#) && text.contains(r#""status":"ready""#),
            "{text}"
        );
        let mut m = all[0].clone();
        m.status = SnapStatus::Failed;
        m.reason = Some("disk full".into());
        assert_eq!(
            m.require_ready().unwrap_err().to_string(),
            "snapshot a failed: disk full"
        );
        m.status = SnapStatus::Creating;
        assert!(!m.interrupted(), "our own pid is alive");
        m.creator_pid = u32::MAX;
        assert!(m.interrupted());
    }
}

//! Keeping snapshots while they are read, and removing them.
//!
//! A sandbox made from a snapshot (and a diff saved on one) pins the
//! snapshot and the chain it builds on: shared locks on
//! `locks/snapshot-NAME.lock`, taken under the store lock after the
//! snapshots were found ready. `snapshot rm` and the expiry reaper take the
//! store lock and then each snapshot's lock exclusively without waiting:
//! `rm` refuses a pinned snapshot, the reaper leaves it for a later pass. So
//! a snapshot never disappears in the middle of a copy or merge. Removing a
//! snapshot unlinks its lock file too (still under both locks), so scheduled
//! snapshots that expire leave nothing behind in `locks/`.

use std::collections::HashSet;

use super::clock;
use super::error::{Error, Result};
use super::names;
use super::snapshot::{self, list, SnapKind, SnapStatus, SnapshotMeta};
use super::store::{Kind, Lock};
use super::Ctx;

/// A ready snapshot held against removal until dropped.
#[derive(Debug)]
pub struct Pinned {
    pub meta: SnapshotMeta,
    /// `meta` and (for a diff) its parents back to the full snapshot, newest
    /// first: everything a restore reads.
    pub chain: Vec<SnapshotMeta>,
    _locks: Vec<Lock>,
}

/// Finds ready snapshot `name` and pins it with its chain.
pub fn pin(ctx: &Ctx, name: &str) -> Result<Pinned> {
    names::validate("snapshot", name)?;
    let store = ctx.store.lock_store()?;
    let meta = SnapshotMeta::load(ctx, name)?;
    meta.require_ready()?;
    let chain = match meta.kind {
        SnapKind::Diff => snapshot::ancestry(ctx, &meta)?,
        SnapKind::Full | SnapKind::Disk => vec![meta.clone()],
    };
    let locks = chain
        .iter()
        .map(|s| ctx.store.lock_snapshot_shared(&store, &s.name))
        .collect::<Result<Vec<_>>>()?;
    Ok(Pinned {
        meta,
        chain,
        _locks: locks,
    })
}

/// Snapshots whose parent is `name`.
pub fn dependents(all: &[SnapshotMeta], name: &str) -> Vec<String> {
    all.iter()
        .filter(|s| s.parent.as_deref() == Some(name))
        .map(|s| s.name.clone())
        .collect()
}

/// The snapshots `rm names` removes, each after every diff built on it.
/// Without `force`, a snapshot with a diff outside the set is refused; with
/// it, such diffs join the set. Every name must exist.
fn removal_order(all: &[SnapshotMeta], names_: &[String], force: bool) -> Result<Vec<String>> {
    if let Some(missing) = names_.iter().find(|n| !all.iter().any(|s| &s.name == *n)) {
        return Err(Error::NoSnapshot(missing.clone()));
    }
    let asked: HashSet<&str> = names_.iter().map(String::as_str).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Depth first, each snapshot after its dependents; `seen` also stops a
    // (corrupt) cycle of parents.
    let mut stack: Vec<(String, bool)> = names_.iter().rev().map(|n| (n.clone(), false)).collect();
    while let Some((name, expanded)) = stack.pop() {
        if expanded {
            order.push(name);
            continue;
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        let deps = dependents(all, &name);
        let outside: Vec<&str> = deps
            .iter()
            .map(String::as_str)
            .filter(|d| !asked.contains(d))
            .collect();
        if !force && !outside.is_empty() {
            return Err(Error::Invalid(format!(
                "snapshot {name} has diff snapshots built on it ({}); -f removes them too",
                outside.join(", ")
            )));
        }
        stack.push((name, true));
        stack.extend(deps.into_iter().rev().map(|d| (d, false)));
    }
    Ok(order)
}

/// Removes snapshots: all checked first (they exist, none is being created
/// or pinned, and without `force` no diff outside them builds on them), then
/// removed dependents first; `removed` hears of each as it goes. Nothing is
/// removed when a check fails.
pub fn remove(
    ctx: &Ctx,
    names_: &[String],
    force: bool,
    mut removed: impl FnMut(&str),
) -> Result<()> {
    for n in names_ {
        names::validate("snapshot", n)?;
    }
    let store = ctx.store.lock_store()?;
    let all = list(ctx)?;
    let order = removal_order(&all, names_, force)?;
    for meta in all.iter().filter(|s| order.contains(&s.name)) {
        if meta.status == SnapStatus::Creating && !meta.interrupted() {
            return Err(Error::Invalid(format!(
                "snapshot {} is being created (by pid {})",
                meta.name, meta.creator_pid
            )));
        }
    }
    let mut locks = Vec::new();
    for n in &order {
        match ctx.store.try_lock_snapshot(&store, n)? {
            Some(l) => locks.push(l),
            None => {
                return Err(Error::Invalid(format!(
                    "snapshot {n} is in use: a sandbox is being made from it (or a diff saved on \
                     it); try again when that is done"
                )))
            }
        }
    }
    for (n, lock) in order.iter().zip(&locks) {
        ctx.store.remove_entry(Kind::Snapshot, n, &store, lock)?;
        removed(n);
    }
    Ok(())
}

/// The reaper: removes what interrupted processes left (hidden
/// directories), marks snapshots whose creator died as failed and removes
/// expired snapshots no diff depends on and nobody pins. Returns what it
/// removed.
pub fn reap(ctx: &Ctx) -> Result<Vec<String>> {
    let store = ctx.store.lock_store()?;
    ctx.store.sweep(&store);
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
            if !expired || s.status == SnapStatus::Creating || !dependents(&all, &s.name).is_empty()
            {
                continue;
            }
            // A pinned snapshot stays until a later pass.
            let Some(lock) = ctx.store.try_lock_snapshot(&store, &s.name)? else {
                continue;
            };
            ctx.store
                .remove_entry(Kind::Snapshot, &s.name, &store, &lock)?;
            removed.push(s.name.clone());
            changed = true;
        }
        if !changed {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::snapshot::tests::meta;
    use super::super::store::tests::TempDir;
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn removal_orders() {
        // a <- b <- c, a <- d; e alone.
        let all = vec![
            meta("a", None),
            meta("b", Some("a")),
            meta("c", Some("b")),
            meta("d", Some("a")),
            meta("e", None),
        ];
        assert_eq!(dependents(&all, "a"), ["b", "d"]);
        assert!(dependents(&all, "c").is_empty());
        let order = |n: &[&str], force| removal_order(&all, &names(n), force);
        assert_eq!(order(&["c"], false).unwrap(), ["c"]);
        // Parent and child together, in either order: children first.
        assert_eq!(order(&["b", "c"], false).unwrap(), ["c", "b"]);
        assert_eq!(order(&["c", "b"], false).unwrap(), ["c", "b"]);
        assert_eq!(
            order(&["a", "b", "c", "d"], false).unwrap(),
            ["c", "b", "d", "a"]
        );
        // A diff outside the set blocks without -f and names the diff.
        let e = order(&["a", "b", "c"], false).unwrap_err().to_string();
        assert!(
            e.contains("snapshot a has diff snapshots built on it (d)"),
            "{e}"
        );
        assert_eq!(order(&["a"], true).unwrap(), ["c", "b", "d", "a"]);
        assert_eq!(order(&["e", "b", "e"], true).unwrap(), ["e", "c", "b"]);
        // A missing name: not found, whatever else was asked.
        let e = order(&["e", "missing"], true).unwrap_err();
        assert!(matches!(&e, Error::NoSnapshot(n) if n == "missing"), "{e}");
        // A cycle of parents (corrupt metadata) ends.
        let cyc = vec![meta("x", Some("y")), meta("y", Some("x"))];
        assert_eq!(
            removal_order(&cyc, &names(&["x"]), true).unwrap(),
            ["y", "x"]
        );
    }

    fn ctx_with(t: &TempDir, metas: &[SnapshotMeta]) -> Ctx {
        let ctx = Ctx::at(&t.0).unwrap();
        for m in metas {
            ctx.store.create_entry(Kind::Snapshot, &m.name, m).unwrap();
            std::fs::write(ctx.store.snapshot_dir(&m.name).join("disk"), "d").unwrap();
        }
        ctx
    }

    fn listed(ctx: &Ctx) -> Vec<String> {
        list(ctx).unwrap().into_iter().map(|m| m.name).collect()
    }

    #[test]
    fn rm_checks_everything_before_removing_anything() {
        let t = TempDir::new("snap-rm");
        let ctx = ctx_with(
            &t,
            &[meta("a", None), meta("b", Some("a")), meta("e", None)],
        );
        let mut out = Vec::new();
        let e = remove(&ctx, &names(&["e", "missing"]), false, |n| {
            out.push(n.to_string())
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        let e = remove(&ctx, &names(&["e", "../b"]), false, |n| {
            out.push(n.to_string())
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
        let e = remove(&ctx, &names(&["e", "a"]), false, |n| {
            out.push(n.to_string())
        })
        .unwrap_err();
        assert!(e.to_string().contains("(b); -f"), "{e}");
        assert!(out.is_empty());
        assert_eq!(listed(&ctx), ["a", "b", "e"]);

        // A pinned snapshot (a sandbox being made from b) is refused, and
        // its parent with it; the reaper passes it by.
        let pinned = pin(&ctx, "b").unwrap();
        assert_eq!(
            pinned
                .chain
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        let e = remove(&ctx, &names(&["a"]), true, |n| out.push(n.to_string())).unwrap_err();
        assert!(e.to_string().contains("is in use"), "{e}");
        assert!(out.is_empty());
        let mut expired = SnapshotMeta::load(&ctx, "b").unwrap();
        expired.expires = Some(1);
        expired.save(&ctx).unwrap();
        assert!(reap(&ctx).unwrap().is_empty());
        drop(pinned);
        assert_eq!(reap(&ctx).unwrap(), ["b"]);

        remove(&ctx, &names(&["a", "e"]), false, |n| {
            out.push(n.to_string())
        })
        .unwrap();
        assert_eq!(out, ["a", "e"]);
        assert!(listed(&ctx).is_empty());
        // No hidden directory is left behind.
        assert_eq!(std::fs::read_dir(t.0.join("snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn pins_refuse_what_cannot_be_restored() {
        let t = TempDir::new("snap-pin");
        let mut creating = meta("c", None);
        creating.status = SnapStatus::Creating;
        let ctx = ctx_with(&t, &[meta("a", None), creating]);
        assert!(matches!(pin(&ctx, "zz"), Err(Error::NoSnapshot(_))));
        assert_eq!(pin(&ctx, "../a").unwrap_err().exit_code(), 1);
        let e = pin(&ctx, "c").unwrap_err().to_string();
        assert!(e.contains("still being created"), "{e}");
        // No lock file for a snapshot that does not exist.
        assert!(!t.0.join("locks/snapshot-zz.lock").exists());
        assert!(pin(&ctx, "a").is_ok());
    }

    /// A snapshot directory copied by hand (`a` to `b`, with `a`'s
    /// metadata) is refused, never acted on as `a`: removal and the reaper
    /// go by directory names.
    #[test]
    fn a_snapshot_directory_copied_by_hand_is_refused() {
        let t = TempDir::new("snap-copied");
        let mut a = meta("a", None);
        a.expires = Some(1);
        let ctx = ctx_with(&t, &[a]);
        let (da, db) = (ctx.store.snapshot_dir("a"), ctx.store.snapshot_dir("b"));
        std::fs::create_dir(&db).unwrap();
        std::fs::copy(da.join("meta.json"), db.join("meta.json")).unwrap();
        let refused = |e: Error| {
            assert_eq!(e.exit_code(), 1);
            assert!(
                e.to_string()
                    .contains("it is the metadata of snapshot \"a\", not \"b\""),
                "{e}"
            );
        };
        refused(SnapshotMeta::load(&ctx, "b").unwrap_err());
        refused(pin(&ctx, "b").unwrap_err());
        refused(remove(&ctx, &names(&["b"]), true, |_| {}).unwrap_err());
        refused(reap(&ctx).unwrap_err());
        assert!(da.join("disk").is_file() && db.is_dir());
        // Once the copy is gone, the expired original is reaped as usual.
        std::fs::remove_dir_all(&db).unwrap();
        assert_eq!(reap(&ctx).unwrap(), ["a"]);
        assert_eq!(std::fs::read_dir(t.0.join("locks")).unwrap().count(), 1);
    }
}

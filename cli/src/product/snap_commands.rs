//! `vmm snapshot save|ls|rm|restore|gc|schedule`.

use serde_json::{json, Value};

use super::args::{SaveArgs, SnapshotCommand};
use super::clock::{format_duration, format_local, format_utc, now};
use super::error::{Error, Result};
use super::names;
use super::net;
use super::output::{human_size, json, Format, Table};
use super::sandbox::Sandbox;
use super::schedule;
use super::snap_remove;
use super::snapshot::{self, SaveOptions, SnapshotMeta};
use super::Ctx;

pub fn run(ctx: &Ctx, cmd: SnapshotCommand) -> Result<i32> {
    match cmd {
        SnapshotCommand::Save(a) => save(ctx, &a),
        SnapshotCommand::Ls(a) => {
            let all = snapshot::list_readable(ctx)?;
            match a.output {
                Format::Json => {
                    let v: Vec<Value> = all.iter().map(snapshot_json).collect();
                    print!("{}", json(&v));
                }
                Format::Table => print!("{}", table(&all)),
            }
            Ok(0)
        }
        SnapshotCommand::Rm(a) => {
            snap_remove::remove(ctx, &a.names, a.force, |n| println!("{n}"))?;
            Ok(0)
        }
        SnapshotCommand::Restore(a) => {
            names::validate("snapshot", &a.name)?;
            names::validate("sandbox", &a.into)?;
            let taken = || Error::Exists {
                what: "sandbox",
                name: a.into.clone(),
            };
            if Sandbox::exists(ctx, &a.into) {
                return Err(taken());
            }
            // The snapshot is pinned (kept from `snapshot rm` and expiry)
            // until the new sandbox has what it needs of it.
            let pin = snap_remove::pin(ctx, &a.name)?;
            let tap = net::for_snapshot(&pin.meta, a.tap.as_deref(), a.mac.as_deref())?;
            let lock = ctx.store.lock_new_sandbox(&a.into)?;
            if Sandbox::exists(ctx, &a.into) {
                return Err(taken());
            }
            // The TAP is checked free as the sandbox is recorded.
            Sandbox::create_from_snapshot(ctx, &a.into, pin, tap, &lock)?;
            Ok(0)
        }
        SnapshotCommand::Gc(_) => {
            for n in snap_remove::reap(ctx)? {
                println!("{n}");
            }
            Ok(0)
        }
        SnapshotCommand::Schedule(a) => {
            names::validate("sandbox", &a.sandbox)?;
            let expires = a.expires_in.or(ctx.config.default_expiry()?);
            let next = schedule::set(ctx, &a.sandbox, a.cron.as_deref(), a.kind, expires)?;
            if let Some(t) = next {
                println!("next snapshot at {}", format_local(t));
            }
            Ok(0)
        }
    }
}

fn save(ctx: &Ctx, a: &SaveArgs) -> Result<i32> {
    names::validate("sandbox", &a.sandbox)?;
    if let Some(n) = &a.name {
        names::validate("snapshot", n)?;
    }
    let opts = SaveOptions {
        name: a.name.clone(),
        kind: a.kind,
        resume_source: a.resume_source,
        guest_sync: a.guest_sync,
        expires_in: a.expires_in.or(ctx.config.default_expiry()?),
    };
    // Found before locking: no lock file for a name that does not exist.
    Sandbox::load(ctx, &a.sandbox)?;
    let _lock = ctx.store.lock_sandbox(&a.sandbox)?;
    let (meta, not_resumed) = snapshot::save(ctx, &a.sandbox, &opts)?;
    match a.output {
        Format::Json => print!("{}", json(&snapshot_json(&meta))),
        Format::Table => println!("{}", meta.name),
    }
    // The snapshot is ready; the sandbox's trouble is reported apart.
    match not_resumed {
        Some(e) => {
            eprintln!("vmm: {e}");
            Ok(e.exit_code())
        }
        None => Ok(0),
    }
}

fn snapshot_json(m: &SnapshotMeta) -> Value {
    json!({
        "name": m.name,
        "id": m.id,
        "sandbox": m.sandbox,
        "type": m.kind.as_str(),
        "status": m.status.as_str(),
        "reason": m.reason,
        "parent": m.parent,
        "parent_id": m.parent_id,
        "tap": m.net.as_ref().map(|n| &n.tap),
        "size_bytes": m.size_bytes,
        "created": format_utc(m.created),
        "expires": m.expires.map(format_utc),
        "vcpus": m.vcpus,
        "mem_mib": m.mem_mib,
        "guest_sync": m.guest_sync,
        "disk_copy": m.disk_copy,
        "disk_bytes": m.disk_bytes,
        "disk_changed_chunks": m.disk_changed_chunks,
        "took_ms": m.took_ms,
    })
}

fn table(all: &[SnapshotMeta]) -> String {
    let mut t = Table::new(&[
        "NAME", "SANDBOX", "TYPE", "STATUS", "SIZE", "CREATED", "EXPIRES",
    ]);
    for m in all {
        t.row(vec![
            m.name.clone(),
            m.sandbox.clone(),
            m.kind.as_str().to_string(),
            m.status.as_str().to_string(),
            human_size(m.size_bytes),
            format_local(m.created),
            m.expires
                .map(|e| match u64::try_from(e - now()) {
                    Ok(left) if left > 0 => format!("in {}", format_duration(left)),
                    _ => "now".into(),
                })
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::snapshot::{SnapKind, SnapStatus};

    #[test]
    fn listing_shapes() {
        let m = SnapshotMeta {
            name: "before".into(),
            id: Some("00ff".into()),
            sandbox: "dev".into(),
            kind: SnapKind::Diff,
            status: SnapStatus::Ready,
            reason: None,
            parent: Some("base".into()),
            parent_id: Some("11ee".into()),
            created: 0,
            expires: None,
            size_bytes: 3 << 20,
            kernel: "/k".into(),
            cmdline: "c".into(),
            vcpus: 1,
            mem_mib: 128,
            net: None,
            creator_pid: 1,
            guest_sync: Some("synced".into()),
            disk_copy: Some(crate::product::disk::CopyMethod::Diff),
            disk_bytes: Some(128 << 10),
            disk_changed_chunks: Some(2),
            took_ms: Some(12),
        };
        let v = snapshot_json(&m);
        assert_eq!(v["type"], "diff");
        assert_eq!(v["parent"], "base");
        assert_eq!(v["created"], "1970-01-01T00:00:00Z");
        assert_eq!(v["expires"], Value::Null);
        assert_eq!(v["disk_copy"], "diff");
        assert_eq!(v["disk_bytes"], 128 << 10);
        assert_eq!(v["disk_changed_chunks"], 2);
        let text = table(&[m]);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "SANDBOX", "TYPE", "STATUS", "SIZE", "CREATED", "EXPIRES"]
        );
        let row = lines.next().unwrap();
        assert!(
            row.starts_with("before  dev      diff  ready   3.0 MiB  "),
            "{row}"
        );
        assert!(row.ends_with("  -"), "{row}");
    }
}

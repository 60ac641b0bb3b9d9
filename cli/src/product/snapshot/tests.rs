//! Tests of snapshot metadata, diff parents, chains and saving.

use super::super::store::tests::{remove, TempDir};
use super::*;
use std::path::Path;

/// A ready snapshot of sandbox `dev` (a diff when it has a parent), with
/// id `id-NAME`.
pub fn meta(name: &str, parent: Option<&str>) -> SnapshotMeta {
    SnapshotMeta {
        name: name.into(),
        id: Some(format!("id-{name}")),
        sandbox: "dev".into(),
        kind: if parent.is_some() {
            SnapKind::Diff
        } else {
            SnapKind::Full
        },
        status: SnapStatus::Ready,
        reason: None,
        parent: parent.map(str::to_string),
        parent_id: parent.map(|p| format!("id-{p}")),
        created: 1,
        expires: None,
        size_bytes: 0,
        kernel: "/k".into(),
        cmdline: "c".into(),
        vcpus: 1,
        mem_mib: 128,
        net: None,
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
    use std::os::unix::fs::FileExt;

    let t = TempDir::new("snap-chain");
    let ctx = Ctx::at(&t.0.join("state")).unwrap();
    let disk = t.0.join("sandbox.ext4");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(b"v1", 0).unwrap();
    let metas = [meta("a", None), meta("b", Some("a")), meta("c", Some("b"))];
    let mut states = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        let dir = ctx.store.create_entry(Kind::Snapshot, &m.name, m).unwrap();
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

    // A parent removed and its name reused is not taken for the
    // parent: merging onto it would corrupt the guest.
    let mut other = meta("b", Some("a"));
    other.id = Some("another".into());
    other.save(&ctx).unwrap();
    let e = ancestry(&ctx, &metas[2]).unwrap_err().to_string();
    assert!(
        e.contains("snapshot c builds on a snapshot named b that was removed"),
        "{e}"
    );

    // A missing parent breaks the chain with a clear error.
    remove(&ctx.store, Kind::Snapshot, "b").unwrap();
    let e = ancestry(&ctx, &metas[2]).unwrap_err().to_string();
    assert!(e.contains("builds on b, which no longer exists"), "{e}");
}

#[test]
fn meta_format() {
    let all = [meta("a", None), meta("b", Some("a"))];
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
    // Metadata of older versions: no id, no parent id, no interface.
    let old: SnapshotMeta = serde_json::from_str(
        r#"{"name":"o","sandbox":"dev","kind":"diff","status":"ready","parent":"p",
            "created":1,"kernel":"/k","cmdline":"c","vcpus":1,"mem_mib":128,"creator_pid":1}"#,
    )
    .unwrap();
    assert!(old.id.is_none() && old.parent_id.is_none() && old.net.is_none());
}

/// A sandbox `dev` recorded in `ctx` (ready), with a disk and these
/// dirty-log baseline fields.
fn sandbox(ctx: &Ctx, baseline: Option<(&str, Option<&str>)>, pid: Option<u32>) -> Sandbox {
    use super::super::sandbox::{Guest, Lifecycle, Origin, SandboxMeta};
    let guest = Guest {
        kernel: "/k".into(),
        cmdline: "c".into(),
        vcpus: 1,
        mem_mib: 128,
        image: None,
    };
    let origin = Origin::Boot {
        rootfs: "/r".into(),
    };
    let mut meta = SandboxMeta::creating("dev", guest, origin, None);
    meta.lifecycle = Lifecycle::Ready;
    meta.creator_pid = None;
    meta.pid = pid;
    meta.mem_baseline = baseline.map(|(n, _)| n.to_string());
    meta.mem_baseline_id = baseline.and_then(|(_, id)| id.map(str::to_string));
    let dir = match ctx.store.create_entry(Kind::Sandbox, "dev", &meta) {
        Ok(dir) => dir,
        Err(_) => {
            let dir = ctx.store.sandbox_dir("dev");
            write_json_atomic(&dir.join(META_FILE), &meta).unwrap();
            dir
        }
    };
    let sb = Sandbox {
        meta,
        paths: Paths::new(dir),
    };
    std::fs::write(&sb.paths.disk, vec![5u8; 1 << 20]).unwrap();
    sb
}

#[test]
fn diffs_build_only_on_the_very_snapshot_of_the_baseline() {
    let t = TempDir::new("snap-diff-parent");
    let ctx = Ctx::at(&t.0).unwrap();
    ctx.store
        .create_entry(Kind::Snapshot, "base", &meta("base", None))
        .unwrap();
    let sb = sandbox(&ctx, Some(("base", Some("id-base"))), None);
    let pin = diff_parent(&ctx, &sb).unwrap();
    assert_eq!(pin.meta.name, "base");
    drop(pin);
    let refused = |sb: &Sandbox, why: &str| {
        let e = diff_parent(&ctx, sb).unwrap_err().to_string();
        assert!(
            e.starts_with("sandbox dev cannot take a diff snapshot: ")
                && e.contains(why)
                && e.ends_with("take a full snapshot (`--type full`)"),
            "{e}"
        );
    };
    // Metadata of older versions: a baseline name without an id.
    refused(
        &sandbox(&ctx, Some(("base", None)), None),
        "no earlier snapshot",
    );
    refused(&sandbox(&ctx, None, None), "no earlier snapshot");
    // The parent was removed and another snapshot took its name.
    let mut other = meta("base", None);
    other.id = Some("another".into());
    other.save(&ctx).unwrap();
    let sb = sandbox(&ctx, Some(("base", Some("id-base"))), None);
    refused(&sb, "the name reused");
    remove(&ctx.store, Kind::Snapshot, "base").unwrap();
    refused(&sb, "is gone or not ready");
}

/// Serves a sandbox's API on `sock` like a running VMM until it is asked
/// to resume: creating a snapshot succeeds when `create_ok`, resuming fails.
fn fake_vmm(sock: &Path, create_ok: bool) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        loop {
            let (mut c, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = c.read(&mut chunk).unwrap();
                req.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if n == 0 || req.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&req).to_string();
            let line = text.lines().next().unwrap_or_default().to_string();
            let resume = line.starts_with("PATCH /vm") && text.contains("Resumed");
            let (status, body) = if line.starts_with("GET /vm") {
                ("200 OK", r#"{"state":"Running"}"#)
            } else if resume {
                (
                    "400 Bad Request",
                    r#"{"fault_message":"vCPU 0 would not resume"}"#,
                )
            } else if line.starts_with("PUT /snapshot/create") && !create_ok {
                (
                    "500 Internal Server Error",
                    r#"{"fault_message":"disk full"}"#,
                )
            } else {
                ("204 No Content", "")
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            c.write_all(reply.as_bytes()).unwrap();
            seen.push(line);
            if resume {
                return seen;
            }
        }
    })
}

#[test]
fn a_complete_snapshot_stays_ready_when_resuming_fails() {
    let t = TempDir::new("snap-resume");
    let ctx = Ctx::at(&t.0).unwrap();
    let dir = ctx.store.sandbox_dir("dev");
    let sock = process::arg(&dir.join("api.sock"));
    // A process recognised as the sandbox's VMM (its arguments hold the
    // API socket); `; :` keeps sh from exec'ing sleep.
    let mut vmm = std::process::Command::new("sh")
        .args(["-c", "sleep 30; :", &sock])
        .spawn()
        .unwrap();
    let sb = sandbox(&ctx, None, Some(vmm.id()));
    while !sb.vmm_alive() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let opts = SaveOptions {
        name: Some("snap".into()),
        kind: SnapKind::Full,
        resume_source: true,
        guest_sync: GuestSync::Skip,
        expires_in: None,
    };
    let server = fake_vmm(&sb.paths.api_sock, true);
    let (m, not_resumed) = save(&ctx, "dev", &opts).unwrap();
    let seen = server.join().unwrap();
    assert_eq!(
        seen.iter()
            .map(|l| l.split(" HTTP").next().unwrap())
            .collect::<Vec<_>>(),
        ["GET /vm", "PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    );
    assert_eq!(m.status, SnapStatus::Ready);
    let e = not_resumed.unwrap();
    assert_eq!(e.exit_code(), 1);
    let text = e.to_string();
    assert!(
        text.starts_with("snapshot snap is ready, but sandbox dev could not be resumed: ")
            && text.contains("vCPU 0 would not resume")
            && !text.contains('\n'),
        "{text}"
    );
    let stored = SnapshotMeta::load(&ctx, "snap").unwrap();
    assert_eq!(stored.status, SnapStatus::Ready);
    assert!(ctx.store.snapshot_dir("snap").join("disk").is_file());
    let after = Sandbox::load(&ctx, "dev").unwrap();
    assert_eq!(after.meta.mem_baseline.as_deref(), Some("snap"));
    assert_eq!(after.meta.mem_baseline_id, stored.id);

    // A snapshot that fails is failed, whatever resuming does, and the
    // error is the snapshot's.
    std::fs::remove_file(&sb.paths.api_sock).unwrap();
    let server = fake_vmm(&sb.paths.api_sock, false);
    let opts = SaveOptions {
        name: Some("snap2".into()),
        ..opts
    };
    let e = save(&ctx, "dev", &opts).unwrap_err().to_string();
    server.join().unwrap();
    assert!(e.contains("disk full"), "{e}");
    let failed = SnapshotMeta::load(&ctx, "snap2").unwrap();
    assert_eq!(failed.status, SnapStatus::Failed);
    let after = Sandbox::load(&ctx, "dev").unwrap();
    assert_eq!(
        (after.meta.mem_baseline, after.meta.mem_baseline_id),
        (None, None)
    );
    let _ = vmm.kill();
    let _ = vmm.wait();
}

#[test]
fn a_snapshot_gone_missing_is_not_found() {
    let t = TempDir::new("snap-vanished");
    let ctx = Ctx::at(&t.0).unwrap();
    let missing = ctx.store.snapshot_dir("gone").join("disk");
    let enoent = || std::io::Error::from_raw_os_error(libc::ENOENT);
    let e = vanished(&ctx, Error::io("opening", &missing, enoent()));
    assert!(matches!(&e, Error::NoSnapshot(n) if n == "gone"), "{e}");
    assert_eq!(e.exit_code(), 3);
    // Other errors, and missing files elsewhere, stay as they are.
    let elsewhere = ctx.store.sandbox_dir("dev").join("disk.ext4");
    let e = vanished(&ctx, Error::io("opening", &elsewhere, enoent()));
    assert!(matches!(e, Error::Io { .. }), "{e}");
    let denied = std::io::Error::from_raw_os_error(libc::EACCES);
    let e = vanished(&ctx, Error::io("opening", &missing, denied));
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

//! Creating a sandbox: it is recorded first (metadata with the `creating`
//! status, placed whole by [`Store::create_entry`]), so an interrupted
//! creation is listed, shown as failed once its process is gone, and
//! removed by `rm -f`; then its disk is copied and its VMM booted or
//! restored. Only a ready sandbox is used; a failed one has its logs and
//! `rm`. Its TAP is checked free and it is recorded under the store lock,
//! so two creations cannot both take one TAP.
//!
//! [`Store::create_entry`]: super::super::store::Store::create_entry

use std::path::{Path, PathBuf};

use super::super::clock;
use super::super::disk;
use super::super::error::{Error, Result};
use super::super::net::{self, NetMeta};
use super::super::snap_remove::Pinned;
use super::super::snapshot::{self, SnapKind};
use super::super::store::{Kind, Lock};
use super::super::Ctx;
use super::{Lifecycle, Origin, Paths, Sandbox, SandboxMeta, Status};

impl SandboxMeta {
    /// The metadata of a sandbox this process is about to create.
    pub fn creating(name: &str, guest: Guest, origin: Origin, net: Option<NetMeta>) -> Self {
        SandboxMeta {
            name: name.to_string(),
            created: clock::now(),
            lifecycle: Lifecycle::Creating,
            creator_pid: Some(std::process::id()),
            failure: None,
            kernel: guest.kernel,
            cmdline: guest.cmdline,
            vcpus: guest.vcpus,
            mem_mib: guest.mem_mib,
            origin,
            image: guest.image,
            net,
            pid: None,
            started: None,
            mem_baseline: None,
            mem_baseline_id: None,
            schedule: None,
        }
    }

    /// Stands in for the metadata of a directory that has none (left by an
    /// interrupted creation of an older version), so it is listed as failed
    /// and can be removed.
    pub(super) fn broken(name: &str, dir: &Path) -> Self {
        let created = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        let mut meta = Self::creating(
            name,
            Guest::default(),
            Origin::Boot {
                rootfs: PathBuf::new(),
            },
            None,
        );
        meta.created = created;
        meta.lifecycle = Lifecycle::Failed;
        meta.creator_pid = None;
        meta.failure = Some("its directory has no metadata (an interrupted creation)".into());
        meta
    }
}

/// The guest of a new sandbox.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The image name when the guest came from `--image`.
    pub image: Option<String>,
}

/// What a new sandbox boots.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub guest: Guest,
    pub rootfs: PathBuf,
    pub net: Option<NetMeta>,
}

impl Sandbox {
    /// Why the sandbox cannot be used, for a failed (or interrupted) one.
    pub fn failure(&self) -> Option<String> {
        match self.status() {
            Status::Failed if self.meta.lifecycle == Lifecycle::Creating => {
                Some("interrupted: the process creating it ended".into())
            }
            Status::Failed => Some(
                self.meta
                    .failure
                    .clone()
                    .unwrap_or_else(|| "unknown reason".into()),
            ),
            _ => None,
        }
    }

    /// Created completely, or an error saying why not and what to do. The
    /// caller holds the sandbox's lock, so a creation is not in progress.
    pub fn require_ready(&self) -> Result<()> {
        let why = match self.meta.lifecycle {
            Lifecycle::Ready => return Ok(()),
            Lifecycle::Creating => "its creation was interrupted".to_string(),
            Lifecycle::Failed => format!(
                "its creation failed: {}",
                self.meta.failure.as_deref().unwrap_or("unknown reason")
            ),
        };
        let name = &self.meta.name;
        let rm = if self.vmm_alive() { "rm -f" } else { "rm" };
        Err(Error::Invalid(format!(
            "sandbox {name} is not usable: {why}; `vmm logs {name}` shows its console, \
             `vmm {rm} {name}` removes it"
        )))
    }

    /// A new sandbox booted from a copy of `spec.rootfs`; `lock` is the
    /// sandbox's ([`super::super::store::Store::lock_new_sandbox`]).
    pub fn create_boot(ctx: &Ctx, name: &str, spec: &BootSpec, lock: &Lock) -> Result<Self> {
        let origin = Origin::Boot {
            rootfs: spec.rootfs.clone(),
        };
        let meta = SandboxMeta::creating(name, spec.guest.clone(), origin, spec.net.clone());
        Self::create(ctx, meta, lock, |sb| {
            ctx.progress
                .step(&format!("copying {}", spec.rootfs.display()));
            disk::copy_file(&spec.rootfs, &sb.paths.disk)?;
            sb.boot(ctx)
        })
    }

    /// A new sandbox from a pinned ready snapshot: its disk, and (unless the
    /// snapshot is disk-only) its memory and devices, so processes continue.
    /// `lock` is the sandbox's; `net` is from [`super::net::for_snapshot`].
    pub fn create_from_snapshot(
        ctx: &Ctx,
        name: &str,
        pin: Pinned,
        net: Option<NetMeta>,
        lock: &Lock,
    ) -> Result<Self> {
        let snap = pin.meta.clone();
        let guest = Guest {
            kernel: snap.kernel.clone(),
            cmdline: snap.cmdline.clone(),
            vcpus: snap.vcpus,
            mem_mib: snap.mem_mib,
            image: None,
        };
        let origin = Origin::Snapshot {
            snapshot: snap.name.clone(),
        };
        let meta = SandboxMeta::creating(name, guest, origin, net);
        Self::create(ctx, meta, lock, move |sb| {
            let snap_dir = ctx.store.snapshot_dir(&snap.name);
            ctx.progress
                .step(&format!("copying the disk of snapshot {}", snap.name));
            let method = disk::copy_file(&snap_dir.join("disk"), &sb.paths.disk)?;
            log::debug!("disk copy by {method:?}");
            if snap.kind == SnapKind::Disk {
                drop(pin);
                sb.boot(ctx)
            } else {
                sb.restore(ctx, pin)
            }
        })
        .map_err(|e| snapshot::vanished(ctx, e))
    }

    /// Records the new sandbox `meta` (creating) and runs `build` on it;
    /// `lock` is the sandbox's. Then it is ready; or, when its guest agent
    /// never answered, kept as failed (VMM stopped, disk and memory files
    /// deleted) for its logs; or else removed.
    fn create(
        ctx: &Ctx,
        meta: SandboxMeta,
        lock: &Lock,
        build: impl FnOnce(&mut Sandbox) -> Result<()>,
    ) -> Result<Self> {
        let dir = {
            // The TAP check and the record under one store lock: another
            // creation checks only once this one is recorded, and sees it.
            let store = ctx.store.lock_store()?;
            let recorded = net::check_free(ctx, meta.net.as_ref())
                .and_then(|()| ctx.store.create_entry(Kind::Sandbox, &meta.name, &meta));
            if recorded.is_err() {
                ctx.store
                    .discard_lock(Kind::Sandbox, &meta.name, &store, lock);
            }
            recorded?
        };
        let mut sb = Sandbox {
            meta,
            paths: Paths::new(dir),
        };
        let built = build(&mut sb).and_then(|()| {
            sb.meta.lifecycle = Lifecycle::Ready;
            sb.meta.creator_pid = None;
            sb.save()
        });
        if let Err(e) = &built {
            sb.kill();
            if let Error::AgentTimeout { secs, cause, .. } = e {
                sb.meta.pid = None;
                sb.meta.lifecycle = Lifecycle::Failed;
                sb.meta.failure = Some(format!(
                    "the guest agent did not answer within {secs}s ({cause})"
                ));
                if let Err(se) = sb.save() {
                    log::warn!("recording that sandbox {} failed: {se}", sb.meta.name);
                }
                sb.remove_large_files();
            } else if let Err(re) = Sandbox::remove(ctx, &sb.meta.name, lock) {
                log::warn!("removing what the failed creation left: {re}");
            }
        }
        built.map(|()| sb)
    }

    /// Deletes what a failed sandbox no longer needs and that can be as big
    /// as the guest: its disk copy and, restored from a diff, the merged
    /// memory and state. Its metadata and logs (`vmm logs`, `vmm status`)
    /// stay.
    fn remove_large_files(&self) {
        let p = &self.paths;
        let ws = p.memory.with_file_name("memory.ws");
        for f in [&p.disk, &p.memory, &p.vmstate, &ws] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("removing {}: {e}", f.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::store::tests::TempDir;
    use super::*;
    use std::time::Duration;

    fn guest() -> Guest {
        Guest {
            kernel: "/k".into(),
            cmdline: "c".into(),
            vcpus: 1,
            mem_mib: 128,
            image: None,
        }
    }

    fn new_meta(name: &str) -> SandboxMeta {
        let origin = Origin::Boot {
            rootfs: "/r".into(),
        };
        SandboxMeta::creating(name, guest(), origin, None)
    }

    /// [`Sandbox::create`] under the new sandbox's lock, as the commands do.
    fn create(
        ctx: &Ctx,
        meta: SandboxMeta,
        build: impl FnOnce(&mut Sandbox) -> Result<()>,
    ) -> Result<Sandbox> {
        let lock = ctx.store.lock_new_sandbox(&meta.name)?;
        Sandbox::create(ctx, meta, &lock, build)
    }

    /// Removes a sandbox as `vmm rm` does.
    fn rm(ctx: &Ctx, name: &str) -> Result<()> {
        let lock = ctx.store.lock_sandbox(name)?;
        Sandbox::remove(ctx, name, &lock)
    }

    #[test]
    fn creation_is_recorded_first_and_failures_keep_only_what_helps() {
        let t = TempDir::new("create");
        let ctx = Ctx::at(&t.0).unwrap();
        // While it is built, the sandbox is there and creating.
        let sb = create(&ctx, new_meta("ok"), |sb| {
            let seen = Sandbox::load(&ctx, "ok")?;
            assert_eq!(seen.status(), Status::Creating);
            assert_eq!(seen.meta.creator_pid, Some(std::process::id()));
            assert!(Sandbox::exists(&ctx, "ok"));
            std::fs::write(&sb.paths.serial, "booted\n")
                .map_err(|e| Error::io("w", Path::new("x"), e))
        })
        .unwrap();
        assert_eq!(sb.meta.lifecycle, Lifecycle::Ready);
        let again = Sandbox::load(&ctx, "ok").unwrap();
        assert_eq!(
            (again.meta.lifecycle, again.meta.creator_pid),
            (Lifecycle::Ready, None)
        );
        assert_eq!(again.status(), Status::Stopped);
        let e = create(&ctx, new_meta("ok"), |_| Ok(())).unwrap_err();
        assert_eq!(e.to_string(), "sandbox ok already exists");

        // An ordinary failure removes the new sandbox.
        let e = create(&ctx, new_meta("gone"), |_| {
            Err(Error::Failed("no disk".into()))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "no disk");
        assert!(!Sandbox::exists(&ctx, "gone"));

        // A guest agent that never answered: kept as failed, with its
        // console, and the message says so.
        let e = create(&ctx, new_meta("slow"), |sb| {
            std::fs::write(
                &sb.paths.serial,
                "Booting\r\nKernel panic - not syncing\r\n\r\n",
            )
            .map_err(|e| Error::io("w", Path::new("x"), e))?;
            // What a restore from a diff leaves: a disk copy, and the merged
            // state and memory (all of the guest's RAM).
            let p = &sb.paths;
            for (f, text) in [
                (&p.vmm_log, "vmm[main] info: started\n"),
                (&p.disk, "disk"),
                (&p.vmstate, "state"),
                (&p.memory, "memory"),
                (&p.history, "2026 exit=0 true\n"),
            ] {
                std::fs::write(f, text).map_err(|e| Error::io("w", f, e))?;
            }
            // "Its VMM": this process, alive (and never killed: the
            // arguments do not match).
            sb.meta.pid = Some(std::process::id());
            sb.wait_agent(Duration::ZERO)
        })
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("sandbox slow: the guest agent did not answer within 0s (")
                && text.contains("kept as failed, its VMM stopped")
                && text.contains("`vmm logs slow` shows its console (its last line: \"Kernel panic - not syncing\")")
                && text.ends_with("`vmm rm slow` removes it")
                && !text.contains('\n'),
            "{text}"
        );
        let slow = Sandbox::load(&ctx, "slow").unwrap();
        assert_eq!(slow.status(), Status::Failed);
        assert_eq!(slow.meta.pid, None);
        // Kept for its logs only: what `logs` and `status` read stays, the
        // files as big as the guest go.
        let p = &slow.paths;
        for kept in [&p.meta, &p.serial, &p.vmm_log, &p.history] {
            assert!(kept.is_file(), "{} is kept", kept.display());
        }
        for gone in [&p.disk, &p.vmstate, &p.memory] {
            assert!(!gone.exists(), "{} is deleted", gone.display());
        }
        assert!(slow.disk_usage() > 0);
        let why = slow.failure().unwrap();
        assert!(
            why.starts_with("the guest agent did not answer within 0s"),
            "{why}"
        );
        let e = slow.require_ready().unwrap_err().to_string();
        assert!(
            e.starts_with("sandbox slow is not usable: its creation failed: the guest agent")
                && e.ends_with("`vmm logs slow` shows its console, `vmm rm slow` removes it"),
            "{e}"
        );
        rm(&ctx, "slow").unwrap();
        assert!(!Sandbox::exists(&ctx, "slow"));

        // An existing sandbox whose agent does not answer is left running.
        let mut ok = Sandbox::load(&ctx, "ok").unwrap();
        ok.meta.pid = Some(std::process::id());
        let e = ok.wait_agent(Duration::ZERO).unwrap_err().to_string();
        assert!(
            e.contains("the sandbox is left running: `vmm logs ok` shows its console (its last line: \"booted\")"),
            "{e}"
        );
    }

    #[test]
    fn interrupted_and_broken_creations_show_as_failed() {
        let t = TempDir::new("create-broken");
        let ctx = Ctx::at(&t.0).unwrap();
        // The creating process is gone (Ctrl-C).
        let mut m = new_meta("cut");
        m.creator_pid = Some(u32::MAX);
        ctx.store.create_entry(Kind::Sandbox, "cut", &m).unwrap();
        let cut = Sandbox::load(&ctx, "cut").unwrap();
        assert_eq!(cut.status(), Status::Failed);
        assert_eq!(
            cut.failure().unwrap(),
            "interrupted: the process creating it ended"
        );
        let e = cut.require_ready().unwrap_err().to_string();
        assert!(
            e.contains("its creation was interrupted") && e.contains("`vmm rm cut`"),
            "{e}"
        );

        // A directory without metadata, as older versions left one.
        let legacy = ctx.store.sandbox_dir("legacy");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(legacy.join("disk.ext4"), "d").unwrap();
        let sb = Sandbox::load(&ctx, "legacy").unwrap();
        assert_eq!(sb.status(), Status::Failed);
        assert!(sb.failure().unwrap().contains("no metadata"));
        assert!(sb.meta.created > 0);
        rm(&ctx, "legacy").unwrap();
        assert!(matches!(
            Sandbox::load(&ctx, "legacy"),
            Err(Error::NoSandbox(_))
        ));

        // Names are checked before any path is made of them.
        let e = Sandbox::load(&ctx, "../snapshots/x").unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
        assert!(
            e.to_string().starts_with("sandbox name \"../snapshots/x\""),
            "{e}"
        );
    }

    /// Two creations cannot both take one TAP: the check and the record are
    /// one step under the store lock, so all but one get the clear error.
    #[test]
    fn one_tap_goes_to_one_sandbox_even_when_created_at_once() {
        use std::sync::{Arc, Barrier};
        let t = TempDir::new("create-tap");
        let ctx = Ctx::at(&t.0).unwrap();
        let start = Arc::new(Barrier::new(4));
        let racers: Vec<_> = (0..4)
            .map(|i| {
                let (root, start) = (t.0.clone(), start.clone());
                std::thread::spawn(move || {
                    let ctx = Ctx::at(&root)?;
                    let mut meta = new_meta(&format!("n{i}"));
                    meta.net = Some(NetMeta {
                        tap: "tap0".into(),
                        mac: None,
                    });
                    start.wait();
                    create(&ctx, meta, |_| {
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(())
                    })
                    .map(|sb| sb.meta.name)
                })
            })
            .collect();
        let results: Vec<Result<String>> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        let winner = won[0].clone();
        for r in &results {
            if let Err(e) = r {
                assert_eq!(
                    e.to_string(),
                    format!("TAP tap0 is sandbox {winner}'s; give another one with --tap")
                );
            }
        }
        // The losers left neither a sandbox nor a lock file.
        assert_eq!(ctx.store.names(Kind::Sandbox).unwrap(), [winner.as_str()]);
        let mut locks: Vec<String> = std::fs::read_dir(t.0.join("locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        locks.sort();
        assert_eq!(
            locks,
            [format!("sandbox-{winner}.lock"), "store.lock".into()]
        );
    }

    /// A sandbox directory copied by hand (`a` to `b`) holds `a`'s
    /// metadata: it is refused, so `vmm rm b` cannot remove `a` (holding
    /// only `b`'s lock); removal goes by the name asked for.
    #[test]
    fn a_directory_copied_by_hand_is_not_taken_for_its_original() {
        use super::super::super::args::RmArgs;
        use super::super::super::commands;
        let t = TempDir::new("create-copied");
        let ctx = Ctx::at(&t.0).unwrap();
        create(&ctx, new_meta("a"), |sb| {
            std::fs::write(&sb.paths.disk, "a's disk")
                .map_err(|e| Error::io("w", &sb.paths.disk, e))
        })
        .unwrap();
        let (a, b) = (ctx.store.sandbox_dir("a"), ctx.store.sandbox_dir("b"));
        std::fs::create_dir(&b).unwrap();
        for f in ["meta.json", "disk.ext4"] {
            std::fs::copy(a.join(f), b.join(f)).unwrap();
        }
        let e = Sandbox::load(&ctx, "b").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string().contains(
                "it is the metadata of sandbox \"a\", not \"b\": its directory was copied"
            ),
            "{e}"
        );
        for force in [false, true] {
            let args = RmArgs {
                name: "b".into(),
                force,
            };
            let e = commands::rm(&ctx, &args).unwrap_err();
            assert!(e.to_string().contains("not \"b\""), "{e}");
        }
        assert!(Sandbox::load(&ctx, "a").is_ok() && b.is_dir());
        // Removing `b` itself (as a remover by name does) leaves `a` alone.
        rm(&ctx, "b").unwrap();
        assert!(!b.exists());
        assert_eq!(std::fs::read(a.join("disk.ext4")).unwrap(), b"a's disk");
        let args = RmArgs {
            name: "a".into(),
            force: false,
        };
        assert_eq!(commands::rm(&ctx, &args).unwrap(), 0);
        assert!(ctx.store.names(Kind::Sandbox).unwrap().is_empty());
    }
}

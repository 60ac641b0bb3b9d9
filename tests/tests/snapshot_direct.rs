//! Issue 4 directly on this machine's KVM (guest kernel only, see shared/platform/README.md): a
//! kernel paused mid-boot carries on after `vmm run --restore`, diff snapshots merge into a
//! loadable full one, corrupt snapshot files are refused with a 400 and a clear message, and a VMM
//! killed in the middle of a snapshot leaves the previous snapshot intact.
//!
//! The nested (full guest with user space) snapshot tests are in snapshot_nested.rs. All heavy
//! tests take one process-wide lock: they share two cores with everyone else, and the timings
//! they print are only meaningful one at a time.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{
    api, artifacts, cleanup, create_snapshot, decode_state, file_load_body, fill_zero_pages, heavy,
    largest_region, pause, read_lossy, read_state, require_kvm, reseal, resume, same_guest_memory,
    scratch, sha256, tail, try_api, utf8 as s, vm_state, wait_for_text, VmmProcess, CRC_LEN,
    HEADER_LEN,
};

/// How long a VMM may take to open its API socket, and to exit after Stop.
const API_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(30);

fn sleep_until(start: Instant, after: Duration) {
    if let Some(d) = after.checked_sub(start.elapsed()) {
        std::thread::sleep(d);
    }
}

const INIT_LINE: &str = "Run /sbin/init as init process";
/// Console lines marking the two pause points of the direct boot: the console is up and the
/// kernel is early in its initcalls; the disk is probed but the root filesystem not yet mounted
/// (so the disk is still untouched at the second snapshot).
const P1_LINE: &str = "devtmpfs: initialized";
const P2_LINE: &str = "virtio_blk virtio0: [vda]";

/// The printk timestamps (seconds) of a console log.
fn timestamps(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.trim().parse().ok())
        .collect()
}

/// A restored guest that ran until it ended (or reached init on an ordinary KVM).
#[derive(Debug)]
struct RestoreRun {
    exit_code: Option<i32>,
    stderr: String,
    serial: String,
    /// From spawn to `Run /sbin/init` appearing on the console.
    init_after: Option<Duration>,
}

impl RestoreRun {
    /// Asserts the guest carried on from `before` (the console up to the pause) to init.
    fn assert_carried_on(&self, what: &str, before: &str) {
        let log = &self.serial;
        assert!(
            self.init_after.is_some(),
            "{what}: init not reached ({self:?})\n{}",
            tail(log, 30)
        );
        // The console was up before the pause, so a second "Linux version" means a reboot.
        assert!(
            !log.contains("Linux version"),
            "{what}: the guest rebooted:\n{}",
            tail(log, 30)
        );
        let (last_before, first_after) = (
            timestamps(before).last().copied(),
            timestamps(log).first().copied(),
        );
        assert!(
            matches!((last_before, first_after), (Some(b), Some(a)) if a >= b),
            "{what}: console time does not continue: {last_before:?} before the pause, {first_after:?} after"
        );
        if Path::new("/sys/module/kvm_pvm").exists() {
            // Guest user space cannot make system calls on kvm_pvm: init dies, the kernel panics.
            assert_eq!(self.exit_code, Some(2), "{what}: {}", self.stderr);
            assert!(
                self.stderr.contains("guest kernel panicked"),
                "{what}: stderr {}",
                self.stderr
            );
        }
    }
}

/// Polls running restores until each has ended (on kvm_pvm: panicked after init) or, on an
/// ordinary KVM, reached init.
fn finish_restores(runs: &mut [(VmmProcess, PathBuf)], timeout: Duration) -> Vec<RestoreRun> {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let deadline = Instant::now() + timeout;
    let mut init_after: Vec<Option<Duration>> = vec![None; runs.len()];
    let mut codes: Vec<Option<Option<i32>>> = vec![None; runs.len()];
    while codes.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (vm, serial)) in runs.iter_mut().enumerate() {
            if init_after[i].is_none() && read_lossy(serial).contains(INIT_LINE) {
                init_after[i] = Some(vm.started().elapsed());
            }
            if codes[i].is_none() {
                if let Some(st) = vm.try_wait() {
                    codes[i] = Some(st.code());
                } else if !pvm && init_after[i].is_some() {
                    codes[i] = Some(None);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    runs.iter_mut()
        .zip(init_after)
        .zip(codes)
        .map(|(((vm, serial), init_after), code)| {
            assert!(
                code.is_some(),
                "vmm {} still running after {timeout:?}:\n{}",
                vm.name(),
                tail(&read_lossy(serial), 20)
            );
            RestoreRun {
                exit_code: code.flatten(),
                stderr: vm.stderr(),
                serial: read_lossy(serial),
                init_after,
            }
        })
        .collect()
}

/// One direct boot serves the mid-boot and the diff test: it tracks dirty pages, takes a full
/// snapshot at P1, resumes, takes a diff (and, for reference, a full) snapshot at P2, merges the
/// diff onto a copy of the P1 memory, then runs both restores at once to init.
struct DirectBoot {
    dir: PathBuf,
    full: PathBuf,
    diff: PathBuf,
    at: PathBuf,
    merged: PathBuf,
    console_p1: String,
    console_p2: String,
    console_after_pause: String,
    paused_at: (Duration, Duration),
    stats: (Value, Value),
    diff_alone: (u16, String),
    merge: (u16, String, Duration),
    merged_load: (u16, String),
    from_full: RestoreRun,
    from_merged: RestoreRun,
}

fn direct_boot() -> &'static Result<DirectBoot, String> {
    static BOOT: OnceLock<Result<DirectBoot, String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::panic::catch_unwind(run_direct_boot).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "direct boot panicked".into())
        })
    })
}

fn run_direct_boot() -> DirectBoot {
    let a = artifacts();
    let dir = scratch("snapshot", "direct-boot");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let (full, diff, at, merged) = (
        dir.join("full"),
        dir.join("diff"),
        dir.join("at"),
        dir.join("merged"),
    );
    let (mut vm, sock, serial) = VmmProcess::boot_kernel(
        &dir,
        "boot",
        "256",
        &["--rootfs", s(&rootfs), "--track-dirty-pages"],
        API_WAIT,
    );
    wait_for_text(&mut vm, &serial, P1_LINE, Duration::from_secs(240));
    pause(&sock);
    let p1 = vm.started().elapsed();
    let console_p1 = read_lossy(&serial);
    let full_stats = create_snapshot(&sock, "Full", &full);
    std::thread::sleep(Duration::from_millis(300));
    let console_after_pause = read_lossy(&serial);
    resume(&sock);
    assert_eq!(vm_state(&sock), "Running");
    wait_for_text(&mut vm, &serial, P2_LINE, Duration::from_secs(240));
    pause(&sock);
    let p2 = vm.started().elapsed();
    let console_p2 = read_lossy(&serial);
    assert!(
        !console_p2.contains("EXT4-fs (vda)"),
        "the root filesystem was mounted before P2"
    );
    let diff_stats = create_snapshot(&sock, "Diff", &diff);
    // A full snapshot of the same paused moment: what the merge must reproduce.
    create_snapshot(&sock, "Full", &at);
    vm.stop(&sock, STOP_WAIT);

    // A diff on its own is refused; then merge it onto a copy of the P1 memory.
    let api_sock = dir.join("api.sock");
    let mut tool = VmmProcess::spawn(&dir, "api", &["run", "--api-sock", s(&api_sock)]);
    tool.wait_api(&api_sock, API_WAIT);
    let diff_alone = api(
        &api_sock,
        "PUT",
        "/snapshot/load",
        Some(&file_load_body(
            &diff.join("vmstate"),
            &full.join("memory"),
            false,
        )),
    );
    assert_eq!(vm_state(&api_sock), "NotLoaded");
    fs::create_dir_all(&merged).unwrap();
    let cp = Command::new("cp")
        .args([
            "--sparse=always",
            s(&full.join("memory")),
            s(&merged.join("memory")),
        ])
        .status()
        .unwrap();
    assert!(cp.success());
    fs::copy(diff.join("vmstate"), merged.join("vmstate")).unwrap();
    let req = format!(
        r#"{{"base_mem_file_path":"{}","diff_mem_file_path":"{}","snapshot_path":"{}"}}"#,
        s(&merged.join("memory")),
        s(&diff.join("memory")),
        s(&merged.join("vmstate"))
    );
    let t = Instant::now();
    let (code, body) = api(&api_sock, "PUT", "/snapshot/merge", Some(&req));
    let merge = (code, body, t.elapsed());
    tool.stop(&api_sock, STOP_WAIT);

    // Both restores at once. The P1 one through `vmm run --restore` (same disk path: nothing
    // wrote it before P2); the merged one through the API with its own copy of the disk.
    let merged_disk = dir.join("merged-disk.ext4");
    fs::copy(&rootfs, &merged_disk).unwrap();
    let rf_serial = dir.join("from-full.serial");
    let from_full = VmmProcess::spawn(
        &dir,
        "from-full",
        &["run", "--restore", s(&full), "--serial-log", s(&rf_serial)],
    );
    let rm_serial = dir.join("from-merged.serial");
    let rm_sock = dir.join("from-merged.sock");
    let mut from_merged = VmmProcess::spawn(
        &dir,
        "from-merged",
        &[
            "run",
            "--api-sock",
            s(&rm_sock),
            "--serial-log",
            s(&rm_serial),
        ],
    );
    from_merged.wait_api(&rm_sock, API_WAIT);
    let body = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true,"drive_overrides":[{{"drive_id":"rootfs","path_on_host":"{}"}}]}}"#,
        s(&merged.join("vmstate")),
        s(&merged.join("memory")),
        s(&merged_disk)
    );
    let merged_load = api(&rm_sock, "PUT", "/snapshot/load", Some(&body));
    let mut runs = vec![(from_full, rf_serial), (from_merged, rm_serial)];
    let mut done = finish_restores(&mut runs, Duration::from_secs(300)).into_iter();
    let (from_full, from_merged) = (done.next().unwrap(), done.next().unwrap());
    DirectBoot {
        dir,
        full,
        diff,
        at,
        merged,
        console_p1,
        console_p2,
        console_after_pause,
        paused_at: (p1, p2),
        stats: (full_stats, diff_stats),
        diff_alone,
        merge,
        merged_load,
        from_full,
        from_merged,
    }
}

/// Called at the end of each of the two tests that share the direct boot: the second to pass
/// removes its scratch directory (memory files, disk copies).
fn direct_boot_passed(b: &DirectBoot) {
    static PASSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if PASSED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
        cleanup(&b.dir);
    }
}

fn direct_boot_ok() -> Option<&'static DirectBoot> {
    let _heavy = heavy();
    if !require_kvm() {
        return None;
    }
    Some(
        direct_boot()
            .as_ref()
            .unwrap_or_else(|e| panic!("direct boot: {e}")),
    )
}

#[test]
fn direct_kernel_paused_mid_boot_carries_on_after_restore() {
    let Some(b) = direct_boot_ok() else { return };
    assert!(
        b.console_p1.contains("Linux version"),
        "console not up at P1"
    );
    assert!(
        !b.console_p1.contains(INIT_LINE),
        "the kernel was not mid-boot at P1"
    );
    assert_eq!(
        b.console_after_pause, b.console_p1,
        "the guest printed while paused"
    );
    b.from_full
        .assert_carried_on("restore of the P1 snapshot", &b.console_p1);
    println!(
        "direct kvm: paused at {:?} after start ({P1_LINE:?}); full snapshot {}; `vmm run \
         --restore` reached init {:?} after it started (scratch {})",
        b.paused_at.0,
        b.stats.0,
        b.from_full.init_after.unwrap_or_default(),
        b.dir.display()
    );
    direct_boot_passed(b);
}

#[test]
fn direct_diff_snapshot_merges_into_a_loadable_full_one() {
    let Some(b) = direct_boot_ok() else { return };
    let (code, body) = &b.diff_alone;
    assert_eq!(*code, 400, "loading a diff on its own: {body}");
    assert!(body.contains("holds a diff"), "{body}");
    let (code, stats, took) = &b.merge;
    assert_eq!(*code, 200, "merge: {stats}");
    assert!(
        !same_guest_memory(&b.full.join("memory"), &b.merged.join("memory")),
        "the diff changed nothing"
    );
    assert!(
        same_guest_memory(&b.merged.join("memory"), &b.at.join("memory")),
        "P1 memory + diff differs from a full snapshot taken at P2"
    );
    let state = decode_state(
        &fs::read(b.merged.join("vmstate")).unwrap(),
        "merged vmstate",
    );
    assert_eq!(state.payload["memory_file"], Value::String("Full".into()));
    let diff_state = decode_state(&fs::read(b.diff.join("vmstate")).unwrap(), "diff vmstate");
    for k in ["vcpus", "vm", "devices", "config", "memory_layout"] {
        assert_eq!(state.payload[k], diff_state.payload[k], "merge changed {k}");
    }
    let (code, body) = &b.merged_load;
    assert_eq!(*code, 204, "loading the merged snapshot: {body}");
    b.from_merged
        .assert_carried_on("restore of the merged snapshot", &b.console_p2);
    println!(
        "direct kvm: diff at {:?} after start ({P2_LINE:?}): {}; merge took {took:?} ({stats}); \
         the merged snapshot reached init {:?} after its VMM started",
        b.paused_at.1,
        b.stats.1,
        b.from_merged.init_after.unwrap_or_default()
    );
    direct_boot_passed(b);
}

/// Boots a small kernel-only guest, pauses it early and snapshots it into `dir/good`.
fn small_snapshot(dir: &Path, mem_mib: &str) -> PathBuf {
    let (mut vm, sock, _) = VmmProcess::boot_kernel(dir, "boot", mem_mib, &[], API_WAIT);
    sleep_until(vm.started(), Duration::from_millis(1500));
    pause(&sock);
    let good = dir.join("good");
    create_snapshot(&sock, "Full", &good);
    vm.stop(&sock, STOP_WAIT);
    good
}

#[test]
fn direct_corrupt_snapshot_files_are_refused_clearly() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("snapshot", "corrupt");
    let good = small_snapshot(&dir, "64");
    let state = fs::read(good.join("vmstate")).unwrap();
    let parsed = decode_state(&state, "good vmstate");
    let mem = good.join("memory");
    let mem_len = fs::metadata(&mem).unwrap().len();

    let variant = |name: &str, bytes: &[u8]| {
        let p = dir.join(format!("{name}.vmstate"));
        fs::write(&p, bytes).unwrap();
        p
    };
    let truncated = variant("truncated", &state[..state.len() / 2]);
    let mut flipped = state.clone();
    let mid = HEADER_LEN + (state.len() - HEADER_LEN - CRC_LEN) / 2;
    flipped[mid] ^= 0x04;
    let flipped = variant("flipped", &flipped);
    let mut newer = state.clone();
    newer[8..12].copy_from_slice(&(parsed.version + 1).to_le_bytes());
    reseal(&mut newer);
    let newer = variant("newer", &newer);
    let short_mem = dir.join("short.memory");
    fs::copy(&mem, &short_mem).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&short_mem)
        .unwrap()
        .set_len(mem_len / 2)
        .unwrap();

    let sock = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&dir, "api", &["run", "--api-sock", s(&sock)]);
    vmm.wait_api(&sock, API_WAIT);
    let good_state = good.join("vmstate");
    let cases: [(&str, &Path, &Path, Vec<String>); 4] = [
        ("truncated", &truncated, &mem, vec!["truncated".into()]),
        ("flipped byte", &flipped, &mem, vec!["checksum".into()]),
        (
            "newer version",
            &newer,
            &mem,
            vec!["newer".into(), format!("version {}", parsed.version + 1)],
        ),
        (
            "short memory",
            &good_state,
            &short_mem,
            vec![
                s(&short_mem).to_string(),
                format!("has {} bytes", mem_len / 2),
                "needs".into(),
            ],
        ),
    ];
    for (what, state_path, mem_path, expected) in &cases {
        let (code, body) = api(
            &sock,
            "PUT",
            "/snapshot/load",
            Some(&file_load_body(state_path, mem_path, false)),
        );
        assert_eq!(code, 400, "{what}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        let msg = v["fault_message"].as_str().unwrap_or_default();
        for e in expected {
            assert!(
                msg.contains(e.as_str()),
                "{what}: expected {e:?} in {msg:?}"
            );
        }
        println!("{what}: 400 {msg}");
        assert!(vmm.alive(), "vmm died after {what}: {}", vmm.stderr());
        assert_eq!(vm_state(&sock), "NotLoaded", "after {what}");
    }
    // The same process still loads the intact snapshot.
    let (code, body) = api(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&file_load_body(&good_state, &mem, false)),
    );
    assert_eq!(code, 204, "intact snapshot after the failures: {body}");
    assert_eq!(vm_state(&sock), "Paused");
    vmm.stop(&sock, STOP_WAIT);
    cleanup(&dir);
}

#[test]
fn direct_vmm_killed_mid_snapshot_leaves_the_previous_one_intact() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("snapshot", "kill");
    let base = small_snapshot(&dir, "1024");
    // Give the 1 GiB guest 512 MiB of non-zero memory so a snapshot takes a while.
    let (off, size) = largest_region(&read_state(&base.join("vmstate")).payload);
    assert!(size >= 768 << 20, "largest region {size} bytes at {off}");
    let filled = fill_zero_pages(&base.join("memory"), off + size / 2, off + size, u64::MAX);
    assert!(
        filled >= 256 << 20,
        "only {filled} bytes of zero pages to fill"
    );

    let sock = dir.join("vm.sock");
    let mut vm = VmmProcess::restore_paused(&dir, "restored", &base, &sock, API_WAIT);
    assert_eq!(vm_state(&sock), "Paused");
    let snap = dir.join("snap");
    let t = Instant::now();
    let first = create_snapshot(&sock, "Full", &snap);
    let first_took = t.elapsed();
    let (state_path, mem_path) = (snap.join("vmstate"), snap.join("memory"));
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    let before = (
        ino(&state_path),
        ino(&mem_path),
        fs::read(&state_path).unwrap(),
        sha256(&mem_path),
    );
    // Change the VM a little so a completed second snapshot would differ.
    resume(&sock);
    std::thread::sleep(Duration::from_millis(300));
    pause(&sock);

    let req_sock = sock.clone();
    let body = format!(
        r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        s(&state_path),
        s(&mem_path)
    );
    let t2 = Instant::now();
    let second =
        std::thread::spawn(move || try_api(&req_sock, "PUT", "/snapshot/create", Some(&body)));
    // Kill as soon as the memory file's temporary copy has data in it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let temp_size = loop {
        let temp = fs::read_dir(&snap)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".memory"));
        // Allocated bytes, not the length (the file may be sized up front).
        if let Some(size) = temp
            .and_then(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .filter(|&l| l >= 64 << 20)
        {
            vm.kill();
            break size;
        }
        assert!(
            !second.is_finished(),
            "the second snapshot finished before the kill"
        );
        assert!(
            Instant::now() < deadline,
            "no temporary memory file appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let killed_at = t2.elapsed();
    let status = vm.wait(Duration::from_secs(10)).expect("killed vmm exits");
    let reply = second.join().unwrap();
    assert!(
        reply.is_err(),
        "the killed snapshot request got an answer: {reply:?}"
    );
    assert_eq!(status.code(), None, "killed by a signal");

    let after = (
        ino(&state_path),
        ino(&mem_path),
        fs::read(&state_path).unwrap(),
        sha256(&mem_path),
    );
    assert!(
        before.0 == after.0 && before.2 == after.2,
        "vmstate was replaced"
    );
    assert!(
        before.1 == after.1 && before.3 == after.3,
        "memory was replaced"
    );
    let leftovers: Vec<String> = fs::read_dir(&snap)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "vmstate" && n != "memory")
        .collect();
    assert!(
        leftovers.iter().all(|n| n.starts_with('.')),
        "visible leftovers: {leftovers:?}"
    );

    // The previous snapshot still loads and runs.
    let sock2 = dir.join("check.sock");
    let mut check = VmmProcess::spawn(
        &dir,
        "check",
        &[
            "run",
            "--api-sock",
            s(&sock2),
            "--serial-log",
            s(&dir.join("check.serial")),
        ],
    );
    check.wait_api(&sock2, API_WAIT);
    let (code, body) = api(
        &sock2,
        "PUT",
        "/snapshot/load",
        Some(&file_load_body(&state_path, &mem_path, true)),
    );
    assert_eq!(code, 204, "loading the previous snapshot: {body}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(check.alive(), "{}", check.stderr());
    assert_eq!(vm_state(&sock2), "Running");
    check.stop(&sock2, STOP_WAIT);
    println!(
        "direct kvm: first snapshot of the 1 GiB guest ({} MiB filled) took {first_took:?} \
         ({first}); killed {:?} into the second with {} MiB in its temporary file; leftovers \
         {leftovers:?}",
        filled >> 20,
        killed_at,
        temp_size >> 20
    );
    cleanup(&dir);
}

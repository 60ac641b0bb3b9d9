//! Issue 8, fault injection, directly on this machine's KVM (a guest kernel, no user space; see
//! shared/platform/README.md):
//!
//! - the snapshot destination fills up: the API answers with a clear error, the previous
//!   snapshot at the same paths is intact, no temporary files remain, the VM carries on;
//! - the userfaultfd page server dies during a lazy restore: the VMM ends with a clear error
//!   instead of leaving the guest hanging on a missing page;
//! - one snapshot restored 100 times in a row, each in a new process: every process exits 0
//!   and nothing is left behind (sockets, files, processes, descriptors of the test);
//! - resource limits (vCPUs, memory, bodies) from the CLI, the API and a snapshot file get a
//!   clear error, never a crash.
//!
//! In the nested test host (a guest with user space): the guest agent does not answer a freeze
//! during `vmm snapshot save --type disk`; `--guest-sync required` fails the snapshot, and
//! `best-effort` proceeds and marks it; the guest is never left frozen, and a freeze nobody
//! thaws ends by the agent's own watchdog.
//!
//! A VMM killed by SIGKILL in the middle of a snapshot is covered by
//! `snapshot_direct.rs::direct_vmm_killed_mid_snapshot_leaves_the_previous_one_intact` (1 GiB
//! guest).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{
    api, artifacts, cleanup, compile_guest_prog, create_body, encode_state, fault_message as fault,
    file_load_body, fill_zero_pages, heavy, largest_region, names_in, pause, raw_api, read_state,
    require_kvm, resume, run_nested, run_with_timeout, same_content, same_guest_memory, scratch,
    sha256, tail, utf8 as s, vm_state, vmm_binary, NestedOptions, VmmProcess,
};

/// How long a VMM may take to open its API socket, and to exit after Stop.
const API_WAIT: Duration = Duration::from_secs(30);
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Boots the guest kernel (no disk) with an API socket and `extra` arguments, pauses it after
/// `run_for` and takes a full snapshot into `dir/<name>`; stops the VMM.
fn boot_and_snapshot(
    dir: &Path,
    name: &str,
    mem_mib: &str,
    run_for: Duration,
    extra: &[&str],
) -> PathBuf {
    let (mut vm, sock, _) = VmmProcess::boot_kernel(dir, name, mem_mib, extra, API_WAIT);
    std::thread::sleep(run_for);
    pause(&sock);
    let snap = dir.join(name);
    let (code, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body("Full", &snap)),
    );
    assert_eq!(code, 200, "snapshot into {}: {body}", snap.display());
    vm.stop(&sock, STOP_WAIT);
    snap
}

/// Writes `bytes` bytes of non-zero data into all-zero pages of the largest memory region of the
/// snapshot in `snap`, from its middle on (memory the guest has not used yet), so a later
/// snapshot of it has that much real data.
fn fill_memory(snap: &Path, bytes: u64) -> u64 {
    let (off, size) = largest_region(&read_state(&snap.join("vmstate")).payload);
    fill_zero_pages(&snap.join("memory"), off + size / 2, off + size, bytes)
}

/// A tmpfs mounted for the test; unmounted when dropped, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let out = run_with_timeout(
            Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(at),
            ]),
            Duration::from_secs(10),
        );
        assert!(
            out.success(),
            "mount tmpfs at {}: {}",
            at.display(),
            out.stderr()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn direct_disk_full_during_snapshot_is_reported_and_harmless() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("faults", "enospc");
    // A guest early in boot: its snapshot is small (zero pages are holes).
    let base = boot_and_snapshot(&dir, "base", "256", Duration::from_millis(1500), &[]);
    // The older snapshot: that guest, on the small filesystem.
    let mnt = dir.join("mnt");
    let tmpfs = Tmpfs::mount(&mnt, "24m");
    let snap = mnt.join("snap");
    fs::create_dir_all(&snap).unwrap();
    for f in ["vmstate", "memory"] {
        // Sparse copy, as the memory file is sparse.
        let out = run_with_timeout(
            Command::new("cp").args(["--sparse=always", s(&base.join(f)), s(&snap.join(f))]),
            Duration::from_secs(60),
        );
        assert!(out.success(), "cp {f}: {}", out.stderr());
    }
    let before = (sha256(&snap.join("vmstate")), sha256(&snap.join("memory")));
    // The same guest with 64 MiB more data than the filesystem holds.
    let filled = fill_memory(&base, 64 << 20);
    assert_eq!(filled, 64 << 20, "zero pages to fill");
    let sock = dir.join("vm.sock");
    let mut vm = VmmProcess::restore_paused(&dir, "restored", &base, &sock, API_WAIT);
    assert_eq!(vm_state(&sock), "Paused");

    let t = Instant::now();
    let (code, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body("Full", &snap)),
    );
    println!(
        "snapshot onto a full tmpfs: {code} after {:?}: {body}",
        t.elapsed()
    );
    assert!((400..600).contains(&code), "{code}: {body}");
    let msg = fault(&body);
    assert!(
        msg.contains("No space left on device") || msg.contains("ENOSPC"),
        "the error names the problem: {msg}"
    );
    assert!(msg.contains(s(&mnt)), "the error names the path: {msg}");
    // The older snapshot is intact, nothing else is left on the filesystem.
    let after = (sha256(&snap.join("vmstate")), sha256(&snap.join("memory")));
    assert_eq!(before, after, "the previous snapshot changed");
    assert_eq!(names_in(&snap), vec!["memory", "vmstate"], "leftovers");
    // The VM carries on: still paused, resumes, runs.
    assert!(vm.alive(), "vmm died: {}", vm.stderr());
    assert_eq!(vm_state(&sock), "Paused");
    resume(&sock);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm_state(&sock), "Running");
    // With room again, the same request succeeds.
    pause(&sock);
    let ok = dir.join("ok");
    let (code, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body("Full", &ok)),
    );
    assert_eq!(code, 200, "{body}");
    vm.stop(&sock, STOP_WAIT);
    drop(tmpfs);
    cleanup(&dir);
}

/// A snapshot takes the dirty pages out of KVM's log before it writes anything: one that then
/// fails (here: no room for the full snapshot) must keep them for the next diff, or the diff
/// silently lacks them. And the halves of different snapshots never go together: a diff is
/// refused before there is a snapshot to be relative to, a state file is not loaded with
/// another snapshot's memory, and a diff does not merge onto the wrong base.
#[test]
fn direct_failed_snapshots_keep_dirty_pages_and_snapshot_halves_match() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("faults", "ids");
    let (mut vm, sock, _) =
        VmmProcess::boot_kernel(&dir, "vm", "256", &["--track-dirty-pages"], API_WAIT);
    std::thread::sleep(Duration::from_millis(1500));
    pause(&sock);
    let snap = |kind: &str, d: &Path| {
        api(
            &sock,
            "PUT",
            "/snapshot/create",
            Some(&create_body(kind, d)),
        )
    };

    // No snapshot yet: nothing for a diff to be relative to.
    let (code, body) = snap("Diff", &dir.join("early"));
    assert_eq!(code, 400, "{body}");
    assert!(
        fault(&body).contains("take a Full snapshot first"),
        "{body}"
    );
    let s0 = dir.join("s0");
    let (code, body) = snap("Full", &s0);
    assert_eq!(code, 200, "{body}");

    // The guest boots on (writing memory); then a full snapshot fails for want of room.
    resume(&sock);
    std::thread::sleep(Duration::from_millis(1500));
    pause(&sock);
    let mnt = dir.join("mnt");
    let tmpfs = Tmpfs::mount(&mnt, "1m");
    let (code, body) = snap("Full", &mnt.join("full"));
    assert!((400..600).contains(&code), "{code}: {body}");
    assert!(fault(&body).contains("No space left"), "{body}");
    drop(tmpfs);
    // The diff still holds every page written since s0: merged onto s0 it is the memory now.
    let (d, s2) = (dir.join("d"), dir.join("s2"));
    let (code, body) = snap("Diff", &d);
    assert_eq!(code, 200, "{body}");
    let (code, body) = snap("Full", &s2);
    assert_eq!(code, 200, "{body}");
    vm.stop(&sock, STOP_WAIT);

    let tool_sock = dir.join("tool.sock");
    let mut tool = VmmProcess::spawn(&dir, "tool", &["run", "--api-sock", s(&tool_sock)]);
    tool.wait_api(&tool_sock, API_WAIT);
    let merge_onto = |base: &Path, name: &str| {
        let out = dir.join(name);
        fs::create_dir_all(&out).unwrap();
        let cp = run_with_timeout(
            Command::new("cp").args([
                "--sparse=always",
                s(&base.join("memory")),
                s(&out.join("memory")),
            ]),
            Duration::from_secs(60),
        );
        assert!(cp.success(), "cp: {}", cp.stderr());
        fs::copy(d.join("vmstate"), out.join("vmstate")).unwrap();
        let req = format!(
            r#"{{"base_mem_file_path":"{}","diff_mem_file_path":"{}","snapshot_path":"{}"}}"#,
            s(&out.join("memory")),
            s(&d.join("memory")),
            s(&out.join("vmstate"))
        );
        let reply = api(&tool_sock, "PUT", "/snapshot/merge", Some(&req));
        (out, reply)
    };
    let (merged, (code, body)) = merge_onto(&s0, "merged");
    assert_eq!(code, 200, "{body}");
    assert!(
        !same_guest_memory(&s0.join("memory"), &merged.join("memory")),
        "the diff changed nothing"
    );
    assert!(
        same_guest_memory(&merged.join("memory"), &s2.join("memory")),
        "s0 + the diff taken after a failed snapshot differs from the memory at the diff"
    );
    // A diff onto another base than its own is refused, the file left alone.
    let (wrong, (code, body)) = merge_onto(&s2, "wrong-base");
    assert_eq!(code, 400, "{body}");
    assert!(fault(&body).contains("belongs to snapshot"), "{body}");
    assert!(same_content(&wrong.join("memory"), &s2.join("memory")));
    // One snapshot's state with another's memory is refused.
    let (code, body) = api(
        &tool_sock,
        "PUT",
        "/snapshot/load",
        Some(&file_load_body(
            &s0.join("vmstate"),
            &s2.join("memory"),
            false,
        )),
    );
    assert_eq!(code, 400, "{body}");
    assert!(fault(&body).contains("belongs to snapshot"), "{body}");
    assert_eq!(vm_state(&tool_sock), "NotLoaded");
    tool.stop(&tool_sock, STOP_WAIT);
    cleanup(&dir);
}

#[test]
fn direct_page_server_death_ends_the_vmm_clearly() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("faults", "uffd");
    let base = boot_and_snapshot(&dir, "base", "128", Duration::from_millis(1500), &[]);
    // A private copy of the memory file the page server will lose.
    let mem = dir.join("memory.lazy");
    fs::copy(base.join("memory"), &mem).unwrap();
    let sock = dir.join("lazy.sock");
    let mut vm = VmmProcess::spawn(
        &dir,
        "lazy",
        &[
            "run",
            "--api-sock",
            s(&sock),
            "--serial-log",
            s(&dir.join("lazy.serial")),
        ],
    );
    vm.wait_api(&sock, API_WAIT);
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":false,"working_set":{{"prefetch":false,"background_fill":false}}}}"#,
        s(&base.join("vmstate")),
        s(&mem)
    );
    let (code, body) = api(&sock, "PUT", "/snapshot/load", Some(&load));
    assert_eq!(code, 204, "lazy load: {body}");
    // The file loses its content under the server: every read of a data page now fails.
    fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(0)
        .unwrap();
    let t = Instant::now();
    // Not `resume`: the VMM may end (as it should) before a GET /vm could confirm Running.
    let (code, body) = api(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert!(code == 200 || code == 204, "resume: {code} {body}");
    let status = vm.wait(Duration::from_secs(60));
    let err = vm.stderr();
    println!(
        "page server lost its file: {status:?} after {:?}: {err}",
        t.elapsed()
    );
    let status = status.unwrap_or_else(|| {
        panic!(
            "the VMM still runs 60 s after its page server lost the memory file (hang); stderr: {err}\nserial:\n{}",
            tail(&fs::read_to_string(dir.join("lazy.serial")).unwrap_or_default(), 10)
        )
    });
    assert!(!status.success(), "exit 0 after losing guest memory: {err}");
    assert!(
        status.code().is_some(),
        "killed by a signal ({status:?}): {err}"
    );
    assert!(err.contains("page server"), "a clear message: {err}");
    cleanup(&dir);
}

/// Descriptors open in this process.
fn own_fds() -> usize {
    fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn direct_100_restores_of_one_snapshot_leave_nothing_behind() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("faults", "restores");
    let snap = boot_and_snapshot(&dir, "base", "64", Duration::from_millis(1500), &[]);
    let runs = dir.join("runs");
    fs::create_dir_all(&runs).unwrap();
    let fds_before = own_fds();
    let snap_before = names_in(&snap);
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t1 = Instant::now();
        let sock = runs.join("api.sock");
        let mut vm = VmmProcess::spawn(
            &runs,
            "restore",
            &[
                "run",
                "--restore",
                s(&snap),
                "--paused",
                "--api-sock",
                s(&sock),
            ],
        );
        vm.wait_api(&sock, API_WAIT);
        assert_eq!(vm_state(&sock), "Paused", "restore {i}");
        // The VMM's own descriptors while it runs, for the report.
        if i == 0 || i == 99 {
            let n = fs::read_dir(format!("/proc/{}/fd", vm.pid())).map(|d| d.count());
            println!("restore {i}: the VMM has {n:?} descriptors open");
        }
        vm.stop(&sock, STOP_WAIT);
        assert!(
            !sock.exists(),
            "restore {i}: API socket {} left behind after exit",
            sock.display()
        );
        slowest = slowest.max(t1.elapsed());
    }
    println!("100 restores in {:?} (slowest {slowest:?})", t.elapsed());
    assert_eq!(
        own_fds(),
        fds_before,
        "descriptors leaked into the test process"
    );
    assert_eq!(
        names_in(&snap),
        snap_before,
        "the snapshot directory changed"
    );
    assert_eq!(
        names_in(&runs),
        vec!["restore.stderr", "restore.stdout"],
        "files left behind by the restores"
    );
    cleanup(&dir);
}

/// A change made to a snapshot's state payload.
type StateEdit = Box<dyn Fn(&mut Value)>;

#[test]
fn direct_resource_limits_from_cli_api_and_snapshot_get_clear_errors() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("faults", "limits");
    // CLI (vcpus 0, mem 1, bad paths are in boot.rs): the other ends of the ranges.
    let huge = u64::MAX.to_string();
    let cli: Vec<(Vec<&str>, Option<i32>, &str)> = vec![
        (
            vec!["--vcpus", "33"],
            Some(1),
            "vcpus must be between 1 and 32",
        ),
        (
            vec!["--vcpus", "255"],
            Some(1),
            "vcpus must be between 1 and 32",
        ),
        (vec!["--vcpus", "256"], Some(2), "256"),
        (
            vec!["--mem-mib", "0"],
            Some(1),
            "mem_mib must be between 16 and",
        ),
        (
            vec!["--mem-mib", &huge],
            Some(1),
            "mem_mib must be between 16 and",
        ),
        (
            vec!["--mem-mib", "18446744073709551616"],
            Some(2),
            "18446744073709551616",
        ),
    ];
    for (extra, code, expected) in &cli {
        let mut args = vec!["run", "--kernel", s(&a.kernel)];
        args.extend_from_slice(extra);
        let out = run_with_timeout(
            Command::new(vmm_binary()).args(&args),
            Duration::from_secs(30),
        );
        assert!(!out.timed_out, "{args:?} timed out");
        let err = out.stderr();
        assert_eq!(out.output.status.code(), *code, "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err}"
        );
    }

    // API: absurd bodies on a VMM without a VM. Each gets a 4xx with a JSON fault; the VMM
    // stays up.
    let sock = dir.join("api.sock");
    let mut vm = VmmProcess::spawn(&dir, "api", &["run", "--api-sock", s(&sock)]);
    vm.wait_api(&sock, API_WAIT);
    let long = "x".repeat(200_000);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mem_backend = r#""mem_backend":{"backend_type":"File","backend_path":"/m"}"#;
    let bodies: Vec<(&str, &str, String)> = vec![
        ("PUT", "/snapshot/load", format!(r#"{{"snapshot_path":"/{long}",{mem_backend}}}"#)),
        ("PUT", "/snapshot/load", nested.clone()),
        ("PUT", "/snapshot/load", format!(r#"{{"snapshot_path":{nested},{mem_backend}}}"#)),
        (
            "PUT",
            "/snapshot/load",
            format!(r#"{{"snapshot_path":"/s",{mem_backend},"working_set":{{"record_ms":1e400}}}}"#),
        ),
        (
            "PUT",
            "/snapshot/load",
            format!(
                r#"{{"snapshot_path":"/s",{mem_backend},"working_set":{{"record_ms":18446744073709551616}}}}"#
            ),
        ),
        (
            "PUT",
            "/snapshot/load",
            format!(r#"{{"snapshot_path":"/s",{mem_backend},"working_set":{{"record_ms":18446744073709551615}}}}"#),
        ),
        ("PUT", "/snapshot/create", r#"{"snapshot_type":"Full","snapshot_path":"","mem_file_path":"/m"}"#.into()),
        ("PUT", "/snapshot/create", "{\"snapshot_type\":\"Full\",\"snapshot_path\":\"/a\\u0000b\",\"mem_file_path\":\"/m\"}".into()),
        ("PATCH", "/vm", r#"{"state":"Paused","state":"Resumed","x":1}"#.into()),
        ("PUT", "/actions", format!(r#"{{"action_type":"{long}"}}"#)),
    ];
    for (method, path, body) in &bodies {
        let (code, resp) = api(&sock, method, path, Some(body));
        let short: String = body.chars().take(80).collect();
        assert!(
            (400..500).contains(&code),
            "{method} {path} {short}: {code} {resp}"
        );
        let msg = fault(&resp);
        // Not bounded: a path is echoed whole (a 200 kB path gives a 200 kB message).
        assert!(!msg.is_empty(), "{short}: empty message");
        let msg_start: String = msg.chars().take(160).collect();
        println!("{method} {path} {short}…: {code} {msg_start}");
        assert!(vm.alive(), "vmm died after {short}: {}", vm.stderr());
    }
    // Absurd framing.
    let framing: Vec<Vec<u8>> = vec![
        b"PUT /snapshot/load HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n{}"
            .to_vec(),
        b"PUT /snapshot/load HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n{}".to_vec(),
        format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(40_000)).into_bytes(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(40_000)).into_bytes(),
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n"
            .to_vec(),
    ];
    for req in &framing {
        let (code, resp) = raw_api(&sock, req);
        let short = String::from_utf8_lossy(&req[..req.len().min(70)]).into_owned();
        // 501: chunked bodies are refused as not implemented.
        assert!(
            (400..500).contains(&code) || code == 501,
            "{short:?}: {code} {resp}"
        );
        println!("{short:?}…: {code} {}", fault(&resp));
        assert!(vm.alive(), "vmm died after {short:?}: {}", vm.stderr());
    }

    // A snapshot file asking for absurd resources: refused clearly before anything is built.
    // With a vsock device, so the state has a virtio slot to damage.
    let vsock = format!("cid=3,uds={}", s(&dir.join("base.vsock")));
    let snap = boot_and_snapshot(
        &dir,
        "base",
        "64",
        Duration::from_millis(1000),
        &["--vsock", &vsock],
    );
    let good = read_state(&snap.join("vmstate"));
    let (version, good) = (good.version, good.payload);
    let edits: Vec<(&str, StateEdit, &str)> = vec![
        (
            "vcpus 255",
            Box::new(|v| v["config"]["vcpus"] = 255.into()),
            "vcpus",
        ),
        (
            "vcpus 0",
            Box::new(|v| v["config"]["vcpus"] = 0.into()),
            "vcpus",
        ),
        (
            "mem huge",
            Box::new(|v| v["config"]["mem_mib"] = u64::MAX.into()),
            "mem",
        ),
        (
            "region huge",
            Box::new(|v| v["memory_layout"]["regions"][0]["size"] = (1u64 << 62).into()),
            "memory",
        ),
        (
            "no vcpus",
            Box::new(|v| v["vcpus"] = Value::Array(vec![])),
            "vcpu",
        ),
        (
            "virtio window in RAM",
            Box::new(|v| v["devices"]["virtio"][0]["base"] = 0x10_0000.into()),
            "saved at mmio 0x100000",
        ),
        (
            "virtio pin of the serial port",
            Box::new(|v| v["devices"]["virtio"][0]["irq"] = 4.into()),
            "irq 4",
        ),
    ];
    for (what, edit, expected) in &edits {
        let mut p = good.clone();
        edit(&mut p);
        let state = dir.join(format!("{}.vmstate", what.replace(' ', "-")));
        fs::write(&state, encode_state(version, &p)).unwrap();
        let load = format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}}}}"#,
            s(&state),
            s(&snap.join("memory"))
        );
        let (code, resp) = api(&sock, "PUT", "/snapshot/load", Some(&load));
        println!("snapshot with {what}: {code} {resp}");
        assert_eq!(code, 400, "{what}: {resp}");
        let msg = fault(&resp).to_lowercase();
        assert!(
            msg.contains(expected),
            "{what}: expected {expected:?} in {msg}"
        );
        assert!(
            vm.alive(),
            "vmm died loading a snapshot with {what}: {}",
            vm.stderr()
        );
        assert_eq!(vm_state(&sock), "NotLoaded", "after {what}");
    }
    vm.stop(&sock, STOP_WAIT);
    cleanup(&dir);
}

/// Shell helpers shared with the other nested scenarios.
const NESTED_LIB: &str = include_str!("../guest-progs/nested-lib.sh");

/// The scenario of [`nested_agent_not_answering_a_freeze_fails_or_marks_the_snapshot`], run in
/// L1 with the product commands. `holdwrite` (guest-progs/holdwrite.c) holds a write to the
/// guest's root filesystem in progress, so the agent's FIFREEZE waits and the freeze request
/// gets no answer: the host's freeze timeout is what ends the wait. Killing `holdwrite` lets
/// that late freeze complete; the guest must then not stay frozen (the agent's watchdog would
/// take 120 s: every write check here gives up after 20 s).
const FREEZE_SCENARIO: &str = r##"
# Helpers (since, run, oneline) are in guest-progs/nested-lib.sh.
set -u
export VMM_KERNEL=/guest/vmlinux VMM_ROOTFS=/guest/rootfs.ext4 VMM_STATE_DIR=/state
mkdir -p /state && mount -t tmpfs -o size=1200m tmpfs /state
U=/state/sandboxes/fz/vsock.sock
g() { timeout 60 vmm use fz -- "$@"; }
# hold KEY: starts holdwrite in the guest; KEY_HOLD is its process state (S: waiting in splice).
hold() {
  g sh -c 'rm -f /run/hold.pid; setsid /run/holdwrite /root/held.txt /run/hold.pid </dev/null >/dev/null 2>/run/hold.err &'
  g sh -c 'i=0; while [ ! -s /run/hold.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done'
  sleep 1
  echo "$1_HOLD=$(g sh -c 'cut -d" " -f3 /proc/$(cat /run/hold.pid)/stat')"
}
# release KEY: ends holdwrite, then a write to the root filesystem must complete within 20 s.
release() {
  g sh -c 'kill $(cat /run/hold.pid)'; echo "$1_RELEASED=$?"
  t0=$(now)
  timeout 20 vmm use fz -- sh -c "echo $1 >/root/after.txt && sync && cat /root/after.txt" >/tmp/out 2>/tmp/err
  echo "$1_WRITE=$? $(since $t0) $(oneline </tmp/out)"
  echo "$1_WRITE_ERR=$(oneline </tmp/err)"
}

run CREATE vmm use fz --mem-mib 128 -- true
vmm use fz -i -- sh -c 'cat >/run/holdwrite && chmod 755 /run/holdwrite' </faults/holdwrite
echo "INSTALL=$?"

# 1. The agent's watchdog: a freeze nobody thaws ends by itself (4 s here).
t0=$(now)
out=$(timeout 30 vmm agent --uds $U freeze --timeout 4); echo "WD_FREEZE=$? $(echo $out)"
echo x | timeout 30 vmm agent --uds $U write-file /root/wd-refused.txt 2>/dev/null; echo "WD_FROZEN_WRITE=$?"
timeout 60 vmm use fz -- sh -c 'echo wd >/root/wd.txt && sync'; echo "WD_WRITE=$? $(since $t0)"
echo "WD_FIRED=$(g grep -c 'freeze watchdog fired' /run/vmm-agent.log)"

# 2. required: the snapshot fails, clearly, and is not left ready.
hold REQ
t0=$(now); run REQ vmm snapshot save fz --name req --type disk --guest-sync required; echo "REQ_SECS=$(since $t0)"
echo "REQ_INFO=$(vmm snapshot ls -o json | tr -d '\n')"
echo "REQ_FILES=$(ls /state/snapshots/req | tr '\n' ' ')"
echo "REQ_SANDBOX=$(vmm status fz -o json | grep '"status"' | tr -d ' ,')"
release REQ

# 3. best-effort: the snapshot proceeds and says the guest was not frozen.
hold BE
t0=$(now); run BE vmm snapshot save fz --name be --type disk --guest-sync best-effort; echo "BE_SECS=$(since $t0)"
echo "BE_INFO=$(vmm snapshot ls -o json | tr -d '\n')"
echo "BE_FILES=$(ls /state/snapshots/be | tr '\n' ' ')"
release BE
run FROM_BE vmm use from-be --mem-mib 128 --snapshot be -- cat /root/wd.txt
for s in fz from-be; do vmm rm -f $s; done
echo "SCRIPT_DONE=1"
"##;

/// The snapshot `name` in the `vmm snapshot ls -o json` listing printed as `KEY=`.
fn snapshot_info(run: &vmm_tests::NestedRun, key: &str, name: &str) -> Value {
    let all = run.json_after(key, 0);
    let found = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .cloned();
    found.unwrap_or_else(|| panic!("{}", run.failure(&format!("no snapshot {name} in {all}"))))
}

#[test]
fn nested_agent_not_answering_a_freeze_fails_or_marks_the_snapshot() {
    let holdwrite = compile_guest_prog("holdwrite");
    let opts = NestedOptions::new("faults-freeze")
        .timeout(Duration::from_secs(420))
        .file(&holdwrite, "/faults/holdwrite");
    let run = {
        let _heavy = heavy();
        run_nested(&format!("{NESTED_LIB}\n{FREEZE_SCENARIO}"), opts)
    };
    eprintln!(
        "nested freeze run: {:.1}s, log {}",
        run.elapsed.as_secs_f64(),
        run.log_path.display()
    );
    run.assert_success();
    run.assert_marker("SCRIPT_DONE", "1");
    run.assert_marker("CREATE_EXIT", "0");
    run.assert_marker("INSTALL", "0");

    // The agent thaws by itself: frozen (writes refused) until its 4 s watchdog, then a write
    // that waited completes, and the agent's log says the watchdog did it.
    run.check(
        run.word("WD_FREEZE", 0) == "0",
        "agent freeze --timeout 4 failed",
    );
    run.check(
        run.word("WD_FREEZE", 1) == "/",
        "the root filesystem was not frozen",
    );
    run.check(
        run.get("WD_FROZEN_WRITE") != "0",
        "write-file succeeded while frozen",
    );
    run.check(
        run.word("WD_WRITE", 0) == "0",
        "write after the watchdog failed",
    );
    let waited: f64 = run.word("WD_WRITE", 1).parse().unwrap_or(0.0);
    run.check(
        waited >= 3.5,
        &format!("the write completed {waited} s after the freeze, before its 4 s watchdog"),
    );
    run.check(
        run.num("WD_FIRED") >= 1,
        "no watchdog message on the console",
    );

    for key in ["REQ", "BE"] {
        // holdwrite was waiting in splice (state S) while the snapshot ran.
        run.check(
            run.get(&format!("{key}_HOLD")) == "S",
            &format!("{key}: holdwrite is not waiting in the kernel"),
        );
        // The host gave up on the freeze after its timeout: the agent did not answer.
        let secs: f64 = run.get(&format!("{key}_SECS")).parse().unwrap_or(0.0);
        run.check(
            (25.0..120.0).contains(&secs),
            &format!("{key}: snapshot save took {secs} s, not the host's freeze timeout"),
        );
        // Afterwards the guest is not frozen: a write completes well before the agent's
        // 120 s watchdog would thaw.
        run.assert_marker(&format!("{key}_RELEASED"), "0");
        run.check(
            run.word(&format!("{key}_WRITE"), 0) == "0",
            &format!(
                "{key}: a write after the failed freeze did not complete within 20 s (the \
                 guest was left frozen): {}",
                run.get(&format!("{key}_WRITE_ERR"))
            ),
        );
        run.check(
            run.get(&format!("{key}_WRITE"))
                .ends_with(&format!("{key}|")),
            &format!("{key}: the write did not land"),
        );
    }

    // required: exit 1 with a clear error; the snapshot is failed, with its reason, and holds no
    // disk; the sandbox carries on running.
    run.assert_marker("REQ_EXIT", "1");
    let err = run.get("REQ_ERR");
    for needle in [
        "guest sync is required and failed",
        "no answer to the freeze request",
    ] {
        run.check(
            err.contains(needle),
            &format!("required: {needle:?} not in {err:?}"),
        );
    }
    let req = snapshot_info(&run, "REQ_INFO", "req");
    run.check(
        req["status"] == "failed",
        &format!("required snapshot: {req}"),
    );
    run.check(
        req["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no answer to the freeze request")),
        &format!("required snapshot without the reason: {req}"),
    );
    run.check(
        !run.get("REQ_FILES").contains("disk"),
        "the failed snapshot kept a disk",
    );
    run.assert_marker("REQ_SANDBOX", "\"status\":\"running\"");

    // best-effort: exit 0, ready, marked as not synced, with its disk; it boots.
    run.assert_marker("BE_EXIT", "0");
    run.assert_marker("BE_OUT", "be|");
    let be = snapshot_info(&run, "BE_INFO", "be");
    run.check(
        be["status"] == "ready",
        &format!("best-effort snapshot: {be}"),
    );
    run.check(
        be["guest_sync"]
            .as_str()
            .is_some_and(|g| g.starts_with("failed: ") && g.contains("no answer to the freeze")),
        &format!("best-effort snapshot not marked: {be}"),
    );
    run.check(
        run.get("BE_FILES").split_whitespace().any(|f| f == "disk"),
        "the best-effort snapshot has no disk",
    );
    run.assert_marker("FROM_BE_EXIT", "0");
    run.assert_marker("FROM_BE_OUT", "wd|");
}

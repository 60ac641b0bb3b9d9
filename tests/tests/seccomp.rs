//! Issue 8, seccomp end to end, directly on this machine's KVM: with the filters on (the
//! default) a real guest boots, pauses, takes Full, Diff and Live snapshots, resumes and stops;
//! its snapshots restore through `vmm run --restore`, through `PUT /snapshot/load` with the File
//! backend (then a Diff snapshot of the restored VM) and with the Uffd backend (page server and
//! background fill threads); every VMM exits 0, never of SIGSYS, and every VMM thread runs under
//! a filter. `--no-seccomp` runs the same way with no filter on any thread.
//!
//! On kvm_pvm the guest kernel is still booting when it is snapshotted (see
//! shared/platform/README.md); that is a real VM with real memory and devices, which is all the
//! VMM's syscalls depend on.

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_tests::{
    api_ok, artifacts, cleanup, create_snapshot, file_len as len, heavy, pause, require_kvm,
    resume, scratch, utf8 as s, vm_state, wait_for_growth, VmmProcess,
};

/// How long a VMM may take to open its API socket, and to exit after Stop.
const API_WAIT: Duration = Duration::from_secs(30);
const STOP_WAIT: Duration = Duration::from_secs(60);

/// A `vmm run` with its API socket at `<dir>/<name>.sock`.
struct Vm {
    proc: VmmProcess,
    sock: PathBuf,
}

impl Vm {
    /// Starts `vmm run <args> --api-sock <dir>/<name>.sock` and waits for the API.
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vm {
        let sock = dir.join(format!("{name}.sock"));
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--api-sock", s(&sock)]);
        let mut proc = VmmProcess::spawn(dir, name, &all);
        proc.wait_api(&sock, API_WAIT);
        Vm { proc, sock }
    }

    /// Loads the snapshot in `snap` with `backend` and resumes it.
    fn load(&self, snap: &Path, backend: &str, track_dirty: bool) {
        let body = format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"{backend}","backend_path":"{}"}},"resume_vm":true,"track_dirty_pages":{track_dirty}}}"#,
            s(&snap.join("vmstate")),
            s(&snap.join("memory"))
        );
        api_ok(&self.sock, "PUT", "/snapshot/load", Some(&body));
        assert_eq!(vm_state(&self.sock), "Running");
    }

    /// Every thread's `Seccomp` mode from /proc (0 none, 2 filter), by thread name.
    fn thread_seccomp(&self) -> Vec<(String, String)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.proc.pid()));
        let mut out = Vec::new();
        for entry in fs::read_dir(&tasks).expect("read /proc/PID/task") {
            let status =
                fs::read_to_string(entry.unwrap().path().join("status")).unwrap_or_default();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            out.push((field("Name:"), field("Seccomp:")));
        }
        out.sort();
        out
    }

    /// Asks the VMM to stop; it must exit 0 (never of SIGSYS).
    fn stop(mut self) {
        self.proc.stop(&self.sock, STOP_WAIT);
    }
}

/// Asserts every thread of `vm` runs under a filter (`on`) or none does, once the threads named
/// `expect_names` exist (threads name themselves and install their filter as they start).
fn assert_threads(vm: &Vm, on: bool, expect_names: &[&str]) {
    // An answer from the API means its thread has installed its filter.
    api_ok(&vm.sock, "GET", "/vm", None);
    let want = if on { "2" } else { "0" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let threads = vm.thread_seccomp();
        let missing: Vec<&&str> = expect_names
            .iter()
            .filter(|name| !threads.iter().any(|(n, _)| n == *name))
            .collect();
        // KVM's NX huge page recovery worker is a kernel thread in the VMM's thread group.
        let wrong: Vec<&(String, String)> = threads
            .iter()
            .filter(|(n, mode)| !n.starts_with("kvm-") && mode != want)
            .collect();
        if missing.is_empty() && wrong.is_empty() {
            println!(
                "vmm {} threads (name, seccomp mode): {threads:?}",
                vm.proc.name()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vmm {}: threads {missing:?} missing, {wrong:?} not in seccomp mode {want}: {threads:?}",
            vm.proc.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn direct_seccomp_filters_keep_boot_snapshots_and_restores_working() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("seccomp", "on");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let serial = dir.join("boot.serial");
    let vsock = dir.join("v.sock");
    let vsock_arg = format!("cid=3,uds={}", s(&vsock));
    let started = Instant::now();
    let mut boot = Vm::spawn(
        &dir,
        "boot",
        &[
            "--kernel",
            s(&a.kernel),
            "--rootfs",
            s(&rootfs),
            "--vcpus",
            "2",
            "--mem-mib",
            "256",
            "--serial-log",
            s(&serial),
            "--vsock",
            &vsock_arg,
            "--track-dirty-pages",
        ],
    );
    // Let the guest kernel run ~10 s.
    while started.elapsed() < Duration::from_secs(10) {
        boot.proc.assert_alive("while booting");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_threads(&boot, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    pause(&boot.sock);
    create_snapshot(&boot.sock, "Full", &dir.join("full"));
    create_snapshot(&boot.sock, "Diff", &dir.join("diff"));
    resume(&boot.sock);
    let before = len(&serial);
    wait_for_growth(&mut boot.proc, &serial, before, Duration::from_secs(60));
    create_snapshot(&boot.sock, "Live", &dir.join("live"));
    assert_eq!(vm_state(&boot.sock), "Running");
    // A host client on the vsock socket (the muxer accepts it on the VMM thread).
    if let Ok(mut c) = UnixStream::connect(&vsock) {
        let _ = c.write_all(b"CONNECT 52\n");
    }
    boot.stop();

    // `vmm run --restore`: built before the VMM thread's filter, run under it.
    let serial = dir.join("restore.serial");
    let mut vm = Vm::spawn(
        &dir,
        "restore",
        &[
            "--restore",
            s(&dir.join("full")),
            "--serial-log",
            s(&serial),
        ],
    );
    wait_for_growth(&mut vm.proc, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    vm.stop();

    // PUT /snapshot/load, File backend, built under the VMM thread's filter; a Diff snapshot of
    // the restored VM.
    let serial = dir.join("file.serial");
    let mut vm = Vm::spawn(&dir, "file", &["--serial-log", s(&serial)]);
    vm.load(&dir.join("full"), "File", true);
    wait_for_growth(&mut vm.proc, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    pause(&vm.sock);
    create_snapshot(&vm.sock, "Diff", &dir.join("file-diff"));
    resume(&vm.sock);
    vm.stop();

    // PUT /snapshot/load of the Live snapshot, Uffd backend: the page server and the background
    // fill run under the VMM thread's filter.
    let serial = dir.join("uffd.serial");
    let mut vm = Vm::spawn(&dir, "uffd", &["--serial-log", s(&serial)]);
    vm.load(&dir.join("live"), "Uffd", false);
    wait_for_growth(&mut vm.proc, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "uffd-pages"]);
    let stats = api_ok(&vm.sock, "GET", "/snapshot/memory-stats", None);
    println!("uffd restore memory stats: {stats}");
    vm.stop();

    cleanup(&dir);
}

#[test]
fn direct_no_seccomp_runs_without_filters() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("seccomp", "off");
    let serial = dir.join("boot.serial");
    let mut boot = Vm::spawn(
        &dir,
        "boot",
        &[
            "--no-seccomp",
            "--kernel",
            s(&a.kernel),
            "--mem-mib",
            "256",
            "--serial-log",
            s(&serial),
        ],
    );
    wait_for_growth(&mut boot.proc, &serial, 0, Duration::from_secs(60));
    assert_threads(&boot, false, &["vmm", "api", "vcpu0"]);
    pause(&boot.sock);
    create_snapshot(&boot.sock, "Full", &dir.join("full"));
    boot.stop();

    let serial = dir.join("restore.serial");
    let mut vm = Vm::spawn(
        &dir,
        "restore",
        &[
            "--no-seccomp",
            "--restore",
            s(&dir.join("full")),
            "--serial-log",
            s(&serial),
        ],
    );
    wait_for_growth(&mut vm.proc, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, false, &["vmm", "api", "vcpu0"]);
    vm.stop();

    cleanup(&dir);
}

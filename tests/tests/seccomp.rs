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
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{artifacts, require_kvm, scratch_dir, tail, vmm_binary};

/// One VM at a time: two cores are shared with everyone else.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("seccomp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `vmm` process with its output in files; killed when dropped.
struct Vmm {
    child: Child,
    name: String,
    stderr: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    /// Starts `vmm run <args> --api-sock <dir>/<name>.sock` and waits for the API.
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vmm {
        let stderr = dir.join(format!("{name}.stderr"));
        let sock = dir.join(format!("{name}.sock"));
        let child = Command::new(vmm_binary())
            .arg("run")
            .args(args)
            .args(["--api-sock", s(&sock)])
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join(format!("{name}.stdout"))).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn vmm {args:?}: {e}"));
        let mut vm = Vmm {
            child,
            name: name.to_string(),
            stderr,
            sock,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&vm.sock).is_err() {
            vm.assert_alive("waiting for its API socket");
            assert!(Instant::now() < deadline, "vmm {name}: no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.child.try_wait().expect("try_wait") {
            panic!(
                "vmm {} ended {when}: {}; stderr:\n{}",
                self.name,
                describe(st),
                self.stderr()
            );
        }
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api(&self.sock, method, path, body)
            .unwrap_or_else(|e| panic!("vmm {}: {method} {path}: {e}", self.name))
    }

    /// A request that must succeed (2xx); returns the body.
    fn ok(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let (code, resp) = self.api(method, path, body);
        assert!(
            (200..300).contains(&code),
            "vmm {}: {method} {path} {}: {code} {resp}",
            self.name,
            body.unwrap_or("")
        );
        resp
    }

    fn state(&self) -> String {
        let v: Value = serde_json::from_str(&self.ok("GET", "/vm", None)).expect("GET /vm JSON");
        v["state"].as_str().unwrap_or_default().to_string()
    }

    fn pause(&self) {
        self.ok("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
        assert_eq!(self.state(), "Paused");
    }

    fn resume(&self) {
        self.ok("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
        assert_eq!(self.state(), "Running");
    }

    fn snapshot(&self, kind: &str, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        let body = format!(
            r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            s(&dir.join("vmstate")),
            s(&dir.join("memory"))
        );
        self.ok("PUT", "/snapshot/create", Some(&body));
    }

    fn load(&self, snap: &Path, backend: &str, track_dirty: bool) {
        let body = format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"{backend}","backend_path":"{}"}},"resume_vm":true,"track_dirty_pages":{track_dirty}}}"#,
            s(&snap.join("vmstate")),
            s(&snap.join("memory"))
        );
        self.ok("PUT", "/snapshot/load", Some(&body));
        assert_eq!(self.state(), "Running");
    }

    /// Every thread's `Seccomp` mode from /proc (0 none, 2 filter), by thread name.
    fn thread_seccomp(&self) -> Vec<(String, String)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
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
        self.assert_alive("before Stop");
        self.ok("PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "vmm {} did not stop", self.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_ne!(
            st.signal(),
            Some(libc::SIGSYS),
            "vmm {} was killed by seccomp; stderr:\n{}",
            self.name,
            self.stderr()
        );
        assert_eq!(
            st.code(),
            Some(0),
            "vmm {}: {}; stderr:\n{}",
            self.name,
            describe(st),
            self.stderr()
        );
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (_, Some(libc::SIGSYS)) => "killed by SIGSYS (a syscall outside its seccomp filter)".into(),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        (Some(code), _) => format!("exit code {code}"),
        _ => format!("{st:?}"),
    }
}

/// One HTTP/1.1 request on the API socket: (status, body).
fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_secs(150)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    stream.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {resp:?}")))?;
    Ok((code, body.to_string()))
}

/// Waits until `path` holds more than `len` bytes (the guest printed on).
fn wait_for_growth(vm: &mut Vmm, path: &Path, len: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while fs::metadata(path).map(|m| m.len()).unwrap_or(0) <= len {
        vm.assert_alive("while the guest should run");
        assert!(
            Instant::now() < deadline,
            "vmm {}: the guest printed nothing in {within:?}:\n{}",
            vm.name,
            tail(&fs::read_to_string(path).unwrap_or_default(), 10)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Asserts every thread of `vm` runs under a filter (`on`) or none does, once the threads named
/// `expect_names` exist (threads name themselves and install their filter as they start).
fn assert_threads(vm: &Vmm, on: bool, expect_names: &[&str]) {
    // An answer from the API means its thread has installed its filter.
    vm.ok("GET", "/vm", None);
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
            println!("vmm {} threads (name, seccomp mode): {threads:?}", vm.name);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vmm {}: threads {missing:?} missing, {wrong:?} not in seccomp mode {want}: {threads:?}",
            vm.name
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
    let dir = scratch("on");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let serial = dir.join("boot.serial");
    let vsock = dir.join("v.sock");
    let vsock_arg = format!("cid=3,uds={}", s(&vsock));
    let started = Instant::now();
    let mut boot = Vmm::spawn(
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
        boot.assert_alive("while booting");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_threads(&boot, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    boot.pause();
    boot.snapshot("Full", &dir.join("full"));
    boot.snapshot("Diff", &dir.join("diff"));
    boot.resume();
    let before = len(&serial);
    wait_for_growth(&mut boot, &serial, before, Duration::from_secs(60));
    boot.snapshot("Live", &dir.join("live"));
    assert_eq!(boot.state(), "Running");
    // A host client on the vsock socket (the muxer accepts it on the VMM thread).
    if let Ok(mut c) = UnixStream::connect(&vsock) {
        let _ = c.write_all(b"CONNECT 52\n");
    }
    boot.stop();

    // `vmm run --restore`: built before the VMM thread's filter, run under it.
    let serial = dir.join("restore.serial");
    let mut vm = Vmm::spawn(
        &dir,
        "restore",
        &[
            "--restore",
            s(&dir.join("full")),
            "--serial-log",
            s(&serial),
        ],
    );
    wait_for_growth(&mut vm, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    vm.stop();

    // PUT /snapshot/load, File backend, built under the VMM thread's filter; a Diff snapshot of
    // the restored VM.
    let serial = dir.join("file.serial");
    let mut vm = Vmm::spawn(&dir, "file", &["--serial-log", s(&serial)]);
    vm.load(&dir.join("full"), "File", true);
    wait_for_growth(&mut vm, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "vcpu1"]);
    vm.pause();
    vm.snapshot("Diff", &dir.join("file-diff"));
    vm.resume();
    vm.stop();

    // PUT /snapshot/load of the Live snapshot, Uffd backend: the page server and the background
    // fill run under the VMM thread's filter.
    let serial = dir.join("uffd.serial");
    let mut vm = Vmm::spawn(&dir, "uffd", &["--serial-log", s(&serial)]);
    vm.load(&dir.join("live"), "Uffd", false);
    wait_for_growth(&mut vm, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, true, &["vmm", "api", "vcpu0", "uffd-pages"]);
    let stats = vm.ok("GET", "/snapshot/memory-stats", None);
    println!("uffd restore memory stats: {stats}");
    vm.stop();

    if std::env::var_os("VMM_TESTS_KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
}

#[test]
fn direct_no_seccomp_runs_without_filters() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("off");
    let serial = dir.join("boot.serial");
    let mut boot = Vmm::spawn(
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
    wait_for_growth(&mut boot, &serial, 0, Duration::from_secs(60));
    assert_threads(&boot, false, &["vmm", "api", "vcpu0"]);
    boot.pause();
    boot.snapshot("Full", &dir.join("full"));
    boot.stop();

    let serial = dir.join("restore.serial");
    let mut vm = Vmm::spawn(
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
    wait_for_growth(&mut vm, &serial, 0, Duration::from_secs(60));
    assert_threads(&vm, false, &["vmm", "api", "vcpu0"]);
    vm.stop();

    if std::env::var_os("VMM_TESTS_KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
}

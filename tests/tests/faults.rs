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
//! A VMM killed by SIGKILL in the middle of a snapshot is covered by
//! `snapshot.rs::direct_vmm_killed_mid_snapshot_leaves_the_previous_one_intact` (1 GiB guest).
//! The guest-agent freeze watchdog needs guest user space (nested host) and is not here.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{artifacts, require_kvm, run_with_timeout, scratch_dir, tail, vmm_binary};

/// One heavy test at a time in this process (two cores, shared).
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("faults-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn cleanup(dir: &Path) {
    if std::env::var_os("VMM_TESTS_KEEP").is_none() {
        let _ = fs::remove_dir_all(dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `vmm` process with its output in files; killed when dropped.
struct Vmm {
    child: Child,
    name: String,
    stderr: PathBuf,
}

impl Vmm {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vmm {
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(vmm_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join(format!("{name}.stdout"))).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn vmm {args:?}: {e}"));
        Vmm {
            child,
            name: name.to_string(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn wait_api(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(sock).is_err() {
            assert!(
                self.alive(),
                "vmm {} exited early: {}",
                self.name,
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "vmm {}: no API socket",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// PUT /actions Stop, then expects exit code 0.
    fn stop(&mut self, sock: &Path) {
        let (code, body) = api(sock, "PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
        assert_eq!(code, 204, "Stop: {body}");
        let st = self.wait(Duration::from_secs(30));
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(0),
            "vmm {} after Stop: {st:?}: {}",
            self.name,
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

/// Sends raw bytes on the API socket and returns (status, body) of the first response.
fn raw_api(sock: &Path, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(sock).expect("connect API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(150)))
        .unwrap();
    // The server may answer (413, 431) before taking the whole request.
    let _ = stream.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len: usize = text[..head_end]
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + len {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    raw_api(sock, req.as_bytes())
}

fn fault(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["fault_message"].as_str().unwrap_or_default().to_string()
}

fn vm_state(sock: &Path) -> String {
    let (code, body) = api(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "GET /vm: {body}");
    let v: Value = serde_json::from_str(&body).expect("GET /vm JSON");
    v["state"].as_str().unwrap_or("").to_string()
}

fn set_state(sock: &Path, state: &str) {
    let (code, body) = api(
        sock,
        "PATCH",
        "/vm",
        Some(&format!(r#"{{"state":"{state}"}}"#)),
    );
    assert!(code == 200 || code == 204, "{state}: {code} {body}");
}

fn create_body(dir: &Path) -> String {
    format!(
        r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        s(&dir.join("vmstate")),
        s(&dir.join("memory"))
    )
}

/// Boots the guest kernel (no disk) with an API socket, pauses it after `run_for` and takes a
/// full snapshot into `dir/<name>`; stops the VMM.
fn boot_and_snapshot(dir: &Path, name: &str, mem_mib: &str, run_for: Duration) -> PathBuf {
    let a = artifacts();
    let sock = dir.join(format!("{name}.sock"));
    let mut vm = Vmm::spawn(
        dir,
        name,
        &[
            "run",
            "--kernel",
            s(&a.kernel),
            "--mem-mib",
            mem_mib,
            "--serial-log",
            s(&dir.join(format!("{name}.serial"))),
            "--api-sock",
            s(&sock),
        ],
    );
    vm.wait_api(&sock);
    std::thread::sleep(run_for);
    set_state(&sock, "Paused");
    let snap = dir.join(name);
    fs::create_dir_all(&snap).unwrap();
    let (code, body) = api(&sock, "PUT", "/snapshot/create", Some(&create_body(&snap)));
    assert_eq!(code, 200, "snapshot into {}: {body}", snap.display());
    vm.stop(&sock);
    snap
}

/// State-file layout (snapshot/src/format.rs): magic 8, version 4, length 8, JSON, CRC64 8.
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 8;

/// CRC-64/ECMA-182, written here independently of the snapshot crate.
fn crc64(data: &[u8]) -> u64 {
    let mut crc = 0u64;
    for &b in data {
        crc ^= u64::from(b) << 56;
        for _ in 0..8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ 0x42F0_E1EB_A9EA_3693
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn state_payload(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap();
    serde_json::from_slice(&bytes[HEADER_LEN..bytes.len() - CRC_LEN]).expect("state JSON")
}

/// Writes `payload` as a sealed state file.
fn write_state(path: &Path, payload: &Value) {
    let body = serde_json::to_vec(payload).unwrap();
    let mut out = b"VMMSNAP\0".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    fs::write(path, out).unwrap();
}

/// Writes a non-zero pattern into `bytes` bytes of all-zero pages of the largest memory region
/// of the snapshot in `snap`, from its middle on (memory the guest has not used yet: a kernel
/// must not rely on its content), so a later snapshot of it has that much real data.
fn fill_memory(snap: &Path, bytes: u64) -> u64 {
    use std::io::{Seek, SeekFrom};
    const PAGE: usize = 4096;
    let regions = state_payload(&snap.join("vmstate"))["memory_layout"]["regions"].clone();
    let r = regions
        .as_array()
        .and_then(|r| r.iter().max_by_key(|r| r["size"].as_u64()))
        .cloned()
        .expect("a memory region");
    let (off, size) = (
        r["file_offset"].as_u64().unwrap(),
        r["size"].as_u64().unwrap(),
    );
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    let mut page = vec![0u8; PAGE];
    let mut written = 0;
    let mut at = off + size / 2;
    while at < off + size && written < bytes {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut page).unwrap();
        if page.iter().all(|&b| b == 0) {
            for (j, b) in page.iter_mut().enumerate() {
                *b = (at / PAGE as u64) as u8 ^ j as u8 ^ 0xA5;
            }
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&page).unwrap();
            page.fill(0);
            written += PAGE as u64;
        }
        at += PAGE as u64;
    }
    f.sync_all().unwrap();
    written
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
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
    let dir = scratch("enospc");
    // A guest early in boot: its snapshot is small (zero pages are holes).
    let base = boot_and_snapshot(&dir, "base", "256", Duration::from_millis(1500));
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
    let mut vm = Vmm::spawn(
        &dir,
        "restored",
        &[
            "run",
            "--restore",
            s(&base),
            "--paused",
            "--api-sock",
            s(&sock),
            "--serial-log",
            s(&dir.join("restored.serial")),
        ],
    );
    vm.wait_api(&sock);
    assert_eq!(vm_state(&sock), "Paused");

    let t = Instant::now();
    let (code, body) = api(&sock, "PUT", "/snapshot/create", Some(&create_body(&snap)));
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
    set_state(&sock, "Resumed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm_state(&sock), "Running");
    // With room again, the same request succeeds.
    set_state(&sock, "Paused");
    let ok = dir.join("ok");
    fs::create_dir_all(&ok).unwrap();
    let (code, body) = api(&sock, "PUT", "/snapshot/create", Some(&create_body(&ok)));
    assert_eq!(code, 200, "{body}");
    vm.stop(&sock);
    drop(tmpfs);
    cleanup(&dir);
}

#[test]
fn direct_page_server_death_ends_the_vmm_clearly() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("uffd");
    let base = boot_and_snapshot(&dir, "base", "128", Duration::from_millis(1500));
    // A private copy of the memory file the page server will lose.
    let mem = dir.join("memory.lazy");
    fs::copy(base.join("memory"), &mem).unwrap();
    let sock = dir.join("lazy.sock");
    let mut vm = Vmm::spawn(
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
    vm.wait_api(&sock);
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
    set_state(&sock, "Resumed");
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
    let dir = scratch("restores");
    let snap = boot_and_snapshot(&dir, "base", "64", Duration::from_millis(1500));
    let runs = dir.join("runs");
    fs::create_dir_all(&runs).unwrap();
    let fds_before = own_fds();
    let snap_before = names_in(&snap);
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t1 = Instant::now();
        let sock = runs.join("api.sock");
        let mut vm = Vmm::spawn(
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
        vm.wait_api(&sock);
        assert_eq!(vm_state(&sock), "Paused", "restore {i}");
        // The VMM's own descriptors while it runs, for the report.
        if i == 0 || i == 99 {
            let n = fs::read_dir(format!("/proc/{}/fd", vm.child.id())).map(|d| d.count());
            println!("restore {i}: the VMM has {n:?} descriptors open");
        }
        vm.stop(&sock);
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
    let dir = scratch("limits");
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
    let mut vm = Vmm::spawn(&dir, "api", &["run", "--api-sock", s(&sock)]);
    vm.wait_api(&sock);
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
    let snap = boot_and_snapshot(&dir, "base", "64", Duration::from_millis(1000));
    let good = state_payload(&snap.join("vmstate"));
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
    ];
    for (what, edit, expected) in &edits {
        let mut p = good.clone();
        edit(&mut p);
        let state = dir.join(format!("{}.vmstate", what.replace(' ', "-")));
        write_state(&state, &p);
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
    vm.stop(&sock);
    cleanup(&dir);
}

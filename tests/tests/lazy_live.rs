//! Issue 5 end to end: live snapshots, lazy (userfaultfd) restore with working-set prefetch, and
//! many lazy clones of one snapshot.
//!
//! Nested (a full guest with user space inside the nested test host; one L1 boot serves the
//! three nested tests, each checks its own markers): a guest program (`guest-progs/stamp.c`)
//! stamps a counter across 64 MiB while live snapshots are taken; a second program
//! (`guest-progs/scan.c`, run in L1) proves each memory file is the image of one moment; the
//! live snapshot restores and the stamper carries on. A full snapshot is then restored lazily
//! without and with the working set, and from a file, and three lazy clones run side by side.
//!
//! Direct (this machine's KVM, guest kernel only): a kernel paused mid-boot restores lazily and
//! reaches init, and a live snapshot of a running kernel restores with `vmm run --restore`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{
    artifacts, require_kvm, run_nested, run_with_timeout, scratch_dir, tail, vmm_binary,
    NestedOptions, NestedRun, GUEST_CMDLINE,
};

/// Memory the stamper mutates, in MiB, and the 4 KiB pages that makes.
const STAMP_MIB: u64 = 64;
const STAMP_PAGES: u64 = STAMP_MIB * 256;
/// The throttled stamper in the full snapshot that is restored lazily: smaller, because with
/// neither prefetch nor background fill its first round faults in every page one by one.
const STAMP2_MIB: u64 = 16;

/// One heavy test at a time in this process (two cores shared with everyone else).
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("lazy-{name}-{}", std::process::id()));
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

/// Compiles `guest-progs/NAME.c` with the host's gcc into a static executable.
fn compile(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest-progs")
        .join(format!("{name}.c"));
    let dir = scratch_dir().join("guest-progs");
    fs::create_dir_all(&dir).expect("create guest-progs dir");
    let out = dir.join(format!("{name}-{}", std::process::id()));
    let res = run_with_timeout(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(&src),
        Duration::from_secs(120),
    );
    assert!(
        res.success(),
        "gcc -static {} failed (is gcc with static glibc installed?):\n{}",
        src.display(),
        res.stderr()
    );
    out
}

/// Seconds in a serde `Duration` ({"secs","nanos"}) or a plain number.
fn secs(v: &Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    Some(v.get("secs")?.as_f64()? + v.get("nanos")?.as_f64()? / 1e9)
}

// ---------------------------------------------------------------------------------------------
// Nested: one L1 boot, three tests
// ---------------------------------------------------------------------------------------------

/// The script run inside L1 (phases print `KEY=VALUE` markers the tests assert on).
const NESTED_SCRIPT: &str = include_str!("../guest-progs/lazy_live.sh");

/// The nested run, once per process; a harness failure is kept as text so that every nested
/// test reports it instead of booting L1 again.
fn nested() -> &'static Result<NestedRun, String> {
    static RUN: OnceLock<Result<NestedRun, String>> = OnceLock::new();
    let _heavy = heavy();
    RUN.get_or_init(|| {
        let (stamp, scan) = (compile("stamp"), compile("scan"));
        let script = NESTED_SCRIPT
            .replace("@CMDLINE@", GUEST_CMDLINE)
            .replace("@NPAGES@", &STAMP_PAGES.to_string())
            .replace("@MIB@", &STAMP_MIB.to_string())
            .replace("@MIB2@", &STAMP2_MIB.to_string());
        let opts = NestedOptions::new("lazy-live")
            .timeout(Duration::from_secs(240))
            .program("/usr/bin/curl", "/usr/bin/curl")
            .file(&stamp, "/lazy/stamp")
            .file(&scan, "/lazy/scan");
        let run = std::panic::catch_unwind(|| run_nested(&script, opts)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "nested run panicked".into())
        });
        if let Ok(run) = &run {
            eprintln!(
                "nested lazy/live run: {:.1}s total, script from {:.1}s to {:.1}s (log {})",
                run.elapsed.as_secs_f64(),
                run.time_of("NESTED-RUN-START")
                    .unwrap_or_default()
                    .as_secs_f64(),
                run.time_of("SCRIPT_DONE").unwrap_or_default().as_secs_f64(),
                run.log_path.display()
            );
        }
        run
    })
}

/// The nested run, which must have finished its script.
fn nested_ok() -> &'static NestedRun {
    let run = nested().as_ref().unwrap_or_else(|e| panic!("{e}"));
    if run.marker("SCRIPT_DONE").is_none() || run.exit_code != Some(0) {
        panic!("{}", run.failure("the lazy/live script did not finish"));
    }
    run
}

fn m(run: &NestedRun, key: &str) -> String {
    run.marker(key)
        .unwrap_or_else(|| panic!("{}", run.failure(&format!("no {key}= marker"))))
}

/// The `i`th whitespace-separated word of a marker.
fn word(run: &NestedRun, key: &str, i: usize) -> String {
    m(run, key)
        .split_whitespace()
        .nth(i)
        .unwrap_or("")
        .to_string()
}

fn num(run: &NestedRun, key: &str) -> u64 {
    let v = word(run, key, 0);
    v.parse()
        .unwrap_or_else(|_| panic!("{}", run.failure(&format!("{key}={v} is not a number"))))
}

/// The JSON that follows the first `skip` words of a marker.
fn json_after(run: &NestedRun, key: &str, skip: usize) -> Value {
    let v = m(run, key);
    let text = v
        .split_whitespace()
        .skip(skip)
        .collect::<Vec<_>>()
        .join(" ");
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{}",
            run.failure(&format!("{key}: not JSON after {skip} words ({e}): {v}"))
        )
    })
}

fn check(run: &NestedRun, ok: bool, what: &str) {
    if !ok {
        panic!("{}", run.failure(what));
    }
}

/// The stamper in a VM is alive: it finished a round after `at_least` and then another within a
/// second, found its memory as it left it, and the agent answers. Returns its three rounds.
fn check_alive(run: &NestedRun, name: &str, at_least: u64) -> [u64; 3] {
    let counts = m(run, &format!("{name}_COUNTS"));
    let parsed: Vec<u64> = counts
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    check(
        run,
        parsed.len() == 3,
        &format!("{name}: stamper round not readable: {counts}"),
    );
    let r = [parsed[0], parsed[1], parsed[2]];
    check(
        run,
        r[0] < r[1] && r[1] < r[2],
        &format!(
            "{name}: the stamper is not counting: rounds {r:?} (two rounds took {})",
            m(run, &format!("{name}_NEXT_ROUNDS"))
        ),
    );
    check(
        run,
        r[0] >= at_least,
        &format!(
            "{name}: stamper round {} is below {at_least}, from before the snapshot",
            r[0]
        ),
    );
    check(
        run,
        m(run, &format!("{name}_ERR")) == "none",
        &format!("{name}: the stamper found its memory changed under it"),
    );
    check(
        run,
        !m(run, &format!("{name}_PID")).is_empty(),
        &format!("{name}: no stamp process"),
    );
    check(
        run,
        m(run, &format!("{name}_PING")) == "0",
        &format!("{name}: the agent does not answer"),
    );
    r
}

#[test]
fn nested_live_snapshot_is_one_moment_and_restores() {
    let run = nested_ok();
    check(
        run,
        num(run, "STAMP_STARTED") >= 3,
        "the stamper did not start",
    );
    let mut last_c = 0;
    for n in 1..=3 {
        let key = |k: &str| format!("{k}_{n}");
        check(
            run,
            word(run, &key("LIVE"), 0) == "200",
            &format!("live snapshot {n} failed"),
        );
        check(
            run,
            m(run, &key("LIVE_STATE")) == "Running",
            &format!("VM not Running after live snapshot {n}"),
        );
        let reply = json_after(run, &key("LIVE_REPLY"), 0);
        let pause = secs(&reply["pause"]).unwrap_or_else(|| {
            panic!(
                "{}",
                run.failure(&format!("no pause in the reply: {reply}"))
            )
        });
        let total = secs(&reply["total"]).unwrap_or(f64::NAN);
        check(
            run,
            pause > 0.0 && pause <= total,
            &format!("live snapshot {n}: pause {pause} s vs total {total} s"),
        );
        let write_faults = reply["copy"]["write_faults"].as_u64().unwrap_or(0);
        // The scan: every stamped page once, one split point, counters one apart at most.
        let sk = |k: &str| format!("SCAN{n}_{k}");
        let detail = m(run, &sk("DETAIL"));
        check(
            run,
            num(run, &sk("FOUND")) == STAMP_PAGES,
            &format!("live image {n}: not every stamped page once ({detail})"),
        );
        for k in ["MISSING", "DUPS", "BAD_INDEX"] {
            check(
                run,
                num(run, &sk(k)) == 0,
                &format!("live image {n}: {k} ({detail})"),
            );
        }
        let (min, max) = (num(run, &sk("MIN")), num(run, &sk("MAX")));
        let split = num(run, &sk("SPLIT"));
        check(
            run,
            max == min || (max == min + 1 && num(run, &sk("BOUNDARIES")) == 1 && split > 0),
            &format!("live image {n} is torn: counters {min}..{max}, split {split}: {detail}"),
        );
        check(run, m(run, &sk("OK")) == "1", &format!("scan {n} verdict"));
        // The image is of a moment between the rounds read before and after the snapshot.
        let before = num(run, &key("LIVE_COUNT_BEFORE"));
        let after = num(run, &key("LIVE_COUNT_AFTER"));
        check(
            run,
            before <= min && max <= after + 1,
            &format!("live image {n}: rounds {min}..{max} outside {before}..{after}+1"),
        );
        println!(
            "nested (not a performance figure): live snapshot {n}: guest-visible pause {:.2} ms, \
             total {:.0} ms ({} by curl), {write_faults} write faults, image at round {min} \
             with {split} of {STAMP_PAGES} pages already at {}",
            pause * 1e3,
            total * 1e3,
            word(run, &key("LIVE"), 1),
            min + 1
        );
        last_c = min;
    }
    check_alive(run, "SOURCE", last_c);
    // The last live snapshot restored into a new VMM: the stamper carries on from the image.
    check(
        run,
        word(run, "LIVE_LOAD", 0) == "204",
        "load of the live snapshot failed",
    );
    check(
        run,
        m(run, "LIVE_RESTORED_STATE") == "Running",
        "restored VM not Running",
    );
    let [a, _, b] = check_alive(run, "LIVE_RESTORED", last_c);
    check(
        run,
        word(run, "VMM0_EXIT", 0) == "0" && word(run, "VMML_EXIT", 0) == "0",
        "a VMM did not stop cleanly",
    );
    println!(
        "nested: live-restored stamper at rounds {a} then {b} (image at {last_c}); load took {}; \
         two rounds after the restore took {}",
        word(run, "LIVE_LOAD", 1),
        m(run, "LIVE_RESTORED_NEXT_ROUNDS")
    );
}

/// Page-server counters of a lazily restored VM.
struct Stats {
    faults: u64,
    pages_copied: u64,
    bytes_copied: u64,
    zero_pages: u64,
    prefetched_pages: u64,
    prefetch_ms: f64,
}

fn stats(run: &NestedRun, key: &str) -> Stats {
    check(run, word(run, key, 0) == "200", &format!("{key}: HTTP"));
    let v = json_after(run, key, 1);
    let server = &v["server"];
    let u = |x: &Value, k: &str| {
        x[k].as_u64()
            .unwrap_or_else(|| panic!("{}", run.failure(&format!("{key}: no {k} in {v}"))))
    };
    Stats {
        faults: u(server, "faults"),
        pages_copied: u(server, "pages_copied"),
        bytes_copied: u(server, "bytes_copied"),
        zero_pages: u(server, "zero_pages"),
        prefetched_pages: u(server, "prefetched_pages"),
        prefetch_ms: v["prefetch_ms"].as_f64().unwrap_or(0.0),
    }
}

/// Seconds from PUT /snapshot/load to the agent's answer, after checking both worked.
fn ready_time(run: &NestedRun, name: &str) -> (f64, f64) {
    let key = format!("READY_{name}");
    check(
        run,
        word(run, &key, 0) == "204",
        &format!("restore {name}: load failed"),
    );
    check(
        run,
        word(run, &key, 1) == "0",
        &format!("restore {name}: the agent did not answer"),
    );
    let f = |i| {
        word(run, &key, i)
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{}", run.failure(&format!("{key}: bad time"))))
    };
    (f(2), f(3))
}

#[test]
fn nested_lazy_restore_prefetches_the_working_set() {
    let run = nested_ok();
    check(run, word(run, "FULL", 0) == "200", "full snapshot failed");
    let (ta, la) = ready_time(run, "a");
    let (tb, lb) = ready_time(run, "b");
    let (tc, lc) = ready_time(run, "c");
    check(
        run,
        word(run, "WS_SAVE_a", 0) == "200",
        "SaveWorkingSet failed",
    );
    let ws_pages = json_after(run, "WS_SAVE_a", 1)["pages"]
        .as_u64()
        .unwrap_or(0);
    check(
        run,
        ws_pages > 0,
        &format!(
            "SaveWorkingSet (record_ms 0) saved {ws_pages} pages: nothing was recorded until the \
             agent answered"
        ),
    );
    check(
        run,
        word(run, "WS_FILE", 0) == (16 + 8 * ws_pages).to_string(),
        "working-set file size",
    );
    let a = stats(run, "STATS_a");
    let b = stats(run, "STATS_b");
    check(
        run,
        a.prefetched_pages == 0 && a.faults > 0,
        "restore a: prefetched without a working set, or no faults",
    );
    check(
        run,
        a.faults >= ws_pages,
        &format!(
            "restore a: {} faults but {ws_pages} pages in its working set",
            a.faults
        ),
    );
    check(run, b.prefetched_pages > 0, "restore b prefetched nothing");
    check(
        run,
        b.faults < a.faults / 2,
        &format!(
            "prefetch did not cut faults: {} with vs {} without",
            b.faults, a.faults
        ),
    );
    // The memory served lazily is the snapshot's: every stamper page as it was.
    let round = num(run, "STAMP2_STARTED");
    for n in ["a", "b", "c"] {
        check_alive(run, &format!("LAZY_{n}"), round);
        check(
            run,
            word(run, &format!("VMM{n}_EXIT"), 0) == "0",
            &format!("VMM {n} did not stop cleanly"),
        );
    }
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    println!("nested (not performance figures): restore to agent answer (load call in brackets)");
    println!(
        "  (a) Uffd, no working set: {ta:.2} s ({la:.2} s); {} faults, {:.1} MiB served, {} \
         zero pages; working set saved: {ws_pages} pages",
        a.faults,
        mib(a.bytes_copied),
        a.zero_pages
    );
    println!(
        "  (b) Uffd, prefetch:       {tb:.2} s ({lb:.2} s); {} faults, {} pages prefetched in \
         {:.1} ms, {:.1} MiB served ({} pages)",
        b.faults,
        b.prefetched_pages,
        b.prefetch_ms,
        mib(b.bytes_copied),
        b.pages_copied
    );
    println!("  (c) File (mmap):          {tc:.2} s ({lc:.2} s)");
    println!(
        "  the stamper took {} / {} / {} for two rounds in (a) / (b) / (c)",
        m(run, "LAZY_a_NEXT_ROUNDS"),
        m(run, "LAZY_b_NEXT_ROUNDS"),
        m(run, "LAZY_c_NEXT_ROUNDS")
    );
    if a.faults > b.faults && ta > tb {
        println!(
            "  derived: {:.0} µs of restore-to-ready per fault avoided",
            (ta - tb) * 1e6 / (a.faults - b.faults) as f64
        );
    }
}

#[test]
fn nested_lazy_clones_are_isolated() {
    let run = nested_ok();
    let round = num(run, "STAMP2_STARTED");
    for c in 1..=3 {
        let k = |x: &str| format!("{x}_{c}");
        check(
            run,
            word(run, &k("CLONE_LOAD"), 0) == "204",
            &format!("clone {c} load failed"),
        );
        check(
            run,
            m(run, &k("CLONE_WRITE")) == "0",
            &format!("clone {c} write failed"),
        );
        let own = format!("clone-{c} clone-{c}");
        check(
            run,
            m(run, &k("CLONE_SEES")) == own,
            &format!("clone {c} does not see only its own data ({own})"),
        );
        check(
            run,
            m(run, &k("CLONE_STATE")) == "Running",
            &format!("clone {c} not Running"),
        );
        check_alive(run, &format!("CLONE_{c}"), round);
        let st = stats(run, &k("CLONE_STATS"));
        check(
            run,
            st.prefetched_pages > 0,
            &format!("clone {c} prefetched nothing"),
        );
        check(
            run,
            word(run, &format!("CLONE_VMM_{c}_EXIT"), 0) == "0",
            &format!("clone {c} VMM did not stop cleanly"),
        );
        println!(
            "nested: clone {c}: load {}, {} faults, {} pages prefetched (working set + \
             background fill), {} zero pages",
            word(run, &k("CLONE_LOAD"), 1),
            st.faults,
            st.prefetched_pages,
            st.zero_pages
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Direct: this machine's KVM
// ---------------------------------------------------------------------------------------------

const INIT_LINE: &str = "Run /sbin/init as init process";

/// A `vmm` process with its output in files; killed when dropped.
struct Vmm {
    child: Child,
    name: String,
    stderr: PathBuf,
    started: Instant,
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
            started: Instant::now(),
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
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_api(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(sock).is_err() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("vmm {} exited early ({st}): {}", self.name, self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "vmm {}: no API socket",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `serial` shows the init line, then for the exit the guest's panic causes on
    /// kvm_pvm (an ordinary KVM runs user space on: the VMM is killed there). Returns the time
    /// from spawn to the init line.
    fn run_to_init(&mut self, serial: &Path) -> Duration {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut init_at = None;
        let status = loop {
            if init_at.is_none() && fs::read_to_string(serial).is_ok_and(|l| l.contains(INIT_LINE))
            {
                init_at = Some(self.started.elapsed());
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if init_at.is_some() && !pvm {
                break None;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running after 300 s without init:\n{}",
                self.name,
                tail(&fs::read_to_string(serial).unwrap_or_default(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = fs::read_to_string(serial).unwrap_or_default();
        let init_at = init_at.or_else(|| log.contains(INIT_LINE).then(|| self.started.elapsed()));
        let err = self.stderr();
        assert!(
            init_at.is_some(),
            "{} did not reach init ({status:?}, stderr {err}):\n{}",
            self.name,
            tail(&log, 30)
        );
        assert!(
            !log.contains("Linux version"),
            "{} booted again instead of carrying on:\n{}",
            self.name,
            tail(&log, 30)
        );
        if pvm {
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(2),
                "{}: stderr {err}",
                self.name
            );
            assert!(
                err.contains("guest kernel panicked"),
                "{}: stderr {err}",
                self.name
            );
        }
        init_at.unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request on an API socket: (status, body).
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut stream = UnixStream::connect(sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(150)))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        match body {
            Some(b) => req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None => req.push_str("\r\n"),
        }
        stream.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(head_end) = text.find("\r\n\r\n") else {
                continue;
            };
            let head = &text[..head_end];
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + len]);
                return Ok((status, body.into_owned()));
            }
        }
    };
    attempt().unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()))
}

fn snapshot_body(kind: &str, dir: &Path) -> String {
    fs::create_dir_all(dir).expect("create snapshot dir");
    format!(
        r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        s(&dir.join("vmstate")),
        s(&dir.join("memory"))
    )
}

#[test]
fn direct_lazy_and_live_restores_of_a_kernel_mid_boot_reach_init() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("direct");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let (sock, serial) = (dir.join("boot.sock"), dir.join("boot.serial"));
    let mut boot = Vmm::spawn(
        &dir,
        "boot",
        &[
            "run",
            "--kernel",
            s(&a.kernel),
            "--rootfs",
            s(&rootfs),
            "--vcpus",
            "1",
            "--mem-mib",
            "256",
            "--serial-log",
            s(&serial),
            "--api-sock",
            s(&sock),
        ],
    );
    boot.wait_api(&sock);

    // A live snapshot of the running kernel once its console is up (its first output is the
    // buffered early log, some 8 s of guest CPU time into the boot; the wall time depends on
    // what else this machine runs).
    let deadline = Instant::now() + Duration::from_secs(150);
    while !fs::read_to_string(&serial).is_ok_and(|l| l.contains("Linux version")) {
        if let Some(st) = boot.child.try_wait().expect("try_wait") {
            panic!("boot VMM exited ({st}): {}", boot.stderr());
        }
        assert!(Instant::now() < deadline, "no console output after 150 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let console_at = boot.started.elapsed();
    let live_dir = dir.join("live");
    let (code, reply) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&snapshot_body("Live", &live_dir)),
    );
    assert_eq!(code, 200, "live snapshot: {reply}");
    let reply: Value = serde_json::from_str(&reply).expect("live snapshot reply JSON");
    let (code, state) = api(&sock, "GET", "/vm", None);
    assert!(
        code == 200 && state.contains("\"Running\""),
        "after a live snapshot: {state}"
    );

    // A full snapshot of the paused kernel a little later, still before init.
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = api(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert!(code == 200 || code == 204, "pause: {code} {body}");
    let before = fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        !before.contains(INIT_LINE),
        "the kernel was not mid-boot:\n{}",
        tail(&before, 20)
    );
    let full_dir = dir.join("full");
    let (code, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&snapshot_body("Full", &full_dir)),
    );
    assert_eq!(code, 200, "full snapshot: {body}");
    let (code, body) = api(&sock, "PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
    assert_eq!(code, 204, "Stop: {body}");
    let st = boot.wait(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", boot.stderr());

    // The live snapshot through `vmm run --restore` (the original rootfs path) and the full one
    // lazily through the API (a copy of the rootfs), side by side.
    let live_serial = dir.join("live.serial");
    let mut live = Vmm::spawn(
        &dir,
        "live-restore",
        &[
            "run",
            "--restore",
            s(&live_dir),
            "--serial-log",
            s(&live_serial),
        ],
    );
    let lazy_disk = dir.join("lazy.ext4");
    fs::copy(&rootfs, &lazy_disk).expect("copy rootfs");
    let (lsock, lserial) = (dir.join("lazy.sock"), dir.join("lazy.serial"));
    let mut lazy = Vmm::spawn(
        &dir,
        "lazy-restore",
        &["run", "--api-sock", s(&lsock), "--serial-log", s(&lserial)],
    );
    lazy.wait_api(&lsock);
    let mem = full_dir.join("memory");
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true,"working_set":{{"prefetch":false,"record_ms":3000,"background_fill":false}},"drive_overrides":[{{"drive_id":"rootfs","path_on_host":"{}"}}]}}"#,
        s(&full_dir.join("vmstate")),
        s(&mem),
        s(&lazy_disk)
    );
    let t = Instant::now();
    let (code, body) = api(&lsock, "PUT", "/snapshot/load", Some(&load));
    let load_took = t.elapsed();
    assert_eq!(code, 204, "lazy load: {body}: {}", lazy.stderr());
    std::thread::sleep(Duration::from_secs(1));
    let (code, early) = api(&lsock, "GET", "/snapshot/memory-stats", None);
    assert_eq!(code, 200, "memory-stats: {early}");
    let early: Value = serde_json::from_str(&early).expect("memory-stats JSON");
    assert!(
        early["server"]["faults"].as_u64().unwrap_or(0) > 0,
        "no page faults served 1 s after a lazy restore: {early}"
    );

    let (lazy_init, live_init) = std::thread::scope(|sc| {
        let l = sc.spawn(|| live.run_to_init(&live_serial));
        let z = lazy.run_to_init(&lserial);
        (z, l.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    let ws = fs::metadata(mem.with_file_name("memory.ws")).map(|m| m.len());
    assert!(
        ws.as_ref().is_ok_and(|&n| n > 16),
        "no working set recorded after record_ms 3000: {ws:?}"
    );
    println!(
        "direct kvm (256 MiB guest): live snapshot at {console_at:?}: pause {:.2} ms, total {:.0} ms, {} \
         write faults; lazy load {load_took:?}, {} faults after 1 s ({:.1} MiB served), init \
         {lazy_init:?} after spawn; live restore init {live_init:?} after spawn; working set file \
         {} bytes",
        secs(&reply["pause"]).unwrap_or(f64::NAN) * 1e3,
        secs(&reply["total"]).unwrap_or(f64::NAN) * 1e3,
        reply["copy"]["write_faults"],
        early["server"]["faults"],
        early["server"]["bytes_copied"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        ws.unwrap_or(0)
    );
    cleanup(&dir);
}

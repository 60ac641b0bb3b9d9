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
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{
    api, artifacts, cleanup, compile_guest_prog, create_body, heavy, read_lossy, require_kvm,
    run_nested, scratch, tail, utf8 as s, wait_for_text, NestedOptions, NestedRun, SharedNestedRun,
    VmmProcess, GUEST_CMDLINE,
};

/// Memory the stamper mutates, in MiB, and the 4 KiB pages that makes.
const STAMP_MIB: u64 = 64;
const STAMP_PAGES: u64 = STAMP_MIB * 256;
/// The throttled stamper in the full snapshot that is restored lazily: smaller, because with
/// neither prefetch nor background fill its first round faults in every page one by one.
const STAMP2_MIB: u64 = 16;

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
/// Shell helpers shared with the other nested scenarios (API calls, stopping VMMs).
const NESTED_LIB: &str = include_str!("../guest-progs/nested-lib.sh");

/// The nested run, shared by the three nested tests.
fn nested_ok() -> &'static NestedRun {
    static RUN: SharedNestedRun = SharedNestedRun::new("lazy/live");
    RUN.get(|| {
        let (stamp, scan) = (compile_guest_prog("stamp"), compile_guest_prog("scan"));
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
        run_nested(&format!("{NESTED_LIB}\n{script}"), opts)
    })
}

/// The stamper in a VM is alive: it finished a round after `at_least` and then another within a
/// second, found its memory as it left it, and the agent answers. Returns its three rounds.
fn check_alive(run: &NestedRun, name: &str, at_least: u64) -> [u64; 3] {
    let counts = run.get(&format!("{name}_COUNTS"));
    let parsed: Vec<u64> = counts
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    run.check(
        parsed.len() == 3,
        &format!("{name}: stamper round not readable: {counts}"),
    );
    let r = [parsed[0], parsed[1], parsed[2]];
    run.check(
        r[0] < r[1] && r[1] < r[2],
        &format!(
            "{name}: the stamper is not counting: rounds {r:?} (two rounds took {})",
            run.get(&format!("{name}_NEXT_ROUNDS"))
        ),
    );
    run.check(
        r[0] >= at_least,
        &format!(
            "{name}: stamper round {} is below {at_least}, from before the snapshot",
            r[0]
        ),
    );
    run.check(
        run.get(&format!("{name}_ERR")) == "none",
        &format!("{name}: the stamper found its memory changed under it"),
    );
    run.check(
        !run.get(&format!("{name}_PID")).is_empty(),
        &format!("{name}: no stamp process"),
    );
    run.check(
        run.get(&format!("{name}_PING")) == "0",
        &format!("{name}: the agent does not answer"),
    );
    r
}

#[test]
fn nested_live_snapshot_is_one_moment_and_restores() {
    let run = nested_ok();
    run.check(run.num("STAMP_STARTED") >= 3, "the stamper did not start");
    let mut last_c = 0;
    for n in 1..=3 {
        let key = |k: &str| format!("{k}_{n}");
        run.check(
            run.word(&key("LIVE"), 0) == "200",
            &format!("live snapshot {n} failed"),
        );
        run.check(
            run.get(&key("LIVE_STATE")) == "Running",
            &format!("VM not Running after live snapshot {n}"),
        );
        let reply = run.json_after(&key("LIVE_REPLY"), 0);
        let pause = secs(&reply["pause"]).unwrap_or_else(|| {
            panic!(
                "{}",
                run.failure(&format!("no pause in the reply: {reply}"))
            )
        });
        let total = secs(&reply["total"]).unwrap_or(f64::NAN);
        run.check(
            pause > 0.0 && pause <= total,
            &format!("live snapshot {n}: pause {pause} s vs total {total} s"),
        );
        let write_faults = reply["copy"]["write_faults"].as_u64().unwrap_or(0);
        // The scan: every stamped page once, one split point, counters one apart at most.
        let sk = |k: &str| format!("SCAN{n}_{k}");
        let detail = run.get(&sk("DETAIL"));
        run.check(
            run.num(&sk("FOUND")) == STAMP_PAGES,
            &format!("live image {n}: not every stamped page once ({detail})"),
        );
        for k in ["MISSING", "DUPS", "BAD_INDEX"] {
            run.check(
                run.num(&sk(k)) == 0,
                &format!("live image {n}: {k} ({detail})"),
            );
        }
        let (min, max) = (run.num(&sk("MIN")), run.num(&sk("MAX")));
        let split = run.num(&sk("SPLIT"));
        run.check(
            max == min || (max == min + 1 && run.num(&sk("BOUNDARIES")) == 1 && split > 0),
            &format!("live image {n} is torn: counters {min}..{max}, split {split}: {detail}"),
        );
        run.check(run.get(&sk("OK")) == "1", &format!("scan {n} verdict"));
        // The image is of a moment between the rounds read before and after the snapshot.
        let before = run.num(&key("LIVE_COUNT_BEFORE"));
        let after = run.num(&key("LIVE_COUNT_AFTER"));
        run.check(
            before <= min && max <= after + 1,
            &format!("live image {n}: rounds {min}..{max} outside {before}..{after}+1"),
        );
        println!(
            "nested (not a performance figure): live snapshot {n}: guest-visible pause {:.2} ms, \
             total {:.0} ms ({} by curl), {write_faults} write faults, image at round {min} \
             with {split} of {STAMP_PAGES} pages already at {}",
            pause * 1e3,
            total * 1e3,
            run.word(&key("LIVE"), 1),
            min + 1
        );
        last_c = min;
    }
    check_alive(run, "SOURCE", last_c);
    // The last live snapshot restored into a new VMM: the stamper carries on from the image.
    run.check(
        run.word("LIVE_LOAD", 0) == "204",
        "load of the live snapshot failed",
    );
    run.check(
        run.get("LIVE_RESTORED_STATE") == "Running",
        "restored VM not Running",
    );
    let [a, _, b] = check_alive(run, "LIVE_RESTORED", last_c);
    run.check(
        run.word("VMM0_EXIT", 0) == "0" && run.word("VMML_EXIT", 0) == "0",
        "a VMM did not stop cleanly",
    );
    println!(
        "nested: live-restored stamper at rounds {a} then {b} (image at {last_c}); load took {}; \
         two rounds after the restore took {}",
        run.word("LIVE_LOAD", 1),
        run.get("LIVE_RESTORED_NEXT_ROUNDS")
    );
}

/// Page-server counters of a lazily restored VM.
struct Stats {
    faults: u64,
    pages_copied: u64,
    bytes_copied: u64,
    zero_pages: u64,
    prefetched_pages: u64,
    working_set_faults: u64,
    prefetch_ms: f64,
}

fn stats(run: &NestedRun, key: &str) -> Stats {
    run.check(run.word(key, 0) == "200", &format!("{key}: HTTP"));
    let v = run.json_after(key, 1);
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
        working_set_faults: u(server, "working_set_faults"),
        prefetch_ms: v["prefetch_ms"].as_f64().unwrap_or(0.0),
    }
}

/// Seconds from PUT /snapshot/load to the agent's answer, after checking both worked.
fn ready_time(run: &NestedRun, name: &str) -> (f64, f64) {
    let key = format!("READY_{name}");
    run.check(
        run.word(&key, 0) == "204",
        &format!("restore {name}: load failed"),
    );
    run.check(
        run.word(&key, 1) == "0",
        &format!("restore {name}: the agent did not answer"),
    );
    let f = |i| {
        run.word(&key, i)
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{}", run.failure(&format!("{key}: bad time"))))
    };
    (f(2), f(3))
}

#[test]
fn nested_lazy_restore_prefetches_the_working_set() {
    let run = nested_ok();
    run.check(run.word("FULL", 0) == "200", "full snapshot failed");
    let (ta, la) = ready_time(run, "a");
    let (tb, lb) = ready_time(run, "b");
    let (tc, lc) = ready_time(run, "c");
    run.check(run.word("WS_SAVE_a", 0) == "200", "SaveWorkingSet failed");
    let ws_pages = run.json_after("WS_SAVE_a", 1)["pages"]
        .as_u64()
        .unwrap_or(0);
    run.check(
        ws_pages > 0,
        &format!(
            "SaveWorkingSet (record_ms 0) saved {ws_pages} pages: nothing was recorded until the \
             agent answered"
        ),
    );
    run.check(
        run.word("WS_FILE", 0) == (16 + 8 * ws_pages).to_string(),
        "working-set file size",
    );
    let a = stats(run, "STATS_a");
    let b = stats(run, "STATS_b");
    run.check(
        a.prefetched_pages == 0 && a.faults > 0,
        "restore a: prefetched without a working set, or no faults",
    );
    run.check(
        a.faults >= ws_pages,
        &format!(
            "restore a: {} faults but {ws_pages} pages in its working set",
            a.faults
        ),
    );
    run.check(b.prefetched_pages > 0, "restore b prefetched nothing");
    // The working set was in place before the guest asked for it: (almost)
    // none of its pages faulted. Pages outside it still fault, as many as
    // the stamper reaches before the stats are read, which depends on load:
    // so the total is only required to be lower.
    run.check(
        b.working_set_faults * 100 <= ws_pages,
        &format!(
            "prefetch left {} of the {ws_pages} working-set pages to fault",
            b.working_set_faults
        ),
    );
    run.check(
        b.faults < a.faults,
        &format!(
            "prefetch did not cut faults: {} with vs {} without",
            b.faults, a.faults
        ),
    );
    // The memory served lazily is the snapshot's: every stamper page as it was.
    let round = run.num("STAMP2_STARTED");
    for n in ["a", "b", "c"] {
        check_alive(run, &format!("LAZY_{n}"), round);
        run.check(
            run.word(&format!("VMM{n}_EXIT"), 0) == "0",
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
        "  (b) Uffd, prefetch:       {tb:.2} s ({lb:.2} s); {} faults ({} on working-set pages), \
         {} pages prefetched in {:.1} ms, {:.1} MiB served ({} pages)",
        b.faults,
        b.working_set_faults,
        b.prefetched_pages,
        b.prefetch_ms,
        mib(b.bytes_copied),
        b.pages_copied
    );
    println!("  (c) File (mmap):          {tc:.2} s ({lc:.2} s)");
    println!(
        "  the stamper took {} / {} / {} for two rounds in (a) / (b) / (c)",
        run.get("LAZY_a_NEXT_ROUNDS"),
        run.get("LAZY_b_NEXT_ROUNDS"),
        run.get("LAZY_c_NEXT_ROUNDS")
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
    let round = run.num("STAMP2_STARTED");
    for c in 1..=3 {
        let k = |x: &str| format!("{x}_{c}");
        run.check(
            run.word(&k("CLONE_LOAD"), 0) == "204",
            &format!("clone {c} load failed"),
        );
        run.check(
            run.get(&k("CLONE_WRITE")) == "0",
            &format!("clone {c} write failed"),
        );
        let own = format!("clone-{c} clone-{c}");
        run.check(
            run.get(&k("CLONE_SEES")) == own,
            &format!("clone {c} does not see only its own data ({own})"),
        );
        run.check(
            run.get(&k("CLONE_STATE")) == "Running",
            &format!("clone {c} not Running"),
        );
        check_alive(run, &format!("CLONE_{c}"), round);
        let st = stats(run, &k("CLONE_STATS"));
        run.check(
            st.prefetched_pages > 0,
            &format!("clone {c} prefetched nothing"),
        );
        run.check(
            run.word(&format!("CLONE_VMM_{c}_EXIT"), 0) == "0",
            &format!("clone {c} VMM did not stop cleanly"),
        );
        println!(
            "nested: clone {c}: load {}, {} faults, {} pages prefetched (working set + \
             background fill), {} zero pages",
            run.word(&k("CLONE_LOAD"), 1),
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

/// How long a VMM may take to open its API socket, and to exit after Stop.
const API_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Waits until `serial` shows the init line, then for the exit the guest's panic causes on
/// kvm_pvm (an ordinary KVM runs user space on: the VMM is killed there). Returns the time from
/// spawn to the init line.
fn run_to_init(vm: &mut VmmProcess, serial: &Path) -> Duration {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut init_at = None;
    let status = loop {
        if init_at.is_none() && read_lossy(serial).contains(INIT_LINE) {
            init_at = Some(vm.started().elapsed());
        }
        if let Some(st) = vm.try_wait() {
            break Some(st);
        }
        if init_at.is_some() && !pvm {
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "{}: still running after 300 s without init:\n{}",
            vm.name(),
            tail(&read_lossy(serial), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = read_lossy(serial);
    let init_at = init_at.or_else(|| log.contains(INIT_LINE).then(|| vm.started().elapsed()));
    let err = vm.stderr();
    assert!(
        init_at.is_some(),
        "{} did not reach init ({status:?}, stderr {err}):\n{}",
        vm.name(),
        tail(&log, 30)
    );
    assert!(
        !log.contains("Linux version"),
        "{} booted again instead of carrying on:\n{}",
        vm.name(),
        tail(&log, 30)
    );
    if pvm {
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{}: stderr {err}",
            vm.name()
        );
        assert!(
            err.contains("guest kernel panicked"),
            "{}: stderr {err}",
            vm.name()
        );
    }
    init_at.unwrap_or_default()
}

#[test]
fn direct_lazy_and_live_restores_of_a_kernel_mid_boot_reach_init() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("lazy", "direct");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let (mut boot, sock, serial) =
        VmmProcess::boot_kernel(&dir, "boot", "256", &["--rootfs", s(&rootfs)], API_WAIT);

    // A live snapshot of the running kernel once its console is up (its first output is the
    // buffered early log, some 8 s of guest CPU time into the boot; the wall time depends on
    // what else this machine runs).
    wait_for_text(
        &mut boot,
        &serial,
        "Linux version",
        Duration::from_secs(150),
    );
    let console_at = boot.started().elapsed();
    let live_dir = dir.join("live");
    let (code, reply) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&create_body("Live", &live_dir)),
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
        Some(&create_body("Full", &full_dir)),
    );
    assert_eq!(code, 200, "full snapshot: {body}");
    boot.stop(&sock, STOP_WAIT);

    // The live snapshot through `vmm run --restore` (the original rootfs path) and the full one
    // lazily through the API (a copy of the rootfs), side by side.
    let live_serial = dir.join("live.serial");
    let mut live = VmmProcess::spawn(
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
    let mut lazy = VmmProcess::spawn(
        &dir,
        "lazy-restore",
        &["run", "--api-sock", s(&lsock), "--serial-log", s(&lserial)],
    );
    lazy.wait_api(&lsock, API_WAIT);
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
    // The resumed guest must fault pages in through the server; how soon
    // depends on the machine's load, so poll (the emulated kernel is slow).
    let t = Instant::now();
    let early = loop {
        let (code, early) = api(&lsock, "GET", "/snapshot/memory-stats", None);
        assert_eq!(code, 200, "memory-stats: {early}");
        let early: Value = serde_json::from_str(&early).expect("memory-stats JSON");
        if early["server"]["faults"].as_u64().unwrap_or(0) > 0 {
            break early;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no page faults served 30 s after a lazy restore: {early}: {}",
            lazy.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let first_faults_after = t.elapsed();

    let (lazy_init, live_init) = std::thread::scope(|sc| {
        let l = sc.spawn(|| run_to_init(&mut live, &live_serial));
        let z = run_to_init(&mut lazy, &lserial);
        (z, l.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    let ws = fs::metadata(mem.with_file_name("memory.ws")).map(|m| m.len());
    assert!(
        ws.as_ref().is_ok_and(|&n| n > 16),
        "no working set recorded after record_ms 3000: {ws:?}"
    );
    println!(
        "direct kvm (256 MiB guest): live snapshot at {console_at:?}: pause {:.2} ms, total {:.0} ms, {} \
         write faults; lazy load {load_took:?}, {} faults by {first_faults_after:?} ({:.1} MiB served), init \
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

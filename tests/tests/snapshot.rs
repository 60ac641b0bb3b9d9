//! Issue 4 end to end: pause, snapshot, restore.
//!
//! Nested (a full guest with user space, inside the nested test host; one L1 boot serves all four
//! tests, each checks its own markers): a running process carries on after a restore, two clones
//! of one snapshot diverge, snapshot → restore (paused) → snapshot reproduces the same state, and
//! a vsock connection from before the snapshot is dead while a new one works. The state files of
//! the round trip are shipped to the host over L1's console (gzip + base64, checked by SHA-256)
//! and compared leaf by leaf: every difference must be explained by time (clocks, timestamps,
//! interrupts that became pending), by what the load writes on purpose (the vsock
//! transport-reset event; KVM's pvclock wall clock), or by one documented artefact of QEMU's SVM
//! emulation; registers, FPU, LAPIC (but IRR), devices (but that event) and memory (but those
//! bytes) must be identical.
//!
//! Direct (this machine's KVM; guest kernel only, see shared/platform/README.md): a kernel paused
//! mid-boot carries on after `vmm run --restore`, diff snapshots merge into a loadable full one,
//! corrupt snapshot files are refused with a 400 and a clear message, and a VMM killed in the
//! middle of a snapshot leaves the previous snapshot intact.
//!
//! All heavy tests take one process-wide lock: they share two cores with everyone else, and the
//! timings they print are only meaningful one at a time.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::{
    artifacts, require_kvm, run_nested, scratch_dir, tail, vmm_binary, NestedOptions, NestedRun,
    GUEST_CMDLINE,
};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// One heavy test at a time in this process.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("snapshot-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Removes a passed test's scratch directory (memory files are large) unless VMM_TESTS_KEEP.
fn cleanup(dir: &Path) {
    if std::env::var_os("VMM_TESTS_KEEP").is_none() {
        let _ = fs::remove_dir_all(dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// CRC-64/ECMA-182 (poly 0x42F0E1EBA9EA3693, init 0, no reflection, no final xor): the state
/// file trailer, recomputed here independently of the snapshot crate.
fn crc64_ecma(data: &[u8]) -> u64 {
    const POLY: u64 = 0x42F0_E1EB_A9EA_3693;
    let mut crc = 0u64;
    for &b in data {
        crc ^= u64::from(b) << 56;
        for _ in 0..8 {
            crc = if crc & (1 << 63) != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Offsets of the state-file format (snapshot/src/format.rs): magic 8, version 4, length 8,
/// JSON payload, CRC64 8.
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 8;

/// A state file taken apart and checked (magic, length, CRC).
struct StateFile {
    version: u32,
    payload: Value,
}

fn decode_state(bytes: &[u8], what: &str) -> StateFile {
    assert!(
        bytes.len() >= HEADER_LEN + CRC_LEN,
        "{what}: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"VMMSNAP\0", "{what}: magic");
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    assert_eq!(
        bytes.len(),
        HEADER_LEN + len + CRC_LEN,
        "{what}: length field"
    );
    let body_end = HEADER_LEN + len;
    let stored = u64::from_le_bytes(bytes[body_end..].try_into().unwrap());
    assert_eq!(
        crc64_ecma(&bytes[..body_end]),
        stored,
        "{what}: CRC64 trailer"
    );
    let payload = serde_json::from_slice(&bytes[HEADER_LEN..body_end])
        .unwrap_or_else(|e| panic!("{what}: payload is not JSON: {e}"));
    StateFile { version, payload }
}

/// Re-seals a state file after its header or payload was edited.
fn reseal(bytes: &mut [u8]) {
    let body_end = bytes.len() - CRC_LEN;
    let crc = crc64_ecma(&bytes[..body_end]);
    bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
}

/// Every leaf where `a` and `b` differ: (path, a, b), values shortened.
fn json_diffs(a: &Value, b: &Value, path: &str, out: &mut Vec<(String, String, String)>) {
    let short = |v: Option<&Value>| {
        let t = v.map_or_else(|| "<absent>".to_string(), Value::to_string);
        if t.len() > 120 {
            format!("{}…", &t[..120])
        } else {
            t
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => json_diffs(va, vb, &p, out),
                    (va, vb) => out.push((p, short(va), short(vb))),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                json_diffs(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push((path.to_string(), short(Some(a)), short(Some(b)))),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Nested: one L1 boot, four tests
// ---------------------------------------------------------------------------------------------

/// The script run inside L1. Phases print `KEY=VALUE` markers; the tests below assert on them.
/// Paths: /tmp/w (tmpfs, so sparse memory files stay sparse).
const NESTED_SCRIPT: &str = r##"
set -u
V=/usr/bin/vmm
W=/tmp/w
mkdir -p $W/S $W/B
CMD='@CMDLINE@'
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
# api SOCK METHOD PATH [BODY]: prints the HTTP status; the body lands in $W/body.
api() {
  if [ $# -ge 4 ]; then
    curl -sS -m 150 --unix-socket "$1" -X "$2" -H 'Content-Type: application/json' -d "$4" \
      -o $W/body -w '%{http_code}' "http://localhost$3"
  else
    curl -sS -m 30 --unix-socket "$1" -X "$2" -o $W/body -w '%{http_code}' "http://localhost$3"
  fi
}
body() { tr '\n' ' ' <$W/body; }
vmstate() { api "$1" GET /vm >/dev/null && sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' $W/body; }
ag() { u=$1; shift; timeout 60 $V agent --uds "$u" --wait 30 "$@"; }
wait_sock() { i=0; while [ ! -S "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; [ -S "$1" ]; }
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done; }
# stop_vmm SOCK PID NAME
stop_vmm() {
  _s=$(api "$1" PUT /actions '{"action_type":"Stop"}'); wait_gone "$2"
  if kill -0 "$2" 2>/dev/null; then echo "$3_HUNG=1"; kill -9 "$2"; fi
  wait "$2"; echo "$3_EXIT=$? http=$_s"
}
# load SOCK JSON NAME
load() { _t=$(now); _s=$(api "$1" PUT /snapshot/load "$2"); echo "$3=$_s $(since $_t)s $(body)"; }
loadjson() { # MEMDIR DISK VSOCK RESUME
  printf '{"snapshot_path":"%s/vmstate","mem_backend":{"backend_type":"File","backend_path":"%s/memory"},"resume_vm":%s,"drive_overrides":[{"drive_id":"rootfs","path_on_host":"%s"}],"vsock_override":{"uds_path":"%s"}}' "$1" "$1" "$4" "$2" "$3"
}
logcheck() { awk '$0 != NR {print "bad line " NR ": " $0; bad=1; exit} END {if (!bad) print "ok " NR}' "$1"; }
fail() {
  echo "SCRIPT_FAILED=$1"
  for f in $W/e*; do echo "== $f: $(tail -c 400 $f | tr '\n' ' ')"; done
  for f in $W/g*.log; do echo "== $f"; tail -n 15 $f; done
  exit 1
}
# dead PID NAME N: when VMM N has exited, say why (exit status, stderr, console tail).
dead() {
  kill -0 "$1" 2>/dev/null && return 1
  wait "$1"; echo "$2_DIED=$?"
  echo "$2_STDERR=$(tr '\n' ' ' <$W/e$3)"
  tail -n 40 $W/g$3.log | sed "s/^/$2_CONSOLE: /"
  return 0
}
finish() { for f in $W/e*; do echo "VMM_STDERR_${f##*/}=$(head -c 300 $f | tr '\n' ' ')"; done; }

# --- Phase 0: boot, start a counting loop and a long-lived agent connection, snapshot --------
cp /guest/rootfs.ext4 $W/disk0.ext4
t=$(now)
$V run --kernel /guest/vmlinux --rootfs $W/disk0.ext4 --vcpus 2 --mem-mib 256 \
  --vsock cid=3,uds=$W/v0.sock --cmdline "$CMD" --serial-log $W/g0.log --api-sock $W/a0.sock 2>$W/e0 &
P0=$!
ag $W/v0.sock ping >/dev/null || fail boot
echo "BOOT_TO_AGENT=$(since $t)s"
cat > $W/loop.sh <<'EOF'
echo $$ > /tmp/loop.pid
i=0
while :; do
  i=$((i+1))
  echo $i > /tmp/counter.new && mv /tmp/counter.new /tmp/counter
  echo $i >> /root/counter.log
  sync
  sleep 0.1
done
EOF
ag $W/v0.sock write-file /root/loop.sh < $W/loop.sh || fail write-loop
ag $W/v0.sock exec -- sh -c 'setsid sh /root/loop.sh </dev/null >/dev/null 2>&1 &' || fail start-loop
i=0; c=0
while [ $i -lt 100 ]; do
  c=$(ag $W/v0.sock exec -- cat /tmp/counter 2>/dev/null); [ "${c:-0}" -ge 10 ] && break
  sleep 0.2; i=$((i+1))
done
LOOP_PID=$(ag $W/v0.sock exec -- cat /tmp/loop.pid)
echo "LOOP_PID_BEFORE=$LOOP_PID"
$V agent --uds $W/v0.sock exec -- sh -c ': OLDCONN_TICKER; while :; do echo tick; sleep 0.2; done' >$W/old.out 2>&1 &
OLDP=$!
sleep 1.5
echo "OLD_TICKS_BEFORE=$(grep -c '^tick$' $W/old.out)"
echo "OLD_TICKER_BEFORE=$(ag $W/v0.sock exec -- sh -c 'ps | grep -c "[O]LDCONN_TICKER"')"
echo "COUNTER_PRE=$(ag $W/v0.sock exec -- cat /tmp/counter)"
t=$(now); echo "PAUSE0=$(api $W/a0.sock PATCH /vm '{"state":"Paused"}') $(since $t)s $(body)"
echo "STATE0=$(vmstate $W/a0.sock)"
t=$(now)
echo "SNAP0=$(api $W/a0.sock PUT /snapshot/create '{"snapshot_type":"Full","snapshot_path":"/tmp/w/S/vmstate","mem_file_path":"/tmp/w/S/memory"}') $(since $t)s $(body)"
cp $W/disk0.ext4 $W/S/disk
echo "SNAP0_FILES=$(stat -c %s $W/S/vmstate) $(stat -c %s $W/S/memory) $(du -k $W/S/memory | cut -f1)KiB"
stop_vmm $W/a0.sock $P0 VMM0
wait_gone $OLDP
if kill -0 $OLDP 2>/dev/null; then echo "OLD_CLIENT_HUNG=1"; kill $OLDP; fi
wait $OLDP; echo "OLD_CLIENT_EXIT=$?"
echo "OLD_CLIENT_MSG=$(grep -v '^tick$' $W/old.out | tr '\n' ' ')"

# --- Phase 1: restore into a new VMM; the loop carries on; the old connection is dead --------
phase1() {
  cp $W/S/disk $W/d1.ext4
  $V run --api-sock $W/a1.sock --serial-log $W/g1.log 2>$W/e1 &
  P1=$!
  wait_sock $W/a1.sock || { dead $P1 VMM1 1; return; }
  echo "STATE1_EMPTY=$(vmstate $W/a1.sock)"
  load $W/a1.sock "$(loadjson /tmp/w/S /tmp/w/d1.ext4 /tmp/w/v1.sock true)" LOAD1
  t=$(now)
  c1=$(ag $W/v1.sock exec -- cat /tmp/counter)
  echo "COUNTER_POST1=$c1"
  echo "AGENT1_FIRST=$(since $t)s"
  if [ -z "$c1" ]; then
    dead $P1 VMM1 1 && return
    tail -n 40 $W/g1.log | sed 's/^/VMM1_CONSOLE: /'; stop_vmm $W/a1.sock $P1 VMM1; return
  fi
  echo "STATE1=$(vmstate $W/a1.sock)"
  echo "LOOP_PID_AFTER=$(ag $W/v1.sock exec -- cat /tmp/loop.pid)"
  echo "LOOP_PS=$(ag $W/v1.sock exec -- ps | awk -v p="$LOOP_PID" '$1==p' | tr -s ' ')"
  echo "LOOP_ALIVE=$(ag $W/v1.sock exec -- sh -c "kill -0 $LOOP_PID && echo yes")"
  n=x; i=0
  while [ $i -lt 50 ]; do
    n=$(ag $W/v1.sock exec -- sh -c 'ps | grep -c "[O]LDCONN_TICKER"'); [ "$n" = 0 ] && break
    sleep 0.2; i=$((i+1))
  done
  echo "OLD_TICKER_AFTER=$n $(since $t)s"
  ag $W/v1.sock ping >$W/ping1; echo "PING1=$? $(cat $W/ping1)"
  sleep 1
  echo "COUNTER_POST2=$(ag $W/v1.sock exec -- cat /tmp/counter)"
  ag $W/v1.sock exec -- cat /root/counter.log >$W/log1
  echo "LOG_CHECK=$(logcheck $W/log1)"
  ag $W/v1.sock exec -- kill $LOOP_PID
  ag $W/v1.sock freeze >/dev/null; echo "FREEZE1=$?"
  stop_vmm $W/a1.sock $P1 VMM1
  e2fsck -fn $W/d1.ext4 >$W/fsck1 2>&1; echo "FSCK1=$? $(tail -n 1 $W/fsck1)"
  debugfs -R 'cat /root/counter.log' $W/d1.ext4 2>/dev/null >$W/disklog1
  echo "DISK_LOG_CHECK=$(logcheck $W/disklog1)"
}
phase1

# --- Phase 2: two clones of the same snapshot at once ---------------------------------------
phase2() {
  for k in a b; do
    cp $W/S/disk $W/d2$k.ext4
    $V run --api-sock $W/a2$k.sock --serial-log $W/g2$k.log 2>$W/e2$k &
    eval "P2$k=$!"
  done
  for k in a b; do
    wait_sock $W/a2$k.sock || echo "CLONE_NO_API_$k=1"
    load $W/a2$k.sock "$(loadjson /tmp/w/S /tmp/w/d2$k.ext4 /tmp/w/v2$k.sock true)" CLONE_LOAD_$k
  done
  for k in a b; do
    ag $W/v2$k.sock exec -- sh -c "echo clone-$k >/root/clone.txt && echo clone-$k >/tmp/clone.txt && sync"
    r=$?; echo "CLONE_WRITE_$k=$r"
    eval "p=\$P2$k"
    [ $r = 0 ] || { dead $p CLONE_VMM_$k 2$k; return; }
  done
  for k in a b; do
    echo "CLONE_SEES_$k=$(ag $W/v2$k.sock exec -- cat /root/clone.txt /tmp/clone.txt | tr '\n' ' ')"
    echo "CLONE_STATE_$k=$(vmstate $W/a2$k.sock)"
    echo "CLONE_LOOP_$k=$(ag $W/v2$k.sock exec -- sh -c "kill -0 $LOOP_PID && echo alive")"
    ag $W/v2$k.sock ping >/dev/null; echo "CLONE_PING_$k=$?"
  done
  for k in a b; do
    ag $W/v2$k.sock freeze >/dev/null; echo "CLONE_FREEZE_$k=$?"
    eval "p=\$P2$k"; stop_vmm $W/a2$k.sock $p CLONE_VMM_$k
    echo "CLONE_DISK_$k=$(debugfs -R 'cat /root/clone.txt' $W/d2$k.ext4 2>/dev/null)"
  done
}
phase2
for p in $(jobs -p); do kill -9 $p 2>/dev/null; done

# --- Phase 3: restore paused (no overrides: same disk and socket paths), snapshot again -----
$V run --api-sock $W/a3.sock --serial-log $W/g3.log 2>$W/e3 &
P3=$!
wait_sock $W/a3.sock || fail a3-sock
load $W/a3.sock '{"snapshot_path":"/tmp/w/S/vmstate","mem_backend":{"backend_type":"File","backend_path":"/tmp/w/S/memory"},"resume_vm":false}' LOAD3
echo "STATE3=$(vmstate $W/a3.sock)"
t=$(now)
echo "SNAP3=$(api $W/a3.sock PUT /snapshot/create '{"snapshot_type":"Full","snapshot_path":"/tmp/w/B/vmstate","mem_file_path":"/tmp/w/B/memory"}') $(since $t)s $(body)"
stop_vmm $W/a3.sock $P3 VMM3
# Every differing byte: "offset(1-based) octal octal" lines.
t=$(now); cmp -l $W/S/memory $W/B/memory >$W/cmp3 2>&1; echo "MEM_CMP=$? $(since $t)s"
echo "MEM_DIFF_COUNT=$(wc -l <$W/cmp3)"
echo "MEM_DIFFS=$(head -n 64 $W/cmp3 | tr -s ' \n' '  ')"
echo "MEM_SIZES=$(stat -c %s $W/S/memory) $(stat -c %s $W/B/memory) $(du -k $W/S/memory | cut -f1)KiB $(du -k $W/B/memory | cut -f1)KiB"
# The two state files go to the host for decoding: gzip + base64 over the console, with a
# checksum. Kernel messages must not interleave with these lines.
dmesg -n 1
for x in S B; do
  echo "VMSTATE_SHA_$x=$(sha256sum $W/$x/vmstate | cut -d' ' -f1)"
  gzip -c $W/$x/vmstate | base64 | sed "s/^/VMSTATE_B64_$x=/"
done
finish
echo "SCRIPT_DONE=1"
"##;

/// The nested run, once per process; a harness failure is kept as text so that every nested
/// test reports it instead of booting L1 again.
fn nested() -> &'static Result<NestedRun, String> {
    static RUN: OnceLock<Result<NestedRun, String>> = OnceLock::new();
    let _heavy = heavy();
    RUN.get_or_init(|| {
        let script = NESTED_SCRIPT.replace("@CMDLINE@", GUEST_CMDLINE);
        let opts = NestedOptions::new("snapshot")
            .timeout(Duration::from_secs(240))
            .program("/usr/bin/curl", "/usr/bin/curl")
            .program("/sbin/e2fsck", "/usr/bin/e2fsck")
            .program("/sbin/debugfs", "/usr/bin/debugfs");
        let run = std::panic::catch_unwind(|| run_nested(&script, opts)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "nested run panicked".into())
        });
        if let Ok(run) = &run {
            eprintln!(
                "nested snapshot run: {:.1}s total, script from {:.1}s to {:.1}s (log {})",
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
        panic!("{}", run.failure("the snapshot script did not finish"));
    }
    run
}

/// The value of a marker, which must be present.
fn m(run: &NestedRun, key: &str) -> String {
    run.marker(key)
        .unwrap_or_else(|| panic!("{}", run.failure(&format!("no {key}= marker"))))
}

/// The first whitespace-separated word of a marker.
fn m1(run: &NestedRun, key: &str) -> String {
    m(run, key)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn num(run: &NestedRun, key: &str) -> u64 {
    let v = m1(run, key);
    v.parse()
        .unwrap_or_else(|_| panic!("{}", run.failure(&format!("{key}={v} is not a number"))))
}

fn check(run: &NestedRun, ok: bool, what: &str) {
    if !ok {
        // The script's reports on VMMs that died (exit status, stderr, guest console).
        let diag: Vec<&str> = run
            .lines
            .iter()
            .map(|l| l.text.as_str())
            .filter(|l| l.contains("_DIED=") || l.contains("_STDERR=") || l.contains("_CONSOLE: "))
            .collect();
        panic!(
            "{}\n--- VMM diagnostics ---\n{}",
            run.failure(what),
            diag.join("\n")
        );
    }
}

#[test]
fn nested_restored_process_carries_on() {
    let run = nested_ok();
    check(run, m1(run, "SNAP0") == "200", "snapshot create failed");
    check(run, m(run, "STATE0") == "Paused", "GET /vm after pause");
    check(run, m1(run, "LOAD1") == "204", "snapshot load failed");
    check(
        run,
        m(run, "STATE1_EMPTY") == "NotLoaded",
        "VMM before load",
    );
    check(
        run,
        m(run, "STATE1") == "Running",
        "GET /vm after load with resume_vm",
    );
    // The same process, still running.
    let pid = m(run, "LOOP_PID_BEFORE");
    check(
        run,
        !pid.is_empty() && m(run, "LOOP_PID_AFTER") == pid,
        "loop PID changed",
    );
    check(run, m(run, "LOOP_ALIVE") == "yes", "loop process not alive");
    let ps = m(run, "LOOP_PS");
    check(
        run,
        ps.split_whitespace().next() == Some(pid.as_str()) && ps.contains("/root/loop.sh"),
        "ps does not show the loop under its PID",
    );
    // The tmpfs counter continues from where it was (not reset) and keeps counting.
    let (pre, post1, post2) = (
        num(run, "COUNTER_PRE"),
        num(run, "COUNTER_POST1"),
        num(run, "COUNTER_POST2"),
    );
    check(run, pre >= 10, "the loop did not count before the snapshot");
    // The snapshot came a few increments after COUNTER_PRE; after the restore the agent answers
    // within a second or two of guest time, i.e. well under 100 increments.
    check(
        run,
        post1 >= pre && post1 < pre + 100,
        &format!("counter after restore {post1} vs {pre} before the snapshot"),
    );
    check(
        run,
        post2 > post1,
        "counter does not increase after restore",
    );
    // The log on the (copied) disk: consecutive lines, in the guest's view and on the disk.
    let log = m(run, "LOG_CHECK");
    check(run, log.starts_with("ok "), "counter.log is inconsistent");
    let lines: u64 = log[3..].trim().parse().unwrap_or(0);
    check(
        run,
        lines >= post2,
        "counter.log is shorter than the counter",
    );
    check(run, m1(run, "FREEZE1") == "0", "freeze before stop failed");
    check(
        run,
        m1(run, "FSCK1") == "0",
        "e2fsck of the restored VM's disk copy",
    );
    let disk = m(run, "DISK_LOG_CHECK");
    check(
        run,
        disk.starts_with("ok "),
        "counter.log on the disk copy is inconsistent",
    );
    for k in ["VMM0_EXIT", "VMM1_EXIT"] {
        check(
            run,
            m1(run, k) == "0",
            &format!("{k}: VMM did not stop cleanly"),
        );
    }
    println!(
        "nested (not a performance figure): boot to agent {}, snapshot {}, load {}, first agent \
         reply after load {}, memory file {}",
        m(run, "BOOT_TO_AGENT"),
        m(run, "SNAP0").split_whitespace().nth(1).unwrap_or("?"),
        m(run, "LOAD1").split_whitespace().nth(1).unwrap_or("?"),
        m(run, "AGENT1_FIRST"),
        m(run, "SNAP0_FILES")
    );
}

#[test]
fn nested_clones_of_one_snapshot_diverge() {
    let run = nested_ok();
    let pid = m(run, "LOOP_PID_BEFORE");
    for c in ["a", "b"] {
        check(
            run,
            m1(run, &format!("CLONE_LOAD_{c}")) == "204",
            "clone load failed",
        );
        check(
            run,
            m(run, &format!("CLONE_WRITE_{c}")) == "0",
            "clone write failed",
        );
        // Each sees its own write on disk (/root) and in memory (/tmp), not the other's.
        let own = format!("clone-{c} clone-{c}");
        check(
            run,
            m(run, &format!("CLONE_SEES_{c}")) == own,
            &format!("clone {c} sees {own}?"),
        );
        check(
            run,
            m(run, &format!("CLONE_STATE_{c}")) == "Running",
            "clone not Running",
        );
        check(
            run,
            m(run, &format!("CLONE_LOOP_{c}")) == "alive",
            "clone's loop died",
        );
        check(
            run,
            m(run, &format!("CLONE_PING_{c}")) == "0",
            "clone's agent",
        );
        check(
            run,
            m1(run, &format!("CLONE_VMM_{c}_EXIT")) == "0",
            "clone VMM stop",
        );
        // And on its own disk copy after it stopped.
        check(
            run,
            m(run, &format!("CLONE_DISK_{c}")) == format!("clone-{c}"),
            "clone disk copy",
        );
    }
    assert!(!pid.is_empty());
}

#[test]
fn nested_old_vsock_connection_dies_and_a_new_one_works() {
    let run = nested_ok();
    // Before: the long-lived exec streamed output and its command ran in the guest.
    check(
        run,
        num(run, "OLD_TICKS_BEFORE") >= 2,
        "old connection streamed nothing",
    );
    check(
        run,
        m(run, "OLD_TICKER_BEFORE") == "1",
        "ticker not running in the guest",
    );
    // The host end died with the old VMM: the client ended with an error, not hanging.
    check(
        run,
        run.marker("OLD_CLIENT_HUNG").is_none(),
        "old client hung",
    );
    check(run, m(run, "OLD_CLIENT_EXIT") != "0", "old client exited 0");
    // In the restored guest the connection was reset: the agent's next write failed and it
    // killed the command; and new connections work.
    check(
        run,
        m1(run, "OLD_TICKER_AFTER") == "0",
        "old connection's command still runs",
    );
    check(
        run,
        m1(run, "PING1") == "0",
        "new agent connection after restore",
    );
    println!(
        "old connection: client said {:?}; guest command gone after {}",
        m(run, "OLD_CLIENT_MSG"),
        m(run, "OLD_TICKER_AFTER")
    );
}

/// Collects the base64 lines of a state file sent over the console and decodes them.
fn shipped_state(run: &NestedRun, x: &str) -> Vec<u8> {
    let b64: String = run.markers(&format!("VMSTATE_B64_{x}")).concat();
    check(run, !b64.is_empty(), "no state file shipped");
    let mut child = Command::new("sh")
        .args(["-c", "base64 -d | gzip -dc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn base64/gzip");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(b64.as_bytes()));
    let out = child.wait_with_output().expect("decode state file");
    writer.join().unwrap().expect("feed base64");
    assert!(out.status.success(), "base64/gzip decode of {x} failed");
    let sha = Command::new("sh")
        .args(["-c", "sha256sum | cut -d' ' -f1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&out.stdout)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    let sha = String::from_utf8_lossy(&sha.stdout).trim().to_string();
    check(
        run,
        sha == m(run, &format!("VMSTATE_SHA_{x}")),
        "state file corrupted in transfer",
    );
    out.stdout
}

/// A path of a JSON leaf, split: `vcpus[0].msrs[8][9]` → Key(vcpus) Idx(0) Key(msrs) Idx(8) Idx(9).
#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Idx(usize),
}

fn segments(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                out.push(Seg::Key(rest[..i].to_string()));
            }
            rest = &rest[i..];
        } else {
            out.push(Seg::Key(rest.to_string()));
            continue;
        }
        for idx in rest.split(['[', ']']).filter(|x| !x.is_empty()) {
            out.push(Seg::Idx(idx.parse().unwrap_or(usize::MAX)));
        }
    }
    out
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
        .unwrap_or_default()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Index of the vsock device among the saved virtio devices.
fn vsock_index(state: &Value) -> Option<usize> {
    state["devices"]["virtio"]
        .as_array()?
        .iter()
        .position(|d| d["device"].get("Vsock").is_some())
}

/// Why a leaf may differ between a snapshot (A) and a snapshot of its paused restore (B), or
/// Err when nothing explains it. Only three things legitimately change: time (counters and
/// timestamps move while the VMM restores and saves), what time and the restore deliver
/// (interrupts that become pending; the vsock transport-reset event pushed at load), and one
/// artefact of QEMU's SVM emulation (see SYSENTER below).
fn explain(path: &str, a: &Value, b: &Value) -> Result<String, String> {
    use Seg::*;
    let segs = segments(path);
    let key = |i: usize| match segs.get(i) {
        Some(Key(k)) => k.as_str(),
        _ => "",
    };
    let idx = |i: usize| match segs.get(i) {
        Some(Idx(n)) => *n,
        _ => usize::MAX,
    };
    let at = |v: &Value, n: usize| -> Value {
        let mut cur = v;
        for s in &segs[..n] {
            cur = match s {
                Key(k) => &cur[k.as_str()],
                Idx(i) => &cur[*i],
            };
        }
        cur.clone()
    };
    let no = |why: &str| Err(format!("{path}: {why}"));
    match (key(0), segs.len()) {
        ("vcpus", 5) if key(2) == "msrs" => {
            let (ea, eb) = (bytes_of(&at(a, 4)), bytes_of(&at(b, 4)));
            if ea.len() != 16 || eb.len() != 16 || ea[..8] != eb[..8] {
                return no("MSR entry index differs");
            }
            let index = u32::from_le_bytes(ea[..4].try_into().unwrap());
            let (da, db) = (u64_at(&ea, 8), u64_at(&eb, 8));
            let amd = {
                let leaf0 = bytes_of(&a["vcpus"][idx(1)]["cpuid"][0]);
                leaf0.len() >= 28 && &leaf0[16..28] == b"AuthcAMDenti"
            };
            match index {
                0x10 | 0x4000_0020 if db >= da => Ok(format!(
                    "MSR {index:#x} (IA32_TSC / Hyper-V TIME_REF_COUNT) is a clock: +{}",
                    db - da
                )),
                // KVM derives VP_RUNTIME from the run time of the thread that asks: the VMM
                // sets MSRs from its main thread and reads them on the vCPU thread.
                0x4000_0010 => Ok(format!("MSR {index:#x} (Hyper-V VP_RUNTIME) {da} -> {db}")),
                // KVM on AMD keeps only the low 32 bits of SYSENTER_ESP/EIP (an AMD CPU in
                // long mode has no use for them); QEMU's emulated SVM stored all 64 bits the
                // guest wrote, so A has a high half that no restore can reproduce.
                0x175 | 0x176 if amd && da & 0xffff_ffff == db && db >> 32 == 0 => Ok(format!(
                    "MSR {index:#x} (SYSENTER) high half dropped by KVM/SVM: {da:#x} -> {db:#x}"
                )),
                _ => no(&format!("MSR {index:#x}: {da:#x} -> {db:#x}")),
            }
        }
        ("vcpus", 4) if key(2) == "lapic" => {
            let off = idx(3);
            let (x, y) = (
                at(a, segs.len()).as_u64().unwrap_or(u64::MAX),
                at(b, segs.len()).as_u64().unwrap_or(u64::MAX),
            );
            if (0x200..0x280).contains(&off) && off % 16 < 4 && x & !y == 0 {
                Ok(format!(
                    "LAPIC IRR byte {off:#x}: interrupt became pending ({x:#x} -> {y:#x})"
                ))
            } else if (0x390..0x394).contains(&off) {
                Ok("LAPIC timer current count".into())
            } else {
                no("LAPIC register")
            }
        }
        ("vm", 3) if key(1) == "clock" && idx(2) < 8 => {
            let (ca, cb) = (
                u64_at(&bytes_of(&a["vm"]["clock"]), 0),
                u64_at(&bytes_of(&b["vm"]["clock"]), 0),
            );
            if cb >= ca {
                Ok(format!("KVM clock +{} ms", (cb - ca) / 1_000_000))
            } else {
                no("KVM clock went backwards")
            }
        }
        ("vm", 3) if key(1) == "pit" && idx(2) < 72 && idx(2) % 24 >= 16 => Ok(format!(
            "PIT channel {} count_load_time (host time of the load)",
            idx(2) / 24
        )),
        ("devices", _) if key(1) == "virtio" && Some(idx(2)) == vsock_index(a) => {
            let (x, y) = (
                at(a, segs.len()).as_u64().unwrap_or(u64::MAX),
                at(b, segs.len()).as_u64().unwrap_or(u64::MAX),
            );
            match (&segs[3..], x, y) {
                ([Key(t), Key(f)], _, _)
                    if t == "transport" && f == "interrupt_status" && y == x | 1 =>
                {
                    Ok("vsock used-buffer interrupt for the transport-reset event".into())
                }
                ([Key(t), Key(q), Idx(2), Key(f)], _, _)
                    if t == "transport"
                        && q == "queues"
                        && (f == "next_avail" || f == "next_used")
                        && y == (x + 1) % 65536 =>
                {
                    Ok(format!(
                        "vsock event queue {f}: one event (transport reset) pushed at load"
                    ))
                }
                _ => no("vsock device state"),
            }
        }
        _ => no("not explained by time or by the restore"),
    }
}

#[test]
fn nested_snapshot_of_a_restored_vm_is_identical() {
    let run = nested_ok();
    check(run, m1(run, "LOAD3") == "204", "paused load failed");
    check(
        run,
        m(run, "STATE3") == "Paused",
        "resume_vm false must leave it Paused",
    );
    check(run, m1(run, "SNAP3") == "200", "second snapshot failed");
    check(run, m1(run, "VMM3_EXIT") == "0", "VMM3 stop");
    let a = decode_state(&shipped_state(run, "S"), "snapshot A");
    let b = decode_state(&shipped_state(run, "B"), "snapshot B");
    let keep = scratch("nested-states");
    fs::write(
        keep.join("A.json"),
        serde_json::to_vec_pretty(&a.payload).unwrap(),
    )
    .unwrap();
    fs::write(
        keep.join("B.json"),
        serde_json::to_vec_pretty(&b.payload).unwrap(),
    )
    .unwrap();
    assert_eq!(a.version, b.version);
    let mut diffs = Vec::new();
    for key in ["vcpus", "vm", "devices", "memory_layout", "memory_file"] {
        json_diffs(&a.payload[key], &b.payload[key], key, &mut diffs);
    }
    let mut explained = std::collections::BTreeMap::<String, usize>::new();
    let mut unexplained = Vec::new();
    for (p, va, vb) in &diffs {
        match explain(p, &a.payload, &b.payload) {
            Ok(why) => {
                let why = why.split(':').next().unwrap_or("").to_string();
                *explained.entry(why).or_default() += 1;
            }
            Err(e) => unexplained.push(format!("  {e} (A={va} B={vb})")),
        }
    }
    println!(
        "snapshot A vs B (decoded payloads in {}): {} differing leaves, explained:",
        keep.display(),
        diffs.len()
    );
    for (why, n) in &explained {
        println!("  {n:3} × {why}");
    }
    assert!(
        unexplained.is_empty(),
        "snapshot → restore (paused) → snapshot changed state that time and the restore do not \
         explain; first at:\n{}",
        unexplained.join("\n")
    );
    // Every vCPU register set except MSRs and LAPIC (handled above) is equal outright.
    for (i, (va, vb)) in a.payload["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b.payload["vcpus"].as_array().unwrap())
        .enumerate()
    {
        for k in [
            "regs",
            "sregs",
            "xsave",
            "xcrs",
            "debug_regs",
            "mp_state",
            "vcpu_events",
            "cpuid",
            "tsc_khz",
        ] {
            assert_eq!(va[k], vb[k], "vcpu {i} {k}");
        }
    }
    // Guest memory: equal except what the load itself writes into the guest: the vsock
    // transport-reset event (the event queue's used ring), and the pvclock wall-clock structure
    // KVM rewrites whenever MSR_KVM_WALL_CLOCK(_NEW) is set (12 bytes at the MSR's address).
    let vs = vsock_index(&a.payload).expect("a vsock device");
    let used = a.payload["devices"]["virtio"][vs]["transport"]["queues"][2]["used_ring"]
        .as_u64()
        .unwrap();
    let mut allowed = vec![("vsock event used ring", used..used + 6 + 8 * 256)];
    for vcpu in a.payload["vcpus"].as_array().unwrap() {
        for e in vcpu["msrs"].as_array().unwrap().iter().map(bytes_of) {
            let index = u32::from_le_bytes(e[..4].try_into().unwrap());
            let gpa = u64_at(&e, 8) & !1;
            if (index == 0x4b56_4d00 || index == 0x11) && gpa != 0 {
                allowed.push(("pvclock wall clock", gpa..gpa + 12));
            }
        }
    }
    let region = &a.payload["memory_layout"]["regions"][0];
    let (gpa0, foff0) = (
        region["guest_addr"].as_u64().unwrap(),
        region["file_offset"].as_u64().unwrap(),
    );
    let count = num(run, "MEM_DIFF_COUNT");
    let nums: Vec<String> = m(run, "MEM_DIFFS")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // cmp -l: 1-based offset, then the two bytes in octal.
    let offsets: Vec<u64> = nums
        .chunks(3)
        .filter_map(|c| c[0].parse::<u64>().ok())
        .map(|o| o - 1)
        .collect();
    check(
        run,
        count as usize == offsets.len() && count <= 64,
        &format!("{count} memory bytes differ"),
    );
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for o in &offsets {
        let gpa = o - foff0 + gpa0;
        let what = allowed
            .iter()
            .find(|(_, r)| r.contains(&gpa))
            .map(|(w, _)| *w);
        check(
            run,
            what.is_some(),
            &format!("memory differs at guest address {gpa:#x}, outside {allowed:x?}"),
        );
        *seen.entry(what.unwrap_or("")).or_default() += 1;
    }
    println!("memory: {count} bytes differ, all explained: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Direct: this machine's KVM
// ---------------------------------------------------------------------------------------------

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

    /// Waits for the process to exit.
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

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits until the API socket accepts connections.
    fn wait_api(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
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
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the VMM to stop and expects exit code 0.
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

/// One HTTP request on the API socket: (status, body). Errors when the VMM closes the
/// connection without a complete answer (e.g. it was killed).
fn try_api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_secs(150)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed after {} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = &text[..head_end];
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + len {
            let body = String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + len]).into_owned();
            return Ok((status, body));
        }
    }
}

fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_api(sock, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()))
}

fn vm_state(sock: &Path) -> String {
    let (code, body) = api(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "GET /vm: {body}");
    let v: Value = serde_json::from_str(&body).expect("GET /vm JSON");
    v["state"].as_str().unwrap_or("").to_string()
}

fn pause(sock: &Path) {
    let (code, body) = api(sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    // 200 with {"pause_us": N} (the OpenAPI file says 204).
    assert!(code == 200 || code == 204, "pause: {code} {body}");
    assert_eq!(vm_state(sock), "Paused");
}

fn resume(sock: &Path) {
    let (code, body) = api(sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert!(code == 200 || code == 204, "resume: {code} {body}");
}

/// PUT /snapshot/create; returns the stats JSON.
fn create(sock: &Path, kind: &str, dir: &Path) -> Value {
    fs::create_dir_all(dir).unwrap();
    let body = format!(
        r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        s(&dir.join("vmstate")),
        s(&dir.join("memory"))
    );
    let (code, resp) = api(sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(
        code,
        200,
        "snapshot create {kind} into {}: {resp}",
        dir.display()
    );
    serde_json::from_str(&resp).expect("snapshot stats JSON")
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":{resume}}}"#,
        s(state),
        s(mem)
    )
}

/// Boots the guest kernel directly (pvm profile) with an API socket.
fn boot_direct(dir: &Path, name: &str, mem_mib: &str, extra: &[&str]) -> (Vmm, PathBuf, PathBuf) {
    let a = artifacts();
    let sock = dir.join(format!("{name}.sock"));
    let serial = dir.join(format!("{name}.serial"));
    let mut args = vec![
        "run",
        "--kernel",
        s(&a.kernel),
        "--vcpus",
        "1",
        "--mem-mib",
        mem_mib,
        "--serial-log",
        s(&serial),
        "--api-sock",
        s(&sock),
    ];
    args.extend_from_slice(extra);
    let mut vm = Vmm::spawn(dir, name, &args);
    vm.wait_api(&sock);
    (vm, sock, serial)
}

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

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the console log holds `needle`.
fn wait_serial(vm: &mut Vmm, serial: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !read(serial).contains(needle) {
        assert!(
            vm.alive(),
            "guest ended before {needle:?}: {}\n{}",
            vm.stderr(),
            tail(&read(serial), 20)
        );
        assert!(
            Instant::now() < deadline,
            "no {needle:?} after {timeout:?}:\n{}",
            tail(&read(serial), 20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
fn finish_restores(runs: &mut [(Vmm, PathBuf)], timeout: Duration) -> Vec<RestoreRun> {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let deadline = Instant::now() + timeout;
    let mut init_after: Vec<Option<Duration>> = vec![None; runs.len()];
    let mut codes: Vec<Option<Option<i32>>> = vec![None; runs.len()];
    while codes.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (vm, serial)) in runs.iter_mut().enumerate() {
            if init_after[i].is_none() && read(serial).contains(INIT_LINE) {
                init_after[i] = Some(vm.started.elapsed());
            }
            if codes[i].is_none() {
                if let Some(st) = vm.child.try_wait().unwrap() {
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
                vm.name,
                tail(&read(serial), 20)
            );
            RestoreRun {
                exit_code: code.flatten(),
                stderr: vm.stderr(),
                serial: read(serial),
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
    let dir = scratch("direct-boot");
    let rootfs = dir.join("rootfs.ext4");
    fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let (full, diff, at, merged) = (
        dir.join("full"),
        dir.join("diff"),
        dir.join("at"),
        dir.join("merged"),
    );
    let (mut vm, sock, serial) = boot_direct(
        &dir,
        "boot",
        "256",
        &["--rootfs", s(&rootfs), "--track-dirty-pages"],
    );
    wait_serial(&mut vm, &serial, P1_LINE, Duration::from_secs(240));
    pause(&sock);
    let p1 = vm.started.elapsed();
    let console_p1 = read(&serial);
    let full_stats = create(&sock, "Full", &full);
    std::thread::sleep(Duration::from_millis(300));
    let console_after_pause = read(&serial);
    resume(&sock);
    assert_eq!(vm_state(&sock), "Running");
    wait_serial(&mut vm, &serial, P2_LINE, Duration::from_secs(240));
    pause(&sock);
    let p2 = vm.started.elapsed();
    let console_p2 = read(&serial);
    assert!(
        !console_p2.contains("EXT4-fs (vda)"),
        "the root filesystem was mounted before P2"
    );
    let diff_stats = create(&sock, "Diff", &diff);
    // A full snapshot of the same paused moment: what the merge must reproduce.
    create(&sock, "Full", &at);
    vm.stop(&sock);

    // A diff on its own is refused; then merge it onto a copy of the P1 memory.
    let api_sock = dir.join("api.sock");
    let mut tool = Vmm::spawn(&dir, "api", &["run", "--api-sock", s(&api_sock)]);
    tool.wait_api(&api_sock);
    let diff_alone = api(
        &api_sock,
        "PUT",
        "/snapshot/load",
        Some(&load_body(
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
    tool.stop(&api_sock);

    // Both restores at once. The P1 one through `vmm run --restore` (same disk path: nothing
    // wrote it before P2); the merged one through the API with its own copy of the disk.
    let merged_disk = dir.join("merged-disk.ext4");
    fs::copy(&rootfs, &merged_disk).unwrap();
    let rf_serial = dir.join("from-full.serial");
    let from_full = Vmm::spawn(
        &dir,
        "from-full",
        &["run", "--restore", s(&full), "--serial-log", s(&rf_serial)],
    );
    let rm_serial = dir.join("from-merged.serial");
    let rm_sock = dir.join("from-merged.sock");
    let mut from_merged = Vmm::spawn(
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
    from_merged.wait_api(&rm_sock);
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

/// Compares two files' content.
fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
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
        !same_content(&b.full.join("memory"), &b.merged.join("memory")),
        "the diff changed nothing"
    );
    assert!(
        same_content(&b.merged.join("memory"), &b.at.join("memory")),
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
    let (mut vm, sock, _) = boot_direct(dir, "boot", mem_mib, &[]);
    sleep_until(vm.started, Duration::from_millis(1500));
    pause(&sock);
    let good = dir.join("good");
    create(&sock, "Full", &good);
    vm.stop(&sock);
    good
}

#[test]
fn direct_corrupt_snapshot_files_are_refused_clearly() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("corrupt");
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
    let mut vmm = Vmm::spawn(&dir, "api", &["run", "--api-sock", s(&sock)]);
    vmm.wait_api(&sock);
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
            Some(&load_body(state_path, mem_path, false)),
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
        Some(&load_body(&good_state, &mem, false)),
    );
    assert_eq!(code, 204, "intact snapshot after the failures: {body}");
    assert_eq!(vm_state(&sock), "Paused");
    vmm.stop(&sock);
    cleanup(&dir);
}

/// Writes a non-zero pattern into every all-zero page of `[from, to)` of `path` (memory the
/// guest never wrote: a kernel must not rely on its content), so the file has real data to
/// write. Returns the bytes written.
fn fill_zero_pages(path: &Path, from: u64, to: u64) -> u64 {
    use std::io::{Seek, SeekFrom};
    const PAGE: usize = 4096;
    const CHUNK: usize = 1 << 20;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut off = from;
    while off < to {
        let n = CHUNK.min((to - off) as usize);
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut buf[..n]).unwrap();
        let mut changed = false;
        for (i, page) in buf[..n].chunks_mut(PAGE).enumerate() {
            if page.iter().all(|&b| b == 0) {
                let tag = (off / PAGE as u64 + i as u64).to_le_bytes();
                for (j, b) in page.iter_mut().enumerate() {
                    *b = tag[j % 8] ^ 0xA5;
                }
                changed = true;
                written += PAGE as u64;
            }
        }
        if changed {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&buf[..n]).unwrap();
        }
        off += n as u64;
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

#[test]
fn direct_vmm_killed_mid_snapshot_leaves_the_previous_one_intact() {
    let _heavy = heavy();
    if !require_kvm() {
        return;
    }
    let dir = scratch("kill");
    let base = small_snapshot(&dir, "1024");
    // Give the 1 GiB guest 512 MiB of non-zero memory so a snapshot takes a while.
    let layout = decode_state(&fs::read(base.join("vmstate")).unwrap(), "base").payload
        ["memory_layout"]["regions"]
        .clone();
    let region = layout
        .as_array()
        .and_then(|r| r.iter().max_by_key(|r| r["size"].as_u64()))
        .cloned()
        .expect("a memory region");
    let (off, size) = (
        region["file_offset"].as_u64().unwrap(),
        region["size"].as_u64().unwrap(),
    );
    assert!(size >= 768 << 20, "region {region}");
    let filled = fill_zero_pages(&base.join("memory"), off + size / 2, off + size);
    assert!(
        filled >= 256 << 20,
        "only {filled} bytes of zero pages to fill"
    );

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
    let snap = dir.join("snap");
    let t = Instant::now();
    let first = create(&sock, "Full", &snap);
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
            vm.child.kill().unwrap();
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
    let mut check = Vmm::spawn(
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
    check.wait_api(&sock2);
    let (code, body) = api(
        &sock2,
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state_path, &mem_path, true)),
    );
    assert_eq!(code, 204, "loading the previous snapshot: {body}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(check.alive(), "{}", check.stderr());
    assert_eq!(vm_state(&sock2), "Running");
    check.stop(&sock2);
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

#[test]
fn crc64_matches_the_reference_check_value() {
    assert_eq!(crc64_ecma(b"123456789"), 0x6C40_DF5F_0B49_7347);
}

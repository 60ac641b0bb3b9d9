//! The product commands end to end: named sandboxes and snapshots.
//!
//! With real guests (nested test host, where guest user space and the guest
//! agent run): `use NAME -- CMD` creating a sandbox and returning the
//! command's exit code; checkpoint before a risky change and restore it
//! (files and a running process come back); one snapshot branched into two
//! sandboxes that diverge; files installed in a sandbox, snapshotted and seen
//! by a new sandbox; diff and disk snapshots; listings in table and JSON;
//! deletion with and without -f; not-found exit codes; stop and start again;
//! logs; expiry; a scheduled snapshot, taken by the sandbox's own VMM; a
//! sandbox booted from a named image; an interrupted creation, shown as
//! failed and removed; a sandbox on a TAP device and a copy of it that must
//! get its own.
//!
//! Without a VM (any machine): the state directory (also given before the
//! subcommand), usage errors and exit codes, names checked before use (no
//! lock files for names that do not exist), disk snapshots of a stopped
//! sandbox, dependency-aware removal of several snapshots at once, expiry,
//! interrupted and legacy leftovers shown as failed and removable, restores
//! of a VM with a network interface needing a TAP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmm_tests::*;

const NESTED_LIB: &str = include_str!("../guest-progs/nested-lib.sh");

const SCENARIO: &str = r##"
set -u
export VMM_KERNEL=/guest/vmlinux VMM_ROOTFS=/guest/rootfs.ext4 VMM_STATE_DIR=/state
mkdir -p /state && mount -t tmpfs -o size=1800m tmpfs /state
# Helpers (now, since, run, oneline) are in guest-progs/nested-lib.sh.

# 1. use creates the sandbox and returns the command's exit code.
t0=$(now); run CREATE vmm use dev --mem-mib 128 -- sh -c 'echo hello-from-dev; exit 7'; echo "T_CREATE=$(since $t0)"
t0=$(now); run WARM vmm use dev -- true; echo "T_WARM=$(since $t0)"
run EXIT42 vmm use dev -- sh -c 'echo out; echo err >&2; exit 42'
run ENV vmm use dev --env FOO=bar --workdir /tmp -- sh -c 'echo "$FOO $(pwd)"'
echo piped | vmm use dev -i -- cat >/tmp/out 2>/tmp/err; echo "STDIN_OUT=$(oneline </tmp/out)"

# 1b. A sandbox from a named image (STATE/images/NAME).
mkdir -p /state/images/small
ln -s /guest/vmlinux /state/images/small/vmlinux
ln -s /guest/rootfs.ext4 /state/images/small/rootfs.ext4
run IMAGE vmm use img --image small --mem-mib 128 -- echo from-image
echo "IMAGE_STATUS=$(vmm status img -o json | grep '"image"' | tr -d ' ,')"
run IMAGE_MISSING vmm use img2 --image nope -- true
vmm rm -f img

# 2. Checkpoint before a risky change, then restore it.
vmm use dev -- sh -c 'echo precious > /root/data.txt; sync'
vmm use dev -- sh -c 'setsid sh -c "i=0; while :; do i=\$((i+1)); echo \$i > /tmp/counter; sleep 1; done" </dev/null >/dev/null 2>&1 &'
sleep 2
echo "COUNTER_BEFORE_SAVE=$(vmm use dev -- cat /tmp/counter)"
t0=$(now); run SAVE vmm snapshot save dev --name before-risky; echo "T_SAVE_FULL=$(since $t0)"
echo "PAUSED_STATUS=$(vmm status dev -o json | grep '"status"' | tr -d ' ,')"
run RISKY vmm use dev -- sh -c 'rm -f /root/data.txt; echo broken > /root/broken'
run GONE vmm use dev -- cat /root/data.txt
run RM_RUNNING vmm rm dev
run RM_FORCE vmm rm -f dev
t0=$(now); run RESTORE vmm snapshot restore before-risky --into dev; echo "T_RESTORE=$(since $t0)"
run RESTORED_DATA vmm use dev -- cat /root/data.txt
run RESTORED_BROKEN vmm use dev -- sh -c 'test -e /root/broken; echo $?'
c1=$(vmm use dev -- cat /tmp/counter 2>/tmp/c1.err); sleep 2; c2=$(vmm use dev -- cat /tmp/counter)
echo "COUNTER_READ_ERR=$(oneline </tmp/c1.err)"
echo "DEV_VMM_LOG=$(tail -n 5 /state/sandboxes/dev/vmm.log | oneline)"
echo "COUNTER_RESTORED=$c1"
echo "COUNTER_ADVANCES=$([ -n "$c1" ] && [ -n "$c2" ] && [ "$c2" -gt "$c1" ] && echo yes || echo "no:$c1:$c2")"

# 3. One snapshot branched into two sandboxes that diverge.
vmm use dev -- sh -c 'echo base > /root/branch.txt'
run BRANCH_SAVE vmm snapshot save dev --name branch-point --resume-source
echo "SOURCE_STATUS=$(vmm status dev -o json | grep '"status"' | tr -d ' ,')"
t0=$(now); run LEFT vmm snapshot restore branch-point --into left; echo "T_RESTORE_LEFT=$(since $t0)"
run RIGHT vmm use right --snapshot branch-point -- sh -c 'echo right >> /root/branch.txt'
vmm use left -- sh -c 'echo left >> /root/branch.txt'
run LEFT_FILE vmm use left -- cat /root/branch.txt
run RIGHT_FILE vmm use right -- cat /root/branch.txt
run DEV_FILE vmm use dev -- cat /root/branch.txt

# 4. Files installed in a sandbox, snapshotted, seen by a new sandbox.
vmm use left -- sh -c 'mkdir -p /opt/tool && printf "#!/bin/sh\necho tool-v1 \$1\n" > /opt/tool/run && chmod +x /opt/tool/run'
run TOOL_SAVE vmm snapshot save left --name with-tool --resume-source -o json
run TOOL vmm use fresh --snapshot with-tool -- /opt/tool/run ok
vmm rm -f fresh

# 5. A diff snapshot on top of with-tool (left's previous snapshot).
vmm use left -- sh -c 'echo diffdata > /root/diff.txt; echo in-memory > /tmp/mem.txt'
t0=$(now); run DIFF vmm snapshot save left --name left-diff --type diff --resume-source -o json; echo "T_SAVE_DIFF=$(since $t0)"
echo "LEFT_DISK_SIZE=$(stat -c %s /state/sandboxes/left/disk.ext4)"
t0=$(now); run FROMDIFF vmm use fromdiff --snapshot left-diff -- sh -c 'cat /root/diff.txt /tmp/mem.txt; /opt/tool/run x'; echo "T_RESTORE_DIFF=$(since $t0)"
# The page cache dropped, files come from the disk rebuilt from with-tool's disk and left-diff's chunks.
run FROMDIFF_DISK vmm use fromdiff -- sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches && cat /root/diff.txt && /opt/tool/run x'
vmm rm -f fromdiff
# A second diff on the first: the disk is rebuilt from a chain of two diffs.
vmm use left -- sh -c 'echo second > /root/diff2.txt; echo diffdata-2 > /root/diff.txt'
run DIFF2 vmm snapshot save left --name left-diff2 --type diff --resume-source -o json
run FROMDIFF2 vmm use fromdiff2 --snapshot left-diff2 -- sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches && cat /root/diff.txt /root/diff2.txt && /opt/tool/run y'
vmm rm -f fromdiff2
run RM_DEP vmm snapshot rm with-tool
run RM_DEP_FORCE vmm snapshot rm -f with-tool

# 6. A disk-only snapshot boots a new sandbox from the disk.
vmm use right -- sh -c 'echo on-disk > /root/disk.txt'
run DISK vmm snapshot save right --name right-disk --type disk --resume-source -o json
run FROMDISK vmm use fromdisk --mem-mib 128 --snapshot right-disk -- cat /root/disk.txt /root/branch.txt

# 7. Stop and start again (a fresh boot from the sandbox's disk).
run STOP vmm stop fromdisk
echo "STOPPED_STATUS=$(vmm status fromdisk -o json | grep '"status"' | tr -d ' ,')"
run AFTER_STOP vmm use fromdisk -- cat /root/disk.txt
echo "CONSOLE_READY=$(vmm logs fromdisk | grep -c VMM-GUEST-READY)"
echo "CONSOLE_TAIL=$(vmm logs fromdisk --tail 1 | oneline)"
vmm logs fromdisk --follow >/tmp/follow.txt & fp=$!
vmm use fromdisk -- sh -c 'echo FOLLOW-MARK > /dev/console'
sleep 1
run STOP2 vmm stop fromdisk
sleep 1
echo "FOLLOW_ENDED=$(kill -0 $fp 2>/dev/null && echo no || echo yes)"
echo "FOLLOW_MARK=$(grep -c FOLLOW-MARK /tmp/follow.txt)"
vmm rm fromdisk

# 8. Listings.
echo "LS_JSON=$(vmm ls -o json | tr -d '\n')"
echo "SNAP_LS_JSON=$(vmm snapshot ls -o json | tr -d '\n')"
vmm ls >/tmp/ls.txt; echo "LS_TABLE=$(oneline </tmp/ls.txt)"
vmm snapshot ls >/tmp/sls.txt; echo "SNAP_LS_TABLE=$(oneline </tmp/sls.txt)"

# 9. Not found, bad names, logs.
run NF_SNAP vmm use ghost --snapshot missing -- true
run NF_STOP vmm stop ghost
run NF_LOGS vmm logs ghost
run NF_SNAP_RM vmm snapshot rm missing
run NF_RESTORE vmm snapshot restore missing --into x
run BAD_NAME vmm use Bad_Name -- true
run LOGS_EXEC vmm logs dev --exec --tail 2

# 10. Expiry: an expired snapshot is removed by gc (and by any command).
run SHORT vmm snapshot save right --name short-lived --type disk --expires-in 6s --resume-source
run SHORT2 vmm snapshot save right --name short-lived-2 --type disk --expires-in 6s --resume-source
echo "SHORT_LISTED=$(vmm snapshot ls | grep -c '^short-lived')"
sleep 7
run GC vmm snapshot gc
echo "SHORT_AFTER_GC=$(vmm snapshot ls | grep -c '^short-lived')"

# 11. A scheduled snapshot every 5 seconds.
run SCHED vmm snapshot schedule right --cron '@every 5s' --expires-in 1h
sleep 13
run SCHED_OFF vmm snapshot schedule right --off
echo "SCHED_COUNT=$(vmm snapshot ls | grep -c '^right-20')"
echo "SCHED_READY=$(vmm snapshot ls | grep '^right-20' | grep -c ready)"
echo "SCHED_LOG=$(grep scheduler /state/sandboxes/right/vmm.log | oneline)"
# Taken by the sandbox's VMM process itself (no separate scheduler process).
echo "RIGHT_PID=$(vmm status right -o json | grep '"pid"' | tr -dc 0-9)"
echo "SCHED_CREATORS=$(cat /state/snapshots/right-20*/meta.json | grep '"creator_pid"' | tr -dc '0-9\n' | sort -u | tr '\n' ' ')"
echo "RIGHT_AFTER_SCHED=$(vmm status right -o json | grep '"status"' | tr -d ' ,')"

# 12. An interrupted creation (the creating process killed while the guest
# boots) is listed as failed, refused by use, and removed by rm -f.
vmm use cut --mem-mib 128 -- true >/dev/null 2>&1 & cp=$!
i=0; until vmm status cut -o json 2>/dev/null | grep -q '"creating"' || [ $i -gt 300 ]; do i=$((i+1)); sleep 0.1; done
kill -TERM $cp; wait $cp 2>/dev/null
echo "CUT_STATUS=$(vmm status cut -o json | grep '"status"' | tr -d ' ,')"
echo "CUT_LS=$(vmm ls | grep -c '^cut  *failed')"
run CUT_USE vmm use cut -- true
run CUT_RM vmm rm -f cut
echo "CUT_GONE=$(vmm ls | grep -c '^cut')"

# 13. A sandbox on a TAP device (the VMM creates it); a copy of its snapshot
# needs a TAP of its own and keeps the guest's MAC address.
run NET vmm use net1 --mem-mib 128 --tap vmmtap1 --mac 02:00:00:00:00:11 -- cat /sys/class/net/eth0/address
echo "NET_STATUS=$(vmm status net1 -o json | grep '"tap"' | tr -d ' ,')"
echo "NET_HOST_TAP=$([ -e /sys/class/net/vmmtap1 ] && echo yes || echo no)"
run NET_SAVE vmm snapshot save net1 --name net-snap --resume-source
run NET_NOTAP vmm snapshot restore net-snap --into net2
run NET_SAME vmm snapshot restore net-snap --into net2 --tap vmmtap1
run NET_RESTORE vmm use net2 --snapshot net-snap --tap vmmtap2 -- cat /sys/class/net/eth0/address
echo "NET2_STATUS=$(vmm status net2 -o json | grep '"tap"' | tr -d ' ,')"
vmm rm -f net2
# Two restores at once asking for one TAP: one gets it, the other the clear error.
vmm snapshot restore net-snap --into net3 --tap vmmtap3 >/tmp/r3 2>&1 & r3=$!
vmm snapshot restore net-snap --into net4 --tap vmmtap3 >/tmp/r4 2>&1; e4=$?
wait $r3; e3=$?
echo "NET_RACE=$e3$e4"
echo "NET_RACE_ERR=$(cat /tmp/r3 /tmp/r4 | oneline)"
vmm rm -f net3 2>/dev/null; vmm rm -f net4 2>/dev/null
vmm rm -f net1; vmm snapshot rm net-snap >/dev/null

for s in dev left right; do vmm rm -f $s; done
echo "LS_END=$(vmm ls | oneline)"
# Lock files exist only for entries that exist (removals and expiry unlink theirs).
orphans=""
for f in /state/locks/*.lock; do
  b=${f##*/}; n=${b%.lock}
  case $b in
    store.lock) ;;
    sandbox-*) [ -e "/state/sandboxes/${n#sandbox-}" ] || orphans="$orphans $b" ;;
    snapshot-*) [ -e "/state/snapshots/${n#snapshot-}" ] || orphans="$orphans $b" ;;
    *) orphans="$orphans $b" ;;
  esac
done
echo "ORPHAN_LOCKS=${orphans:-none}"
echo "VMM_PROCS_LEFT=$(ps | grep -c '[v]mm run')"
"##;

/// Asserts `KEY_EXIT` and that `KEY_OUT` equals `out` (lines joined by '|').
fn expect(run: &NestedRun, key: &str, code: i32, out: Option<&str>) {
    let got = run.get(&format!("{key}_EXIT"));
    let err = run.marker(&format!("{key}_ERR")).unwrap_or_default();
    assert_eq!(
        got,
        code.to_string(),
        "{}",
        run.failure(&format!(
            "{key}: exit {got}, expected {code}; stderr: {err}"
        ))
    );
    if let Some(out) = out {
        let got = run.get(&format!("{key}_OUT"));
        assert_eq!(got, out, "{}", run.failure(&format!("{key} stdout")));
    }
}

fn err_of(run: &NestedRun, key: &str) -> String {
    run.marker(&format!("{key}_ERR")).unwrap_or_default()
}

/// Asserts `KEY_EXIT` and that `KEY_ERR` contains `needle`.
fn expect_err(run: &NestedRun, key: &str, code: i32, needle: &str) {
    expect(run, key, code, None);
    let err = err_of(run, key);
    assert!(
        err.contains(needle),
        "{}",
        run.failure(&format!("{key}: {err}"))
    );
}

#[test]
fn nested_sandbox_and_snapshot_scenarios() {
    let mut opts = NestedOptions::new("product").timeout(Duration::from_secs(900));
    opts.mem_mib = 3072;
    let run = run_nested(&format!("{NESTED_LIB}\n{SCENARIO}"), opts);
    run.assert_success();

    // 1. use: creation, exit codes, output, env, workdir, stdin.
    expect(&run, "CREATE", 7, Some("hello-from-dev|"));
    expect(&run, "WARM", 0, Some(""));
    expect(&run, "EXIT42", 42, Some("out|"));
    assert_eq!(err_of(&run, "EXIT42"), "err|");
    expect(&run, "ENV", 0, Some("bar /tmp|"));
    run.assert_marker("STDIN_OUT", "piped|");

    // 1b. Images.
    expect(&run, "IMAGE", 0, Some("from-image|"));
    run.assert_marker("IMAGE_STATUS", "\"image\":\"small\"");
    expect_err(
        &run,
        "IMAGE_MISSING",
        1,
        "no image named \"nope\"; available: small, default",
    );

    // 2. Checkpoint and restore; the source is paused after a snapshot.
    expect(&run, "SAVE", 0, Some("before-risky|"));
    run.assert_marker("PAUSED_STATUS", "\"status\":\"paused\"");
    expect(&run, "RISKY", 0, None);
    expect(&run, "GONE", 1, None);
    expect_err(&run, "RM_RUNNING", 1, "stop it first or use -f");
    expect(&run, "RM_FORCE", 0, None);
    expect(&run, "RESTORE", 0, None);
    expect(&run, "RESTORED_DATA", 0, Some("precious|"));
    expect(&run, "RESTORED_BROKEN", 0, Some("1|"));
    run.assert_marker("COUNTER_ADVANCES", "yes");

    // 3. Branches diverge; the source keeps running with --resume-source.
    expect(&run, "BRANCH_SAVE", 0, Some("branch-point|"));
    run.assert_marker("SOURCE_STATUS", "\"status\":\"running\"");
    expect(&run, "LEFT", 0, None);
    expect(&run, "RIGHT", 0, None);
    expect(&run, "LEFT_FILE", 0, Some("base|left|"));
    expect(&run, "RIGHT_FILE", 0, Some("base|right|"));
    expect(&run, "DEV_FILE", 0, Some("base|"));

    // 4. Installed files come along.
    expect(&run, "TOOL_SAVE", 0, None);
    expect(&run, "TOOL", 0, Some("tool-v1 ok|"));

    // 5. Diff snapshot: parent recorded, memory and disk restored, and
    // removal honors the dependency.
    expect(&run, "DIFF", 0, None);
    let diff: Value = serde_json::from_str(&run.get("DIFF_OUT").replace('|', "")).unwrap();
    assert_eq!(diff["type"], "diff");
    assert_eq!(diff["parent"], "with-tool");
    assert_eq!(diff["status"], "ready");
    expect(&run, "FROMDIFF", 0, Some("diffdata|in-memory|tool-v1 x|"));
    // The diff stores only the disk chunks that changed since with-tool.
    let disk_size: u64 = run.get("LEFT_DISK_SIZE").parse().unwrap();
    assert_eq!(diff["disk_copy"], "diff", "{diff}");
    let diff_disk = diff["disk_bytes"].as_u64().unwrap();
    assert!(
        diff["disk_changed_chunks"].as_u64().unwrap() > 0 && diff_disk > 0,
        "the guest wrote /root/diff.txt: {diff}"
    );
    assert!(
        diff_disk * 16 < disk_size,
        "diff disk part {diff_disk} bytes, disk {disk_size}"
    );
    assert!(diff["size_bytes"].as_u64().unwrap() >= diff_disk);
    expect(&run, "FROMDIFF_DISK", 0, Some("diffdata|tool-v1 x|"));
    expect(&run, "DIFF2", 0, None);
    let diff2: Value = serde_json::from_str(&run.get("DIFF2_OUT").replace('|', "")).unwrap();
    assert_eq!(diff2["parent"], "left-diff");
    assert!(
        diff2["disk_bytes"].as_u64().unwrap() * 16 < disk_size,
        "{diff2}"
    );
    expect(&run, "FROMDIFF2", 0, Some("diffdata-2|second|tool-v1 y|"));
    expect_err(&run, "RM_DEP", 1, "left-diff");
    expect(
        &run,
        "RM_DEP_FORCE",
        0,
        Some("left-diff2|left-diff|with-tool|"),
    );

    // 6. Disk snapshot.
    expect(&run, "DISK", 0, None);
    let disk: Value = serde_json::from_str(&run.get("DISK_OUT").replace('|', "")).unwrap();
    assert_eq!(disk["type"], "disk");
    assert!(
        disk["guest_sync"]
            .as_str()
            .unwrap_or_default()
            .starts_with("frozen"),
        "{disk}"
    );
    expect(&run, "FROMDISK", 0, Some("on-disk|base|right|"));

    // 7. Stop and start.
    expect(&run, "STOP", 0, None);
    run.assert_marker("STOPPED_STATUS", "\"status\":\"stopped\"");
    expect(&run, "AFTER_STOP", 0, Some("on-disk|"));
    // The console log of the second boot (the log starts again per boot).
    run.assert_marker("CONSOLE_READY", "1");
    assert_eq!(run.get("CONSOLE_TAIL").matches('|').count(), 1);
    // --follow prints what the guest writes and ends when the sandbox stops.
    expect(&run, "STOP2", 0, None);
    run.assert_marker("FOLLOW_MARK", "1");
    run.assert_marker("FOLLOW_ENDED", "yes");

    // 8. Listings.
    let ls: Value = serde_json::from_str(&run.get("LS_JSON")).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "left", "right"]);
    assert!(ls
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "running" && s["mem_mib"] == 128));
    let snaps: Value = serde_json::from_str(&run.get("SNAP_LS_JSON")).unwrap();
    let snap_names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(snap_names, ["before-risky", "branch-point", "right-disk"]);
    assert!(snaps
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "ready" && s["size_bytes"].as_u64().unwrap() > 0));
    let table = run.get("LS_TABLE");
    let rows: Vec<&str> = table.split('|').filter(|l| !l.is_empty()).collect();
    assert_eq!(
        rows[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATUS", "CPU", "MEMORY", "CREATED"]
    );
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[1].starts_with("dev ") && rows[1].contains("running"));
    let stable = run.get("SNAP_LS_TABLE");
    assert!(
        stable.starts_with("NAME") && stable.contains("SANDBOX") && stable.contains("EXPIRES"),
        "{stable}"
    );

    // 9. Not found is exit 3, a bad name is 1.
    for key in ["NF_SNAP", "NF_STOP", "NF_LOGS", "NF_SNAP_RM", "NF_RESTORE"] {
        expect(&run, key, 3, None);
        let err = err_of(&run, key);
        assert!(
            err.starts_with("vmm: no s") && err.matches('|').count() == 1,
            "{key}: one clear line expected: {err}"
        );
    }
    expect(&run, "BAD_NAME", 1, None);
    expect(&run, "LOGS_EXEC", 0, None);
    let history = run.get("LOGS_EXEC_OUT");
    assert_eq!(history.matches('|').count(), 2, "{history}");
    assert!(history.contains("exit=0"), "{history}");

    // 10. Expiry.
    expect(&run, "SHORT", 0, None);
    run.assert_marker("SHORT_LISTED", "2");
    expect(&run, "GC", 0, Some("short-lived|short-lived-2|"));
    run.assert_marker("SHORT_AFTER_GC", "0");

    // 11. Schedule: at least one automatic snapshot, ready, and the source
    // still running.
    expect(&run, "SCHED", 0, None);
    assert!(run.get("SCHED_OUT").starts_with("next snapshot at "));
    expect(&run, "SCHED_OFF", 0, None);
    let count: u32 = run.get("SCHED_COUNT").parse().unwrap();
    let ready: u32 = run.get("SCHED_READY").parse().unwrap();
    assert!(
        (1..=3).contains(&count) && ready == count,
        "{}",
        run.failure(&format!(
            "scheduled snapshots: {count}, ready {ready}; log: {}",
            run.get("SCHED_LOG")
        ))
    );
    run.assert_marker("RIGHT_AFTER_SCHED", "\"status\":\"running\"");
    let right_pid = run.get("RIGHT_PID");
    assert!(!right_pid.is_empty(), "{}", run.failure("no pid of right"));
    assert_eq!(
        run.get("SCHED_CREATORS").trim(),
        right_pid,
        "{}",
        run.failure("scheduled snapshots must be taken by the sandbox's VMM")
    );

    // 12. Interrupted creation.
    run.assert_marker("CUT_STATUS", "\"status\":\"failed\"");
    run.assert_marker("CUT_LS", "1");
    expect_err(&run, "CUT_USE", 1, "creation was interrupted");
    expect(&run, "CUT_RM", 0, None);
    run.assert_marker("CUT_GONE", "0");

    // 13. TAP networking.
    expect(&run, "NET", 0, Some("02:00:00:00:00:11|"));
    run.assert_marker("NET_STATUS", "\"tap\":\"vmmtap1\"");
    run.assert_marker("NET_HOST_TAP", "yes");
    expect(&run, "NET_SAVE", 0, None);
    expect_err(&run, "NET_NOTAP", 1, "on TAP vmmtap1 of sandbox net1");
    expect_err(&run, "NET_SAME", 1, "TAP vmmtap1 is sandbox net1's");
    expect(&run, "NET_RESTORE", 0, Some("02:00:00:00:00:11|"));
    run.assert_marker("NET2_STATUS", "\"tap\":\"vmmtap2\"");
    // One of two concurrent creations gets the TAP; the other is told whose
    // it is (the check and the record are one step under the store lock).
    let race = run.get("NET_RACE");
    let race_err = run.get("NET_RACE_ERR");
    let loser_msg = match race.as_str() {
        "01" => "TAP vmmtap3 is sandbox net3's",
        "10" => "TAP vmmtap3 is sandbox net4's",
        _ => panic!(
            "{}",
            run.failure(&format!("TAP race: exits {race}: {race_err}"))
        ),
    };
    assert!(
        race_err.contains(loser_msg),
        "{}",
        run.failure(&format!("TAP race: {race_err}"))
    );

    run.assert_marker("LS_END", "NAME  STATUS  CPU  MEMORY  CREATED|");
    run.assert_marker("ORPHAN_LOCKS", "none");
    run.assert_marker("VMM_PROCS_LEFT", "0");

    for key in [
        "T_CREATE",
        "T_WARM",
        "T_SAVE_FULL",
        "T_RESTORE",
        "T_RESTORE_LEFT",
        "T_SAVE_DIFF",
        "T_RESTORE_DIFF",
    ] {
        println!(
            "nested (not a performance figure): {key} = {} s",
            run.get(key)
        );
    }
}

/// Runs the vmm binary with a state directory; (exit code, stdout, stderr).
fn vmm(state: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(vmm_binary());
    cmd.args(args)
        .env("VMM_STATE_DIR", state)
        .env_remove("VMM_KERNEL")
        .env_remove("VMM_ROOTFS");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(!out.timed_out, "vmm {args:?} timed out");
    (
        out.output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.output.stdout).into_owned(),
        String::from_utf8_lossy(&out.output.stderr).into_owned(),
    )
}

fn state_dir(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("product-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stopped sandbox as `vmm use` leaves one after `vmm stop`.
fn stopped_sandbox(state: &Path, name: &str) {
    let dir = state.join("sandboxes").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = std::fs::File::create(dir.join("disk.ext4")).unwrap();
    disk.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    disk.write_all_at(b"disk-bytes", 1 << 20).unwrap();
    let meta = serde_json::json!({
        "name": name, "created": 1_700_000_000, "kernel": "/nonexistent/vmlinux",
        "cmdline": "console=ttyS0", "vcpus": 1, "mem_mib": 128,
        "origin": {"kind": "boot", "rootfs": "/nonexistent/rootfs.ext4"}
    });
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
}

#[test]
fn commands_without_a_vm() {
    let state = state_dir("novm");
    let s = state.as_path();

    let (code, out, err) = vmm(s, &["ls"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "NAME  STATUS  CPU  MEMORY  CREATED\n"),
        "{err}"
    );
    let (code, out, _) = vmm(s, &["ls", "-o", "json"]);
    assert_eq!((code, out.trim()), (0, "[]"));

    // --state-dir before the subcommand as well as after it.
    let other = s.join("other-state");
    for args in [
        &["--state-dir", other.to_str().unwrap(), "ls"][..],
        &["snapshot", "ls", "--state-dir", other.to_str().unwrap()],
    ] {
        let (code, out, err) = vmm(s, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.starts_with("NAME"), "{out}");
    }
    assert!(other.join("sandboxes").is_dir() && other.join("snapshots").is_dir());

    // Not found: 3, one line.
    for args in [
        &["stop", "ghost"][..],
        &["rm", "ghost"],
        &["logs", "ghost"],
        &["status", "ghost"],
        &["snapshot", "rm", "ghost"],
        &["snapshot", "save", "ghost"],
        &["snapshot", "restore", "ghost", "--into", "x"],
        &["use", "x", "--snapshot", "ghost", "--", "true"],
        &["snapshot", "schedule", "ghost", "--off"],
    ] {
        let (code, _, err) = vmm(s, args);
        assert_eq!(code, 3, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("vmm: no s"), "{args:?}: {err}");
    }
    // Names are checked before they are used in a path: a usage error, one
    // line.
    for args in [
        &["status", "../snapshots/x"][..],
        &["logs", "../x"],
        &["stop", "a/b"],
        &["rm", ".."],
        &["use", "x", "--snapshot", "../x", "--", "true"],
        &["snapshot", "restore", "../x", "--into", "y"],
        &["snapshot", "rm", "ok", "../x"],
        &["snapshot", "save", "x", "--name", "../y"],
    ] {
        let (code, _, err) = vmm(s, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(" name \""), "{args:?}: {err}");
    }
    // None of this made a lock file (or anything else) for those names.
    let locks: Vec<String> = std::fs::read_dir(s.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(locks, ["store.lock"], "{locks:?}");
    assert_eq!(std::fs::read_dir(s.join("sandboxes")).unwrap().count(), 0);
    // Usage and validation errors: 1.
    for (args, want) in [
        (
            &["use", "Bad_Name", "--", "true"][..],
            "sandbox name \"Bad_Name\"",
        ),
        (
            &["snapshot", "save", "x", "--expires-in", "5y"],
            "unknown unit 'y'",
        ),
        (
            &["snapshot", "schedule", "x", "--cron", "61 * * * *"],
            "minute field",
        ),
        (
            &["snapshot", "save", "x", "--type", "tiny"],
            "invalid value 'tiny'",
        ),
        (&["snapshot", "rm"], "required"),
        (
            &["use", "x", "--image", "nope", "--", "true"],
            "no image named \"nope\"; available: default",
        ),
        (
            &["use", "x", "--image", "a", "--kernel", "/k", "--", "true"],
            "cannot be used with",
        ),
        (&["use", "x", "--env", "NOVALUE", "--", "true"], "KEY=VALUE"),
        (&["use", "x", "--tap", "a/b", "--", "true"], "TAP name"),
        (
            &["use", "x", "--mac", "02:00:00:00:00:01", "--", "true"],
            "--tap",
        ),
    ] {
        let (code, _, err) = vmm(s, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // No guest anywhere: a clear error naming every way to give one.
    let mut cmd = Command::new(vmm_binary());
    cmd.args(["use", "fresh", "--", "true"])
        .env("VMM_STATE_DIR", s)
        .env("VMM_CACHE", s.join("empty-cache"))
        .env_remove("VMM_KERNEL");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.output.status.code(), Some(1));
    assert!(
        out.stderr()
            .contains("no guest kernel: give --kernel, set VMM_KERNEL"),
        "{}",
        out.stderr()
    );
    assert!(!s.join("sandboxes/fresh").exists());

    // A stopped sandbox: listed, disk-only snapshots work, memory ones refuse.
    stopped_sandbox(s, "cold");
    let (code, out, _) = vmm(s, &["ls"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("cold  stopped  1    128 MiB  "),
        "{out}"
    );
    let (code, _, err) = vmm(s, &["snapshot", "save", "cold"]);
    assert_eq!(code, 1);
    assert!(err.contains("is stopped"), "{err}");
    let (code, out, err) = vmm(
        s,
        &[
            "snapshot", "save", "cold", "--type", "disk", "--name", "keep", "-o", "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["guest_sync"].as_str()),
        (Some("ready"), Some("skipped"))
    );
    let copy = std::fs::read(s.join("snapshots/keep/disk")).unwrap();
    assert_eq!(&copy[1 << 20..(1 << 20) + 10], b"disk-bytes");
    assert_eq!(copy.len(), 64 << 20);
    // An automatic name, and a name clash.
    let (code, out, _) = vmm(
        s,
        &[
            "snapshot",
            "save",
            "cold",
            "--type",
            "disk",
            "--expires-in",
            "1s",
        ],
    );
    assert_eq!(code, 0);
    let auto = out.trim().to_string();
    assert!(
        auto.starts_with("cold-") && auto.len() == "cold-YYYYMMDD-HHMMSS".len(),
        "{auto}"
    );
    let (code, _, err) = vmm(
        s,
        &[
            "snapshot", "save", "cold", "--type", "disk", "--name", "keep",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("snapshot keep already exists"), "{err}");

    // Dependencies: a diff on `keep` blocks its removal without -f.
    let dep = s.join("snapshots/keep-diff");
    std::fs::create_dir_all(&dep).unwrap();
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(s.join("snapshots/keep/meta.json")).unwrap())
            .unwrap();
    meta["name"] = "keep-diff".into();
    meta["kind"] = "diff".into();
    meta["parent"] = "keep".into();
    std::fs::write(dep.join("meta.json"), meta.to_string()).unwrap();
    let (code, _, err) = vmm(s, &["snapshot", "rm", "keep"]);
    assert_eq!(code, 1);
    assert!(err.contains("keep-diff") && err.contains("-f"), "{err}");

    // A restored VM keeps its network interface: a copy needs its own TAP.
    let net = s.join("snapshots/net-full");
    std::fs::create_dir_all(&net).unwrap();
    let mut nmeta = meta.clone();
    nmeta["name"] = "net-full".into();
    nmeta["kind"] = "full".into();
    nmeta["parent"] = Value::Null;
    nmeta["net"] = serde_json::json!({"tap": "tap0"});
    std::fs::write(net.join("meta.json"), nmeta.to_string()).unwrap();
    let (code, _, err) = vmm(s, &["snapshot", "restore", "net-full", "--into", "copy"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has a network interface (on TAP tap0 of sandbox cold)")
            && err.contains("--tap"),
        "{err}"
    );
    let (code, _, err) = vmm(
        s,
        &[
            "snapshot", "restore", "keep", "--into", "copy2", "--tap", "t1", "--mac", "zz",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(!s.join("sandboxes/copy").exists() && !s.join("locks/sandbox-copy.lock").exists());
    let (code, out, err) = vmm(s, &["snapshot", "rm", "net-full"]);
    assert_eq!((code, out.as_str()), (0, "net-full\n"), "{err}");
    let (code, out, _) = vmm(s, &["snapshot", "ls"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("keep-diff") && out.contains("\nkeep "),
        "{out}"
    );

    // Expiry: the 1s snapshot disappears on the next command.
    std::thread::sleep(Duration::from_millis(2100));
    let (code, out, _) = vmm(s, &["snapshot", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    let names: Vec<String> = serde_json::from_str::<Vec<Value>>(&out)
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["keep", "keep-diff"], "{out}");

    // Several at once: all checked first, then removed children first.
    let (code, out, err) = vmm(s, &["snapshot", "rm", "keep", "missing"]);
    assert_eq!((code, out.as_str()), (3, ""), "{err}");
    let (code, out, err) = vmm(s, &["snapshot", "rm", "keep", "keep-diff"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "keep-diff\nkeep\n");

    // A sandbox directory copied by hand holds another sandbox's metadata:
    // refused (one line, exit 1), and removing the copy never removes the
    // original.
    let copy = s.join("sandboxes/cold-copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(s.join("sandboxes/cold/meta.json"), copy.join("meta.json")).unwrap();
    for args in [
        &["rm", "cold-copy"][..],
        &["rm", "-f", "cold-copy"],
        &["status", "cold-copy"],
    ] {
        let (code, _, err) = vmm(s, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("it is the metadata of sandbox \"cold\", not \"cold-copy\""),
            "{args:?}: {err}"
        );
    }
    // A listing names it on stderr and shows the others.
    let (code, out, err) = vmm(s, &["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with("cold ")), "{out}");
    assert!(!out.contains("cold-copy"), "{out}");
    assert!(
        err.contains("cold-copy") && err.contains("left out"),
        "{err}"
    );
    assert!(s.join("sandboxes/cold/disk.ext4").is_file());
    std::fs::remove_dir_all(&copy).unwrap();
    let (code, _, _) = vmm(s, &["rm", "cold"]);
    assert_eq!(code, 0);

    // Leftovers: an interrupted creation (its process gone) and directories
    // without metadata (older versions) are listed as failed and removable.
    stopped_sandbox(s, "cut");
    let cut_meta = s.join("sandboxes/cut/meta.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&cut_meta).unwrap()).unwrap();
    m["lifecycle"] = "creating".into();
    m["creator_pid"] = u32::MAX.into();
    std::fs::write(&cut_meta, m.to_string()).unwrap();
    std::fs::create_dir_all(s.join("sandboxes/legacy")).unwrap();
    std::fs::write(s.join("sandboxes/legacy/disk.ext4"), "d").unwrap();
    std::fs::create_dir_all(s.join("snapshots/old-snap")).unwrap();
    std::fs::write(s.join("snapshots/old-snap/disk"), "d").unwrap();
    let (code, out, _) = vmm(s, &["ls", "-o", "json"]);
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    let st: Vec<(&str, &str)> = listed
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["status"].as_str().unwrap()))
        .collect();
    assert_eq!(st, [("cut", "failed"), ("legacy", "failed")], "{out}");
    assert!(
        listed[0]["failure"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{out}"
    );
    let (code, _, err) = vmm(s, &["use", "cut", "--", "true"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("its creation was interrupted") && err.contains("`vmm rm cut`"),
        "{err}"
    );
    let (code, _, err) = vmm(s, &["use", "legacy", "--", "true"]);
    assert_eq!(code, 1);
    assert!(err.contains("sandbox legacy is not usable"), "{err}");
    let (code, out, _) = vmm(s, &["snapshot", "ls"]);
    assert_eq!(code, 0);
    assert!(out.contains("old-snap") && out.contains("failed"), "{out}");
    for args in [
        &["rm", "-f", "cut"][..],
        &["rm", "legacy"],
        &["snapshot", "rm", "old-snap"],
    ] {
        let (code, _, err) = vmm(s, args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    // Nothing is left, hidden directories and lock files included.
    assert_eq!(std::fs::read_dir(s.join("sandboxes")).unwrap().count(), 0);
    let locks: Vec<String> = std::fs::read_dir(s.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(locks, ["store.lock"], "{locks:?}");
    let (_, out, _) = vmm(s, &["snapshot", "ls", "-o", "json"]);
    assert_eq!(out.trim(), "[]");
    let (_, out, _) = vmm(s, &["status"]);
    assert!(
        out.contains("state_dir:") && out.contains("sandboxes:"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

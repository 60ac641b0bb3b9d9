//! The nested test host works: L1 boots, loads kvm_amd with nested virtualization, runs the
//! test script and reports its markers and exit status.

use std::time::Duration;

use vmm_tests::{run_nested, NestedOptions};

#[test]
fn nested_host_has_working_kvm() {
    let script = r#"
set -u
if [ -c /dev/kvm ] && [ -r /dev/kvm ]; then echo KVM_OK=1; else echo KVM_OK=0; fi
if dmesg | grep -qi 'Nested Virtualization enabled'; then echo NESTED_VIRT=1; fi
if dmesg | grep -qi 'Nested Paging enabled'; then echo NESTED_PAGING=1; fi
echo "SVM_FLAG=$(grep -c -w svm /proc/cpuinfo)"
echo "TUN=$([ -c /dev/net/tun ] && echo 1 || echo 0)"
for f in /guest/vmlinux /guest/rootfs.ext4 /data/hello.txt; do
    [ -s "$f" ] || { echo "MISSING=$f"; exit 3; }
done
echo "DATA=$(cat /data/hello.txt)"
# A dynamically linked host program (as vmm is) must find its libraries and loader in L1.
echo "JQ=$(echo '{"a":[1,2,3]}' | /usr/bin/jq -c '.a | length')"
exit 7
"#;
    let data = std::env::temp_dir().join(format!("vmm-nested-host-{}.txt", std::process::id()));
    std::fs::write(&data, "hello from the host\n").unwrap();
    // The vmm binary is left out so that this test of the harness does not depend on the VMM
    // compiling; it is shipped by the same path as the jq program here.
    let run = run_nested(
        script,
        NestedOptions::new("nested_host")
            .timeout(Duration::from_secs(120))
            .without_vmm()
            .program("/usr/bin/jq", "/usr/bin/jq")
            .file(&data, "/data/hello.txt"),
    );
    std::fs::remove_file(&data).unwrap();
    eprintln!(
        "nested run: {:.1}s total, run.sh started at {:.1}s (log {})",
        run.elapsed.as_secs_f64(),
        run.time_of("NESTED-RUN-START")
            .unwrap_or_default()
            .as_secs_f64(),
        run.log_path.display()
    );
    // A non-zero status must come through unchanged.
    assert_eq!(run.exit_code, Some(7), "{}", run.failure("expected exit 7"));
    assert!(run.l1_kvm(), "{}", run.failure("no /dev/kvm in L1"));
    run.assert_marker("KVM_OK", "1");
    run.assert_marker("NESTED_VIRT", "1");
    run.assert_marker("NESTED_PAGING", "1");
    run.assert_marker("TUN", "1");
    run.assert_marker("DATA", "hello from the host");
    run.assert_marker("JQ", "3");
    assert_eq!(run.marker("MISSING"), None);
    let svm_cpus: u32 = run
        .marker("SVM_FLAG")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(svm_cpus >= 1, "{}", run.failure("no svm flag in L1"));
}

#[test]
fn nested_script_timeout_is_reported() {
    let run = run_nested(
        "echo BEFORE=1; sleep 600; echo AFTER=1",
        NestedOptions::new("nested_timeout")
            .timeout(Duration::from_secs(3))
            .without_vmm()
            .without_guest(),
    );
    run.assert_marker("BEFORE", "1");
    assert_eq!(run.marker("AFTER"), None);
    run.assert_marker("NESTED-TIMEOUT", "3");
    // busybox timeout ends the script with SIGTERM.
    assert_eq!(run.exit_code, Some(143), "{}", run.failure("expected 143"));
}

/// L1 itself failing (here: a kernel panic on purpose) is retried once in a fresh L1, and a second
/// failure comes back as a run without an exit status that says both attempts failed.
#[test]
fn nested_host_that_dies_is_run_once_more_then_reported() {
    let run = run_nested(
        "echo ATTEMPT=1; echo c > /proc/sysrq-trigger; sleep 60; echo AFTER=1",
        NestedOptions::new("nested_dies")
            .timeout(Duration::from_secs(120))
            .without_vmm()
            .without_guest(),
    );
    run.assert_marker("ATTEMPT", "1");
    assert_eq!(run.marker("AFTER"), None);
    assert_eq!(run.exit_code, None, "{}", run.failure("expected no exit"));
    assert!(
        run.name.contains("second attempt") && run.name.contains("L1 died"),
        "{}",
        run.failure("expected the second attempt's report")
    );
}

/// An L1 whose heartbeat stops (here: the script kills it) is given up on after the configured
/// silence, long before the script's timeout, retried once, then reported as hung.
#[test]
#[should_panic(expected = "L1 hung (its heartbeat stopped)")]
fn nested_host_that_hangs_is_stopped_early_run_once_more_then_reported() {
    let script = r#"
s=$(pidof sleep); for p in $s; do kill "$(cut -d' ' -f4 /proc/$p/stat)" "$p"; done
echo KILLED=1; sleep 600
"#;
    let _ = run_nested(
        script,
        NestedOptions {
            heartbeat_silence: Duration::from_secs(15),
            ..NestedOptions::new("nested_hangs")
                .timeout(Duration::from_secs(600))
                .without_vmm()
                .without_guest()
        },
    );
}

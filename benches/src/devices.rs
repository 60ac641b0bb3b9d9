//! The `devices` scenario: virtio block, net (TAP) and vsock throughput.
//!
//! Guest user space cannot make system calls on kvm_pvm, so this runs in
//! the project's nested test host (QEMU TCG emulating AMD SVM, a Debian
//! kernel with kvm_amd) through the tests crate's `try_run_nested`, with
//! the script in `devices.sh`. The figures describe the emulator far more
//! than the vmm: every record carries [`NESTED_LABEL`].

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use vmm_tests::{NestedOptions, NestedRun, GUEST_CMDLINE};

use crate::error::{BenchError, Result};
use crate::machine::MachineInfo;
use crate::report::{metrics_out, Record};
use crate::stats::Metrics;

/// Shown with every figure of this scenario.
pub const NESTED_LABEL: &str = "nested (QEMU-emulated SVM; not a performance figure)";

/// The L1 script; placeholders are filled by [`script`].
const SCRIPT: &str = include_str!("devices.sh");

/// Knobs of the scenario.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Rounds of transfers (each round: every device, both ways).
    pub runs: usize,
    /// MiB per transfer.
    pub mib: u64,
    /// Guest memory, MiB (it holds a source file of `mib` MiB in tmpfs).
    pub guest_mem_mib: u64,
}

/// Guest vCPUs: one, like the tests crate's device tests (a 2-vCPU guest
/// under long device I/O in the nested host has an open triple-fault bug).
const GUEST_VCPUS: u8 = 1;

/// One measured quantity: its marker, metric name, and how to read it.
struct Figure {
    marker: &'static str,
    metric: &'static str,
    kind: Kind,
}

enum Kind {
    /// "BYTES MS" from the guest helper.
    BytesMs,
    /// `vsock-cat: <verb> BYTES bytes in SECS s`.
    VsockCat(&'static str),
}

const FIGURES: &[Figure] = &[
    Figure {
        marker: "BLK_WRITE",
        metric: "block_write",
        kind: Kind::BytesMs,
    },
    Figure {
        marker: "BLK_READ",
        metric: "block_read",
        kind: Kind::BytesMs,
    },
    Figure {
        marker: "NET_H2G",
        metric: "net_tcp_host_to_guest",
        kind: Kind::BytesMs,
    },
    Figure {
        marker: "NET_G2H",
        metric: "net_tcp_guest_to_host",
        kind: Kind::BytesMs,
    },
    Figure {
        marker: "VSOCK_H2G",
        metric: "vsock_host_to_guest",
        kind: Kind::VsockCat("received"),
    },
    Figure {
        marker: "VSOCK_G2H",
        metric: "vsock_guest_to_host",
        kind: Kind::VsockCat("sent"),
    },
];

/// What a reader needs to interpret the figures.
pub const NOTES: &[&str] = &[
    "nested (QEMU-emulated SVM; not a performance figure): L1 is a Debian kernel with kvm_amd under QEMU TCG; the numbers mostly measure the emulator",
    "timed inside the guest: block = dd bs=1M with O_DIRECT on a drive backed by a file in L1's tmpfs; net = busybox nc (guest, always the client) against socat in L1's network namespace over TAP; vsock = vmm-agent vsock-cat to/from socat on the host-side Unix socket",
    "guest clock is /proc/uptime (10 ms resolution); a sender's time ends when the receiver has read everything and closed",
];

/// The script with its placeholders filled.
pub fn script(s: &DeviceSettings) -> String {
    SCRIPT
        .replace("@MIB@", &s.mib.to_string())
        .replace("@RUNS@", &s.runs.to_string())
        .replace("@GUEST_MEM@", &s.guest_mem_mib.to_string())
        .replace("@CMDLINE@", GUEST_CMDLINE)
}

/// "BYTES MS" -> MiB/s.
fn rate_bytes_ms(value: &str) -> std::result::Result<f64, String> {
    let mut words = value.split_whitespace();
    let (Some(b), Some(m), None) = (words.next(), words.next(), words.next()) else {
        return Err(format!("expected \"BYTES MS\", got {value:?}"));
    };
    let bytes: u64 = b.parse().map_err(|_| format!("bad byte count {b:?}"))?;
    let ms: u64 = m.parse().map_err(|_| format!("bad milliseconds {m:?}"))?;
    rate(bytes, ms as f64 / 1000.0)
}

/// `vsock-cat: VERB BYTES bytes in SECS s` -> MiB/s.
fn rate_vsock_cat(value: &str, verb: &str) -> std::result::Result<f64, String> {
    let bad = || format!("expected \"vsock-cat: {verb} N bytes in S s\", got {value:?}");
    let rest = value
        .trim()
        .strip_prefix("vsock-cat: ")
        .and_then(|r| r.strip_prefix(verb))
        .ok_or_else(bad)?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let [bytes, "bytes", "in", secs, "s"] = words.as_slice() else {
        return Err(bad());
    };
    let bytes: u64 = bytes.parse().map_err(|_| bad())?;
    let secs: f64 = secs.parse().map_err(|_| bad())?;
    rate(bytes, secs)
}

fn rate(bytes: u64, secs: f64) -> std::result::Result<f64, String> {
    if bytes == 0 {
        return Err("no bytes moved".into());
    }
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!(
            "{bytes} bytes in {secs} s: too fast for the guest clock; use a larger --devices-mib"
        ));
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / secs)
}

/// The figures of a finished run: one MiB/s sample per round and device
/// direction. Every transfer must have moved `mib` MiB.
pub fn parse_figures(run: &NestedRun, s: &DeviceSettings) -> Result<Metrics> {
    let mut m = Metrics::default();
    for f in FIGURES {
        let values = run.markers(f.marker);
        if values.len() != s.runs {
            return Err(BenchError::Nested(run.failure(&format!(
                "{} {}= lines, expected {}",
                values.len(),
                f.marker,
                s.runs
            ))));
        }
        for v in values {
            let r = match f.kind {
                Kind::BytesMs => rate_bytes_ms(&v),
                Kind::VsockCat(verb) => rate_vsock_cat(&v, verb),
            };
            let mibps = r.map_err(|e| BenchError::Nested(format!("{}: {e}", f.marker)))?;
            m.push(f.metric, "MiB/s", mibps);
        }
    }
    // The bytes L1 received over TCP must be all the guest sent.
    let want = (s.mib * 1024 * 1024).to_string();
    for got in run.markers("NET_G2H_L1_BYTES") {
        if got != want {
            return Err(BenchError::Nested(format!(
                "L1 received {got} bytes over TCP, the guest sent {want}"
            )));
        }
    }
    Ok(m)
}

/// `qemu-system-x86_64 --version`'s first line.
fn qemu_version() -> String {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "QEMU (version unknown)".into())
}

/// Runs the scenario once in the nested host; always returns a record
/// (with `error` set when something failed).
pub fn run(s: &DeviceSettings, machine: &MachineInfo) -> Record {
    let opts = NestedOptions::new("vmm_bench_devices")
        .timeout(Duration::from_secs(240 + s.runs as u64 * s.mib * 4))
        .program("/usr/sbin/ip", "/opt/bin/ip")
        .program("/usr/bin/socat", "/opt/bin/socat");
    let (l1_mem, l1_cpus) = (opts.mem_mib, opts.cpus);
    let outcome = run_nested(&script(s), &opts);
    let mut details = serde_json::json!({
        "transfer_mib": s.mib,
        "guest_mem_mib": s.guest_mem_mib,
        "guest_vcpus": GUEST_VCPUS,
        "qemu": qemu_version(),
    });
    let result = outcome.and_then(|run| {
        let marker = |k: &str| run.marker(k).unwrap_or_else(|| "unknown".into());
        details["environment"] = serde_json::Value::String(format!(
            "L1: {}, -cpu max, {l1_cpus} vCPUs, {l1_mem} MiB; L1 kernel {} with kvm_amd; \
             guest kernel {}, {} MiB, {GUEST_VCPUS} vCPU; {} MiB per transfer",
            details["qemu"].as_str().unwrap_or("QEMU"),
            marker("L1_KERNEL"),
            marker("GUEST_KERNEL"),
            s.guest_mem_mib,
            s.mib
        ));
        details["l1_cpu"] = serde_json::Value::String(marker("L1_CPU"));
        details["guest_boot_ms"] = serde_json::Value::String(marker("BOOT_MS"));
        details["nested_wall_s"] = serde_json::json!(run.elapsed.as_secs_f64());
        details["serial_log"] = serde_json::json!(run.log_path);
        if !run.l1_kvm() {
            return Err(BenchError::Nested(run.failure("L1 has no /dev/kvm")));
        }
        if let Some(why) = run.marker("FAIL") {
            return Err(BenchError::Nested(run.failure(&format!("FAIL={why}"))));
        }
        match run.exit_code {
            Some(0) => {}
            Some(c) => {
                return Err(BenchError::Nested(
                    run.failure(&format!("script exited with {c}")),
                ))
            }
            None => return Err(BenchError::Nested(run.failure("no NESTED-EXIT line"))),
        }
        parse_figures(&run, s)
    });
    let (metrics, error) = match result {
        Ok(m) => (metrics_out(&m), None),
        Err(e) => (Default::default(), Some(e.to_string())),
    };
    Record {
        scenario: "devices".into(),
        target: "vmm".into(),
        mem_mib: s.guest_mem_mib,
        vcpus: GUEST_VCPUS,
        runs: s.runs,
        warmup: 0,
        error,
        metrics,
        notes: NOTES.iter().map(ToString::to_string).collect(),
        details,
        machine: machine.clone(),
        label: Some(NESTED_LABEL.into()),
    }
}

/// The tests crate's nested run; its helpers panic on a build failure or a
/// timeout (they are made for tests), which becomes an error here.
fn run_nested(script: &str, opts: &NestedOptions) -> Result<NestedRun> {
    let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // Build what the run needs first, for typed errors where possible.
        vmm_tests::try_vmm_binary().map_err(|e| format!("building vmm: {e}"))?;
        vmm_tests::try_artifacts().map_err(|e| format!("guest artifacts: {e}"))?;
        vmm_tests::try_run_nested(script, opts).map_err(|e| e.to_string())
    }));
    match caught {
        Ok(Ok(run)) => Ok(run),
        Ok(Err(e)) => Err(BenchError::Nested(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into());
            Err(BenchError::Nested(msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vmm_tests::LogLine;

    fn nested(lines: &[&str]) -> NestedRun {
        NestedRun {
            name: "t".into(),
            lines: lines
                .iter()
                .map(|l| LogLine {
                    at: Duration::ZERO,
                    text: l.to_string(),
                })
                .collect(),
            exit_code: Some(0),
            log_path: PathBuf::from("/nonexistent.log"),
            qemu_stderr: String::new(),
            elapsed: Duration::from_secs(1),
        }
    }

    fn settings(runs: usize) -> DeviceSettings {
        DeviceSettings {
            runs,
            mib: 4,
            guest_mem_mib: 256,
        }
    }

    const ONE_ROUND: &[&str] = &[
        "BLK_WRITE=4194304 2000",
        "BLK_READ=4194304 1000",
        "[   12.3] some kernel line",
        "NET_H2G=4194304 500",
        "NET_G2H=4194304 250",
        "NET_G2H_L1_BYTES=4194304",
        "VSOCK_H2G=vsock-cat: received 4194304 bytes in 0.125 s",
        "VSOCK_G2H=vsock-cat: sent 4194304 bytes in 4.000 s",
    ];

    #[test]
    fn figures_from_markers() {
        let m = parse_figures(&nested(ONE_ROUND), &settings(1)).unwrap();
        let got = |k: &str| {
            let metric = m.get(k).unwrap();
            assert_eq!(metric.unit, "MiB/s");
            metric.samples.clone()
        };
        assert_eq!(got("block_write"), [2.0]);
        assert_eq!(got("block_read"), [4.0]);
        assert_eq!(got("net_tcp_host_to_guest"), [8.0]);
        assert_eq!(got("net_tcp_guest_to_host"), [16.0]);
        assert_eq!(got("vsock_host_to_guest"), [32.0]);
        assert_eq!(got("vsock_guest_to_host"), [1.0]);
    }

    #[test]
    fn missing_short_or_garbled_figures_fail() {
        // Two rounds expected, one present.
        let err = parse_figures(&nested(ONE_ROUND), &settings(2)).unwrap_err();
        assert!(
            err.to_string().contains("1 BLK_WRITE= lines, expected 2"),
            "{err}"
        );
        let mut lines = ONE_ROUND.to_vec();
        lines[0] = "BLK_WRITE=";
        let err = parse_figures(&nested(&lines), &settings(1)).unwrap_err();
        assert!(err.to_string().contains("BLK_WRITE"), "{err}");
        lines[0] = "BLK_WRITE=4194304 0";
        let err = parse_figures(&nested(&lines), &settings(1)).unwrap_err();
        assert!(err.to_string().contains("too fast"), "{err}");
        let mut lines = ONE_ROUND.to_vec();
        lines[5] = "NET_G2H_L1_BYTES=100";
        let err = parse_figures(&nested(&lines), &settings(1)).unwrap_err();
        assert!(err.to_string().contains("received 100 bytes"), "{err}");
    }

    #[test]
    fn value_parsers() {
        assert_eq!(rate_bytes_ms("1048576 1000"), Ok(1.0));
        assert!(rate_bytes_ms("1048576").is_err());
        assert!(rate_bytes_ms("1048576 1000 3").is_err());
        assert!(rate_bytes_ms("x 1000").is_err());
        assert!(rate_bytes_ms("0 1000").is_err());
        assert_eq!(
            rate_vsock_cat("vsock-cat: sent 2097152 bytes in 2.0 s", "sent"),
            Ok(1.0)
        );
        assert!(rate_vsock_cat("vsock-cat: sent 2097152 bytes in 2.0 s", "received").is_err());
        assert!(rate_vsock_cat("vsock-cat: sent 2097152 bytes", "sent").is_err());
        assert!(rate_vsock_cat("vsock-cat: sent 1 bytes in 0.000 s", "sent").is_err());
        assert!(rate_vsock_cat("vsock-cat: sent 1 bytes in NaN s", "sent").is_err());
    }

    #[test]
    fn script_placeholders_are_all_filled() {
        let text = script(&DeviceSettings {
            runs: 3,
            mib: 16,
            guest_mem_mib: 512,
        });
        for p in ["@MIB@", "@RUNS@", "@GUEST_MEM@", "@CMDLINE@"] {
            assert!(!text.contains(p), "{p} left in the script");
        }
        assert!(text.contains("MIB=16\nRUNS=3\nGUEST_MEM=512\n"));
        assert!(text.contains(&format!("CMDLINE='{GUEST_CMDLINE}'")));
    }
}

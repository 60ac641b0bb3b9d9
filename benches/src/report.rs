//! Results: one JSON record per scenario × guest size × target (each
//! carrying the machine description, so a record stands alone), and a
//! Markdown table putting the vmm and Firecracker side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::machine::MachineInfo;
use crate::stats::{Metrics, Summary};

/// One scenario on one guest size and one target.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub scenario: &'static str,
    pub target: &'static str,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub runs: usize,
    pub warmup: usize,
    /// None when the scenario succeeded.
    pub error: Option<String>,
    pub metrics: BTreeMap<String, MetricOut>,
    pub notes: Vec<&'static str>,
    /// Scenario-specific facts (warm-up outcome, settings).
    pub details: serde_json::Value,
    pub machine: MachineInfo,
}

/// A metric as stored: summary and raw samples.
#[derive(Debug, Clone, Serialize)]
pub struct MetricOut {
    pub unit: &'static str,
    #[serde(flatten)]
    pub summary: Option<Summary>,
    pub samples: Vec<f64>,
}

/// Converts collected metrics for output.
pub fn metrics_out(m: &Metrics) -> BTreeMap<String, MetricOut> {
    m.0.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                MetricOut {
                    unit: v.unit,
                    summary: v.summary(),
                    samples: v.samples.clone(),
                },
            )
        })
        .collect()
}

/// Writes `records` as a JSON array (parent directories created).
pub fn write_json(path: &Path, records: &[Record]) -> Result<()> {
    let text = serde_json::to_string_pretty(records)
        .map_err(|e| BenchError::Setup(format!("serializing results: {e}")))?;
    write_file(path, &text)
}

pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(BenchError::file("creating", dir))?;
    }
    std::fs::write(path, text).map_err(BenchError::file("writing", path))
}

/// The Markdown report: machine line, then a table with one row per metric.
pub fn markdown(records: &[Record]) -> String {
    let mut out = String::new();
    if let Some(m) = records.first().map(|r| &r.machine) {
        let _ = writeln!(
            out,
            "Machine: {} ({} CPUs, {} MiB), host kernel {}, {}, temp fs {}; vmm {}{}\n",
            m.cpu_model,
            m.nproc,
            m.mem_total_mib,
            m.host_kernel,
            m.kvm_module,
            m.temp_fs,
            m.vmm_commit,
            m.firecracker_version
                .as_deref()
                .map(|v| format!("; firecracker {v}"))
                .unwrap_or_default()
        );
    }
    let has_fc = records.iter().any(|r| r.target == "firecracker");
    out.push_str("| scenario | guest | metric | unit | vmm min | vmm median | vmm max |");
    if has_fc {
        out.push_str(" fc median | vmm/fc |");
    }
    out.push('\n');
    out.push_str("|---|---|---|---|---:|---:|---:|");
    if has_fc {
        out.push_str("---:|---:|");
    }
    out.push('\n');

    let mut keys: Vec<(&str, u64, u8)> = Vec::new();
    for r in records {
        let k = (r.scenario, r.mem_mib, r.vcpus);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (scenario, mem, vcpus) in keys {
        let find = |t: &str| {
            records.iter().find(|r| {
                r.scenario == scenario && r.mem_mib == mem && r.vcpus == vcpus && r.target == t
            })
        };
        let (vmm, fc) = (find("vmm"), find("firecracker"));
        let guest = format!("{mem} MiB, {vcpus} vCPU");
        let empty = if has_fc { " | |" } else { "" };
        for (who, rec) in [("vmm", vmm), ("firecracker", fc)] {
            if let Some(e) = rec.and_then(|r| r.error.as_deref()) {
                let _ = writeln!(
                    out,
                    "| {scenario} | {guest} | **{who} failed** | | {} | | |{empty}",
                    cell(e)
                );
            }
        }
        let mut names: Vec<&String> = vmm
            .iter()
            .chain(fc.iter())
            .flat_map(|r| r.metrics.keys())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let v = vmm.and_then(|r| r.metrics.get(name.as_str()));
            let f = fc.and_then(|r| r.metrics.get(name.as_str()));
            let unit = v.or(f).map_or("", |m| m.unit);
            let vs = v.and_then(|m| m.summary);
            let fs = f.and_then(|m| m.summary);
            let num = |x: Option<f64>| x.map(|x| fmt_value(unit, x)).unwrap_or_default();
            let _ = write!(
                out,
                "| {scenario} | {guest} | {name} | {unit} | {} | {} | {} |",
                num(vs.map(|s| s.min)),
                num(vs.map(|s| s.median)),
                num(vs.map(|s| s.max)),
            );
            if has_fc {
                let ratio = match (vs, fs) {
                    (Some(v), Some(f)) if f.median != 0.0 => format!("{:.2}", v.median / f.median),
                    _ => String::new(),
                };
                let _ = write!(out, " {} | {ratio} |", num(fs.map(|s| s.median)));
            }
            out.push('\n');
        }
    }
    out
}

/// A number in its unit's natural precision.
pub fn fmt_value(unit: &str, x: f64) -> String {
    match unit {
        "bytes" => {
            let mib = x / (1024.0 * 1024.0);
            if mib >= 1.0 {
                format!("{mib:.1} MiB")
            } else {
                format!("{:.1} KiB", x / 1024.0)
            }
        }
        "pages" | "count" => format!("{x:.0}"),
        "ratio" => format!("{x:.3}"),
        _ if x.abs() >= 1000.0 => format!("{x:.0}"),
        _ if x.abs() >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.3}"),
    }
}

/// Text safe inside a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineInfo {
        MachineInfo {
            cpu_model: "CPU".into(),
            host_kernel: "6.1".into(),
            kvm_module: "kvm_pvm".into(),
            nproc: 2,
            mem_total_mib: 1024,
            temp_fs: "ext4".into(),
            vmm_commit: "abc".into(),
            vmm_version: "0.1.0",
            firecracker_version: None,
        }
    }

    fn record(target: &'static str, pause: &[f64], error: Option<&str>) -> Record {
        let mut m = Metrics::default();
        for p in pause {
            m.push("pause", "ms", *p);
        }
        Record {
            scenario: "pause",
            target,
            mem_mib: 128,
            vcpus: 1,
            runs: pause.len(),
            warmup: 1,
            error: error.map(String::from),
            metrics: metrics_out(&m),
            notes: vec![],
            details: serde_json::Value::Null,
            machine: machine(),
        }
    }

    #[test]
    fn table_with_ratio_and_errors() {
        let md = markdown(&[
            record("vmm", &[1.0, 2.0, 3.0], None),
            record("firecracker", &[4.0], None),
        ]);
        assert!(
            md.contains(
                "| pause | 128 MiB, 1 vCPU | pause | ms | 1.000 | 2.000 | 3.000 | 4.000 | 0.50 |"
            ),
            "{md}"
        );
        let md = markdown(&[record("vmm", &[], Some("boom | bad"))]);
        assert!(md.contains("**vmm failed** | | boom \\| bad |"), "{md}");
        assert!(!md.contains("fc median"));
    }

    #[test]
    fn json_has_summary_and_samples() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("sub/results.json");
        write_json(&path, &[record("vmm", &[1.0, 3.0], None)]).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let p = &v[0]["metrics"]["pause"];
        assert_eq!(p["median"], 2.0);
        assert_eq!(p["samples"], serde_json::json!([1.0, 3.0]));
        assert_eq!(v[0]["machine"]["kvm_module"], "kvm_pvm");
        assert!(v[0]["error"].is_null());
    }

    #[test]
    fn values_format_by_unit() {
        assert_eq!(fmt_value("bytes", 3.0 * 1024.0 * 1024.0), "3.0 MiB");
        assert_eq!(fmt_value("bytes", 2048.0), "2.0 KiB");
        assert_eq!(fmt_value("ms", 0.1234), "0.123");
        assert_eq!(fmt_value("ms", 12.34), "12.3");
        assert_eq!(fmt_value("ms", 12345.6), "12346");
        assert_eq!(fmt_value("pages", 26214.0), "26214");
    }
}

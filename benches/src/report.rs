//! Results: one JSON record per scenario × guest size × target (each
//! carrying the machine description, so a record stands alone), and a
//! Markdown table putting the vmm and Firecracker side by side. Records
//! measured somewhere else than this machine's own KVM (the nested test
//! host) carry a label and get a table of their own under it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::machine::MachineInfo;
use crate::stats::{Metrics, Summary};

/// One scenario on one guest size and one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub scenario: String,
    pub target: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub runs: usize,
    pub warmup: usize,
    /// None when the scenario succeeded.
    pub error: Option<String>,
    pub metrics: BTreeMap<String, MetricOut>,
    pub notes: Vec<String>,
    /// Scenario-specific facts (warm-up outcome, settings).
    pub details: serde_json::Value,
    pub machine: MachineInfo,
    /// Set when the figures were not measured on `machine`'s own KVM, e.g.
    /// "nested (QEMU-emulated SVM; not a performance figure)"; every table
    /// row of such a record shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A metric as stored: summary and raw samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricOut {
    pub unit: String,
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
                    unit: v.unit.to_string(),
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

/// Reads the records of one or more results files, in order.
pub fn read_json(paths: &[impl AsRef<Path>]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(BenchError::file("reading", path))?;
        let mut some: Vec<Record> =
            serde_json::from_str(&text).map_err(|source| BenchError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        records.append(&mut some);
    }
    Ok(records)
}

/// Writes `text` to `path`, creating parent directories.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(BenchError::file("creating", dir))?;
    }
    std::fs::write(path, text).map_err(BenchError::file("writing", path))
}

/// The Markdown report: a machine line, then one table of the records
/// without a label, then one table per label (each row marked with it).
pub fn markdown(records: &[Record]) -> String {
    let mut out = String::new();
    if let Some(m) = records.first().map(|r| &r.machine) {
        let _ = writeln!(out, "Machine: {}\n", machine_line(m));
    }
    let plain: Vec<&Record> = records.iter().filter(|r| r.label.is_none()).collect();
    if !plain.is_empty() {
        out.push_str(&table(&plain, None));
    }
    let mut labels: Vec<&str> = records.iter().filter_map(|r| r.label.as_deref()).collect();
    labels.dedup();
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        let these: Vec<&Record> = records
            .iter()
            .filter(|r| r.label.as_deref() == Some(label))
            .collect();
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        let _ = writeln!(out, "**{}**\n", cell(label));
        let mut envs: Vec<&str> = these
            .iter()
            .filter_map(|r| r.details.get("environment").and_then(|e| e.as_str()))
            .collect();
        envs.dedup();
        for env in envs {
            let _ = writeln!(out, "{}\n", cell(env));
        }
        out.push_str(&table(&these, Some(label)));
    }
    out
}

/// CPU, cores, memory, host kernel, KVM module, temp fs and versions.
pub fn machine_line(m: &MachineInfo) -> String {
    format!(
        "{} ({} CPUs, {} MiB), host kernel {}, {}, temp fs {}; vmm {}{}",
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
    )
}

/// One table: vmm min/median/max per metric, and the Firecracker median
/// and ratio when any record is Firecracker's. With a label, every row's
/// guest cell names it (short form: the part before any parenthesis).
fn table(records: &[&Record], label: Option<&str>) -> String {
    let mut out = String::new();
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
    let tag = label
        .map(|l| format!(", {}", l.split('(').next().unwrap_or(l).trim()))
        .unwrap_or_default();

    let mut keys: Vec<(&str, u64, u8)> = Vec::new();
    for r in records {
        let k = (r.scenario.as_str(), r.mem_mib, r.vcpus);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (scenario, mem, vcpus) in keys {
        let find = |t: &str| {
            records.iter().copied().find(|r| {
                r.scenario == scenario && r.mem_mib == mem && r.vcpus == vcpus && r.target == t
            })
        };
        let (vmm, fc) = (find("vmm"), find("firecracker"));
        let guest = format!("{mem} MiB, {vcpus} vCPU{}", cell(&tag));
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
            let unit = v.or(f).map_or("", |m| m.unit.as_str());
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
        "MiB/s" => format!("{x:.1}"),
        "ratio" => format!("{x:.3}"),
        _ if x.abs() >= 1000.0 => format!("{x:.0}"),
        _ if x.abs() >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.3}"),
    }
}

/// Text safe inside a table cell.
pub fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineInfo {
        MachineInfo::fixture()
    }

    fn record(target: &str, pause: &[f64], error: Option<&str>) -> Record {
        let mut m = Metrics::default();
        for p in pause {
            m.push("pause", "ms", *p);
        }
        Record {
            scenario: "pause".into(),
            target: target.into(),
            mem_mib: 128,
            vcpus: 1,
            runs: pause.len(),
            warmup: 1,
            error: error.map(String::from),
            metrics: metrics_out(&m),
            notes: vec![],
            details: serde_json::Value::Null,
            machine: machine(),
            label: None,
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

    fn labelled_only() -> Record {
        let mut r = record("vmm", &[5.0], None);
        r.label = Some("nested (emulated; not a performance figure)".into());
        r
    }

    #[test]
    fn labelled_records_get_their_own_table() {
        let mut nested = record("vmm", &[5.0], None);
        nested.scenario = "devices".into();
        nested.label = Some("nested (emulated; not a performance figure)".into());
        nested.details = serde_json::json!({"environment": "L1: test"});
        let md = markdown(&[record("vmm", &[1.0], None), nested]);
        let (plain, labelled) = md.split_once("**nested (emulated").unwrap();
        assert!(plain.ends_with("|\n\n"), "{md}");
        let alone = markdown(&[labelled_only()]);
        assert!(alone.contains("vmm abc\n\n**nested"), "{alone}");
        assert!(
            plain.contains("| pause | 128 MiB, 1 vCPU | pause |"),
            "{md}"
        );
        assert!(!plain.contains("devices"), "{md}");
        assert!(labelled.contains("L1: test"), "{md}");
        assert!(
            labelled.contains("| devices | 128 MiB, 1 vCPU, nested | pause |"),
            "{md}"
        );
    }

    #[test]
    fn json_round_trips_and_old_files_load() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("r.json");
        let mut r = record("vmm", &[1.0, 3.0], None);
        r.label = Some("x".into());
        write_json(&path, &[r, record("firecracker", &[], Some("e"))]).unwrap();
        let back = read_json(&[&path]).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].label.as_deref(), Some("x"));
        let s = back[0].metrics["pause"].summary.unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(back[0].metrics["pause"].unit, "ms");
        // No samples: no summary fields in the file, and none read back.
        assert!(back[1].metrics.is_empty());
        assert_eq!(back[1].error.as_deref(), Some("e"));

        // A file from before `label`, `started_utc` and `command` existed,
        // with a metric that has no summary.
        let old = r#"[{"scenario":"pause","target":"vmm","mem_mib":128,"vcpus":1,"runs":1,
            "warmup":1,"error":null,"metrics":{"pause":{"unit":"ms","samples":[]}},
            "notes":["n"],"details":null,"machine":{"cpu_model":"C","host_kernel":"k",
            "kvm_module":"kvm_pvm","nproc":2,"mem_total_mib":1,"temp_fs":"ext4",
            "vmm_commit":"c","vmm_version":"0.1.0","firecracker_version":null}}]"#;
        std::fs::write(&path, old).unwrap();
        let back = read_json(&[&path]).unwrap();
        assert!(back[0].label.is_none());
        assert!(back[0].metrics["pause"].summary.is_none());
        assert!(back[0].machine.command.is_empty());

        std::fs::write(&path, "[{").unwrap();
        let err = read_json(&[&path]).unwrap_err().to_string();
        assert!(err.contains("r.json"), "{err}");
        let err = read_json(&[dir.path().join("missing.json")]).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
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

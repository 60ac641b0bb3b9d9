//! The `boot` scenario: a whole guest boot in a separate process, timed
//! from spawn to console markers: the first console line, then the root
//! filesystem ("Run /init", or the "VFS:" line of a kernel with no root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::firecracker::{boot_requests, FcProcess};
use crate::process;
use crate::serial::{LogWatch, Seen};
use crate::signals;
use crate::stats::Metrics;
use crate::vmm_target::GuestSpec;

/// Console text of the root filesystem stage: init starting when there is
/// a root filesystem; without one, the kernel's "VFS:" line saying it has
/// none (a successful mount also prints "VFS:", hence the choice).
pub fn root_marker(has_rootfs: bool) -> &'static str {
    if has_rootfs {
        "Run /init"
    } else {
        "VFS:"
    }
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootSettings {
    pub runs: usize,
    pub timeout: Duration,
    pub rootfs: Option<PathBuf>,
    /// The `vmm` CLI binary.
    pub vmm_bin: PathBuf,
    /// The full command line Firecracker gets (the vmm's, as it builds it).
    pub fc_cmdline: String,
    pub fc_bin: Option<PathBuf>,
}

/// Markers seen during one boot.
#[derive(Debug, Clone)]
struct BootMarks {
    first: Seen,
    root: Seen,
}

/// Boots `spec` `runs` times on the vmm (and Firecracker, interleaved);
/// results in target order: vmm, then firecracker when configured.
pub fn run(
    spec: &GuestSpec,
    s: &BootSettings,
    work: &Path,
) -> Vec<(&'static str, Result<Metrics>)> {
    let mut vmm: Result<Metrics> = Ok(Metrics::default());
    let mut fc: Option<Result<Metrics>> = s.fc_bin.as_ref().map(|_| Ok(Metrics::default()));
    for run in 0..s.runs {
        if let Ok(m) = &mut vmm {
            match signals::check().and_then(|()| boot_vmm(spec, s, work, run)) {
                Ok(marks) => record(&marks, m),
                Err(e) => vmm = Err(e),
            }
        }
        if let (Some(Ok(m)), Some(bin)) = (&mut fc, &s.fc_bin) {
            match signals::check().and_then(|()| boot_fc(bin, spec, s, work, run)) {
                Ok(marks) => record(&marks, m),
                Err(e) => fc = Some(Err(e)),
            }
        }
    }
    let mut out = vec![("vmm", vmm)];
    if let Some(fc) = fc {
        out.push(("firecracker", fc));
    }
    out
}

fn record(marks: &BootMarks, m: &mut Metrics) {
    m.push_ms("first_console_line", marks.first.wall);
    m.push_ms("root_marker", marks.root.wall);
    let first_ts = marks.first.kernel_secs.unwrap_or(0.0);
    if let Some(root_ts) = marks.root.kernel_secs {
        // Wall time before the kernel's clock starts (VMM start-up, kernel
        // load, early boot before printk time), and the kernel's own
        // account of the rest.
        let before = marks.first.wall.as_secs_f64() - first_ts;
        m.push("before_first_printk", "ms", before * 1000.0);
        m.push("kernel_timestamp_span", "ms", (root_ts - first_ts) * 1000.0);
    }
}

fn boot_vmm(spec: &GuestSpec, s: &BootSettings, work: &Path, run: usize) -> Result<BootMarks> {
    let serial = work.join(format!("boot-vmm-{run}.log"));
    let mut cmd = Command::new(&s.vmm_bin);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&spec.kernel)
        .arg("--mem-mib")
        .arg(spec.mem_mib.to_string())
        .arg("--vcpus")
        .arg(spec.vcpus.to_string())
        .arg("--serial-log")
        .arg(&serial);
    if let Some(c) = &spec.cmdline {
        cmd.arg("--cmdline").arg(c);
    }
    if let Some(r) = &s.rootfs {
        cmd.arg("--rootfs").arg(r);
    }
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BenchError::file("spawning", &s.vmm_bin))?;
    let mut child = process::ChildGuard(child);
    let marker = root_marker(s.rootfs.is_some());
    let marks = watch(&serial, marker, start, s.timeout, || {
        Ok(child
            .0
            .try_wait()
            .map_err(BenchError::io("waiting for vmm"))?
            .map(|st| st.to_string()))
    });
    process::terminate(&mut child.0, Duration::from_secs(5));
    marks.map_err(|e| match e {
        BenchError::GuestStopped(m) => BenchError::GuestStopped(format!(
            "{m}; vmm stderr: {}",
            process::read_stderr(&mut child.0)
        )),
        e => e,
    })
}

fn boot_fc(
    bin: &Path,
    spec: &GuestSpec,
    s: &BootSettings,
    work: &Path,
    run: usize,
) -> Result<BootMarks> {
    let serial = work.join(format!("boot-fc-{run}.log"));
    let start = Instant::now();
    let fc = FcProcess::spawn(bin, work, &format!("boot-fc-{run}"), &serial, s.timeout)?;
    for (method, path, body) in boot_requests(spec, &s.fc_cmdline, s.rootfs.as_deref(), false) {
        fc.call(method, path, body)?;
    }
    let marker = root_marker(s.rootfs.is_some());
    watch(&serial, marker, start, s.timeout, || {
        Ok((!fc.is_running().unwrap_or(false)).then(|| "not running".to_string()))
    })
}

/// Polls the log until the root marker, the timeout, or `exited` reports
/// the guest gone.
fn watch(
    serial: &Path,
    marker: &str,
    start: Instant,
    timeout: Duration,
    mut exited: impl FnMut() -> Result<Option<String>>,
) -> Result<BootMarks> {
    let mut log = LogWatch::new(serial, start);
    let mut first = None;
    let mut polls = 0u64;
    loop {
        signals::check()?;
        log.poll();
        if first.is_none() {
            first = log.first_line().map(|l| log.seen(0, l));
        }
        if let Some(line) = log.find(marker) {
            let root = log.seen(1, line);
            let first = first.unwrap_or_else(|| root.clone());
            return Ok(BootMarks { first, root });
        }
        if start.elapsed() > timeout {
            return Err(BenchError::Timeout {
                what: format!("the root marker in {}", serial.display()),
                after: timeout,
            });
        }
        // Checking the process is costlier than reading the log: every 20th
        // poll (100 ms).
        polls += 1;
        if polls >= 20 {
            polls = 0;
            if let Some(how) = exited()? {
                log.poll();
                return Err(BenchError::GuestStopped(format!(
                    "guest ended ({how}) before the root marker; console: {}",
                    log.tail(3)
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn watch_finds_markers_and_reports_exits() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("serial.log");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"[    0.000000] Linux version\n[   16.190000] VFS: Cannot open root device\n")
            .unwrap();
        let marks = watch(
            &path,
            "VFS:",
            Instant::now(),
            Duration::from_secs(5),
            || Ok(None),
        )
        .unwrap();
        assert_eq!(marks.first.kernel_secs, Some(0.0));
        assert_eq!(marks.root.marker, 1);
        assert!(watch(
            &path,
            "Run /init",
            Instant::now(),
            Duration::from_millis(20),
            || Ok(None)
        )
        .is_err());
        assert_eq!(marks.root.kernel_secs, Some(16.19));
        let mut m = Metrics::default();
        record(&marks, &mut m);
        assert!((m.get("kernel_timestamp_span").unwrap().samples[0] - 16190.0).abs() < 1e-6);

        let quiet = dir.path().join("quiet.log");
        std::fs::write(&quiet, b"[ 0.1] nothing yet\n").unwrap();
        let err = watch(
            &quiet,
            "VFS:",
            Instant::now(),
            Duration::from_secs(30),
            || Ok(Some("exit status: 2".into())),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exit status: 2"), "{err}");
        let err = watch(
            &quiet,
            "VFS:",
            Instant::now(),
            Duration::from_millis(30),
            || Ok(None),
        )
        .unwrap_err();
        assert!(matches!(err, BenchError::Timeout { .. }));
    }
}

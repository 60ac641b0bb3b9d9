//! What the figures were measured on: CPU, host kernel, which KVM, cores,
//! memory, the temp directory's filesystem, and the vmm commit.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Host description stored with every result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    pub host_kernel: String,
    /// kvm_pvm, kvm_intel, kvm_amd, or "none".
    pub kvm_module: String,
    pub nproc: usize,
    pub mem_total_mib: u64,
    /// Filesystem of the directory snapshot files were written to.
    pub temp_fs: String,
    /// `git rev-parse HEAD` of the source tree, "+dirty" when modified.
    pub vmm_commit: String,
    pub vmm_version: String,
    /// `$FIRECRACKER_BIN --version`, when Firecracker ran.
    pub firecracker_version: Option<String>,
    /// When the harness started, UTC, `YYYY-MM-DDTHH:MM:SSZ` (absent in
    /// results of older harness versions).
    #[serde(default)]
    pub started_utc: Option<String>,
    /// /proc/loadavg's three load averages when the harness started (other
    /// people's work on a shared machine shows up here).
    #[serde(default)]
    pub loadavg: Option<String>,
    /// The harness's own command line, so a table can say what produced it.
    #[serde(default)]
    pub command: Vec<String>,
}

impl MachineInfo {
    pub fn collect(temp_dir: &Path, firecracker: Option<&Path>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            kvm_module: kvm_module(Path::new("/sys/module")),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total_mib: mem_total_kib(&meminfo).unwrap_or(0) / 1024,
            temp_fs: fs_type(temp_dir),
            vmm_commit: git_commit(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            firecracker_version: firecracker.map(|bin| {
                command_line(Command::new(bin).arg("--version")).unwrap_or_else(|| "unknown".into())
            }),
            started_utc: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| utc_timestamp(d.as_secs())),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
            command: std::env::args().collect(),
        }
    }

    /// A fixed description for unit tests.
    #[cfg(test)]
    pub fn fixture() -> Self {
        Self {
            cpu_model: "CPU".into(),
            host_kernel: "6.1".into(),
            kvm_module: "kvm_pvm".into(),
            nproc: 2,
            mem_total_mib: 1024,
            temp_fs: "ext4".into(),
            vmm_commit: "abc".into(),
            vmm_version: "0.1.0".into(),
            firecracker_version: None,
            started_utc: None,
            loadavg: None,
            command: vec![],
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic
/// Gregorian calendar; no time-zone database needed for UTC).
pub fn utc_timestamp(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of the `days`-th day after 1970-01-01: counts whole
/// 400-year eras (146097 days each), then the year of the era with March as
/// the first month so that February's leap day falls at the end.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The loaded KVM flavour, from /sys/module.
fn kvm_module(sys_module: &Path) -> String {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| sys_module.join(m).exists())
        .unwrap_or("none")
        .to_string()
}

/// First line of a command's standard output.
fn command_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

fn git_commit(repo: &Path) -> String {
    let Some(head) = command_line(
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["rev-parse", "HEAD"]),
    ) else {
        return "unknown".into();
    };
    let dirty = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

/// The filesystem type of `path` by statfs magic (tmpfs matters: its
/// "allocated blocks" are RAM).
fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return "unknown".into();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("{other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(cpu_model(cpu).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("nothing"), None);
        let mem = "MemTotal:       24683520 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total_kib(mem), Some(24683520));
        assert_eq!(mem_total_kib(""), None);
    }

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(utc_timestamp(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(utc_timestamp(951_868_800), "2000-03-01T00:00:00Z");
        // 2100 is not a leap year: 2100-02-28 is followed by 2100-03-01.
        assert_eq!(utc_timestamp(4_107_456_000), "2100-02-28T00:00:00Z");
        assert_eq!(utc_timestamp(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn kvm_module_from_sys_tree() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        assert_eq!(kvm_module(dir.path()), "none");
        dir.subdir("kvm_amd").unwrap();
        assert_eq!(kvm_module(dir.path()), "kvm_amd");
        dir.subdir("kvm_pvm").unwrap();
        assert_eq!(kvm_module(dir.path()), "kvm_pvm");
    }
}

//! What the figures were measured on: CPU, host kernel, which KVM, cores,
//! memory, the temp directory's filesystem, and the vmm commit.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// Host description stored with every result.
#[derive(Debug, Clone, Serialize)]
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
    pub vmm_version: &'static str,
    /// `$FIRECRACKER_BIN --version`, when Firecracker ran.
    pub firecracker_version: Option<String>,
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
            vmm_version: env!("CARGO_PKG_VERSION"),
            firecracker_version: firecracker.map(|bin| {
                command_line(Command::new(bin).arg("--version")).unwrap_or_else(|| "unknown".into())
            }),
        }
    }
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
    fn kvm_module_from_sys_tree() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        assert_eq!(kvm_module(dir.path()), "none");
        dir.subdir("kvm_amd").unwrap();
        assert_eq!(kvm_module(dir.path()), "kvm_amd");
        dir.subdir("kvm_pvm").unwrap();
        assert_eq!(kvm_module(dir.path()), "kvm_pvm");
    }
}

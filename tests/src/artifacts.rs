//! Guest and nested-host artifacts built by the resources/ scripts, once per process and under a
//! cross-process lock so parallel test binaries do not build them twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use crate::binaries::agent_binary;
use crate::error::Result;
use crate::lock::FileLock;
use crate::paths::{cache_dir, resources_dir, scratch_dir};
use crate::process::{last_line, run_logged};

/// The guest kernel, root filesystem and nested host, all in the artifact cache.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Guest kernel (ELF vmlinux with a PVH entry).
    pub kernel: PathBuf,
    /// The guest kernel's .config.
    pub kernel_config: PathBuf,
    /// Guest root filesystem (ext4) with busybox, /init and the guest agent.
    pub rootfs: PathBuf,
    /// The static guest agent that went into `rootfs`.
    pub agent: PathBuf,
    /// The nested test host.
    pub nested: NestedHostFiles,
}

/// The nested test host (L1) built by build-nested-host.sh.
#[derive(Debug, Clone)]
pub struct NestedHostFiles {
    /// Its cache directory.
    pub dir: PathBuf,
    /// The L1 kernel (Debian cloud kernel bzImage).
    pub kernel: PathBuf,
    /// The base initramfs (gzip cpio, padded to 512 bytes) that per-test archives follow.
    pub base_initrd: PathBuf,
}

/// Runs a resources/ script and returns the path it printed last.
fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Result<PathBuf> {
    let start = Instant::now();
    let path = resources_dir().join(script);
    let mut cmd = Command::new(&path);
    cmd.args(args).env("VMM_CACHE", cache_dir());
    let log = scratch_dir().join("logs").join(format!("{script}.log"));
    let stdout = run_logged(&mut cmd, &log)?;
    let out = PathBuf::from(last_line(&stdout, script)?);
    eprintln!(
        "vmm-tests: {script} -> {} ({:.1}s)",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn lock(name: &str) -> Result<FileLock> {
    FileLock::acquire(&cache_dir().join(format!(".lock-harness-{name}")))
}

fn require_file(path: &Path) -> Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| crate::error::HarnessError::io("stat artifact", path, e))
}

/// Builds (or finds in the cache) the nested test host.
pub fn try_nested_host() -> Result<NestedHostFiles> {
    let _lock = lock("nested")?;
    let dir = run_script("build-nested-host.sh", &[])?;
    let files = NestedHostFiles {
        kernel: dir.join("vmlinuz"),
        base_initrd: dir.join("base.cpio.gz"),
        dir,
    };
    require_file(&files.kernel)?;
    require_file(&files.base_initrd)?;
    Ok(files)
}

/// The nested test host; built once per process.
pub fn nested_host() -> &'static NestedHostFiles {
    static NESTED: OnceLock<NestedHostFiles> = OnceLock::new();
    NESTED.get_or_init(|| try_nested_host().unwrap_or_else(|e| panic!("nested host: {e}")))
}

/// Builds (or finds in the cache) every artifact.
pub fn try_artifacts() -> Result<Artifacts> {
    let agent = agent_binary();
    let (kernel, rootfs) = {
        let _lock = lock("guest")?;
        let kernel = run_script("build-kernel.sh", &[])?;
        let rootfs = run_script("build-rootfs.sh", &["--agent".as_ref(), agent.as_os_str()])?;
        (kernel, rootfs)
    };
    require_file(&kernel)?;
    require_file(&rootfs)?;
    let kernel_config = kernel.with_file_name("config");
    Ok(Artifacts {
        kernel,
        kernel_config,
        rootfs,
        agent,
        nested: nested_host().clone(),
    })
}

/// Every artifact (guest kernel, rootfs with the agent, nested host); built once per process.
/// A cold guest kernel build takes minutes; later runs find everything in the cache.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| try_artifacts().unwrap_or_else(|e| panic!("artifacts: {e}")))
}

//! Building the project's binaries for tests: the host `vmm` and the static guest agent.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use crate::error::{HarnessError, Result};
use crate::paths::{scratch_dir, target_dir, workspace_root};
use crate::process::{describe, run_logged};

/// Target triple of the guest agent build. Naming it explicitly keeps RUSTFLAGS (crt-static)
/// away from build scripts and proc-macros, which must stay dynamic host artifacts.
const AGENT_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

fn cargo_build(mut cmd: Command, log_name: &str, out: PathBuf) -> Result<PathBuf> {
    let start = Instant::now();
    let log = scratch_dir().join("logs").join(log_name);
    run_logged(&mut cmd, &log)?;
    if !out.is_file() {
        return Err(HarnessError::BadOutput {
            command: describe(&cmd),
            detail: format!("{} was not produced", out.display()),
        });
    }
    eprintln!(
        "vmm-tests: {} ready in {:.1}s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Builds (`cargo build --release -p vmm-cli --bin vmm`; a no-op when fresh) and returns the
/// `vmm` binary. Built once per process.
pub fn vmm_binary() -> PathBuf {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| try_vmm_binary().unwrap_or_else(|e| panic!("building vmm: {e}")))
        .clone()
}

/// [`vmm_binary`] returning errors instead of panicking (and without the per-process cache).
pub fn try_vmm_binary() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "vmm-cli", "--bin", "vmm"]);
    cargo_build(
        cmd,
        "cargo-vmm.log",
        target_dir().join("release").join("vmm"),
    )
}

/// Where the guest agent is built: its own target directory, so that its RUSTFLAGS do not
/// invalidate the main build.
pub fn agent_target_dir() -> PathBuf {
    target_dir().join("guest")
}

/// Builds the guest agent as a static executable and returns its path. Built once per process.
pub fn agent_binary() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| try_agent_binary().unwrap_or_else(|e| panic!("building vmm-agent: {e}")))
        .clone()
}

/// [`agent_binary`] returning errors instead of panicking (and without the per-process cache).
pub fn try_agent_binary() -> Result<PathBuf> {
    let dir = agent_target_dir();
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "guest-agent",
        "--bin",
        "vmm-agent",
        "--target",
        AGENT_TRIPLE,
    ])
    .env("CARGO_TARGET_DIR", &dir)
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let out = dir.join(AGENT_TRIPLE).join("release").join("vmm-agent");
    cargo_build(cmd, "cargo-agent.log", out)
}

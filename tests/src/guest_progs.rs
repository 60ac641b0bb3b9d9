//! Small C programs (tests/guest-progs/*.c) built as static executables for the guest or for
//! L1: busybox cannot do what they do (stamp memory, scan a memory file, hold a write open).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::paths::scratch_dir;
use crate::process::run_with_timeout;

/// Compiles `guest-progs/NAME.c` with the host's gcc into a static executable and returns it.
pub fn compile_guest_prog(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest-progs")
        .join(format!("{name}.c"));
    let dir = scratch_dir().join("guest-progs");
    std::fs::create_dir_all(&dir).expect("create guest-progs dir");
    let out = dir.join(format!("{name}-{}", std::process::id()));
    let res = run_with_timeout(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(&src),
        Duration::from_secs(120),
    );
    assert!(
        res.success(),
        "gcc -static {} failed (is gcc with static glibc installed?):\n{}",
        src.display(),
        res.stderr()
    );
    out
}

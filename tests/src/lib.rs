//! Test support: building the project's binaries and guest artifacts, and driving guests —
//! directly on this machine's KVM or inside the nested test host (QEMU with AMD SVM emulated).

mod artifacts;
mod binaries;
pub mod cpio;
mod error;
mod kvm;
mod lock;
mod nested;
mod paths;
mod process;

pub use artifacts::{
    artifacts, nested_host, try_artifacts, try_nested_host, Artifacts, NestedHostFiles,
};
pub use binaries::{agent_binary, agent_target_dir, try_agent_binary, try_vmm_binary, vmm_binary};
pub use error::{HarnessError, Result};
pub use kvm::{kvm_unusable_reason, require_kvm};
pub use lock::FileLock;
pub use nested::{
    run_nested, try_run_nested, LogLine, NestedOptions, NestedRun, GUEST_CMDLINE,
    NESTED_GUEST_KERNEL, NESTED_GUEST_ROOTFS, NESTED_VMM,
};
pub use paths::{cache_dir, resources_dir, scratch_dir, target_dir, workspace_root};
pub use process::{run_with_timeout, tail, try_run_with_timeout, TimedOutput};

//! Test support: building the project's binaries and guest artifacts, and driving guests —
//! directly on this machine's KVM or inside the nested test host (QEMU with AMD SVM emulated).

mod api;
mod artifacts;
mod binaries;
pub mod cpio;
mod error;
mod files;
mod guest_memory;
mod guest_progs;
mod kvm;
mod lock;
mod markers;
mod nested;
mod paths;
mod process;
mod scratch;
mod state_file;
mod vmm_process;

pub use api::{
    api, api_ok, create_body, create_snapshot, fault_message, file_load_body, pause, raw_api,
    resume, try_api, try_raw_api, vm_state, ApiError,
};
pub use artifacts::{
    artifacts, nested_host, try_artifacts, try_nested_host, Artifacts, NestedHostFiles,
};
pub use binaries::{agent_binary, agent_target_dir, try_agent_binary, try_vmm_binary, vmm_binary};
pub use error::{HarnessError, Result};
pub use files::{
    file_len, names_in, read_lossy, same_content, same_guest_memory, sha256, wait_for_growth,
    wait_for_text, MEMORY_TRAILER_LEN,
};
pub use guest_memory::{fill_zero_pages, largest_region};
pub use guest_progs::compile_guest_prog;
pub use kvm::{kvm_unusable_reason, require_kvm};
pub use lock::FileLock;
pub use markers::SharedNestedRun;
pub use nested::{
    run_nested, try_run_nested, LogLine, NestedOptions, NestedRun, GUEST_CMDLINE,
    NESTED_GUEST_KERNEL, NESTED_GUEST_ROOTFS, NESTED_VMM,
};
pub use paths::{cache_dir, resources_dir, scratch_dir, target_dir, utf8, workspace_root};
pub use process::{run_with_timeout, tail, try_run_with_timeout, TimedOutput};
pub use scratch::{cleanup, heavy, scratch};
pub use state_file::{
    crc64_ecma, decode_state, encode_state, read_state, reseal, StateFile, CRC_LEN, HEADER_LEN,
};
pub use vmm_process::{describe_exit, VmmProcess};

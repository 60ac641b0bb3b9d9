//! `vmm`: a snapshot-first microVM monitor on KVM.
//!
//! [`builder::build_for_boot`] turns a [`config::VmConfig`] into a
//! [`microvm::Microvm`], whose [`microvm::Microvm::run`] runs the guest until
//! it ends and returns a [`stop::StopReason`].

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod controller;
pub mod device_manager;
pub mod lazy;
pub mod live_snapshot;
pub mod memory;
pub mod microvm;
pub mod profile;
pub mod seccomp;
pub mod snapshot;
pub mod stop;
pub mod vcpu;
pub mod vm;

/// Device configurations, as users give them.
pub mod devices_config {
    pub use devices::virtio::block::BlockConfig;
    pub use devices::virtio::net::{MacAddr, NetConfig};
    pub use devices::virtio::vsock::VsockConfig;
}

pub use builder::{build_for_boot, BuildError};
pub use config::VmConfig;
pub use microvm::Microvm;
pub use stop::StopReason;

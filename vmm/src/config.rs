//! What a VM is made of, as the user describes it (CLI flags or a JSON file),
//! and its validation: every mistake becomes one clear error before any
//! resource is created.

use std::path::{Path, PathBuf};

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::VsockConfig;
use serde::{Deserialize, Serialize};

use crate::arch::layout::CMDLINE_MAX_SIZE;
use crate::memory::MAX_MEM_MIB;
use crate::profile::GuestProfile;

/// Most virtio devices a VM may have (one IOAPIC pin each).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// A complete VM description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` means [`crate::profile::DEFAULT_CMDLINE`].
    /// The profile's required arguments and device arguments are appended.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Root filesystem image; becomes /dev/vda and `root=/dev/vda`.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Mount the root filesystem read-only.
    #[serde(default)]
    pub rootfs_read_only: bool,
    /// Extra disks, after the root filesystem (ids `drive1`, `drive2`, ...
    /// unless the drive's `id` is set).
    #[serde(default)]
    pub drives: Vec<BlockConfig>,
    /// Network interfaces on TAP devices (ids `eth0`, `eth1`, ...).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// The vsock device (hybrid: host side on a Unix socket).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Track dirty pages (needed for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Guest profile; detected from the host when absent.
    #[serde(default)]
    pub profile: Option<GuestProfile>,
}

fn default_vcpus() -> u8 {
    1
}

fn default_mem_mib() -> u64 {
    256
}

/// A configuration mistake.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("mem_mib must be between 16 and {MAX_MEM_MIB}, got {0}")]
    Memory(u64),
    #[error("{what} {path}: {reason}")]
    Path {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("kernel command line is {0} bytes with the VMM's additions; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit")]
    TooManyDevices(usize),
    #[error("vsock guest_cid must be between 3 and 4294967295, got {0}")]
    VsockCid(u64),
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
}

impl VmConfig {
    /// A minimal configuration booting `kernel` with defaults.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: default_vcpus(),
            mem_mib: default_mem_mib(),
            rootfs: None,
            rootfs_read_only: false,
            drives: Vec::new(),
            net: Vec::new(),
            vsock: None,
            serial: SerialOutput::default(),
            track_dirty_pages: false,
            profile: None,
        }
    }

    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// Checks everything that can be checked before building the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_limits()?;
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if let Some(rootfs) = &self.rootfs {
            check_file("rootfs", rootfs)?;
        }
        for drive in &self.drives {
            check_file("drive", &drive.path)?;
        }
        let virtio = self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rootfs.is_some());
        if virtio > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(virtio));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(vsock.guest_cid));
            }
        }
        if let SerialOutput::File(path) = &self.serial {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    return Err(ConfigError::Path {
                        what: "serial log directory",
                        path: dir.display().to_string(),
                        reason: "does not exist".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The disks in device order with their ids: the root filesystem
    /// (`rootfs`) first, then `drives`.
    pub fn disks(&self) -> Vec<(String, BlockConfig)> {
        let mut out = Vec::new();
        if let Some(path) = &self.rootfs {
            out.push((
                "rootfs".to_string(),
                BlockConfig {
                    path: path.clone(),
                    read_only: self.rootfs_read_only,
                    id: Some("rootfs".into()),
                },
            ));
        }
        for (i, d) in self.drives.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| format!("drive{}", i + 1));
            out.push((id, d.clone()));
        }
        out
    }

    /// The resource limits alone (vCPUs, memory), without touching any
    /// file: what a snapshot's configuration must satisfy on restore.
    pub fn validate_limits(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(16..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        Ok(())
    }

    /// The profile in effect.
    pub fn profile(&self) -> GuestProfile {
        self.profile.unwrap_or_else(GuestProfile::detect)
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Path {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_kernel() -> (VmConfig, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "vmm-cfg-kernel-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, b"k").unwrap();
        (VmConfig::new(&path), path)
    }

    #[test]
    fn validation_names_the_problem() {
        let (mut cfg, path) = with_kernel();
        cfg.validate().unwrap();
        cfg.vcpus = 0;
        assert_eq!(cfg.validate(), Err(ConfigError::Vcpus(0)));
        cfg.vcpus = MAX_VCPUS + 1;
        assert_eq!(cfg.validate(), Err(ConfigError::Vcpus(MAX_VCPUS + 1)));
        cfg.vcpus = 2;
        cfg.mem_mib = 1;
        assert_eq!(cfg.validate(), Err(ConfigError::Memory(1)));
        cfg.mem_mib = 128;
        cfg.rootfs = Some("/nonexistent/rootfs.ext4".into());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("rootfs /nonexistent/rootfs.ext4"), "{err}");
        cfg.rootfs = Some(std::env::temp_dir());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn json_round_trip_and_unknown_fields_rejected() {
        let (cfg, path) = with_kernel();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), cfg);
        let minimal: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!((minimal.vcpus, minimal.mem_mib), (1, 256));
        let bad = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpu": 2}"#);
        assert!(bad.unwrap_err().to_string().contains("unknown field"));
        std::fs::remove_file(path).unwrap();
    }
}

//! Building a VM from its configuration: memory, KVM VM, devices, kernel
//! and boot data, vCPUs. The result is a [`Microvm`] ready to run.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use kvm_ioctls::Kvm;

use crate::arch::{boot, cpuid, mptable, regs};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::console::Console;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{self, MemoryError};
use crate::microvm::{Microvm, MicrovmParts};
use crate::profile::DEFAULT_CMDLINE;
use crate::stop::VmStop;
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{kvm_err, open_kvm, Vm, VmError};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("vCPU setup: {0}")]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("serial output {path}: {source}")]
    SerialOutput {
        path: String,
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("restoring vCPU state: {0}")]
    VcpuState(#[from] crate::arch::vcpu_state::StateError),
}

pub(crate) fn console_for(config: &VmConfig) -> Result<Console, BuildError> {
    let out: Box<dyn Write + Send> = match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Off => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            Box::new(
                File::create(path).map_err(|source| BuildError::SerialOutput {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
    };
    Ok(Console::new(out))
}

/// The full kernel command line: the user's (or the default), the profile's
/// required arguments, the root device, then the devices.
pub fn kernel_cmdline(config: &VmConfig, device_args: &[String]) -> Result<String, ConfigError> {
    let mut parts: Vec<&str> = vec![config.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)];
    let profile = config.profile().required_cmdline();
    if !profile.is_empty() {
        parts.push(profile);
    }
    let user_has_root = parts[0].split_whitespace().any(|a| a.starts_with("root="));
    if config.rootfs.is_some() && !user_has_root {
        parts.push(if config.rootfs_read_only {
            "root=/dev/vda ro"
        } else {
            "root=/dev/vda rw"
        });
    }
    parts.extend(device_args.iter().map(String::as_str));
    let line = parts.join(" ");
    if line.len() + 1 > crate::arch::layout::CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong(line.len()));
    }
    Ok(line)
}

/// Builds a VM that boots `config.kernel`; its vCPUs start running when
/// [`Microvm::run`] is called.
pub fn build_for_boot(config: &VmConfig) -> Result<Microvm, BuildError> {
    config.validate()?;
    let kvm = open_kvm()?;
    let mem = memory::create_anonymous(config.mem_mib)?;
    let vm = Vm::new(&kvm, &mem, config.track_dirty_pages)?;

    let console = console_for(config)?;
    let stop = Arc::new(VmStop::new().map_err(|e| BuildError::EventLoop(e.to_string()))?);
    let mut devices = DeviceManager::new(&vm, console.clone(), &stop, None)?;
    for (id, disk) in config.disks() {
        devices.add_block(&vm, &mem, id, disk)?;
    }
    for (i, net) in config.net.iter().enumerate() {
        devices.add_net(&vm, &mem, format!("eth{i}"), net.clone())?;
    }
    if let Some(vsock) = &config.vsock {
        devices.add_vsock(&vm, &mem, vsock.clone())?;
    }

    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|p| boot::load_initrd(&mem, p))
        .transpose()?;
    let cmdline = kernel_cmdline(config, devices.cmdline_args())?;
    boot::load_cmdline(&mem, &cmdline)?;
    boot::write_boot_params(&mem, &kernel, cmdline.len(), initrd)?;
    mptable::setup_mptable(&mem, config.vcpus)?;
    regs::write_boot_tables(&mem)?;

    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let vcpus = create_vcpus(&vm, &devices, &stop, config.vcpus, |index, fd| {
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, index, config.vcpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::setup_common_vcpu(fd)?;
        if index == 0 {
            regs::setup_boot_vcpu(fd, kernel.entry)?;
        }
        Ok(())
    })?;
    log::info!("kernel command line: {cmdline}");
    Microvm::new(MicrovmParts {
        config: config.clone(),
        vm,
        mem,
        devices,
        console,
        stop,
        vcpus,
        msr_indices: Arc::new(msr_indices(&kvm)?),
        lazy: None,
    })
}

/// The MSRs saved with each vCPU: every MSR KVM can save and restore.
pub(crate) fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, BuildError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Creates `count` vCPUs, configured by `setup` (boot registers, or a
/// snapshot's state), each dispatching to the device buses.
pub(crate) fn create_vcpus(
    vm: &Vm,
    devices: &DeviceManager,
    stop: &Arc<VmStop>,
    count: u8,
    mut setup: impl FnMut(u8, &kvm_ioctls::VcpuFd) -> Result<(), BuildError>,
) -> Result<Vec<Vcpu>, BuildError> {
    (0..count)
        .map(|index| {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            setup(index, &fd)?;
            Ok(Vcpu::new(
                index,
                fd,
                devices.pio.clone(),
                devices.mmio.clone(),
                stop.clone(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::GuestProfile;

    #[test]
    fn cmdline_gets_profile_root_and_devices() {
        let mut cfg = VmConfig::new("/k");
        cfg.profile = Some(GuestProfile::Standard);
        cfg.rootfs = Some("/r".into());
        let line = kernel_cmdline(&cfg, &["virtio_mmio.device=4K@0xd0000000:5".into()]).unwrap();
        assert_eq!(
            line,
            format!("{DEFAULT_CMDLINE} root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5")
        );
        cfg.profile = Some(GuestProfile::Pvm);
        cfg.cmdline = Some("console=ttyS0 root=/dev/vdb".into());
        let line = kernel_cmdline(&cfg, &[]).unwrap();
        assert!(
            line.starts_with("console=ttyS0 root=/dev/vdb noxsave"),
            "{line}"
        );
        assert!(!line.contains("/dev/vda"));
        cfg.cmdline = Some("x".repeat(3000));
        assert!(matches!(
            kernel_cmdline(&cfg, &[]),
            Err(ConfigError::CmdlineTooLong(_))
        ));
    }
}

//! `vmm run`: build a VM from flags or a JSON config and run it in the
//! foreground until the guest ends.

use std::path::PathBuf;

use clap::Args;
use vmm::config::SerialOutput;
use vmm::profile::GuestProfile;
use vmm::VmConfig;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// JSON VM configuration (same fields as the flags); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Root filesystem image (ext4), attached as /dev/vda.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Kernel command line (replaces the default; device and profile
    /// arguments are still appended).
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Write the guest console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial_log: Option<PathBuf>,
    /// Track dirty pages (needed for diff snapshots).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Guest profile (default: detected from the host's KVM).
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ProfileArg {
    Standard,
    Pvm,
}

impl RunArgs {
    /// The VM configuration: the file's (if any) with flags applied on top.
    fn to_config(&self) -> Result<VmConfig, String> {
        let mut cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            (None, Some(kernel)) => VmConfig::new(kernel),
            (None, None) => return Err("--kernel or --config is required".into()),
        };
        if let Some(k) = &self.kernel {
            cfg.kernel = k.clone();
        }
        if let Some(v) = &self.initrd {
            cfg.initrd = Some(v.clone());
        }
        if let Some(v) = &self.rootfs {
            cfg.rootfs = Some(v.clone());
        }
        if let Some(v) = &self.cmdline {
            cfg.cmdline = Some(v.clone());
        }
        if let Some(v) = self.vcpus {
            cfg.vcpus = v;
        }
        if let Some(v) = self.mem_mib {
            cfg.mem_mib = v;
        }
        if let Some(v) = &self.serial_log {
            cfg.serial = SerialOutput::File(v.clone());
        }
        cfg.track_dirty_pages |= self.track_dirty_pages;
        if let Some(p) = self.profile {
            cfg.profile = Some(match p {
                ProfileArg::Standard => GuestProfile::Standard,
                ProfileArg::Pvm => GuestProfile::Pvm,
            });
        }
        Ok(cfg)
    }
}

/// Runs the VM; returns the process exit code.
pub fn run(args: RunArgs) -> i32 {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 1;
        }
    };
    let vm = match vmm::build_for_boot(&config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: cannot start the VM: {e}");
            return 1;
        }
    };
    let reason = vm.run();
    let code = reason.exit_code();
    if code == 0 {
        log::info!("{reason}");
    } else {
        eprintln!("vmm: {reason}");
    }
    code
}

//! `vmm run`: build a VM from flags or a JSON config and run it in the
//! foreground until the guest ends.

use std::path::PathBuf;

use crate::device_args;
use clap::Args;
use vmm::config::SerialOutput;
use vmm::controller::Controller;
use vmm::devices_config::{BlockConfig, NetConfig, VsockConfig};
use vmm::profile::GuestProfile;
use vmm::snapshot::{MemoryBackend, RestoreParams, MEMORY_FILE, STATE_FILE};
use vmm::VmConfig;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// JSON VM configuration (same fields as the flags); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON) on this Unix socket. Without a
    /// kernel or --restore, the VMM waits for PUT /snapshot/load.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Restore the snapshot in DIR (DIR/vmstate and DIR/memory) and resume it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "kernel", "initrd", "rootfs", "cmdline", "vcpus", "mem_mib", "profile", "drive", "net", "vsock"])]
    restore: Option<PathBuf>,
    /// With --restore: leave the VM paused.
    #[arg(long, requires = "restore")]
    paused: bool,
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
    /// Extra disk: path=FILE[,ro][,id=NAME] (repeatable).
    #[arg(long, value_name = "SPEC", value_parser = device_args::parse_drive)]
    drive: Vec<BlockConfig>,
    /// Network interface on a TAP device: tap=NAME[,mac=MAC] (repeatable).
    #[arg(long, value_name = "SPEC", value_parser = device_args::parse_net)]
    net: Vec<NetConfig>,
    /// vsock device: cid=N,uds=PATH (host side is a Unix socket).
    #[arg(long, value_name = "SPEC", value_parser = device_args::parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Write the guest console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial_log: Option<PathBuf>,
    /// Track dirty pages (needed for diff snapshots).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Guest profile (default: detected from the host's KVM).
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
    /// Run without seccomp filters (debugging only: any syscall allowed).
    #[arg(long)]
    no_seccomp: bool,
    /// The product sandbox this VMM runs: its snapshot schedule is run by a
    /// thread of this process (set by `vmm use`, not meant for users).
    #[arg(long, value_name = "NAME", hide = true, requires = "sandbox_state")]
    sandbox: Option<String>,
    /// The state directory of `--sandbox`.
    #[arg(long, value_name = "DIR", hide = true, requires = "sandbox")]
    sandbox_state: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ProfileArg {
    Standard,
    Pvm,
}

impl RunArgs {
    /// The VM configuration: the file's (if any) with flags applied on top;
    /// None when there is nothing to boot.
    fn to_config(&self) -> Result<Option<VmConfig>, String> {
        let mut cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            (None, Some(kernel)) => VmConfig::new(kernel),
            (None, None) => return Ok(None),
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
        cfg.drives.extend(self.drive.iter().cloned());
        cfg.net.extend(self.net.iter().cloned());
        if let Some(v) = &self.vsock {
            cfg.vsock = Some(v.clone());
        }
        if let Some(p) = self.profile {
            cfg.profile = Some(match p {
                ProfileArg::Standard => GuestProfile::Standard,
                ProfileArg::Pvm => GuestProfile::Pvm,
            });
        }
        Ok(Some(cfg))
    }

    fn serial(&self) -> SerialOutput {
        match &self.serial_log {
            Some(path) => SerialOutput::File(path.clone()),
            None => SerialOutput::Stdout,
        }
    }

    /// The VM to start with, if any: booted, restored, or none (API load).
    fn initial_vm(&self) -> Result<Option<vmm::Microvm>, String> {
        if let Some(dir) = &self.restore {
            let params = RestoreParams {
                state_path: dir.join(STATE_FILE),
                memory: MemoryBackend::File(dir.join(MEMORY_FILE)),
                track_dirty_pages: self.track_dirty_pages,
                serial: self.serial(),
                overrides: Default::default(),
            };
            let mut vm = vmm::snapshot::build_from_snapshot(&params)
                .map_err(|e| format!("cannot restore {}: {e}", dir.display()))?;
            let started = if self.paused {
                vm.start_paused()
            } else {
                vm.start()
            };
            started.map_err(|e| format!("cannot start the restored VM: {e}"))?;
            return Ok(Some(vm));
        }
        match self.to_config()? {
            Some(config) => vmm::build_for_boot(&config)
                .map(Some)
                .map_err(|e| format!("cannot start the VM: {e}")),
            None if self.api_sock.is_some() => Ok(None),
            None => Err("nothing to run: give --kernel, --config, --restore or --api-sock".into()),
        }
    }
}

/// Runs the VM; returns the process exit code.
pub fn run(args: RunArgs) -> i32 {
    // Before any VMM thread starts: each reads it as it installs its filter.
    vmm::seccomp::set_enabled(!args.no_seccomp);
    // First, while no thread has a filter: the scheduler installs its own.
    if let (Some(name), Some(state)) = (&args.sandbox, &args.sandbox_state) {
        if let Err(e) = crate::product::start_scheduler(state, name) {
            eprintln!("vmm: {e}");
            return 1;
        }
    }
    let vm = match args.initial_vm() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 1;
        }
    };
    let controller = match Controller::new(vm, args.api_sock.as_deref(), args.serial()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 1;
        }
    };
    let reason = controller.run();
    let code = reason.exit_code();
    if code == 0 {
        log::info!("{reason}");
    } else {
        eprintln!("vmm: {reason}");
    }
    code
}

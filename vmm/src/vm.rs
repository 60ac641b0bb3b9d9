//! The KVM VM: memory slots, the in-kernel interrupt controllers and PIT,
//! and interrupt/notification plumbing (irqfd, ioeventfd).

use devices::GuestMemoryMmap;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDRESS;

/// A KVM failure, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks a capability the VMM needs: {0}")]
    MissingCap(&'static str),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm and checks the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let required = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    for (cap, name) in required {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// A VM with its in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
pub struct Vm {
    fd: VmFd,
    dirty_tracking: bool,
}

impl Vm {
    /// Creates the VM, registers `mem` as its memory slots (slot i = region
    /// i, with dirty logging when `track_dirty` is set), then creates the
    /// in-kernel irqchip and PIT.
    ///
    /// Memory comes before the irqchip on purpose: on kvm_pvm, registering a
    /// 1 GiB slot after KVM_CREATE_IRQCHIP takes ~6.6 ms, before it ~0.4 ms
    /// (measured with a bare ioctl sequence), and that is most of a restore.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let vm = Self {
            fd,
            dirty_tracking: track_dirty,
        };
        vm.register_memory(mem)?;
        vm.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(vm)
    }

    fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let userspace_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MissingCap("host address of a guest memory region"))?
                as u64;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if self.dirty_tracking {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr,
            };
            // SAFETY: the region's mapping is owned by `mem`, which the VMM
            // keeps alive for as long as the VM exists, and it covers exactly
            // `memory_size` bytes from `userspace_addr`.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Whether KVM logs dirty pages for this VM's memory.
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_tracking
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

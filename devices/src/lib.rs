//! Emulated devices: the bus the vCPUs dispatch port and MMIO accesses to,
//! legacy PC devices (serial, i8042) and virtio devices over virtio-mmio.
//!
//! This crate does not depend on KVM: interrupts are delivered through the
//! [`interrupt::Interrupt`] trait (an irqfd underneath).

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod virtio;

/// Guest memory as every device sees it: mmap-backed, with a bitmap that
/// records pages the VMM itself writes (device DMA), so diff snapshots include
/// them even though KVM's dirty log does not.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

//! Places devices on the port I/O and MMIO buses, wires their interrupts to
//! KVM (irqfd) and their queue notifications (ioeventfd), and tells the
//! kernel where virtio devices are on its command line.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::{Interrupt, IrqFd};
use devices::legacy::{
    I8042State, Serial, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN, I8042, I8042_KBD_IRQ,
};
use devices::virtio::block::{Block, BlockConfig, BlockConstructorArgs, BlockState};
use devices::virtio::mmio::{
    MmioTransport, MmioTransportConstructorArgs, MmioTransportState, MMIO_SIZE, NOTIFY_REG_OFFSET,
};
use devices::virtio::net::{Net, NetConfig, NetConstructorArgs, NetState};
use devices::virtio::vsock::{Vsock, VsockConfig, VsockConstructorArgs, VsockState};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IRQ_FIRST_VIRTIO, IRQ_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::console::Console;
use crate::microvm::Subscriber;
use crate::stop::{GuestResetLine, VmStop};
use crate::vm::{kvm_err, Vm, VmError};

/// Why a device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("placing {device} on the bus: {source}")]
    Bus {
        device: &'static str,
        source: BusError,
    },
    #[error("creating an eventfd for {device}: {source}")]
    EventFd {
        device: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("restoring {device}: {reason}")]
    Restore {
        device: &'static str,
        reason: String,
    },
    #[error("virtio device {id}: {reason}")]
    Virtio { id: String, reason: String },
    #[error("no IOAPIC pin left for virtio device {0} (at most {max} virtio devices)", max = IRQ_MAX - IRQ_FIRST_VIRTIO + 1)]
    OutOfIrqs(String),
}

/// A virtio device's kind, configuration and, once running, its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VirtioState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
}

/// One virtio-mmio slot in a snapshot: where it sits and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// Stable id used by restore overrides (`rootfs`, `drive1`, `eth0`, `vsock`).
    pub id: String,
    pub base: u64,
    pub irq: u32,
    pub device: VirtioState,
    pub transport: MmioTransportState,
}

/// Host resources a restored device may be pointed at instead of the saved
/// ones (each sandbox restored from one snapshot has its own).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Drive id to host file.
    pub drives: Vec<(String, std::path::PathBuf)>,
    /// Interface id to TAP name.
    pub taps: Vec<(String, String)>,
    /// New vsock Unix socket path.
    pub vsock_uds: Option<std::path::PathBuf>,
}

impl RestoreOverrides {
    fn drive(&self, id: &str) -> Option<std::path::PathBuf> {
        self.drives
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, p)| p.clone())
    }

    fn tap(&self, id: &str) -> Option<String> {
        self.taps
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, t)| t.clone())
    }

    /// Ids that match no device of the snapshot.
    pub fn unknown_ids(&self, slots: &[VirtioSlotState]) -> Vec<String> {
        let known = |id: &str| slots.iter().any(|s| s.id == id);
        self.drives
            .iter()
            .map(|(id, _)| id)
            .chain(self.taps.iter().map(|(id, _)| id))
            .filter(|id| !known(id))
            .cloned()
            .collect()
    }
}

/// A running virtio device: its transport on the MMIO bus and the device.
struct VirtioSlot {
    id: String,
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
    device: VirtioKind,
}

enum VirtioKind {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Vsock(Arc<Mutex<Vsock>>),
}

impl VirtioKind {
    fn as_virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioKind::Block(d) => d.clone(),
            VirtioKind::Net(d) => d.clone(),
            VirtioKind::Vsock(d) => d.clone(),
        }
    }

    fn as_subscriber(&self) -> Subscriber {
        match self {
            VirtioKind::Block(d) => d.clone(),
            VirtioKind::Net(d) => d.clone(),
            VirtioKind::Vsock(d) => d.clone(),
        }
    }

    fn save(&self) -> VirtioState {
        match self {
            VirtioKind::Block(d) => VirtioState::Block(lock(d).save()),
            VirtioKind::Net(d) => VirtioState::Net(lock(d).save()),
            VirtioKind::Vsock(d) => VirtioState::Vsock(lock(d).save()),
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Saved state of all devices.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    #[serde(default)]
    pub virtio: Vec<VirtioSlotState>,
}

/// The devices of a VM and the buses they sit on.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    /// Kernel command-line arguments describing the devices.
    cmdline: Vec<String>,
    virtio: Vec<VirtioSlot>,
}

fn eventfd(device: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { device, source })
}

/// An interrupt line for ISA IRQ `gsi`, delivered by KVM through an irqfd.
fn irq_line(vm: &Vm, gsi: u32, device: &'static str) -> Result<Box<dyn Interrupt>, DeviceError> {
    let evt = eventfd(device)?;
    vm.fd()
        .register_irqfd(&evt, gsi)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Box::new(IrqFd::new(evt)))
}

fn restore_err(device: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |e| DeviceError::Restore {
        device,
        reason: e.to_string(),
    }
}

impl DeviceManager {
    /// Creates COM1 (the console) and the i8042, whose reset line reports a
    /// guest reset to `stop`, fresh or from `state` when restoring a snapshot.
    pub fn new(
        vm: &Vm,
        console: Console,
        stop: &Arc<VmStop>,
        state: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let serial_irq = irq_line(vm, COM1_IRQ, "serial interrupt")?;
        let serial = match state {
            None => Serial::new(serial_irq, Box::new(console)),
            Some(s) => Serial::restore((serial_irq, Box::new(console)), &s.serial)
                .map_err(restore_err("serial"))?,
        };
        let serial = Arc::new(Mutex::new(serial));

        let reset = Box::new(GuestResetLine(stop.clone()));
        let kbd_irq = irq_line(vm, I8042_KBD_IRQ, "i8042 interrupt")?;
        let i8042 = match state {
            None => I8042::new(reset, kbd_irq),
            Some(s) => I8042::restore((reset, kbd_irq), &s.i8042).map_err(restore_err("i8042"))?,
        };
        let i8042 = Arc::new(Mutex::new(i8042));

        let mut pio = Bus::new();
        let bus_err = |device| move |source| DeviceError::Bus { device, source };
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(bus_err("serial"))?;
        pio.insert(i8042.clone(), I8042::BASE, I8042::LEN)
            .map_err(bus_err("i8042"))?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            i8042,
            cmdline: Vec::new(),
            virtio: Vec::new(),
        })
    }

    /// The next free MMIO window and IOAPIC pin.
    fn next_slot(&self, id: &str) -> Result<(u64, u32), DeviceError> {
        let n = self.virtio.len() as u32;
        let irq = IRQ_FIRST_VIRTIO + n;
        if irq > IRQ_MAX {
            return Err(DeviceError::OutOfIrqs(id.to_string()));
        }
        Ok((VIRTIO_MMIO_START + u64::from(n) * VIRTIO_MMIO_SIZE, irq))
    }

    /// Puts a transport on the MMIO bus at `base` with interrupt `irq`:
    /// irqfd for the interrupt, one ioeventfd per queue, a command-line entry.
    fn attach(
        &mut self,
        vm: &Vm,
        id: String,
        base: u64,
        irq: u32,
        transport: MmioTransport,
        device: VirtioKind,
    ) -> Result<(), DeviceError> {
        for (i, evt) in transport.queue_notify_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_SIZE)
            .map_err(|source| DeviceError::Bus {
                device: "virtio-mmio",
                source,
            })?;
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.virtio.push(VirtioSlot {
            id,
            base,
            irq,
            transport,
            device,
        });
        Ok(())
    }

    fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: String,
        device: VirtioKind,
    ) -> Result<(), DeviceError> {
        let (base, irq) = self.next_slot(&id)?;
        let line = irq_line(vm, irq, "virtio interrupt")?;
        let transport = MmioTransport::new(mem.clone(), device.as_virtio(), line).map_err(|e| {
            DeviceError::Virtio {
                id: id.clone(),
                reason: e.to_string(),
            }
        })?;
        self.attach(vm, id, base, irq, transport, device)
    }

    /// Adds a virtio-blk disk.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: String,
        config: BlockConfig,
    ) -> Result<(), DeviceError> {
        let dev = Block::new(config).map_err(|e| DeviceError::Virtio {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        self.add(vm, mem, id, VirtioKind::Block(Arc::new(Mutex::new(dev))))
    }

    /// Adds a virtio-net interface on a TAP device.
    pub fn add_net(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: String,
        config: NetConfig,
    ) -> Result<(), DeviceError> {
        let dev = Net::new(config).map_err(|e| DeviceError::Virtio {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        self.add(vm, mem, id, VirtioKind::Net(Arc::new(Mutex::new(dev))))
    }

    /// Adds the virtio-vsock device.
    pub fn add_vsock(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        config: VsockConfig,
    ) -> Result<(), DeviceError> {
        let dev = Vsock::new(&config).map_err(|e| DeviceError::Virtio {
            id: "vsock".into(),
            reason: e.to_string(),
        })?;
        self.add(
            vm,
            mem,
            "vsock".into(),
            VirtioKind::Vsock(Arc::new(Mutex::new(dev))),
        )
    }

    /// Rebuilds the virtio devices of a snapshot, in their saved slots.
    pub fn restore_virtio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        slots: &[VirtioSlotState],
        overrides: &RestoreOverrides,
    ) -> Result<(), DeviceError> {
        for slot in slots {
            let err = |reason: String| DeviceError::Virtio {
                id: slot.id.clone(),
                reason,
            };
            // Slots are handed out in order at boot; a saved window or pin
            // anywhere else (a damaged or forged state file) could overlap
            // RAM or another device.
            let (base, irq) = self.next_slot(&slot.id)?;
            if (slot.base, slot.irq) != (base, irq) {
                return Err(err(format!(
                    "saved at MMIO {:#x} IRQ {}, but device {} of a VM sits at MMIO {base:#x} IRQ {irq}",
                    slot.base,
                    slot.irq,
                    self.virtio.len()
                )));
            }
            let device = match &slot.device {
                VirtioState::Block(s) => {
                    let args = BlockConstructorArgs {
                        path_override: overrides.drive(&slot.id),
                    };
                    VirtioKind::Block(Arc::new(Mutex::new(
                        Block::restore(args, s).map_err(|e| err(e.to_string()))?,
                    )))
                }
                VirtioState::Net(s) => {
                    let args = NetConstructorArgs {
                        tap_override: overrides.tap(&slot.id),
                    };
                    VirtioKind::Net(Arc::new(Mutex::new(
                        Net::restore(args, s).map_err(|e| err(e.to_string()))?,
                    )))
                }
                VirtioState::Vsock(s) => {
                    let args = VsockConstructorArgs {
                        uds_path_override: overrides.vsock_uds.clone(),
                    };
                    VirtioKind::Vsock(Arc::new(Mutex::new(
                        Vsock::restore(args, s).map_err(|e| err(e.to_string()))?,
                    )))
                }
            };
            let line = irq_line(vm, slot.irq, "virtio interrupt")?;
            let args = MmioTransportConstructorArgs {
                mem: mem.clone(),
                device: device.as_virtio(),
                interrupt: line,
            };
            let transport =
                MmioTransport::restore(args, &slot.transport).map_err(|e| err(e.to_string()))?;
            self.attach(vm, slot.id.clone(), slot.base, slot.irq, transport, device)?;
        }
        Ok(())
    }

    /// Event-loop subscribers of the virtio devices.
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.virtio
            .iter()
            .map(|s| s.device.as_subscriber())
            .collect()
    }

    /// Saves the state of every device; the VM must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioSlotState {
                    id: slot.id.clone(),
                    base: slot.base,
                    irq: slot.irq,
                    // The device first: saving the transport locks it.
                    device: slot.device.save(),
                    transport: lock(&slot.transport).save(),
                })
                .collect(),
        }
    }

    /// Kernel command-line arguments for the devices.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline
    }
}

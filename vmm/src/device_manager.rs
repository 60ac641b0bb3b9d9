//! Places devices on the port I/O and MMIO buses, wires their interrupts to
//! KVM (irqfd) and their queue notifications (ioeventfd), and tells the
//! kernel where virtio devices are on its command line.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::{Interrupt, IrqFd};
use devices::legacy::{
    I8042State, Serial, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN, I8042, I8042_KBD_IRQ,
};
use snapshot::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
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
}

/// Saved state of all devices.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
}

/// The devices of a VM and the buses they sit on.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    /// Written by the i8042 when the guest resets the CPU.
    pub reset_evt: EventFd,
    /// Kernel command-line arguments describing the devices.
    cmdline: Vec<String>,
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
    /// Creates COM1 (the console) and the i8042, fresh or from `state`
    /// when restoring a snapshot.
    pub fn new(
        vm: &Vm,
        console: Console,
        state: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let serial_irq = irq_line(vm, COM1_IRQ, "serial interrupt")?;
        let serial = match state {
            None => Serial::new(serial_irq, Box::new(console)),
            Some(s) => Serial::restore((serial_irq, Box::new(console)), &s.serial)
                .map_err(restore_err("serial"))?,
        };
        let serial = Arc::new(Mutex::new(serial));

        let reset_evt = eventfd("i8042 reset")?;
        let reset_clone = reset_evt
            .try_clone()
            .map_err(|source| DeviceError::EventFd {
                device: "i8042 reset",
                source,
            })?;
        let kbd_irq = irq_line(vm, I8042_KBD_IRQ, "i8042 interrupt")?;
        let i8042 = match state {
            None => I8042::new(reset_clone, kbd_irq),
            Some(s) => {
                I8042::restore((reset_clone, kbd_irq), &s.i8042).map_err(restore_err("i8042"))?
            }
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
            reset_evt,
            cmdline: Vec::new(),
        })
    }

    /// Saves the state of every device; the VM must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
            i8042: self.i8042.lock().unwrap_or_else(|e| e.into_inner()).save(),
        }
    }

    /// Kernel command-line arguments for the devices.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline
    }
}

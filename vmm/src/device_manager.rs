//! Places devices on the port I/O and MMIO buses, wires their interrupts to
//! KVM (irqfd) and their queue notifications (ioeventfd), and tells the
//! kernel where virtio devices are on its command line.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::IrqFd;
use devices::legacy::{Serial, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN, I8042};
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
}

/// The legacy devices every VM has.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<Serial>>,
    /// Written by the i8042 when the guest resets the CPU.
    pub reset_evt: EventFd,
    /// Kernel command-line arguments describing the devices.
    cmdline: Vec<String>,
}

fn eventfd(device: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { device, source })
}

impl DeviceManager {
    /// Creates COM1 (console) and the i8042, with the serial interrupt
    /// delivered through an irqfd; the UART starts from `serial_state` when
    /// restoring a snapshot.
    pub fn new(
        vm: &Vm,
        console: Console,
        serial_state: Option<&SerialState>,
    ) -> Result<Self, DeviceError> {
        let irq = eventfd("serial interrupt")?;
        vm.fd()
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let line = Box::new(IrqFd::new(irq));
        let serial = match serial_state {
            None => Serial::new(line, Box::new(console)),
            Some(state) => Serial::restore((line, Box::new(console)), state).map_err(|e| {
                DeviceError::Restore {
                    device: "serial",
                    reason: e.to_string(),
                }
            })?,
        };
        let serial = Arc::new(Mutex::new(serial));

        let reset_evt = eventfd("i8042 reset")?;
        let i8042 = I8042::new(
            reset_evt
                .try_clone()
                .map_err(|source| DeviceError::EventFd {
                    device: "i8042 reset",
                    source,
                })?,
        );

        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(|source| DeviceError::Bus {
                device: "serial",
                source,
            })?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042::BASE, I8042::LEN)
            .map_err(|source| DeviceError::Bus {
                device: "i8042",
                source,
            })?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            reset_evt,
            cmdline: Vec::new(),
        })
    }

    /// Saves the state of every device; the VM must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
        }
    }

    /// Kernel command-line arguments for the devices.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline
    }
}

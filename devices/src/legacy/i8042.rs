//! The i8042 keyboard controller, emulated only as far as its CPU reset
//! line: a guest `reboot` (kernel `reboot=k`) writes 0xFE to port 0x64, which
//! the VMM treats as the end of the VM.

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Port base and length: data port 0x60 through command port 0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

struct ResetTrigger(EventFd);

impl Trigger for ResetTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The controller; signals `reset_evt` when the guest resets the CPU.
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Port base of the device.
    pub const BASE: u64 = I8042_BASE;
    /// Number of ports covered.
    pub const LEN: u64 = I8042_LEN;

    /// A controller that writes `reset_evt` on a CPU reset command.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetTrigger(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = self.dev.read(offset as u8),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            if let Err(e) = self.dev.write(offset as u8, *value) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(4, &[0x01]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}

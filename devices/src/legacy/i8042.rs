//! The i8042 keyboard controller: enough of it that a Linux guest's driver
//! probes it quickly (controller self-test, command byte, keyboard ACKs),
//! and its CPU reset line, which a guest `reboot` (kernel `reboot=k`) pulls
//! and the VMM treats as the end of the VM.

use std::collections::VecDeque;
use std::io;

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;

/// Port base and length: data port 0x60 through command/status port 0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// ISA IRQ of the keyboard port.
pub const I8042_KBD_IRQ: u32 = 1;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_UNLOCKED: u8 = 0x10;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Command byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
const KBD_ACK: u8 = 0xfa;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_RESET_OK: u8 = 0xaa;
/// The output buffer holds at most this many bytes; older ones are dropped.
const OUT_CAPACITY: usize = 16;

/// Where the controller's CPU reset line goes.
///
/// It is pulled on the vCPU thread that wrote the command, so the VMM can
/// record the reset before that vCPU runs on: after pulsing the line, Linux
/// falls back to other reboot methods that end in a triple fault, which must
/// not be mistaken for a crash.
pub trait ResetLine: Send {
    /// The guest asked for a CPU reset.
    fn pull(&self);
}

/// The controller's registers, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub ctr: u8,
    pub outport: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    pub output: Vec<u8>,
}

/// The controller; pulls its reset line when the guest resets the CPU.
pub struct I8042 {
    reset: Box<dyn ResetLine>,
    kbd_irq: Box<dyn Interrupt>,
    status: u8,
    ctr: u8,
    outport: u8,
    pending: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    /// Port base of the device.
    pub const BASE: u64 = I8042_BASE;
    /// Number of ports covered.
    pub const LEN: u64 = I8042_LEN;

    /// A controller in its power-on state.
    pub fn new(reset: Box<dyn ResetLine>, kbd_irq: Box<dyn Interrupt>) -> Self {
        Self {
            reset,
            kbd_irq,
            status: SB_KBD_UNLOCKED,
            ctr: CTR_KBD_INT | CTR_AUX_DISABLE,
            outport: 0x01,
            pending: None,
            output: VecDeque::new(),
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() == OUT_CAPACITY {
            self.output.pop_front();
        }
        self.output.push_back(byte);
        self.status |= SB_OUT_FULL;
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.kbd_irq.trigger() {
                log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if self.output.is_empty() {
            self.status &= !SB_OUT_FULL;
        }
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPORT | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_SELF_TEST => {
                self.status |= SB_SYSTEM;
                self.push_output(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.push_output(PORT_TEST_OK),
            // No auxiliary (mouse) port: report its clock line stuck low.
            CMD_AUX_TEST => self.push_output(0x01),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPORT => self.push_output(self.outport),
            CMD_RESET_CPU => self.reset.pull(),
            other => log::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTPORT) => self.outport = byte,
            // Bytes for the (absent) mouse are dropped.
            Some(_) => {}
            // A byte for the keyboard: acknowledge it like a real one.
            None => {
                self.push_output(KBD_ACK);
                if byte == KBD_CMD_RESET {
                    self.push_output(KBD_RESET_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status,
            _ => 0,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            DATA_OFFSET => self.write_data(*value),
            COMMAND_OFFSET => self.command(*value),
            _ => {}
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = (Box<dyn ResetLine>, Box<dyn Interrupt>);
    type Error = io::Error;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outport: self.outport,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
        }
    }

    fn restore((reset, kbd_irq): Self::ConstructorArgs, s: &I8042State) -> io::Result<Self> {
        if s.output.len() > OUT_CAPACITY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "i8042 output buffer of {} bytes (max {OUT_CAPACITY})",
                    s.output.len()
                ),
            ));
        }
        Ok(Self {
            reset,
            kbd_irq,
            status: s.status,
            ctr: s.ctr,
            outport: s.outport,
            pending: s.pending,
            output: s.output.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Default, Clone)]
    struct Counter(Arc<AtomicUsize>);
    impl Interrupt for Counter {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    impl ResetLine for Counter {
        fn pull(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The device, its reset line's pulls and its interrupts.
    fn dev() -> (I8042, Counter, Counter) {
        let (reset, irq) = (Counter::default(), Counter::default());
        let dev = I8042::new(Box::new(reset.clone()), Box::new(irq.clone()));
        (dev, reset, irq)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn linux_probe_sequence_answers() {
        let (mut d, _, irq) = dev();
        assert_eq!(rd(&mut d, 4) & SB_OUT_FULL, 0);
        d.write(4, &[CMD_SELF_TEST]);
        assert_ne!(rd(&mut d, 4) & SB_OUT_FULL, 0);
        assert_eq!(rd(&mut d, 0), SELF_TEST_OK);
        assert_eq!(rd(&mut d, 4) & SB_OUT_FULL, 0);
        d.write(4, &[CMD_READ_CTR]);
        let ctr = rd(&mut d, 0);
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[ctr & !CTR_KBD_INT]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, 0), ctr & !CTR_KBD_INT);
        let before = irq.0.load(Ordering::SeqCst);
        d.write(0, &[KBD_CMD_RESET]);
        assert_eq!(
            irq.0.load(Ordering::SeqCst),
            before,
            "interrupts disabled in CTR"
        );
        assert_eq!((rd(&mut d, 0), rd(&mut d, 0)), (KBD_ACK, KBD_RESET_OK));
        assert_ne!(before, 0, "interrupts were on at first");
    }

    #[test]
    fn reset_command_signals_event() {
        let (mut d, reset, _) = dev();
        d.write(4, &[CMD_KBD_TEST]);
        assert_eq!(reset.0.load(Ordering::SeqCst), 0, "no reset yet");
        d.write(4, &[CMD_RESET_CPU]);
        assert_eq!(reset.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let (mut d, reset, irq) = dev();
        d.write(4, &[CMD_READ_CTR]);
        d.write(4, &[CMD_WRITE_OUTPORT]);
        let s = d.save();
        let r = I8042::restore((Box::new(reset.clone()), Box::new(irq.clone())), &s).unwrap();
        assert_eq!(r.save(), s);
        let mut bad = s.clone();
        bad.output = vec![0; OUT_CAPACITY + 1];
        assert!(I8042::restore((Box::new(reset), Box::new(irq)), &bad).is_err());
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut d, _, _) = dev();
        d.write(0, &[1, 2]);
        d.write(2, &[1]);
        let mut wide = [0xffu8; 4];
        d.read(0, &mut wide);
        assert_eq!(wide, [0, 0, 0, 0]);
        for _ in 0..100 {
            d.write(0, &[0x42]);
        }
        assert!(d.output.len() <= OUT_CAPACITY);
    }
}

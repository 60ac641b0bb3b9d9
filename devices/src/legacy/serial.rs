//! The guest's serial console: a 16550 UART (vm-superio) on COM1.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;

/// COM1's port base, length and ISA IRQ.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Adapts our [`Interrupt`] to vm-superio's trigger.
struct IrqTrigger(Box<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550 UART whose output goes to any writer (stdout, a log file).
pub struct Serial {
    uart: Uart,
}

impl Serial {
    /// A UART in its power-on state.
    pub fn new(interrupt: Box<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(interrupt), out),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes fit
    /// in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity();
        let n = input.len().min(room);
        if n == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&input[..n])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }

    /// Flushes buffered guest output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            // An output error (a closed log) must not stop the guest; the
            // UART itself stays consistent.
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                log::warn!("serial write: {e:?}");
            }
        }
    }
}

/// Saved UART registers and unread input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Persist for Serial {
    type State = SerialState;
    type ConstructorArgs = (Box<dyn Interrupt>, Box<dyn Write + Send>);
    type Error = io::Error;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(
        (interrupt, out): Self::ConstructorArgs,
        s: &SerialState,
    ) -> Result<Self, io::Error> {
        let state = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Uart::from_state(&state, IrqTrigger(interrupt), NoEvents, out)
            .map_err(|e| io::Error::other(format!("invalid serial state: {e:?}")))?;
        Ok(Self { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Counter(Arc<AtomicUsize>);
    impl Interrupt for Counter {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Default, Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_writer_and_state_round_trips() {
        let sink = Sink::default();
        let irq = Counter::default();
        let mut s = Serial::new(Box::new(irq.clone()), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        s.write(3, &[0x03]); // line control
        s.write(1, &[0x01]); // enable rx interrupt
        assert_eq!(s.enqueue_input(b"xy").unwrap(), 2);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let state = s.save();
        let mut r = Serial::restore((Box::new(irq), Box::new(sink)), &state).unwrap();
        assert_eq!(r.save(), state);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let sink = Sink::default();
        let mut s = Serial::new(Box::new(Counter::default()), Box::new(sink.clone()));
        s.write(0, b"ab");
        let mut b = [0u8; 2];
        s.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}

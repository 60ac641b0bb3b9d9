//! Legacy PC devices on port I/O: the 16550 serial console and the i8042
//! controller whose reset line ends the VM.

mod i8042;
mod serial;

pub use i8042::{I8042State, ResetLine, I8042, I8042_KBD_IRQ};
pub use serial::{Serial, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN};

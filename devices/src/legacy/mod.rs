//! Legacy PC devices on port I/O: the 16550 serial console and the i8042
//! controller whose reset line ends the VM.

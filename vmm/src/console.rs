//! Where the guest's serial output goes: stdout or a log file, written a line
//! at a time, and watched for a kernel panic so the VMM can end with a
//! non-zero exit code instead of treating the panic's reboot as a clean exit.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// What the kernel prints first when it panics (KERN_EMERG, shown even with
/// `quiet`).
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Partial lines are pushed out at this size even without a newline.
const MAX_PENDING: usize = 4096;

struct Inner {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    /// The line being received, kept apart from `pending` (which partial
    /// flushes empty) so the panic watch always sees whole lines.
    line: Vec<u8>,
    panic: Option<(String, Instant)>,
}

impl Inner {
    fn write_out(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|_| self.out.flush());
        self.pending.clear();
        result
    }
}

impl Inner {
    /// Feeds output to the panic watch a line at a time.
    fn watch(&mut self, buf: &[u8]) {
        for &b in buf {
            if b != b'\n' {
                if self.line.len() < MAX_PENDING {
                    self.line.push(b);
                }
                continue;
            }
            if self.panic.is_none() {
                if let Some(pos) = find(&self.line, PANIC_MARKER) {
                    let line = String::from_utf8_lossy(&self.line[pos..]);
                    self.panic = Some((line.trim_end().to_string(), Instant::now()));
                }
            }
            self.line.clear();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The console sink, cloneable: one clone goes into the UART, the others let
/// the VMM flush partial lines (prompts) and ask whether the guest panicked.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                out,
                pending: Vec::new(),
                line: Vec::new(),
                panic: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes out any partial line.
    pub fn sync(&self) -> io::Result<()> {
        self.lock().write_out()
    }

    /// The panic line and when it was seen, if the guest kernel panicked.
    pub fn panic(&self) -> Option<(String, Instant)> {
        self.lock().panic.clone()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.lock();
        inner.watch(buf);
        inner.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || inner.pending.len() >= MAX_PENDING {
            inner.write_out()?;
        }
        Ok(buf.len())
    }

    /// The UART flushes after every byte; lines are written out as they
    /// complete instead, and partial lines by [`Console::sync`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
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
    fn panic_line_is_whole_even_when_a_partial_line_was_flushed() {
        let mut c = Console::new(Box::new(Sink::default()));
        c.write_all(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root")
            .unwrap();
        c.sync().unwrap();
        assert!(c.panic().is_none(), "only whole lines count");
        c.write_all(b" fs on unknown-block(0,0)\n").unwrap();
        let (line, _) = c.panic().unwrap();
        assert_eq!(
            line,
            "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
        );
    }

    #[test]
    fn writes_whole_lines_and_syncs_partial_ones() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        for b in b"hello\nwor" {
            c.write_all(&[*b]).unwrap();
            c.flush().unwrap();
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        c.sync().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\nwor");
        assert!(c.panic().is_none());
    }

    #[test]
    fn detects_kernel_panic() {
        let mut c = Console::new(Box::new(Sink::default()));
        c.write_all(b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        let (line, _) = c.panic().unwrap();
        assert_eq!(line, "Kernel panic - not syncing: Attempted to kill init!");
    }
}

//! The guest console as the host sees it: the output stream, when it started, and the
//! result line a guest program ends with.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use splitvisor_guests::GuestResult;

/// Longest console line kept while looking for the result line; longer lines are cut.
const MAX_LINE: usize = 4096;

/// What Linux prints when it panics (`panic()`: `Kernel panic - not syncing: <why>`).
pub const LINUX_PANIC_MARKER: &str = "Kernel panic - not syncing";

/// What the console has shown so far. Shared between the UART's writer and the VM owner.
#[derive(Debug, Default)]
pub struct ConsoleState {
    first_output: OnceLock<Instant>,
    result: Mutex<Option<GuestResult>>,
    panic: OnceLock<String>,
    line: Mutex<Vec<u8>>,
}

impl ConsoleState {
    /// When the guest wrote its first byte.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output.get().copied()
    }

    /// The first result line the guest printed.
    pub fn result(&self) -> Option<GuestResult> {
        self.result.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The guest's first kernel panic line, from the marker on (at most a console
    /// line), if it printed one.
    pub fn panic(&self) -> Option<String> {
        self.panic.get().cloned()
    }

    fn observe(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let _ = self.first_output.set(Instant::now());
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        for &byte in bytes {
            if byte == b'\n' {
                let text = String::from_utf8_lossy(&line);
                if let Some(result) = GuestResult::parse_line(&text) {
                    self.result.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(result);
                }
                if let Some(at) = text.find(LINUX_PANIC_MARKER) {
                    let _ = self.panic.set(text[at..].trim_end().to_string());
                }
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(byte);
            }
        }
    }
}

/// A writer that passes the guest's output on to `inner` and watches it.
pub struct ConsoleTap {
    inner: Box<dyn Write + Send>,
    state: Arc<ConsoleState>,
}

impl ConsoleTap {
    /// Watches what goes to `inner`.
    pub fn new(inner: Box<dyn Write + Send>, state: Arc<ConsoleState>) -> Self {
        Self { inner, state }
    }
}

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.state.observe(buf);
        // A console the host cannot write to (a closed pipe) must not stop the guest.
        if let Err(e) = self.inner.write_all(buf).and_then(|()| self.inner.flush()) {
            log::debug!("console output dropped: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A console writer whose bytes can be read back: for tests, benches and anything that
/// wants the guest's output as a string ([`ConsoleOutput::Writer`](crate::ConsoleOutput)).
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// What was written so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_result_across_writes_and_keeps_the_first() {
        let state = Arc::new(ConsoleState::default());
        let mut tap = ConsoleTap::new(Box::new(io::sink()), state.clone());
        assert!(state.first_output().is_none());
        tap.write_all(b"hello\nSPLITVISOR-RES").unwrap();
        assert!(state.first_output().is_some());
        assert_eq!(state.result(), None);
        tap.write_all(b"ULT: PASS\nSPLITVISOR-RESULT: FAIL late\n").unwrap();
        assert_eq!(state.result(), Some(GuestResult::Pass));
    }

    #[test]
    fn finds_the_first_kernel_panic_line() {
        let state = Arc::new(ConsoleState::default());
        let mut tap = ConsoleTap::new(Box::new(io::sink()), state.clone());
        tap.write_all(b"[    1.0] Run /init as init process\n").unwrap();
        assert_eq!(state.panic(), None);
        tap.write_all(
            b"[   40.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n",
        )
        .unwrap();
        tap.write_all(b"[   40.2] Kernel panic - not syncing: a second one\n").unwrap();
        assert_eq!(
            state.panic().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert_eq!(state.result(), None, "a panic is no guest-kit result");
    }

    #[test]
    fn endless_lines_are_bounded() {
        let state = Arc::new(ConsoleState::default());
        let mut tap = ConsoleTap::new(Box::new(io::sink()), state.clone());
        for _ in 0..100 {
            tap.write_all(&[b'x'; 1000]).unwrap();
        }
        assert!(state.line.lock().unwrap().len() <= MAX_LINE);
    }
}

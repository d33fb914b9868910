//! The i8042 keyboard controller (vm-superio's): here for its CPU reset line, which is how
//! a guest without ACPI powers the machine off.

use std::sync::Arc;

use splitvisor_bus::{BusDevice, Interrupt};

use crate::InterruptTrigger;

/// Base I/O port (data at 0x60, command/status at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports it spans.
pub const I8042_PORT_COUNT: u64 = 5;

/// An i8042 whose CPU reset command raises `reset`.
pub struct I8042 {
    inner: vm_superio::I8042Device<InterruptTrigger>,
}

impl I8042 {
    /// A controller that signals a guest-requested reset through `reset`.
    pub fn new(reset: Arc<dyn Interrupt>) -> Self {
        Self { inner: vm_superio::I8042Device::new(InterruptTrigger(reset)) }
    }
}

impl BusDevice for I8042 {
    // Ports are bytes: a wider access touches consecutive ports (`out dx, ax` at 0x63 writes
    // 0x63 and 0x64), so a reset command can arrive as the second byte of a word.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|port| u8::try_from(port).ok())
                .map_or(0, |port| self.inner.read(port));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, value) in data.iter().enumerate() {
            let Some(port) = offset.checked_add(i as u64).and_then(|port| u8::try_from(port).ok()) else {
                return;
            };
            if let Err(e) = self.inner.write(port, *value) {
                log::warn!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_bus::CountingInterrupt;

    const COMMAND: u64 = 4;

    #[test]
    fn reset_command_raises_the_reset_line() {
        let reset = Arc::new(CountingInterrupt::new());
        let mut kbd = I8042::new(reset.clone());
        kbd.write(COMMAND, &[0xfe]);
        assert_eq!(reset.count(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let reset = Arc::new(CountingInterrupt::new());
        let mut kbd = I8042::new(reset.clone());
        kbd.write(COMMAND, &[0xaa]);
        kbd.write(0, &[0xfe]);
        kbd.write(COMMAND, &[]);
        kbd.write(COMMAND, &[0x00, 0xfe]);
        let mut status = [0xffu8; 2];
        kbd.read(COMMAND, &mut status);
        assert_eq!(status, [0, 0]);
        assert_eq!(reset.count(), 0);
    }

    #[test]
    fn a_wide_write_resets_when_its_command_port_byte_is_the_reset_command() {
        let reset = Arc::new(CountingInterrupt::new());
        let mut kbd = I8042::new(reset.clone());
        // `out 0x63, ax` with ah = 0xfe: the second byte lands on the command port.
        kbd.write(COMMAND - 1, &[0x00, 0xfe]);
        assert_eq!(reset.count(), 1);
    }
}

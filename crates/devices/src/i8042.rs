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
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.inner.write(offset, *value) {
            log::warn!("i8042: cannot signal the reset: {e}");
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
        let mut status = [0xffu8; 2];
        kbd.read(COMMAND, &mut status);
        assert_eq!(status[1], 0);
        assert_eq!(reset.count(), 0);
    }
}

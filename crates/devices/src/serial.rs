//! The 8250/16550 UART (vm-superio's), as a bus device.

use std::io::Write;
use std::sync::Arc;

use splitvisor_bus::{BusDevice, Interrupt};
use vm_superio::serial::{NoEvents, SerialState};

use crate::InterruptTrigger;

/// Base I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports a UART spans.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Errors feeding the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The receive FIFO is full; try again once the guest has read some.
    #[error("the UART receive FIFO is full")]
    FifoFull,
    /// Raising the receive interrupt failed.
    #[error("cannot raise the UART interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// An 8250 UART whose transmitted bytes go to `W`.
pub struct Serial<W: Write + Send> {
    inner: vm_superio::Serial<InterruptTrigger, NoEvents, W>,
    /// An output error was logged and nothing was written since: a closed output (a pipe
    /// whose reader left) fails every byte the guest sends, and is logged once.
    output_failing: bool,
}

impl<W: Write + Send> Serial<W> {
    /// A UART in its power-on state, interrupting through `interrupt`, writing to `out`.
    pub fn new(interrupt: Arc<dyn Interrupt>, out: W) -> Self {
        Self { inner: vm_superio::Serial::new(InterruptTrigger(interrupt), out), output_failing: false }
    }

    /// Rebuilds a UART from saved state.
    pub fn from_state(
        state: &SerialState,
        interrupt: Arc<dyn Interrupt>,
        out: W,
    ) -> Result<Self, SerialError> {
        vm_superio::Serial::from_state(state, InterruptTrigger(interrupt), NoEvents, out)
            .map(|inner| Self { inner, output_failing: false })
            .map_err(|_| SerialError::FifoFull)
    }

    /// The register state, to rebuild the device elsewhere.
    pub fn state(&self) -> SerialState {
        self.inner.state()
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let room = self.inner.fifo_capacity();
        if room == 0 {
            return if bytes.is_empty() { Ok(0) } else { Err(SerialError::FifoFull) };
        }
        let take = bytes.len().min(room);
        self.inner.enqueue_raw_bytes(&bytes[..take]).map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            _ => SerialError::FifoFull,
        })
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.inner.writer()
    }
}

/// Offset of the interrupt identification register.
const IIR: u8 = 2;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR: the transmitter holding register is empty.
const IIR_THR_EMPTY: u8 = 0x02;
/// IIR: received data is available.
const IIR_DATA: u8 = 0x04;
/// IER: interrupt when data is received.
const IER_DATA: u8 = 0x01;
/// IER: interrupt when the transmitter is empty.
const IER_THR_EMPTY: u8 = 0x02;

impl<W: Write + Send> Serial<W> {
    /// Reads IIR as a 16550 answers it: the highest-priority interrupt that is both pending
    /// and enabled now (received data before transmitter empty), or none. vm-superio keeps
    /// an interrupt pending after the driver disabled it and reports two at once (0x06,
    /// which a 16550 uses for "line status"); a guest must see neither.
    fn interrupt_identification(&mut self) -> u8 {
        let enabled = self.inner.state().interrupt_enable;
        let iir = self.inner.read(IIR);
        let pending = if iir & IIR_NONE != 0 { 0 } else { iir };
        let id = if pending & IIR_DATA != 0 && enabled & IER_DATA != 0 {
            IIR_DATA
        } else if pending & IIR_THR_EMPTY != 0 && enabled & IER_THR_EMPTY != 0 {
            IIR_THR_EMPTY
        } else {
            IIR_NONE
        };
        (iir & 0xf0) | id
    }
}

impl Serial<Vec<u8>> {
    /// What the guest has sent so far (for tests and captures).
    pub fn output(&self) -> &[u8] {
        self.inner.writer()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes: a wider access reads consecutive registers.
        for (i, byte) in data.iter_mut().enumerate() {
            let register = (offset + i as u64) as u8;
            *byte = if register == IIR { self.interrupt_identification() } else { self.inner.read(register) };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let register = (offset + i as u64) as u8;
            match self.inner.write(register, *byte) {
                // Only the transmitter holding register writes to the output.
                Ok(()) if register == 0 => self.output_failing = false,
                Ok(()) => {}
                Err(e) if !self.output_failing => {
                    log::warn!("serial: {e} (the guest's output is lost until a write succeeds again)");
                    self.output_failing = true;
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_bus::CountingInterrupt;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;

    fn serial() -> (Serial<Vec<u8>>, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::new());
        (Serial::new(irq.clone(), Vec::new()), irq)
    }

    fn read(s: &mut Serial<Vec<u8>>, offset: u64) -> u8 {
        let mut b = [0];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_without_interrupts_by_default() {
        let (mut s, irq) = serial();
        s.write(THR, b"h");
        s.write(THR, b"i");
        assert_eq!(s.output(), b"hi");
        assert_eq!(irq.count(), 0);
        assert_ne!(read(&mut s, LSR) & 0x20, 0, "THR is always empty");
    }

    #[test]
    fn transmitter_empty_interrupt_fires_on_enable_and_per_byte() {
        let (mut s, irq) = serial();
        s.write(IER, &[0x02]);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut s, IIR) & 0x0f, 0x02, "THR empty identified");
        s.write(THR, b"x");
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn host_input_raises_the_receive_interrupt_and_is_read_in_order() {
        let (mut s, irq) = serial();
        s.write(IER, &[0x01]);
        assert_eq!(s.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut s, LSR) & 1, 1, "data ready");
        assert_eq!(read(&mut s, THR), b'o');
        assert_eq!(read(&mut s, THR), b'k');
        assert_eq!(read(&mut s, LSR) & 1, 0);
    }

    #[test]
    fn a_full_fifo_takes_what_fits_then_refuses() {
        let (mut s, _) = serial();
        let room = s.input_room();
        let big = vec![b'a'; room + 10];
        assert_eq!(s.enqueue_input(&big).unwrap(), room);
        assert!(matches!(s.enqueue_input(b"b"), Err(SerialError::FifoFull)));
    }

    #[test]
    fn iir_names_only_an_enabled_interrupt_and_one_at_a_time() {
        let (mut s, _) = serial();
        s.write(IER, &[0x03]);
        s.enqueue_input(b"x").unwrap();
        // Both are pending: received data has priority.
        assert_eq!(read(&mut s, IIR) & 0x0f, 0x04);
        s.write(IER, &[0x02]);
        s.enqueue_input(b"y").unwrap();
        s.write(IER, &[0x00]);
        // Raised while enabled, disabled before the driver looked: not reported.
        assert_eq!(read(&mut s, IIR) & 0x0f, 0x01);
    }

    #[test]
    fn wide_accesses_touch_consecutive_registers() {
        let (mut s, _) = serial();
        s.write(LCR, &[0x03, 0x0b]);
        let mut regs = [0u8; 2];
        s.read(LCR, &mut regs);
        assert_eq!(regs, [0x03, 0x0b]);
    }

    #[test]
    fn state_round_trips() {
        let (mut s, _) = serial();
        s.write(LCR, &[0x03]);
        let state = s.state();
        let irq = Arc::new(CountingInterrupt::new());
        let mut restored = Serial::from_state(&state, irq, Vec::new()).unwrap();
        assert_eq!(read(&mut restored, LCR), 0x03);
    }
}

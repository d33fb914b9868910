//! The power registers of a hardware-reduced ACPI platform: how a guest OS powers the
//! machine off (`poweroff`) or resets it (`reboot`) through ACPI.
//!
//! A hardware-reduced platform (ACPI 6.x, 4.1) has no PM1 register blocks. Instead its FADT
//! names three registers, each one byte at an I/O port here:
//!
//! * the **sleep control register** ([`SLEEP_CONTROL_OFFSET`]): the OS writes
//!   `SLP_EN | SLP_TYP << 2` to enter sleep state `SLP_TYP`, the value it read from the
//!   DSDT's `\_Sx` object; [`S5_SLEEP_TYPE`] (soft off) powers the machine off;
//! * the **sleep status register** ([`SLEEP_STATUS_OFFSET`]): `WAK_STS` (bit 7) says the
//!   machine woke up again; the OS clears it (writes 1) before sleeping and polls it after;
//! * the **reset register** ([`RESET_OFFSET`]): writing [`RESET_VALUE`] resets the machine.
//!
//! The device only reports what the guest asked for, through two [`Interrupt`] lines, as the
//! i8042 reports its reset: what "power off" and "reset" mean is the VMM's business. The
//! ports are this crate's choice ([`ACPI_POWER_PORT`], clear of COM1 at 0x3f8 and the
//! i8042 at 0x60/0x64); the VMM writes them, with [`S5_SLEEP_TYPE`] and [`RESET_VALUE`],
//! into its FADT and DSDT.
//!
//! ```
//! use std::sync::Arc;
//! use splitvisor_bus::{BusDevice, CountingInterrupt};
//! use splitvisor_devices::acpi::{AcpiPower, S5_SLEEP_TYPE, SLEEP_CONTROL_OFFSET, SLP_EN};
//!
//! let (power_off, reset) = (Arc::new(CountingInterrupt::new()), Arc::new(CountingInterrupt::new()));
//! let mut power = AcpiPower::new(power_off.clone(), reset.clone());
//! power.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | S5_SLEEP_TYPE << 2]); // Linux's `poweroff`
//! assert_eq!((power_off.count(), reset.count()), (1, 0));
//! ```

use std::sync::Arc;

use splitvisor_bus::{BusDevice, Interrupt};

/// First I/O port of the device (Cloud Hypervisor's ACPI shutdown device uses 0x600 too;
/// nothing on a PC platform decodes it).
pub const ACPI_POWER_PORT: u64 = 0x600;
/// Ports the device spans: control, status, reset.
pub const ACPI_POWER_PORT_COUNT: u64 = 3;
/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`).
pub const RESET_OFFSET: u64 = 2;

/// Sleep control: sleep enable; the write enters the sleep state in `SLP_TYP`.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: the sleep type field, bits 2-4.
pub const SLP_TYP_MASK: u8 = 0b111 << 2;
/// Sleep status: the machine woke up (write 1 to clear).
pub const WAK_STS: u8 = 1 << 7;
/// The sleep type of S5 (soft off): the DSDT's `\_S5` object must carry it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The value that, written to the reset register, resets the machine (the FADT's
/// `RESET_VALUE`).
pub const RESET_VALUE: u8 = 1;

/// The sleep state the guest's register write asks for: `SLP_TYP` when `SLP_EN` is set.
pub fn requested_sleep_type(control: u8) -> Option<u8> {
    (control & SLP_EN != 0).then_some((control & SLP_TYP_MASK) >> 2)
}

/// The register state, to rebuild the device elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcpiPowerState {
    /// `WAK_STS` of the sleep status register.
    pub woke: bool,
}

/// The hardware-reduced ACPI sleep control, sleep status and reset registers.
pub struct AcpiPower {
    power_off: Arc<dyn Interrupt>,
    reset: Arc<dyn Interrupt>,
    state: AcpiPowerState,
}

impl AcpiPower {
    /// Registers that report a guest's power-off through `power_off` and its reset through
    /// `reset`.
    pub fn new(power_off: Arc<dyn Interrupt>, reset: Arc<dyn Interrupt>) -> Self {
        Self::from_state(&AcpiPowerState::default(), power_off, reset)
    }

    /// Rebuilds the registers from saved state.
    pub fn from_state(
        state: &AcpiPowerState,
        power_off: Arc<dyn Interrupt>,
        reset: Arc<dyn Interrupt>,
    ) -> Self {
        Self { power_off, reset, state: *state }
    }

    /// The register state.
    pub fn state(&self) -> AcpiPowerState {
        self.state
    }

    fn raise(line: &dyn Interrupt, what: &str) {
        if let Err(e) = line.trigger() {
            log::warn!("ACPI power: cannot signal the guest's {what}: {e}");
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        match requested_sleep_type(value) {
            None => {}
            Some(S5_SLEEP_TYPE) => {
                log::debug!("ACPI power: the guest entered S5 (power off)");
                Self::raise(self.power_off.as_ref(), "power-off");
            }
            Some(other) => {
                // No other state is offered in the DSDT. Wake at once, so that an OS
                // polling WAK_STS goes on instead of spinning forever.
                log::warn!("ACPI power: sleep type {other} is not supported; waking at once");
                self.state.woke = true;
            }
        }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            SLEEP_STATUS_OFFSET if self.state.woke => WAK_STS,
            _ => 0,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The registers are one byte wide: a wider access writes its low byte.
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            SLEEP_STATUS_OFFSET if value & WAK_STS != 0 => self.state.woke = false,
            RESET_OFFSET if value == RESET_VALUE => {
                log::debug!("ACPI power: the guest reset the machine");
                Self::raise(self.reset.as_ref(), "reset");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_bus::CountingInterrupt;

    struct Lines {
        power_off: Arc<CountingInterrupt>,
        reset: Arc<CountingInterrupt>,
    }

    fn device() -> (AcpiPower, Lines) {
        let lines = Lines {
            power_off: Arc::new(CountingInterrupt::new()),
            reset: Arc::new(CountingInterrupt::new()),
        };
        (AcpiPower::new(lines.power_off.clone(), lines.reset.clone()), lines)
    }

    fn counts(lines: &Lines) -> (u64, u64) {
        (lines.power_off.count(), lines.reset.count())
    }

    fn status(power: &mut AcpiPower) -> u8 {
        let mut byte = [0xff];
        power.read(SLEEP_STATUS_OFFSET, &mut byte);
        byte[0]
    }

    #[test]
    fn linux_poweroff_sequence_powers_off() {
        // What ACPICA's acpi_hw_extended_sleep() does for S5: clear WAK_STS, then write
        // SLP_TYP | SLP_EN to the sleep control register.
        let (mut power, lines) = device();
        power.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(counts(&lines), (0, 0));
        power.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(counts(&lines), (1, 0));
        assert_eq!(status(&mut power), 0, "no wake-up after S5");
    }

    #[test]
    fn sleep_type_without_slp_en_does_nothing() {
        let (mut power, lines) = device();
        power.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        power.write(SLEEP_CONTROL_OFFSET, &[0]);
        assert_eq!(counts(&lines), (0, 0));
    }

    #[test]
    fn other_sleep_states_wake_at_once_until_cleared() {
        let (mut power, lines) = device();
        power.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert_eq!(counts(&lines), (0, 0));
        assert_eq!(status(&mut power), WAK_STS);
        power.write(SLEEP_STATUS_OFFSET, &[0x01]);
        assert_eq!(status(&mut power), WAK_STS, "only writing WAK_STS clears it");
        power.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(status(&mut power), 0);
    }

    #[test]
    fn reset_value_resets_and_nothing_else_does() {
        let (mut power, lines) = device();
        for value in [0u8, 2, 0xfe, 0xff] {
            power.write(RESET_OFFSET, &[value]);
        }
        assert_eq!(counts(&lines), (0, 0));
        power.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(counts(&lines), (0, 1));
    }

    #[test]
    fn wide_and_empty_accesses_are_harmless() {
        let (mut power, lines) = device();
        power.write(SLEEP_CONTROL_OFFSET, &[]);
        let mut wide = [0xffu8; 3];
        power.read(SLEEP_CONTROL_OFFSET, &mut wide);
        assert_eq!(wide, [0, 0, 0]);
        power.read(RESET_OFFSET, &mut []);
        // A word write: its low byte is the register value.
        power.write(RESET_OFFSET, &[RESET_VALUE, 0xff]);
        assert_eq!(counts(&lines), (0, 1));
        power.write(7, &[RESET_VALUE]);
        assert_eq!(counts(&lines), (0, 1));
    }

    #[test]
    fn state_round_trips() {
        let (mut power, lines) = device();
        power.write(SLEEP_CONTROL_OFFSET, &[(1 << 2) | SLP_EN]);
        let state = power.state();
        assert!(state.woke);
        let mut rebuilt = AcpiPower::from_state(&state, lines.power_off.clone(), lines.reset.clone());
        assert_eq!(status(&mut rebuilt), WAK_STS);
    }

    #[test]
    fn requested_sleep_type_decodes_the_control_register() {
        assert_eq!(requested_sleep_type(0x34), Some(5));
        assert_eq!(requested_sleep_type(0x14), None);
        assert_eq!(requested_sleep_type(SLP_EN), Some(0));
    }
}

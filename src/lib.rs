//! splitvisor: a KVM virtual machine monitor assembled from small crates.
//!
//! This facade re-exports the member crates, so a user can depend on `splitvisor` alone:
//!
//! | module | crate | concern |
//! |---|---|---|
//! | [`memory`] | splitvisor-memory | guest RAM (memfd-backed), guest-physical layout, e820 |
//! | [`bus`] | splitvisor-bus | PIO/MMIO buses, the device trait, interrupts, allocation |
//! | [`vcpu`] | splitvisor-vcpu | KVM VM and vCPUs, boot state, run loop |
//! | [`devices`] | splitvisor-devices | device emulators (8250, i8042) |
//! | [`guests`] | splitvisor-guests | the project's own PVH guest programs |
//! | [`layout`] | splitvisor-layout | assembling a VM from a description |
//!
//! [`cli`] holds the command line shared by the `monolithic` and `microkernel` examples.

pub mod cli;

pub use splitvisor_bus as bus;
pub use splitvisor_devices as devices;
pub use splitvisor_guests as guests;
pub use splitvisor_layout as layout;
pub use splitvisor_memory as memory;
pub use splitvisor_vcpu as vcpu;

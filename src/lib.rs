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
//! | [`isolation`] | splitvisor-isolation | driver partitions: vhost-user, spawning, sandbox, supervision |
//! | [`layout`] | splitvisor-layout | placement policies and assembling a VM from a description |
//!
//! [`cli`] holds the command line shared by the `monolithic` and `microkernel` examples.
//!
//! ```no_run
//! use splitvisor::layout::{ConsoleOutput, VmBuilder};
//!
//! let hello = splitvisor::guests::find("hello").expect("embedded");
//! let report = VmBuilder::new(hello.elf).vcpus(2).console(ConsoleOutput::Stdout).build()?.run()?;
//! println!("guest said {:?} after {} port I/O exits", report.guest_result, report.pio_exits);
//! # Ok::<(), splitvisor::layout::Error>(())
//! ```
//!
//! ```
//! // Every guest program of the kit is embedded, ready to boot.
//! assert!(splitvisor::guests::names().contains(&"hello"));
//! assert_eq!(splitvisor::cli::parse_size("128M"), Ok(128 << 20));
//! ```

pub mod cli;

pub use splitvisor_bus as bus;
pub use splitvisor_devices as devices;
pub use splitvisor_guests as guests;
pub use splitvisor_isolation as isolation;
pub use splitvisor_layout as layout;
pub use splitvisor_memory as memory;
pub use splitvisor_vcpu as vcpu;

//! The command line of the examples: parsing, validation and the exit status.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use splitvisor_layout::{DiskConfig, DriverProgram, FaultPolicy, Layout, NetConfig, OnReboot, Placement};

/// Run a Linux kernel, or one of splitvisor's own guest programs, on KVM.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct VmArgs {
    /// The embedded guest program to run (see --list-guests), when no --kernel is given.
    #[arg(long, default_value = "hello", conflicts_with = "kernel")]
    pub guest: String,
    /// Boot this kernel instead of an embedded guest: a PVH ELF (a Linux vmlinux) or a
    /// bzImage (vmlinuz), recognised by its headers. The VM then gets ACPI tables (see
    /// --acpi), and the guest's power-off ends it with status 0.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// An initrd (initramfs) for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel", conflicts_with = "guest")]
    pub initrd: Option<PathBuf>,
    /// ACPI tables (RSDP, XSDT, FADT, MADT, a DSDT naming every device) and the ACPI power
    /// device: `on` (default with --kernel) or `off` (default for the embedded guests,
    /// which find their disks on the command line).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub acpi: Option<bool>,
    /// What a guest reboot does: `end` the VM (status 0 for a --kernel guest), or
    /// `restart` it (devices reset, the kernel loaded again, every vCPU reset). A reset
    /// after a kernel panic always ends the VM, with status 1.
    #[arg(long, value_name = "end|restart", default_value = "end")]
    pub on_reboot: OnReboot,
    /// Guest RAM: bytes, or a number with a K, M, G or T suffix (binary units).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// A virtio-blk disk: `PATH` or `path=PATH`, with `ro=on` (read-only), `serial=ID`
    /// (what the guest reads as the disk's ID), `queues=N` (request queues; one per vCPU by
    /// default) and `cache=writeback|none` (`none`: O_DIRECT) comma-separated, a comma in a
    /// path written twice (`path=a,,b.img`); or `socket=PATH` for an external vhost-user-blk
    /// backend. Repeatable: disk0, disk1, ...
    #[arg(long = "disk", value_name = "PATH[,ro=on][,serial=ID][,queues=N][,cache=MODE]|socket=PATH")]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net NIC: `tap=NAME` (a TAP interface the hypervisor opens; `mac=MAC` and
    /// `mtu=N` optional), or `socket=PATH` for an external vhost-user-net backend.
    /// Repeatable: net0, net1, ...
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,mtu=N]|socket=PATH")]
    pub nics: Vec<NetConfig>,
    /// Write the guest console to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub serial_out: Option<PathBuf>,
    /// More guest command line, appended to what splitvisor puts there (`console=ttyS0`,
    /// `virtio_mmio.device=...` per disk when there are no ACPI tables,
    /// `splitvisor.vcpus=N`).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Stop the VM after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub timeout: Option<Duration>,
    /// Print the time from process start to VM created, first guest output and VM end.
    #[arg(long)]
    pub boot_timeline: bool,
    /// Print exits and accesses per device when the VM ends.
    #[arg(long)]
    pub stats: bool,
    /// Print where every device runs (partition PIDs, fault policies) before starting.
    #[arg(long)]
    pub layout: bool,
    /// Override one device's placement: `disk0=partition`, `com1=hypervisor`. Repeatable;
    /// devices are com1, i8042, disk0, disk1, ..., net0, net1, ...
    #[arg(long = "place", value_name = "DEVICE=hypervisor|partition", value_parser = parse_placement)]
    pub placements: Vec<(String, Placement)>,
    /// What happens when a device's driver fails: `halt` (the VM ends), `fail` (the device
    /// fails, the VM goes on), `restart[:max=N][:window=SECONDS][:backoff=MS]` (a new driver
    /// takes over; default for partitions: restart:max=10:window=60:backoff=50).
    /// Repeatable: `--fault-policy disk0=fail`.
    #[arg(long = "fault-policy", value_name = "DEVICE=POLICY", value_parser = parse_fault_policy)]
    pub fault_policies: Vec<(String, FaultPolicy)>,
    /// How long a driver may leave requests waiting without completing any before it is
    /// taken as hung and replaced; a partition of a plain device (COM1, the i8042) that
    /// the guest left alone this long is probed, and replaced if it does not answer.
    /// 10 to 600000 (shorter would take a driver that is merely slow for a hung one).
    /// A disk driver waiting in the kernel (slow or frozen storage) gets up to 60 s.
    #[arg(long, value_name = "MILLISECONDS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub watchdog: u64,
    /// Do not keep a spare partition started for each device (restarts then start one).
    #[arg(long)]
    pub no_spare: bool,
    /// Inject a fault into a device's driver, for demonstrations: `disk0:crash-after=N` or
    /// `disk0:hang-after=N` requests. Repeatable.
    #[arg(long = "inject-fault", value_name = "DEVICE:FAULT", value_parser = parse_fault)]
    pub faults: Vec<(String, String)>,
    /// Serve the control socket here while the VM runs (list, restart, upgrade or fail a
    /// device's driver; see `splitvisor-ctl --help`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Do not sandbox the hypervisor's own threads (debugging only: by default every
    /// thread gets a seccomp filter for its kind, and a forbidden system call ends the
    /// process with status 159 and a line naming the thread and the call).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Once the VM is set up, jail the hypervisor: new mount, IPC, UTS, network and
    /// cgroup namespaces, an empty root, every capability dropped but CAP_KILL. Needs
    /// root. Partitions are still started, restarted and upgraded; an external
    /// vhost-user backend (socket=PATH) cannot be reconnected after it restarts.
    #[arg(long)]
    pub jail: bool,
    /// List the embedded guest programs and exit.
    #[arg(long)]
    pub list_guests: bool,
}

/// Parses `4096`, `64K`, `128M`, `1G`, `2T` (binary units; `MiB`, `GB`... also accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("'{text}' is not a size (try 128M or 2G)"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("'{text}' is too large"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!("unknown size unit '{other}' in '{text}' (use K, M, G or T)"));
        }
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("'{text}' is too large"))
}

fn device_and(text: &str, separator: char, what: &str) -> Result<(String, String), String> {
    match text.split_once(separator) {
        Some((device, value)) if !device.is_empty() => Ok((device.to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not {what}")),
    }
}

fn parse_placement(text: &str) -> Result<(String, Placement), String> {
    let (device, place) = device_and(text, '=', "DEVICE=hypervisor|partition")?;
    Ok((device, place.parse()?))
}

fn parse_fault_policy(text: &str) -> Result<(String, FaultPolicy), String> {
    let (device, policy) = device_and(text, '=', "DEVICE=POLICY")?;
    Ok((device, policy.parse()?))
}

fn parse_fault(text: &str) -> Result<(String, String), String> {
    let (device, fault) = device_and(text, ':', "DEVICE:FAULT")?;
    splitvisor_isolation::backend::FaultPlan::parse(&fault)?;
    Ok((device, fault))
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("'{other}' is not on or off")),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    match Duration::try_from_secs_f64(seconds) {
        // A VM stopped before it started is never what was meant (leave the option out
        // for no timeout).
        Ok(timeout) if timeout.is_zero() => Err(format!("'{text}' would stop the VM at once")),
        Ok(timeout) => Ok(timeout),
        Err(_) => Err(format!("'{text}' is not a valid timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("M").unwrap_err().contains("not a size"));
        assert!(parse_size("12Q").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("17179869184T").unwrap_err().contains("too large"));
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let args = VmArgs::try_parse_from(["monolithic"]).unwrap();
        assert_eq!((args.guest.as_str(), args.mem, args.vcpus), ("hello", 128 << 20, 1));
        let args = VmArgs::try_parse_from([
            "m",
            "--guest",
            "irq",
            "--mem",
            "1G",
            "--vcpus",
            "2",
            "--timeout",
            "2.5",
        ])
        .unwrap();
        assert_eq!((args.guest.as_str(), args.mem, args.vcpus), ("irq", 1 << 30, 2));
        assert_eq!(args.timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn disks_parse_in_one_syntax() {
        let args =
            VmArgs::try_parse_from(["m", "--disk", "a.img", "--disk", "path=b,,c.img,ro=on,serial=s1"])
                .unwrap();
        assert_eq!(
            args.disks,
            vec![DiskConfig::image("a.img"), DiskConfig::image("b,c.img").read_only().serial("s1")]
        );
        let args = VmArgs::try_parse_from(["m", "--disk", "socket=/run/blk.sock"]).unwrap();
        assert_eq!(args.disks[0], DiskConfig::VhostUser { socket: "/run/blk.sock".into() });
        assert!(VmArgs::try_parse_from(["m", "--disk", "a.img,rx"]).is_err());
        assert!(VmArgs::try_parse_from(["m", "--disk", ",ro=on"]).is_err());
    }

    #[test]
    fn nics_parse() {
        let args =
            VmArgs::try_parse_from(["m", "--net", "tap=t0,mac=52:54:00:00:00:07", "--net", "socket=/s"])
                .unwrap();
        assert_eq!(
            args.nics,
            vec![
                NetConfig::tap("t0").mac([0x52, 0x54, 0, 0, 0, 7]),
                NetConfig::VhostUser { socket: "/s".into(), mac: None }
            ]
        );
        assert!(VmArgs::try_parse_from(["m", "--net", "tap0"]).is_err());
    }

    #[test]
    fn placements_policies_and_faults_parse() {
        let args = VmArgs::try_parse_from([
            "m",
            "--place",
            "disk0=partition",
            "--fault-policy",
            "disk0=restart:max=20:backoff=0",
            "--inject-fault",
            "disk0:crash-after=100",
        ])
        .unwrap();
        assert_eq!(args.placements, vec![("disk0".to_string(), Placement::Partition)]);
        assert!(matches!(args.fault_policies[0].1, FaultPolicy::Restart { max: 20, .. }));
        assert_eq!(args.faults, vec![("disk0".to_string(), "crash-after=100".to_string())]);
        for bad in [
            ["--place", "=partition"],
            ["--place", "disk0=elsewhere"],
            ["--fault-policy", "disk0=sometimes"],
            ["--inject-fault", "disk0:explode=1"],
            ["--inject-fault", ":crash-after=1"],
        ] {
            assert!(VmArgs::try_parse_from(std::iter::once("m").chain(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_arguments_parse() {
        let args = VmArgs::try_parse_from([
            "m",
            "--kernel",
            "vmlinux",
            "--initrd",
            "initrd.cpio",
            "--cmdline",
            "panic=-1",
            "--on-reboot",
            "restart",
        ])
        .unwrap();
        assert_eq!(args.kernel.as_deref(), Some(std::path::Path::new("vmlinux")));
        assert_eq!(args.initrd.as_deref(), Some(std::path::Path::new("initrd.cpio")));
        assert_eq!((args.cmdline.as_str(), args.on_reboot, args.acpi), ("panic=-1", OnReboot::Restart, None));
        let args = VmArgs::try_parse_from(["m", "--kernel", "k", "--acpi", "off"]).unwrap();
        assert_eq!(args.acpi, Some(false));
        assert_eq!(VmArgs::try_parse_from(["m"]).unwrap().on_reboot, OnReboot::End);
        for bad in [
            &["--initrd", "i"][..],
            &["--guest", "hello", "--initrd", "i"],
            &["--kernel", "k", "--guest", "hello"],
            &["--kernel", "k", "--acpi", "maybe"],
            &["--on-reboot", "sometimes"],
        ] {
            assert!(
                VmArgs::try_parse_from(std::iter::once("m").chain(bad.iter().copied())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn malformed_arguments_are_refused() {
        assert!(VmArgs::try_parse_from(["m", "--vcpus", "-1"]).is_err());
        assert!(VmArgs::try_parse_from(["m", "--vcpus", "many"]).is_err());
        assert!(VmArgs::try_parse_from(["m", "--mem", "lots"]).is_err());
        let negative = VmArgs::try_parse_from(["m", "--timeout", "-3"]).unwrap_err().to_string();
        assert!(negative.contains("'-3' is not a valid timeout"), "{negative}");
        let zero = VmArgs::try_parse_from(["m", "--timeout", "0"]).unwrap_err().to_string();
        assert!(zero.contains("'0' would stop the VM at once"), "{zero}");
        assert!(VmArgs::try_parse_from(["m", "--bogus"]).is_err());
    }
}

/// How the examples end: 0 only if the guest reported success (an embedded guest) or
/// ended cleanly (a `--kernel` guest powered off or rebooted).
pub mod exit_status {
    /// An embedded guest printed `SPLITVISOR-RESULT: PASS`; a `--kernel` guest powered
    /// off or rebooted.
    pub const PASS: u8 = 0;
    /// The guest reported a failure or ended without a result (embedded guests), a
    /// `--kernel` guest panicked, a driver fault ended the VM, or a vCPU failed.
    pub const GUEST_FAILED: u8 = 1;
    /// Bad arguments or the VM could not be set up (no /dev/kvm, bad sizes, ...).
    pub const SETUP_ERROR: u8 = 2;
    /// Stopped by the host (Ctrl-C, SIGTERM, SIGHUP or --timeout) before the guest reported.
    pub const STOPPED: u8 = 3;
    /// A hypervisor thread made a system call its seccomp filter forbids (one line on
    /// stderr names the thread and the call). 128 + SIGSYS.
    pub const FORBIDDEN_SYSCALL: u8 = splitvisor_layout::FORBIDDEN_SYSCALL_EXIT_STATUS as u8;
}

use std::process::ExitCode;
use std::time::Instant;

use splitvisor_guests::GuestResult;
use splitvisor_layout::{ConsoleOutput, HypervisorSandbox, VmBuilder, VmReport};
use splitvisor_vcpu::VmEnd;

/// The sub-command under which a program built on this module runs as a driver partition
/// when no `splitvisor-driver` binary is around (see [`DriverProgram`]).
pub const DRIVER_SUBCOMMAND: &str = "__splitvisor-driver";

/// Parses the command line, runs the VM with devices placed by `layout` and turns the
/// outcome into an exit status, printing one line to stderr for any error. `program` names
/// the tool in messages. Started as `PROGRAM __splitvisor-driver ...`, it is a driver
/// partition instead.
pub fn main(program: &str, layout: Layout, process_start: Instant) -> ExitCode {
    if let Some(status) = driver_subcommand(program) {
        return status;
    }
    // First thing (a driver partition, above, keeps the fds it was handed): nothing this
    // process inherited stays open in the hypervisor (the logger holds no fd of its own).
    if let Err(e) = splitvisor_isolation::sandbox::hypervisor::close_inherited_fds() {
        eprintln!("{program}: error: cannot close inherited file descriptors: {e}");
        return ExitCode::from(exit_status::SETUP_ERROR);
    }
    // Before any thread starts: Ctrl-C, SIGTERM or SIGHUP sent while the VM is built waits
    // for it to run, and then stops it cleanly (see VmBuilder::stop_on_host_signals).
    if let Err(e) = splitvisor_layout::host_signals::block_stop_signals() {
        eprintln!("{program}: error: cannot block the stop signals: {e}");
        return ExitCode::from(exit_status::SETUP_ERROR);
    }
    main_from(program, layout, std::env::args_os(), process_start)
}

/// If this process was started as `PROGRAM __splitvisor-driver ...` (a driver partition
/// for a VM of this program, when no `splitvisor-driver` binary is around), serves as one
/// and returns its exit status.
pub fn driver_subcommand(program: &str) -> Option<ExitCode> {
    let mut args = std::env::args_os();
    if args.nth(1).is_none_or(|first| first != DRIVER_SUBCOMMAND) {
        return None;
    }
    let name = format!("{program} (driver partition)");
    Some(splitvisor_isolation::driver::main(
        &name,
        std::iter::once(std::ffi::OsString::from(&name)).chain(args),
    ))
}

/// [`main`] with the arguments given (the first one is the program name).
pub fn main_from<I, T>(program: &str, layout: Layout, args: I, process_start: Instant) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match VmArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::from(exit_status::PASS);
        }
        Err(e) => {
            // One line, as for every other error: clap's first paragraph (a list of
            // missing arguments follows its line), joined.
            let rendered = e.render().to_string();
            let first: Vec<&str> =
                rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
            eprintln!("{program}: {} (see --help)", first.join(" "));
            return ExitCode::from(exit_status::SETUP_ERROR);
        }
    };
    if args.list_guests {
        for guest in splitvisor_guests::GUESTS {
            println!("{:<14} {}", guest.name, guest.summary);
        }
        return ExitCode::from(exit_status::PASS);
    }
    match run(program, &args, layout, process_start) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("{program}: error: {e}");
            ExitCode::from(match e {
                RunError::Vm(splitvisor_layout::Error::Vcpu(_)) => exit_status::GUEST_FAILED,
                _ => exit_status::SETUP_ERROR,
            })
        }
    }
}

/// Errors of an example run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `--guest` names no embedded program.
    #[error("unknown guest '{name}' (available: {available})")]
    UnknownGuest {
        /// What was asked for.
        name: String,
        /// What exists.
        available: String,
    },
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] splitvisor_layout::Error),
}

/// Builds and runs the VM `args` describe, devices placed by `layout` (and `--place`,
/// `--fault-policy`); returns the exit status.
pub fn run(program: &str, args: &VmArgs, layout: Layout, process_start: Instant) -> Result<u8, RunError> {
    let guest = match &args.kernel {
        Some(_) => None,
        None => Some(splitvisor_guests::find(&args.guest).ok_or_else(|| RunError::UnknownGuest {
            name: args.guest.clone(),
            available: splitvisor_guests::names().join(", "),
        })?),
    };
    let console = match &args.serial_out {
        Some(path) => ConsoleOutput::File(path.clone()),
        None => ConsoleOutput::Stdout,
    };
    let layout = args.placements.iter().fold(layout, |layout, (device, place)| layout.with(device, *place));
    let layout = args
        .fault_policies
        .iter()
        .fold(layout, |layout, (device, policy)| layout.with_fault_policy(device, *policy))
        .with_watchdog(Duration::from_millis(args.watchdog))
        .with_standby(!args.no_spare);
    let mut builder = VmBuilder::new(guest.map_or(&[][..], |guest| guest.elf)).layout(layout);
    if let Some(kernel) = &args.kernel {
        builder = builder.kernel(kernel.as_path());
    }
    if let Some(initrd) = &args.initrd {
        builder = builder.initrd(initrd.as_path());
    }
    if let Some(acpi) = args.acpi {
        builder = builder.acpi(acpi);
    }
    builder = builder.on_reboot(args.on_reboot);
    // Partitions run splitvisor-driver if it is around, else this very program as one.
    builder = builder.find_driver_with(|| {
        DriverProgram::find().or_else(|| {
            std::env::current_exe()
                .ok()
                .map(|path| DriverProgram { path, prefix: vec![DRIVER_SUBCOMMAND.to_string()] })
        })
    });
    for nic in &args.nics {
        builder = builder.net(nic.clone());
    }
    for disk in &args.disks {
        builder = builder.disk(disk.clone());
    }
    for (device, fault) in &args.faults {
        builder = builder.inject_fault(device, fault);
    }
    if let Some(path) = &args.api_socket {
        builder = builder.api_socket(path);
    }
    let sandbox = if args.no_seccomp { HypervisorSandbox::off() } else { HypervisorSandbox::seccomp() };
    builder = builder.hypervisor_sandbox(sandbox.with_jail(args.jail));
    let vm = builder
        .memory(args.mem)
        .vcpus(args.vcpus)
        .cmdline(&args.cmdline)
        .console(console)
        .console_input(true)
        .stop_on_host_signals(true)
        .timeout(args.timeout)
        .build()?;
    if args.layout {
        print_layout(vm.placements());
    }
    let report = vm.run()?;
    for event in &report.device_events {
        eprintln!("{program}: {:>8.3} s  {}: {}", event.at.as_secs_f64(), event.device, event.what);
    }
    if args.boot_timeline {
        print_timeline(&report, process_start);
    }
    if args.stats {
        print_stats(&report);
    }
    Ok(match guest {
        Some(guest) => kit_status(program, guest.name, &report),
        None => kernel_status(program, &report),
    })
}

/// The exit status of an embedded guest: what the guest reported decides; a driver fault
/// after the guest's result changes nothing (the guest had finished).
fn kit_status(program: &str, guest: &str, report: &VmReport) -> u8 {
    match (&report.guest_result, &report.end) {
        (Some(GuestResult::Pass), _) => exit_status::PASS,
        (Some(GuestResult::Fail(why)), _) => {
            eprintln!("{program}: guest '{guest}' reported a failure: {why}");
            exit_status::GUEST_FAILED
        }
        (None, VmEnd::Stopped | VmEnd::TimedOut) => {
            eprintln!("{program}: VM {} before the guest reported a result", report.end);
            exit_status::STOPPED
        }
        (None, VmEnd::GuestReset | VmEnd::PowerOff) => {
            eprintln!("{program}: guest '{guest}' ended the VM without reporting a result");
            exit_status::GUEST_FAILED
        }
        (None, VmEnd::GuestPanic { .. } | VmEnd::DeviceFault { .. }) => {
            eprintln!("{program}: the VM ended before the guest reported a result: {}", report.end);
            exit_status::GUEST_FAILED
        }
    }
}

/// The exit status of a `--kernel` guest, which prints no result line: how it ended
/// decides. Power-off and reboot are the guest's own clean ends (0); a panic, a driver
/// fault that ends the VM (1) and a host stop (3) are not.
fn kernel_status(program: &str, report: &VmReport) -> u8 {
    let restarts = match report.restarts {
        0 => String::new(),
        1 => " (after 1 restart)".to_string(),
        n => format!(" (after {n} restarts)"),
    };
    match &report.end {
        VmEnd::PowerOff => {
            eprintln!("{program}: the guest powered off{restarts}");
            exit_status::PASS
        }
        VmEnd::GuestReset => {
            eprintln!(
                "{program}: the guest rebooted{restarts}; the VM ends (--on-reboot restart boots it again)"
            );
            exit_status::PASS
        }
        VmEnd::GuestPanic { message } => {
            eprintln!("{program}: the guest panicked{restarts}: {message}");
            exit_status::GUEST_FAILED
        }
        VmEnd::Stopped | VmEnd::TimedOut => {
            eprintln!("{program}: VM {}{restarts}", report.end);
            exit_status::STOPPED
        }
        VmEnd::DeviceFault { .. } => {
            eprintln!("{program}: {}{restarts}", report.end);
            exit_status::GUEST_FAILED
        }
    }
}

fn print_layout(placements: &[splitvisor_layout::DevicePlacement]) {
    eprintln!("{:<8} {:<12} {:<18} {:<42} driver", "device", "kind", "placement", "on a driver fault");
    for placed in placements {
        eprintln!(
            "{:<8} {:<12} {:<18} {:<42} {}",
            placed.device,
            placed.kind,
            placed.placement.to_string(),
            placed.policy.to_string(),
            placed.partition.as_deref().unwrap_or("-")
        );
    }
}

fn millis(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

fn print_timeline(report: &VmReport, start: Instant) {
    eprintln!("boot timeline (ms from process start):");
    eprintln!("  VM created     {:>9.2}", millis(start, report.created));
    match report.first_output {
        Some(first) => eprintln!("  first output   {:>9.2}", millis(start, first)),
        None => eprintln!("  first output         n/a"),
    }
    eprintln!("  VM end         {:>9.2}", millis(start, report.ended));
}

fn print_stats(report: &VmReport) {
    eprintln!(
        "exits that reached splitvisor:  {:>9} port I/O {:>9} MMIO",
        report.pio_exits, report.mmio_exits
    );
    if !report.kvm_exits.is_empty() {
        let count = |name: &str| report.kvm_exits.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let counts: Vec<String> = report
            .kvm_exits
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        eprintln!("KVM's own counts, all vCPUs:    {}", counts.join(", "));
        // A KVM that does not count what reached us (this machine's software KVM) would
        // otherwise show "io_exits 0" beside hundreds of port I/O exits.
        let missing: Vec<&str> = [("io_exits", report.pio_exits), ("mmio_exits", report.mmio_exits)]
            .into_iter()
            .filter(|(name, ours)| *ours > 0 && count(name) == Some(0))
            .map(|(name, _)| name)
            .collect();
        if !missing.is_empty() {
            eprintln!("                                ({} not counted by this KVM)", missing.join(", "));
        }
    }
    eprintln!("device accesses that reached splitvisor:");
    eprintln!("  {:<5} {:<24} {:<28} {:>10} {:>10}", "bus", "range", "device", "reads", "writes");
    for bus in &report.buses {
        for device in &bus.devices {
            eprintln!(
                "  {:<5} {:<24} {:<28} {:>10} {:>10}",
                bus.kind.to_string(),
                device.range.to_string(),
                device.name,
                device.reads,
                device.writes
            );
        }
    }
    for bus in &report.buses {
        if bus.unassigned > 0 {
            eprintln!(
                "  {} accesses no {} device claimed (answered as an empty bus)",
                bus.unassigned, bus.kind
            );
        }
    }
    for driver in &report.drivers {
        if driver.restarts > 0 || driver.health != splitvisor_layout::Health::Running {
            eprintln!("driver of {}: {} restarts, {}", driver.device, driver.restarts, driver.health);
        }
    }
}

//! Where each device runs, and what happens when its driver fails.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use splitvisor_isolation::partition::DriverProgram;

/// Where one device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside the hypervisor process (the monolithic layout): fastest, a fault takes the
    /// hypervisor down.
    InHypervisor,
    /// In a sandboxed driver partition of its own (the microkernel layout): a fault stays
    /// contained.
    Partition,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::InHypervisor => "in hypervisor",
            Placement::Partition => "driver partition",
        })
    }
}

impl FromStr for Placement {
    type Err = String;

    /// `hypervisor` or `partition`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "hypervisor" => Ok(Self::InHypervisor),
            "partition" => Ok(Self::Partition),
            other => Err(format!("unknown placement '{other}' (use hypervisor or partition)")),
        }
    }
}

/// What happens when a device's driver fails: it crashed or exited, it hung (requests
/// waiting and none completed for the watchdog's time), or its backend hung up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPolicy {
    /// The VM ends, with a report naming the device. This is all a driver inside the
    /// hypervisor process can honestly offer: the default there.
    HaltVm,
    /// The device fails (virtio: DEVICE_NEEDS_RESET; the 8250 and the i8042 read as an
    /// empty bus); the VM goes on.
    FailDevice,
    /// A new driver takes over, with the device's state and every request that was in
    /// flight, and the guest sees nothing: at most `max` times within any `window`. The
    /// first restart in a window is immediate, each later one waits `backoff` longer than
    /// the one before (doubling). Beyond `max` the device fails. The default for partitions.
    Restart {
        /// Restarts allowed within `window`.
        max: u32,
        /// The sliding window.
        window: Duration,
        /// The delay before the second restart within the window; doubles after.
        backoff: Duration,
    },
}

impl FaultPolicy {
    /// The default restart policy: 10 restarts a minute, backing off from 50 ms.
    pub const RESTART: FaultPolicy =
        FaultPolicy::Restart { max: 10, window: Duration::from_secs(60), backoff: Duration::from_millis(50) };
}

impl fmt::Display for FaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultPolicy::HaltVm => f.write_str("halt"),
            FaultPolicy::FailDevice => f.write_str("fail"),
            FaultPolicy::Restart { max, window, backoff } => {
                write!(f, "restart:max={max}:window={}s:backoff={}ms", window.as_secs(), backoff.as_millis())
            }
        }
    }
}

impl FromStr for FaultPolicy {
    type Err = String;

    /// `halt`, `fail`, `restart`, or `restart:max=N:window=SECONDS:backoff=MILLISECONDS`
    /// (any of the three, in any order; the others keep their defaults).
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        match parts.next() {
            Some("halt") if text == "halt" => return Ok(Self::HaltVm),
            Some("fail") if text == "fail" => return Ok(Self::FailDevice),
            Some("restart") => {}
            _ => {
                return Err(format!(
                    "unknown fault policy '{text}' (use halt, fail or restart[:max=N:window=S:backoff=MS])"
                ));
            }
        }
        let FaultPolicy::Restart { mut max, mut window, mut backoff } = Self::RESTART else {
            unreachable!("RESTART is a restart policy")
        };
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("'{part}' is not KEY=VALUE"))?;
            let number = |what: &str| -> Result<u64, String> {
                let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                digits.parse().map_err(|_| format!("'{value}' is not a {what}"))
            };
            match key {
                "max" => {
                    max = u32::try_from(number("count")?).map_err(|_| format!("'{value}' is too large"))?
                }
                "window" => window = Duration::from_secs(number("number of seconds")?),
                "backoff" => backoff = Duration::from_millis(number("number of milliseconds")?),
                other => {
                    return Err(format!("unknown restart setting '{other}' (use max, window or backoff)"));
                }
            }
        }
        if window.is_zero() {
            return Err("a restart window of 0 s allows nothing".into());
        }
        Ok(Self::Restart { max, window, backoff })
    }
}

/// A placement and fault policy: defaults, and overrides per device.
///
/// Devices are named `com1`, `i8042`, `disk0`, `disk1`, ...
///
/// ```
/// use splitvisor_layout::{FaultPolicy, Layout, Placement};
///
/// // Hybrid: everything in the hypervisor but the second disk.
/// let layout = Layout::monolithic().with("disk1", Placement::Partition);
/// assert_eq!(layout.placement("disk0"), Placement::InHypervisor);
/// assert_eq!(layout.placement("disk1"), Placement::Partition);
/// // A driver in the hypervisor can only take the VM down with it; one in a partition
/// // is restarted.
/// assert_eq!(layout.fault_policy("disk0"), FaultPolicy::HaltVm);
/// assert_eq!(layout.fault_policy("disk1"), FaultPolicy::RESTART);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    default: Placement,
    overrides: BTreeMap<String, Placement>,
    policies: BTreeMap<String, FaultPolicy>,
    watchdog: Duration,
    standby: bool,
}

impl Layout {
    /// Every device inside the hypervisor process.
    pub fn monolithic() -> Self {
        Self::with_default(Placement::InHypervisor)
    }

    /// Every device in a driver partition of its own.
    pub fn microkernel() -> Self {
        Self::with_default(Placement::Partition)
    }

    fn with_default(default: Placement) -> Self {
        Self {
            default,
            overrides: BTreeMap::new(),
            policies: BTreeMap::new(),
            watchdog: Duration::from_secs(1),
            standby: true,
        }
    }

    /// Overrides the placement of one device.
    pub fn with(mut self, device: &str, placement: Placement) -> Self {
        self.overrides.insert(device.to_string(), placement);
        self
    }

    /// Overrides the fault policy of one device.
    pub fn with_fault_policy(mut self, device: &str, policy: FaultPolicy) -> Self {
        self.policies.insert(device.to_string(), policy);
        self
    }

    /// How long a driver may leave requests waiting without completing any before it is
    /// taken as hung (default 1 s); also how long a plain device's partition may go
    /// without an access before the supervisor probes it. A disk driver with a thread
    /// waiting in the kernel (slow or frozen storage) gets up to 60 s instead.
    pub fn with_watchdog(mut self, timeout: Duration) -> Self {
        self.watchdog = timeout;
        self
    }

    /// Whether a spare partition is kept started and sandboxed for each restartable
    /// device, so that a restart only has to hand it the device (default: yes).
    pub fn with_standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// Whether any device may run in a partition.
    pub(crate) fn has_partitions(&self) -> bool {
        self.default == Placement::Partition || self.overrides.values().any(|p| *p == Placement::Partition)
    }

    /// Where `device` runs.
    pub fn placement(&self, device: &str) -> Placement {
        self.overrides.get(device).copied().unwrap_or(self.default)
    }

    /// What happens when `device`'s driver fails: the override, else `halt` in the
    /// hypervisor and `restart` in a partition.
    pub fn fault_policy(&self, device: &str) -> FaultPolicy {
        self.policies.get(device).copied().unwrap_or(match self.placement(device) {
            Placement::InHypervisor => FaultPolicy::HaltVm,
            Placement::Partition => FaultPolicy::RESTART,
        })
    }

    /// The watchdog's timeout.
    pub fn watchdog(&self) -> Duration {
        self.watchdog
    }

    /// Whether restartable devices keep a spare partition.
    pub fn standby(&self) -> bool {
        self.standby
    }

    /// Device names the overrides mention that are not among `known`.
    pub(crate) fn unknown_devices<'a>(&'a self, known: &[String]) -> Vec<&'a str> {
        self.overrides
            .keys()
            .chain(self.policies.keys())
            .filter(|name| !known.contains(name))
            .map(String::as_str)
            .collect()
    }
}

/// Where one device ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlacement {
    /// The device's name.
    pub device: String,
    /// What it is.
    pub kind: String,
    /// Where it runs.
    pub placement: Placement,
    /// What happens when its driver fails.
    pub policy: FaultPolicy,
    /// The partition's process ID, or a note (an external backend's socket).
    pub partition: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microkernel_puts_every_device_in_a_partition() {
        let layout = Layout::microkernel();
        assert_eq!(layout.placement("disk0"), Placement::Partition);
        assert_eq!(layout.placement("com1"), Placement::Partition);
        assert_eq!(Layout::monolithic().placement("i8042"), Placement::InHypervisor);
        let hybrid = Layout::microkernel().with("disk1", Placement::InHypervisor);
        assert_eq!(hybrid.placement("disk0"), Placement::Partition);
        assert_eq!(hybrid.placement("disk1"), Placement::InHypervisor);
        assert_eq!(hybrid.fault_policy("disk1"), FaultPolicy::HaltVm);
    }

    #[test]
    fn fault_policies_parse() {
        assert_eq!("halt".parse(), Ok(FaultPolicy::HaltVm));
        assert_eq!("fail".parse(), Ok(FaultPolicy::FailDevice));
        assert_eq!("restart".parse(), Ok(FaultPolicy::RESTART));
        assert_eq!(
            "restart:max=100:backoff=0ms".parse(),
            Ok(FaultPolicy::Restart { max: 100, window: Duration::from_secs(60), backoff: Duration::ZERO })
        );
        assert_eq!(
            "restart:window=5s".parse::<FaultPolicy>().map(|p| p.to_string()),
            Ok("restart:max=10:window=5s:backoff=50ms".to_string())
        );
        for bad in
            ["", "halts", "halt:now", "restart:max", "restart:max=x", "restart:speed=1", "restart:window=0"]
        {
            assert!(bad.parse::<FaultPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_device_names_are_found() {
        let layout = Layout::monolithic()
            .with("disk5", Placement::Partition)
            .with_fault_policy("foo", FaultPolicy::FailDevice)
            .with("com1", Placement::Partition);
        let known = ["com1".to_string(), "i8042".to_string(), "disk0".to_string()];
        assert_eq!(layout.unknown_devices(&known), vec!["disk5", "foo"]);
    }
}

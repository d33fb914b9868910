//! virtio-net NICs: `net0`, `net1`, ... placed through the same seam as disks.
//!
//! * `tap=NAME[,mac=MAC][,mtu=N]`: the hypervisor opens the TAP interface NAME (in its own
//!   network namespace). In the hypervisor the in-process device serves it; in a driver
//!   partition `splitvisor-driver net` serves it over vhost-user, handed the TAP as an fd,
//!   supervised like a disk's partition (restart with a hot spare, upgrade, fault policy).
//! * `socket=PATH[,mac=MAC]`: any vhost-user-net backend listening on PATH (a hand-started
//!   `splitvisor-driver net`, or another), reconnected when it comes back.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use splitvisor_devices::virtio::MmioTransport;
use splitvisor_devices::virtio::net::{self, Net, NetParams};
use splitvisor_devices::virtio::tap::Tap;
use splitvisor_isolation::driver::default_mac_for;
use splitvisor_isolation::frontend::{DeviceShape, Handshake};
use splitvisor_isolation::partition::{NetOptions, Partition};

use crate::Error;
use crate::device::{Assembly, DeviceRecipe, Placed, frontend, virtio_vhost_user};
use crate::drivers::{Backend, Served, Spare};
use crate::placement::Placement;

/// A virtio-net NIC.
///
/// On the command line: `tap=NAME` with `mac=aa:bb:cc:dd:ee:ff` and `mtu=N` optional,
/// comma-separated; or `socket=PATH` (with `mac=` optional) for an external vhost-user-net
/// backend.
///
/// ```
/// use splitvisor_layout::NetConfig;
///
/// let nic: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
/// assert_eq!(nic, NetConfig::tap("tap0").mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
/// let external: NetConfig = "socket=/run/net.sock".parse().unwrap();
/// assert_eq!(external, NetConfig::VhostUser { socket: "/run/net.sock".into(), mac: None });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetConfig {
    /// A TAP interface opened by the hypervisor, served by splitvisor's own virtio-net,
    /// placed by the layout.
    Tap {
        /// The interface.
        name: String,
        /// The guest's MAC (default: one derived from the interface name).
        mac: Option<[u8; 6]>,
        /// The guest's MTU (default 1500).
        mtu: Option<u16>,
    },
    /// An external vhost-user-net backend listening on `socket`.
    VhostUser {
        /// Its socket.
        socket: PathBuf,
        /// The MAC the guest sees, instead of the backend's.
        mac: Option<[u8; 6]>,
    },
}

impl NetConfig {
    /// The TAP interface `name`, default MAC and MTU.
    pub fn tap(name: &str) -> Self {
        Self::Tap { name: name.to_string(), mac: None, mtu: None }
    }

    /// The same NIC with the MAC `mac`.
    pub fn mac(self, mac: [u8; 6]) -> Self {
        match self {
            Self::Tap { name, mtu, .. } => Self::Tap { name, mac: Some(mac), mtu },
            Self::VhostUser { socket, .. } => Self::VhostUser { socket, mac: Some(mac) },
        }
    }
}

impl FromStr for NetConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (mut tap, mut socket, mut mac, mut mtu) = (None, None, None, None);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("socket", path)) if !path.is_empty() => socket = Some(PathBuf::from(path)),
                Some(("mac", value)) => mac = Some(net::parse_mac(value)?),
                Some(("mtu", value)) => {
                    let value: u16 = value.parse().map_err(|_| format!("mtu={value}: not a number"))?;
                    if !(68..=65_000).contains(&value) {
                        return Err(format!("mtu={value}: use 68 to 65000"));
                    }
                    mtu = Some(value);
                }
                _ => {
                    return Err(format!(
                        "'{part}' is not a NIC option (use tap=NAME or socket=PATH, with mac=MAC and, for a TAP, mtu=N)"
                    ));
                }
            }
        }
        match (tap, socket) {
            (Some(name), None) => {
                if name.len() >= 16 || name.contains('/') {
                    return Err(format!("'{name}' is not an interface name (at most 15 bytes, no '/')"));
                }
                Ok(Self::Tap { name, mac, mtu })
            }
            (None, Some(socket)) if mtu.is_none() => Ok(Self::VhostUser { socket, mac }),
            (None, Some(_)) => Err("mtu= belongs to the external backend (set it where it runs)".into()),
            (Some(_), Some(_)) => Err("give tap= or socket=, not both".into()),
            (None, None) => Err("give tap=NAME or socket=PATH".into()),
        }
    }
}

/// A virtio-net NIC.
pub(crate) struct NetRecipe {
    pub index: usize,
    pub config: NetConfig,
}

impl DeviceRecipe for NetRecipe {
    fn name(&self) -> String {
        format!("net{}", self.index)
    }

    fn kind(&self) -> &'static str {
        "virtio-net"
    }

    fn place(self: Box<Self>, placement: Placement, vm: &mut Assembly<'_>) -> Result<Placed, Error> {
        let device = self.name();
        let slot = vm.virtio_slot()?;
        let mem = vm.ram.memory().clone();
        match self.config {
            NetConfig::Tap { name, mac, mtu } => {
                // Opened here in either placement: a partition gets the fd.
                let tap = Tap::open(&name).map_err(|source| Error::Tap { device: device.clone(), source })?;
                let params = NetParams {
                    mac: mac.unwrap_or_else(|| default_mac_for(&name)),
                    mtu: mtu.unwrap_or(net::DEFAULT_MTU),
                };
                let mac = net::format_mac(&params.mac);
                match placement {
                    Placement::InHypervisor => {
                        let transport =
                            MmioTransport::new(Net::new(params, Arc::new(tap)), mem, slot.line.clone())
                                .map_err(Error::EventFd)?;
                        let label = format!("{device} (TAP {name}, {mac})");
                        vm.add_virtio(&slot, Arc::new(Mutex::new(transport)), &label)?;
                        Ok(Placed { note: None, driver: None, input: None })
                    }
                    Placement::Partition => {
                        let driver = vm.driver(&device)?;
                        let tap = tap.file().try_clone().map_err(|source| Error::DuplicateFd {
                            device: device.clone(),
                            what: "TAP",
                            source,
                        })?;
                        let options = NetOptions { params, fault: None, guest_ram: vm.ram.size() };
                        let first = NetOptions { fault: vm.fault(&device), ..options.clone() };
                        let (partition, stream) =
                            Partition::spawn_net(&driver, &tap, &first).map_err(Error::partition(&device))?;
                        let handshake = Handshake::for_device(stream, &DeviceShape::net())
                            .map_err(|source| Error::VhostUser { device: device.clone(), source })?;
                        let frontend = frontend(&device, handshake, DeviceShape::net())?;
                        let backend = Backend::Spawned {
                            driver,
                            served: Served::Net { tap, options },
                            active: Some(partition),
                            spare: Spare::new(vm.layout.standby()),
                        };
                        let label = format!("{device} (TAP {name}, {mac}, partition)");
                        virtio_vhost_user(vm, &slot, &device, "virtio-net", &label, frontend, backend, mem)
                    }
                }
            }
            NetConfig::VhostUser { socket, mac } => {
                let handshake = Handshake::connect_for(&socket, &DeviceShape::net())
                    .map_err(|source| Error::VhostUser { device: device.clone(), source })?;
                let mut frontend = frontend(&device, handshake, DeviceShape::net())?;
                if let Some(mac) = mac {
                    frontend = frontend.override_config(0, &mac);
                }
                let label = format!("{device} (vhost-user {})", socket.display());
                let note = Some(format!("external vhost-user {}", socket.display()));
                let placed = virtio_vhost_user(
                    vm,
                    &slot,
                    &device,
                    "virtio-net",
                    &label,
                    frontend,
                    Backend::External { socket },
                    mem,
                )?;
                Ok(Placed { note, ..placed })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_parse_in_one_syntax() {
        assert_eq!("tap=t0".parse(), Ok(NetConfig::tap("t0")));
        assert_eq!(
            "tap=t0,mac=52:54:00:00:00:01,mtu=9000".parse(),
            Ok(NetConfig::Tap { name: "t0".into(), mac: Some([0x52, 0x54, 0, 0, 0, 1]), mtu: Some(9000) })
        );
        assert_eq!(
            "socket=/s,mac=52:54:00:00:00:02".parse(),
            Ok(NetConfig::VhostUser { socket: "/s".into(), mac: Some([0x52, 0x54, 0, 0, 0, 2]) })
        );
        for bad in [
            "",
            "t0",
            "tap=",
            "tap=a-name-far-too-long",
            "tap=t0,socket=/s",
            "tap=t0,mac=01:00:00:00:00:00",
            "tap=t0,mac=52:54:00:00:00",
            "tap=t0,mtu=10",
            "socket=/s,mtu=1500",
            "tap=t0,colour=blue",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }
}

//! A TCP/IP stack for the network guests: smoltcp (no_std, no allocator) over the
//! virtio-net driver.
//!
//! The guest's address comes from the command line: `net.ip=A.B.C.D/PREFIX` (default
//! `10.0.2.15/24`) and `net.peer=A.B.C.D` (the host side, default `10.0.2.2`), also its
//! default gateway. Time is the TSC scaled by kvm-clock. Between polls the CPU halts until
//! the device interrupts or smoltcp's next timer is due (a one-shot local APIC timer).

use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::clock::{self, TscScale};
use crate::virtio::{self, MmioDevice};
use crate::virtio_net::{NetDevice, RxFrame};
use crate::{Boot, Line, alloc, rdtsc, start_info};

/// Sockets a stack holds at most.
const MAX_SOCKETS: usize = 8;

static mut SOCKET_STORAGE: [SocketStorage<'static>; MAX_SOCKETS] = [SocketStorage::EMPTY; MAX_SOCKETS];

/// Longest the CPU halts between polls when nothing is due: bounds how late a missed
/// interrupt is noticed.
const MAX_HALT_NS: u64 = 20_000_000;

/// The network stack of a guest: the device, smoltcp's interface and sockets, the clock.
pub struct Stack {
    /// The virtio-net device.
    pub device: NetDevice,
    /// smoltcp's interface.
    pub iface: Interface,
    /// The sockets.
    pub sockets: SocketSet<'static>,
    /// This guest's address.
    pub ip: Ipv4Address,
    /// The host side's address.
    pub peer: Ipv4Address,
    scale: Option<TscScale>,
    start: u64,
}

/// Parses `A.B.C.D`.
pub fn parse_ipv4(text: &str) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let value = start_info::parse_u64(parts.next()?)?;
        *octet = u8::try_from(value).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Address::new(octets[0], octets[1], octets[2], octets[3]))
}

/// `len` bytes of memory for the rest of the program (socket buffers).
pub fn buffer(len: usize) -> Result<&'static mut [u8], &'static str> {
    let ptr = alloc::alloc(len as u64, 64).ok_or("out of memory for socket buffers")?;
    // SAFETY: a fresh allocation of `len` bytes, never freed, owned by the caller alone.
    let bytes = unsafe { core::slice::from_raw_parts_mut(ptr, len) };
    bytes.fill(0);
    Ok(bytes)
}

/// `n` copies of `value` in memory for the rest of the program (socket metadata).
pub fn slots<T: Copy>(value: T, n: usize) -> Result<&'static mut [T], &'static str> {
    let size = (core::mem::size_of::<T>() * n) as u64;
    let ptr = alloc::alloc(size.max(1), core::mem::align_of::<T>().max(8) as u64).ok_or("out of memory for sockets")?
        as *mut T;
    for i in 0..n {
        // SAFETY: inside a fresh allocation of `n` elements.
        unsafe { ptr.add(i).write(value) };
    }
    // SAFETY: `n` initialised elements, never freed, owned by the caller alone.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, n) })
}

impl Stack {
    /// Finds the first virtio-net device on the command line and brings the stack up.
    pub fn new(boot: &Boot) -> Result<Self, &'static str> {
        let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
        let cmdline = info.cmdline();
        let device: MmioDevice = virtio::devices(cmdline)
            .find(|device| device.device_id() == 1)
            .ok_or("no virtio-net device on the command line")?;
        let mut device = NetDevice::init(device)?;
        let (ip, prefix) = match info.cmdline_value("net.ip") {
            Some(text) => {
                let (address, prefix) = text.split_once('/').unwrap_or((text, "24"));
                let prefix = start_info::parse_u64(prefix).filter(|p| *p <= 32).ok_or("bad net.ip prefix")?;
                (parse_ipv4(address).ok_or("bad net.ip")?, prefix as u8)
            }
            None => (Ipv4Address::new(10, 0, 2, 15), 24),
        };
        let peer = match info.cmdline_value("net.peer") {
            Some(text) => parse_ipv4(text).ok_or("bad net.peer")?,
            None => Ipv4Address::new(10, 0, 2, 2),
        };
        let scale = clock::kvm_clock_scale();
        let start = rdtsc();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(device.mac)));
        config.random_seed = rdtsc() ^ 0x5eed_5eed_5eed_5eed;
        let now = Instant::from_micros(0);
        let mut iface = Interface::new(config, &mut Port(&mut device), now);
        let mut added = Ok(());
        iface.update_ip_addrs(|addrs| added = addrs.push(IpCidr::new(ip.into(), prefix)).map_err(|_| ()));
        added.map_err(|()| "cannot add the address")?;
        iface.routes_mut().add_default_ipv4_route(peer).map_err(|_| "cannot add the route")?;
        // SAFETY: the storage is used by this one stack, created once per program.
        let storage = unsafe { &mut *(&raw mut SOCKET_STORAGE) };
        let sockets = SocketSet::new(&mut storage[..]);
        let mac = device.mac;
        Line::new()
            .str("net: mac ")
            .hex(u64::from(mac[0]) << 40 | u64::from(mac[1]) << 32 | u64::from(mac[2]) << 24 | u64::from(mac[3]) << 16 | u64::from(mac[4]) << 8 | u64::from(mac[5]))
            .str(" mtu ")
            .dec(u64::from(device.mtu))
            .str(if device.tx_csum_offload { " csum-offload" } else { "" })
            .print();
        Ok(Self { device, iface, sockets, ip, peer, scale, start })
    }

    /// Nanoseconds since the stack came up.
    pub fn now_ns(&self) -> u64 {
        let ticks = rdtsc().wrapping_sub(self.start);
        match &self.scale {
            Some(scale) => scale.ns(ticks),
            // Without kvm-clock, a 1 GHz TSC is assumed (timers only get slower or faster).
            None => ticks,
        }
    }

    /// smoltcp's time.
    pub fn now(&self) -> Instant {
        Instant::from_micros((self.now_ns() / 1000) as i64)
    }

    /// Moves frames between the device and the sockets; true if a socket may have changed.
    pub fn poll(&mut self) -> bool {
        let now = self.now();
        let mut port = Port(&mut self.device);
        self.iface.poll(now, &mut port, &mut self.sockets) == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// Halts until a frame arrives or smoltcp has something due (at most `max_ns`).
    pub fn wait(&mut self, max_ns: u64) {
        let now = self.now();
        let due = self.iface.poll_delay(now, &self.sockets).map_or(MAX_HALT_NS, |d| d.total_micros() * 1000);
        if due == 0 {
            return;
        }
        self.device.wait(due.min(max_ns).min(MAX_HALT_NS));
    }

    /// Polls and waits until `done` says so or `timeout_ns` passes; false on timeout. Fails
    /// if the device needs a reset.
    pub fn run_until(
        &mut self,
        timeout_ns: u64,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<bool, &'static str> {
        let deadline = self.now_ns().saturating_add(timeout_ns);
        loop {
            self.poll();
            if done(self) {
                return Ok(true);
            }
            if self.device.needs_reset() {
                return Err("the network device needs a reset");
            }
            let now = self.now_ns();
            if now >= deadline {
                return Ok(false);
            }
            self.wait(deadline - now);
        }
    }
}

/// The device as smoltcp sees it.
struct Port<'a>(&'a mut NetDevice);

/// A received frame, handed to smoltcp.
struct Rx {
    device: *mut NetDevice,
    frame: Option<RxFrame>,
}

/// Room to send one frame.
struct Tx {
    device: *mut NetDevice,
}

/// Where a frame goes when no transmit buffer is free: it is lost, as on a busy wire.
static mut SCRATCH: [u8; 2048] = [0; 2048];

impl RxToken for Rx {
    fn consume<R, F>(mut self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let frame = self.frame.take();
        let result = f(frame.as_ref().map_or(&[][..], |frame| frame.bytes()));
        if let Some(frame) = frame {
            // SAFETY: the device outlives the token (both live within one `poll`), and no
            // other reference to it is used while the token is consumed.
            unsafe { (*self.device).recycle(frame) };
        }
        result
    }
}

impl TxToken for Tx {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // SAFETY: as for `Rx::consume`.
        let device = unsafe { &mut *self.device };
        let mut f = Some(f);
        if let Some(result) = device.send(len, |bytes| (f.take().expect("called once"))(bytes)) {
            return result;
        }
        // SAFETY: the scratch buffer is only ever used here, by one CPU.
        let scratch = unsafe { &mut *(&raw mut SCRATCH) };
        (f.take().expect("not called yet"))(&mut scratch[..len.min(2048)])
    }
}

impl Device for Port<'_> {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.0.receive()?;
        let device: *mut NetDevice = self.0;
        Some((Rx { device, frame: Some(frame) }, Tx { device }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.0.can_send() {
            return None;
        }
        Some(Tx { device: self.0 })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(self.0.mtu) + 14;
        caps.max_burst_size = None;
        let mut checksum = ChecksumCapabilities::default();
        // The driver completes and checks TCP and UDP checksums (offloaded when it can).
        checksum.tcp = Checksum::None;
        checksum.udp = Checksum::None;
        caps.checksum = checksum;
        caps
    }
}

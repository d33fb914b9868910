//! A Linux TAP device as a virtio-net backend.
//!
//! The hypervisor opens the TAP (`/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`) and either serves it itself or hands the open fd to a driver partition,
//! which never opens anything. Every frame crosses the fd with the virtio-net header in
//! front, so checksum offload needs no work here: the kernel reads and writes the same
//! header the guest does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::net::{NetBackend, feature};

/// `TUNSETIFF`: attach the fd to an interface (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNGETIFF`: the interface the fd is attached to (`_IOR('T', 210, unsigned int)`).
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETOFFLOAD`: what the kernel may hand us unfinished (`_IOW('T', 208, unsigned int)`).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: bytes of virtio-net header on each frame (`_IOW('T', 216, int)`).
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// A TAP interface, not a TUN.
const IFF_TAP: libc::c_short = 0x0002;
/// No packet-information prefix.
const IFF_NO_PI: libc::c_short = 0x1000;
/// Each frame carries a virtio-net header.
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// TUNSETOFFLOAD: frames with a partial checksum may be delivered.
const TUN_F_CSUM: libc::c_uint = 0x01;

/// Longest interface name, NUL excluded.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as far as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("'{0}' is not a valid interface name (1 to 15 bytes, no '/', no NUL)")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// The kernel refused the interface (no permission, or not a TAP).
    #[error("cannot attach to TAP {name}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The fd is not a TAP device set up for virtio-net headers.
    #[error("fd {fd} is not a TAP with virtio-net headers: {why}")]
    NotTap {
        /// The fd.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
}

/// An open TAP device, non-blocking, with virtio-net headers on every frame.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if it does not exist and this process may) the TAP interface
    /// `name` in this thread's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', '\0']) {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut request =
            IfReq { name: [0; IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq`, of which IfReq is a prefix-compatible
        // layout of the full size (40 bytes).
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if result < 0 {
            return Err(TapError::Attach { name: name.to_string(), source: io::Error::last_os_error() });
        }
        let tap = Self { file, name: name.to_string() };
        tap.set_header_size(super::net::HEADER_SIZE)
            .map_err(|source| TapError::Attach { name: name.to_string(), source })?;
        Ok(tap)
    }

    /// Takes over an open TAP fd (a driver partition's, handed over by the hypervisor).
    /// Checks that it is a TAP with virtio-net headers, and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let not_tap = |why: String| TapError::NotTap { fd: raw, why };
        let mut request = IfReq { name: [0; IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into a buffer of its full size.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut request) } < 0 {
            return Err(not_tap(io::Error::last_os_error().to_string()));
        }
        if request.flags & (IFF_TAP | IFF_VNET_HDR) != IFF_TAP | IFF_VNET_HDR {
            return Err(not_tap(format!("flags {:#x}", request.flags)));
        }
        // SAFETY: fcntl on an fd we own, with integer arguments.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(not_tap(io::Error::last_os_error().to_string()));
        }
        let end = request.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&request.name[..end]).into_owned();
        Ok(Self { file: File::from(fd), name })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open device, e.g. to hand to a driver partition.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// TUNSETVNETHDRSZ: reads an int through a pointer.
    fn set_header_size(&self, bytes: usize) -> io::Result<()> {
        let value = bytes as libc::c_int;
        // SAFETY: an ioctl on our own fd that reads one int from a live local.
        let result = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &value) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// TUNSETOFFLOAD: takes the flags as the argument itself.
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: an ioctl on our own fd with an integer argument.
        let result = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

impl NetBackend for Tap {
    fn recv(&self, frame: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a buffer of `frame.len()` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: writing from a buffer of `frame.len()` bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn configure(&self, guest_features: u64, header_size: usize) -> io::Result<()> {
        self.set_header_size(header_size)?;
        let offload = if guest_features & feature::GUEST_CSUM != 0 { TUN_F_CSUM } else { 0 };
        self.set_offload(offload)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A frame-preserving socket as a backend: one end of a `SOCK_DGRAM` or `SOCK_SEQPACKET`
/// pair, each message a frame with its virtio-net header. For tests, fuzzing and a guest
/// wired to a program instead of a host interface.
#[derive(Debug)]
pub struct SocketBackend {
    socket: OwnedFd,
}

impl SocketBackend {
    /// A connected pair: the device's end and the other end (the "wire").
    pub fn pair() -> io::Result<(Self, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new fds into the array.
        let result = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let ours = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let theirs = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        Ok((Self { socket: ours }, theirs))
    }
}

impl NetBackend for SocketBackend {
    fn recv(&self, frame: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into a buffer of `frame.len()` bytes, never blocking.
        let n = unsafe {
            libc::recv(self.socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), libc::MSG_DONTWAIT)
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sending from a buffer of `frame.len()` bytes, never blocking.
        let n = unsafe {
            libc::send(self.socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT)
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn configure(&self, _guest_features: u64, _header_size: usize) -> io::Result<()> {
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

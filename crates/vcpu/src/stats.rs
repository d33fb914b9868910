//! KVM's binary statistics of a vCPU (KVM_GET_STATS_FD, Linux 5.14+): exit counts the
//! kernel keeps, including the exits it handles itself (ioeventfds, the in-kernel APIC).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

/// One statistic: where its value lives in the stats file.
#[derive(Debug)]
struct Descriptor {
    name: String,
    /// Byte offset of its first u64 in the file.
    offset: u64,
}

/// The statistics file of one vCPU.
#[derive(Debug)]
pub struct VcpuStats {
    file: File,
    descriptors: Vec<Descriptor>,
}

impl VcpuStats {
    /// Opens the statistics of `vcpu`; `None` if the kernel has no binary statistics.
    pub fn open(vcpu: &VcpuFd) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the fd was just returned by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0).ok()?;
        let word = |i: usize| {
            u32::from_le_bytes([header[4 * i], header[4 * i + 1], header[4 * i + 2], header[4 * i + 3]])
        };
        let (name_size, count, desc_offset, data_offset) =
            (word(1) as usize, word(2) as usize, word(4), word(5));
        // kvm_stats_desc: flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
        let stride = 16 + name_size;
        let mut table = vec![0u8; stride.checked_mul(count)?];
        file.read_exact_at(&mut table, u64::from(desc_offset)).ok()?;
        let descriptors = table
            .chunks_exact(stride)
            .map(|raw| {
                let offset = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
                let name = &raw[16..];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                Descriptor {
                    name: String::from_utf8_lossy(&name[..end]).into_owned(),
                    offset: u64::from(data_offset) + u64::from(offset),
                }
            })
            .collect();
        log::debug!("vCPU statistics on fd {}", file.as_raw_fd());
        Some(Self { file, descriptors })
    }

    /// The current value of the statistic `name` (its first u64).
    pub fn get(&self, name: &str) -> Option<u64> {
        let descriptor = self.descriptors.iter().find(|d| d.name == name)?;
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, descriptor.offset).ok()?;
        Some(u64::from_le_bytes(value))
    }

    /// The names of every statistic.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.descriptors.iter().map(|d| d.name.as_str())
    }
}

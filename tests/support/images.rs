//! Disk images for the tests, and the host-side check of blk-verify's pattern.

use std::path::PathBuf;

/// A fresh image file of `bytes` zero bytes in the temporary directory, removed on drop.
pub struct Image(pub PathBuf);

impl Image {
    pub fn new(name: &str, bytes: u64) -> Self {
        let path = std::env::temp_dir().join(format!("splitvisor-{}-{name}.img", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(bytes).unwrap();
        Self(path)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Checks blk-verify's pattern: sector n holds n (le64), the generation (le64), then
/// 496 bytes of (n ^ generation) as u8. Returns the sectors that do not.
pub fn pattern_mismatches(image: &[u8], sectors: usize, generation: u64) -> Vec<usize> {
    (0..sectors)
        .filter(|&n| {
            let sector = &image[n * 512..(n + 1) * 512];
            let number = u64::from_le_bytes(sector[0..8].try_into().unwrap());
            let stamp = u64::from_le_bytes(sector[8..16].try_into().unwrap());
            let fill = (n as u64 ^ generation) as u8;
            number != n as u64 || stamp != generation || sector[16..].iter().any(|b| *b != fill)
        })
        .collect()
}

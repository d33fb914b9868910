//! The on-disk format of `blk-stress`: one self-describing 4 KiB block per disk block.
//!
//! This file is compiled twice: into the guest kit, which writes and checks blocks inside the
//! VM, and into the host crate `splitvisor-guests`, whose `blk_stress_check` checks an image
//! after the VM has ended. So both sides agree by construction. It is plain integer code
//! with no dependencies and no formatting.
//!
//! Block `i` (at byte `i * 4096` of the disk) written in generation `g` holds 512
//! little-endian 64-bit words:
//!
//! | word      | bytes       | value |
//! |-----------|-------------|-------|
//! | 0         | 0..8        | [`MAGIC`], the ASCII bytes `SVSTRESS` |
//! | 1         | 8..16       | the block index `i` |
//! | 2         | 16..24      | the generation `g` |
//! | 3..=510   | 24..4088    | word `k` holds `(i * 4096 + 8 * k) ^ (g * GENERATION_KEY)` (wrapping): its own byte offset on the disk, keyed by the generation |
//! | 511       | 4088..4096  | the checksum of words 0..=510: FNV-1a over words, `h = CHECKSUM_BASIS`, then `h = (h ^ w) * CHECKSUM_PRIME` (wrapping) for each word `w` in order |
//!
//! So a block names its place and its generation, a block from another place or generation
//! fails on its header, and a block torn between two writes fails its checksum or pattern.

/// Bytes in one block: the unit `blk-stress` writes, reads and checks.
pub const BLOCK_SIZE: usize = 4096;
/// Word 0 of every block: `b"SVSTRESS"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SVSTRESS");
/// The generation's key in the pattern words (the 64-bit golden ratio).
pub const GENERATION_KEY: u64 = 0x9e37_79b9_7f4a_7c15;
/// The checksum's starting value (FNV-1a's 64-bit offset basis).
pub const CHECKSUM_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// The checksum's multiplier (FNV-1a's 64-bit prime).
pub const CHECKSUM_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Words in a block.
const WORDS: usize = BLOCK_SIZE / 8;
/// The first pattern word (after magic, index and generation).
const FIRST_PATTERN_WORD: usize = 3;
/// The checksum word.
const CHECKSUM_WORD: usize = WORDS - 1;

/// Pattern word `word` of block `index` in generation `generation`.
pub fn pattern_word(index: u64, generation: u64, word: usize) -> u64 {
    index.wrapping_mul(BLOCK_SIZE as u64).wrapping_add(8 * word as u64)
        ^ generation.wrapping_mul(GENERATION_KEY)
}

fn read_word(block: &[u8; BLOCK_SIZE], word: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&block[8 * word..8 * word + 8]);
    u64::from_le_bytes(bytes)
}

fn write_word(block: &mut [u8; BLOCK_SIZE], word: usize, value: u64) {
    block[8 * word..8 * word + 8].copy_from_slice(&value.to_le_bytes());
}

/// The checksum of words 0..=510 of `block` (what word 511 must hold).
pub fn checksum(block: &[u8; BLOCK_SIZE]) -> u64 {
    (0..CHECKSUM_WORD)
        .fold(CHECKSUM_BASIS, |hash, word| (hash ^ read_word(block, word)).wrapping_mul(CHECKSUM_PRIME))
}

/// Fills `block` with block `index` of generation `generation`.
pub fn fill(block: &mut [u8; BLOCK_SIZE], index: u64, generation: u64) {
    write_word(block, 0, MAGIC);
    write_word(block, 1, index);
    write_word(block, 2, generation);
    for word in FIRST_PATTERN_WORD..CHECKSUM_WORD {
        write_word(block, word, pattern_word(index, generation, word));
    }
    let sum = checksum(block);
    write_word(block, CHECKSUM_WORD, sum);
}

/// What is wrong with a block, in the order [`check`] looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Word 0 is not [`MAGIC`] (the block was never written by `blk-stress`): what it holds.
    Magic(u64),
    /// The block names another index (it landed at the wrong place): the index it names.
    Index(u64),
    /// The block is from another generation (a lost or stale write): the generation it names.
    Generation(u64),
    /// Word 511 does not match the rest (a torn or corrupted block): what it holds.
    Checksum(u64),
    /// A pattern word is wrong although the checksum matches: the first such word.
    Pattern(usize),
}

/// Checks that `block` is block `index` of generation `generation`.
pub fn check(block: &[u8; BLOCK_SIZE], index: u64, generation: u64) -> Result<(), Mismatch> {
    let magic = read_word(block, 0);
    if magic != MAGIC {
        return Err(Mismatch::Magic(magic));
    }
    let found_index = read_word(block, 1);
    if found_index != index {
        return Err(Mismatch::Index(found_index));
    }
    let found_generation = read_word(block, 2);
    if found_generation != generation {
        return Err(Mismatch::Generation(found_generation));
    }
    let sum = read_word(block, CHECKSUM_WORD);
    if sum != checksum(block) {
        return Err(Mismatch::Checksum(sum));
    }
    match (FIRST_PATTERN_WORD..CHECKSUM_WORD)
        .find(|&word| read_word(block, word) != pattern_word(index, generation, word))
    {
        Some(word) => Err(Mismatch::Pattern(word)),
        None => Ok(()),
    }
}

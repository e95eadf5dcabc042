//! Deterministic hashing. `std`'s `RandomState` differs per process, which would
//! make iteration order, and so the simulation, depend on the run.

use std::hash::{BuildHasher, Hasher};

/// FxHash-style multiply-rotate hasher: fast on short keys, fixed across runs.
#[derive(Clone, Copy, Default)]
pub struct FixedHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FixedHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FixedHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // final avalanche so that low bits are usable by hashbrown
        let mut z = self.hash;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        z ^ (z >> 33)
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = FixedHasher;
    fn build_hasher(&self) -> FixedHasher {
        FixedHasher::default()
    }
}

pub type FixedMap<K, V> = std::collections::HashMap<K, V, FixedState>;
pub type FixedSet<K> = std::collections::HashSet<K, FixedState>;

/// A 128-bit digest built from two independent 64-bit streams. Cache keys use it:
/// a 64-bit key would collide (and serve one query's rows for another) with a
/// probability that matters at fleet scale; two streams make it negligible.
#[derive(Clone)]
pub struct Digest128 {
    a: u64,
    b: u64,
}

impl Default for Digest128 {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest128 {
    pub fn new() -> Self {
        Digest128 { a: 0xcbf2_9ce4_8422_2325, b: 0x6c62_272e_07bb_0142 }
    }
    #[inline]
    pub fn u64(&mut self, w: u64) {
        self.a = (self.a.rotate_left(5) ^ w).wrapping_mul(SEED);
        self.b = (self.b ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.u64(u64::from_le_bytes(w));
        }
    }
    pub fn finish(&self) -> u128 {
        let mix = |mut z: u64| {
            z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            z ^ (z >> 33)
        };
        ((mix(self.a) as u128) << 64) | mix(self.b ^ self.a.rotate_left(17)) as u128
    }
}

/// Hash of a byte string with the fixed hasher.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = FixedHasher::default();
    h.write(bytes);
    h.finish()
}

//! A hash map for the hot per-row and per-entry indexes (version map, refresh
//! index, tiers): open addressing with linear probing, keys and values inline.
//!
//! Why not `std`'s map: a lookup there reads a control group and then the
//! bucket, two dependent cache misses when the map is larger than the cache
//! (a node holds one entry per cached row; the simulation holds 300 nodes).
//! Here the first probe reads the slot itself, so a lookup costs one miss,
//! and [`OpenMap::prefetch`] lets a batch start the misses of many lookups
//! before it needs any of them. Iteration is in slot order, a function of the
//! keys and the insertion history only (hashing is fixed), so it is
//! deterministic. Deletion shifts the following entries back (no tombstones).

use crate::sql::TableId;

/// A key of an [`OpenMap`]: copyable, with a fixed 64-bit hash.
pub trait OpenKey: Copy + Eq + Default {
    fn hash64(&self) -> u64;
}

/// Fibonacci hashing: one multiplication, the slot taken from the high bits.
/// Enough for the keys these maps hold, which are digests already (row key
/// hashes, 128-bit cache keys).
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

impl OpenKey for (TableId, u64) {
    #[inline]
    fn hash64(&self) -> u64 {
        (self.1 ^ u64::from(self.0.0).rotate_left(32)).wrapping_mul(MUL)
    }
}

impl OpenKey for u128 {
    #[inline]
    fn hash64(&self) -> u64 {
        ((*self as u64) ^ ((*self >> 64) as u64)).wrapping_mul(MUL)
    }
}

/// A hint to the processor that `*value` will be read soon. On other
/// targets (wasm32) a no-op.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    let first = (value as *const T).cast::<u8>();
    prefetch_line(first);
    // a value may straddle two cache lines (a 56-byte slot does 6 times in 8)
    let last = first.wrapping_add(size_of::<T>().max(1) - 1);
    if (last as usize) / 64 != (first as usize) / 64 {
        prefetch_line(last);
    }
}

#[inline(always)]
fn prefetch_line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not dereference: it cannot fault, and it
    // neither reads nor writes memory as far as the program can tell. The
    // pointers come from a reference and point into its value anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[derive(Clone, Debug, Default)]
struct Slot<K, V> {
    key: K,
    used: bool,
    value: V,
}

/// Open-addressing map; see the module documentation.
#[derive(Clone, Debug)]
pub struct OpenMap<K, V> {
    slots: Vec<Slot<K, V>>,
    len: usize,
    /// log2 of the capacity (0 while nothing was ever inserted).
    bits: u32,
}

impl<K: OpenKey, V: Default> Default for OpenMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: OpenKey, V: Default> OpenMap<K, V> {
    pub fn new() -> Self {
        OpenMap { slots: Vec::new(), len: 0, bits: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes everything; keeps the allocation.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            *s = Slot::default();
        }
        self.len = 0;
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    #[inline]
    fn home(&self, key: &K) -> usize {
        // the high bits of a multiplicative hash are the well-mixed ones
        if self.bits == 0 { 0 } else { (key.hash64() >> (64 - self.bits)) as usize }
    }

    /// The slot holding `key`, if any.
    #[inline]
    fn find(&self, key: &K) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let s = &self.slots[i];
            if !s.used {
                return None;
            }
            if s.key == *key {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Asks the processor to load the slot where a lookup of `key` starts,
    /// without waiting for it: issued for a batch of keys before they are
    /// used, the cache misses of the batch overlap instead of following each
    /// other. No effect on the map's contents.
    #[inline]
    pub fn prefetch(&self, key: &K) {
        if let Some(slot) = self.slots.get(self.home(key)) {
            prefetch(slot);
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).map(|i| &self.slots[i].value)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.find(key).map(|i| &mut self.slots[i].value)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_some()
    }

    /// The value of `key`, inserted as `V::default()` when absent.
    pub fn get_or_default(&mut self, key: K) -> &mut V {
        if self.len + 1 > self.slots.len() / 8 * 5 {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(&key);
        loop {
            if !self.slots[i].used {
                self.slots[i] = Slot { key, used: true, value: V::default() };
                self.len += 1;
                return &mut self.slots[i].value;
            }
            if self.slots[i].key == key {
                return &mut self.slots[i].value;
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let present = self.contains_key(&key);
        let old = std::mem::replace(self.get_or_default(key), value);
        present.then_some(old)
    }

    /// Removes `key`, shifting back the entries probed past its slot.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let mut hole = self.find(key)?;
        let mask = self.mask();
        let removed = std::mem::take(&mut self.slots[hole]);
        self.len -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            if !self.slots[j].used {
                break;
            }
            let home = self.home(&self.slots[j].key);
            // the entry at j may move to the hole unless its home lies
            // cyclically in (hole, j]
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.slots.swap(hole, j);
                hole = j;
            }
        }
        Some(removed.value)
    }

    /// Entries in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().filter(|s| s.used).map(|s| (&s.key, &s.value))
    }

    fn grow(&mut self) {
        let bits = (self.bits + 1).max(4);
        let old = std::mem::take(&mut self.slots);
        self.slots = (0..1usize << bits).map(|_| Slot::default()).collect();
        self.bits = bits;
        self.len = 0;
        for s in old.into_iter().filter(|s| s.used) {
            *self.get_or_default(s.key) = s.value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u64),
        Remove(u8),
        Bump(u8, u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => any::<u8>().prop_map(Op::Remove),
            3 => (any::<u8>(), any::<u64>()).prop_map(|(k, v)| Op::Bump(k, v)),
            1 => Just(Op::Clear),
        ]
    }

    // keys collide on purpose: few tables, rows that share hash bits
    fn key(k: u8) -> (TableId, u64) {
        (TableId(u32::from(k % 3)), u64::from(k / 3) << 40)
    }

    proptest! {
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec(op(), 0..400)) {
            let mut m: OpenMap<(TableId, u64), u64> = OpenMap::new();
            let mut model: BTreeMap<(TableId, u64), u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(key(k), v), model.insert(key(k), v)),
                    Op::Remove(k) => prop_assert_eq!(m.remove(&key(k)), model.remove(&key(k))),
                    Op::Bump(k, v) => {
                        let e = m.get_or_default(key(k));
                        *e = (*e).max(v);
                        let e = model.entry(key(k)).or_default();
                        *e = (*e).max(v);
                    }
                    Op::Clear => {
                        m.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(m.len(), model.len());
                for (k, v) in &model {
                    prop_assert_eq!(m.get(k), Some(v));
                }
                let mut seen: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
                seen.sort();
                prop_assert_eq!(seen, model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn prefetch_changes_nothing() {
        let mut m: OpenMap<u128, u32> = OpenMap::new();
        m.prefetch(&7);
        m.insert(7, 1);
        m.prefetch(&7);
        m.prefetch(&8);
        assert_eq!((m.get(&7), m.get(&8), m.len()), (Some(&1), None, 1));
    }
}

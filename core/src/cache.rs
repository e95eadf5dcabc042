//! One cache tier type, instantiated three times (L1 site KV, L2 site SQLite/D1,
//! L3 regional). Bounded by bytes and by entries, with TTL and an eviction
//! policy. SIEVE by default: on skewed (Zipf) workloads it keeps the hot set
//! better than LRU at lower cost per hit (a flag flip instead of a list move);
//! `benches/core.rs` measures both.

use crate::invalidation::{Dep, Deps};
use crate::open_map::OpenMap;
use crate::{Duration, Instant, Lsn};

/// Which tier, for statistics and replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum TierName {
    L1,
    L2,
    L3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Eviction {
    Sieve,
    Lru,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TierConfig {
    pub bytes_max: u64,
    pub entries_max: usize,
    /// Default time to live; a fill may ask for less.
    pub ttl: Duration,
    pub eviction: Eviction,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TierConfigError {
    #[error("entries_max must be between 1 and 2^31")]
    Entries,
    #[error("bytes_max must be positive")]
    Bytes,
    #[error("ttl must be positive")]
    Ttl,
}

impl TierConfig {
    pub fn validate(&self) -> Result<(), TierConfigError> {
        if self.entries_max == 0 || self.entries_max > (1 << 31) {
            return Err(TierConfigError::Entries);
        }
        if self.bytes_max == 0 {
            return Err(TierConfigError::Bytes);
        }
        if self.ttl.is_zero() {
            return Err(TierConfigError::Ttl);
        }
        Ok(())
    }
}

/// A cached result: the value, the commit position it reflects, its dependencies.
#[derive(Clone, Debug)]
pub struct Entry<V> {
    pub value: V,
    /// The result reflects every commit up to this LSN (a lower bound).
    pub lsn: Lsn,
    pub deps: Deps,
    pub size_bytes: u32,
    pub expires_at: Instant,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierStats {
    pub hits: u64,
    pub misses: u64,
    pub expirations: u64,
    pub evictions: u64,
    pub invalidations: u64,
    pub inserts: u64,
    /// Fills refused because one entry exceeds the tier's byte budget.
    pub oversized: u64,
    pub bytes: u64,
    pub entries: u64,
}

const NIL: u32 = u32::MAX;

/// A slot hint that points nowhere (see [`Tier::refresh_hinted`]).
pub const NO_SLOT: u32 = NIL;

#[derive(Debug)]
struct Slot<V> {
    key: u128,
    entry: Entry<V>,
    visited: bool,
    /// towards the tail (older)
    older: u32,
    /// towards the head (newer)
    newer: u32,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a, V> {
    Hit(&'a Entry<V>),
    Miss,
}

/// One tier. Keys are 128-bit digests of (shape, arguments, session context).
#[derive(Debug)]
pub struct Tier<V> {
    config: TierConfig,
    map: OpenMap<u128, u32>,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    hand: u32,
    stats: TierStats,
    /// The time to live of an entry the change stream keeps valid row by
    /// row ([`Tier::keep_fresh`]); `None`: every entry has the tier's TTL.
    fresh_ttl: Option<Duration>,
}

/// Whether every dependency of an entry is a row the change stream names
/// by key: its row events alone decide whether it is still valid.
fn vouched_by_rows(deps: &[Dep]) -> bool {
    !deps.is_empty() && deps.iter().all(|d| matches!(d, Dep::Key(..)))
}

impl<V: Clone> Tier<V> {
    pub fn new(config: TierConfig) -> Result<Self, TierConfigError> {
        config.validate()?;
        Ok(Tier {
            map: OpenMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            hand: NIL,
            stats: TierStats::default(),
            fresh_ttl: None,
            config,
        })
    }

    /// Fresh, not expired: an entry whose every dependency is a row the
    /// change stream names by key lives up to `ttl` instead of the tier's
    /// TTL, and leaves by the budget's eviction. Only for a tier whose
    /// owner applies key-level change events and serves nothing while the
    /// stream is silent: the stream, not the TTL, keeps such an entry fresh.
    pub fn keep_fresh(&mut self, ttl: Duration) {
        self.fresh_ttl = Some(ttl.max(self.config.ttl));
    }

    pub fn config(&self) -> &TierConfig {
        &self.config
    }

    pub fn stats(&self) -> TierStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every entry held, expired or not, in slot order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry<V>> {
        self.slots.iter().flatten().map(|s| &s.entry)
    }

    /// Every entry held with its key, in slot order.
    pub fn keyed_entries(&self) -> impl Iterator<Item = (u128, &Entry<V>)> {
        self.slots.iter().flatten().map(|s| (s.key, &s.entry))
    }

    /// Drops everything (a lost tier). Statistics other than size are kept.
    pub fn clear(&mut self) {
        self.map.clear();
        self.slots.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
        self.hand = NIL;
        self.stats.bytes = 0;
        self.stats.entries = 0;
    }

    /// Looks `key` up. An expired entry, or one `valid` rejects, is removed and
    /// counts as a miss (as an expiration or an invalidation).
    pub fn get(&mut self, now: Instant, key: u128, valid: impl FnOnce(&Entry<V>) -> bool) -> Lookup<'_, V> {
        let Some(&idx) = self.map.get(&key) else {
            self.stats.misses += 1;
            return Lookup::Miss;
        };
        let slot = self.slots[idx as usize].as_ref().expect("mapped slot is occupied");
        if slot.entry.expires_at <= now {
            self.remove_idx(idx);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return Lookup::Miss;
        }
        if !valid(&slot.entry) {
            self.remove_idx(idx);
            self.stats.invalidations += 1;
            self.stats.misses += 1;
            return Lookup::Miss;
        }
        self.stats.hits += 1;
        match self.config.eviction {
            Eviction::Sieve => {
                if let Some(s) = self.slots[idx as usize].as_mut() {
                    s.visited = true;
                }
            }
            Eviction::Lru => {
                self.unlink(idx);
                self.link_head(idx);
            }
        }
        let slot = self.slots[idx as usize].as_ref().expect("mapped slot is occupied");
        Lookup::Hit(&slot.entry)
    }

    /// Whether `key` is present, without touching statistics or recency.
    pub fn contains(&self, key: u128) -> bool {
        self.map.contains_key(&key)
    }

    /// The entry of `key`, as stored: no statistics, recency, expiry or
    /// validity check (a driver copying what a fill stored, e.g. to a file).
    pub fn peek(&self, key: u128) -> Option<&Entry<V>> {
        let idx = *self.map.get(&key)?;
        self.slots[idx as usize].as_ref().map(|s| &s.entry)
    }

    /// Inserts or replaces. An entry never replaces a newer one for the same key
    /// (fills may arrive out of order). Returns whether it was stored.
    pub fn insert(&mut self, now: Instant, key: u128, mut entry: Entry<V>) -> bool {
        if entry.size_bytes as u64 > self.config.bytes_max {
            self.stats.oversized += 1;
            return false;
        }
        let ttl = match self.fresh_ttl {
            Some(fresh) if vouched_by_rows(&entry.deps) => fresh,
            _ => self.config.ttl,
        };
        entry.expires_at = entry.expires_at.min(now + ttl);
        if let Some(&idx) = self.map.get(&key) {
            let old = &self.slots[idx as usize].as_ref().expect("mapped slot is occupied").entry;
            if old.lsn > entry.lsn {
                return false;
            }
            self.remove_idx(idx);
        }
        while self.map.len() >= self.config.entries_max
            || self.stats.bytes + entry.size_bytes as u64 > self.config.bytes_max
        {
            if !self.evict_one() {
                break;
            }
        }
        let size = entry.size_bytes as u64;
        let slot = Slot { key, entry, visited: false, older: NIL, newer: NIL };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).expect("entries_max < 2^31")
            }
        };
        self.link_head(idx);
        self.map.insert(key, idx);
        self.stats.inserts += 1;
        self.stats.bytes += size;
        self.stats.entries += 1;
        true
    }

    /// Replaces the value of `key` with one reflecting `lsn`, when the entry
    /// is older than `lsn` and `compute` yields `(value, size)`. Returns whether
    /// it did. The entry keeps its place and its expiry.
    pub fn refresh(&mut self, key: u128, lsn: Lsn, compute: impl FnOnce(&V) -> Option<(V, u32)>) -> bool {
        let mut hint = NO_SLOT;
        self.refresh_hinted(key, &mut hint, lsn, compute)
    }

    /// Prefetches what [`Self::rehint`] reads for `key`: slot `hint`, if any,
    /// and always where the map's lookup starts (see [`OpenMap::prefetch`]):
    /// whether the hint went stale (the entry evicted, or moved by a
    /// re-insert) is only known once the slot has arrived.
    pub fn prefetch(&self, key: u128, hint: u32) {
        if let Some(slot) = self.slots.get(hint as usize) {
            crate::open_map::prefetch(slot);
        }
        self.map.prefetch(&key);
    }

    /// Makes `hint` the slot holding `key` (`NO_SLOT` when absent), looking
    /// it up in the map only when the hinted slot holds another key, and
    /// prefetches the slot found. A batch rehints all its entries before it
    /// refreshes any, so that the misses of stale hints overlap too.
    pub fn rehint(&self, key: u128, hint: &mut u32) {
        if matches!(self.slots.get(*hint as usize), Some(Some(s)) if s.key == key) {
            return;
        }
        *hint = self.map.get(&key).copied().unwrap_or(NO_SLOT);
        if let Some(slot) = self.slots.get(*hint as usize) {
            crate::open_map::prefetch(slot);
        }
    }

    /// [`Self::refresh`] starting from `hint`, the slot where `key` was last
    /// found: read directly when it still holds `key` (no map lookup), else
    /// looked up and `hint` updated (`NO_SLOT` when absent).
    pub fn refresh_hinted(
        &mut self,
        key: u128,
        hint: &mut u32,
        lsn: Lsn,
        compute: impl FnOnce(&V) -> Option<(V, u32)>,
    ) -> bool {
        let hinted = matches!(self.slots.get(*hint as usize), Some(Some(s)) if s.key == key);
        if !hinted {
            match self.map.get(&key) {
                Some(&idx) => *hint = idx,
                None => {
                    *hint = NO_SLOT;
                    return false;
                }
            }
        }
        let idx = *hint;
        let slot = self.slots[idx as usize].as_mut().expect("mapped slot is occupied");
        if slot.entry.lsn >= lsn {
            return false;
        }
        let Some((value, size)) = compute(&slot.entry.value) else { return false };
        let old = slot.entry.size_bytes as u64;
        slot.entry.value = value;
        slot.entry.size_bytes = size;
        slot.entry.lsn = lsn;
        self.stats.bytes = self.stats.bytes - old + size as u64;
        if size as u64 > self.config.bytes_max {
            self.remove_idx(idx);
            self.stats.oversized += 1;
            return false;
        }
        while self.stats.bytes > self.config.bytes_max {
            if !self.evict_one() {
                break;
            }
        }
        true
    }

    /// Removes `key` if present (an explicit invalidation).
    pub fn remove(&mut self, key: u128) -> bool {
        match self.map.get(&key) {
            Some(&idx) => {
                self.remove_idx(idx);
                self.stats.invalidations += 1;
                true
            }
            None => false,
        }
    }

    fn evict_one(&mut self) -> bool {
        if self.tail == NIL {
            return false;
        }
        let victim = match self.config.eviction {
            Eviction::Lru => self.tail,
            Eviction::Sieve => {
                let mut hand = if self.hand == NIL { self.tail } else { self.hand };
                loop {
                    let s = self.slots[hand as usize].as_mut().expect("listed slot is occupied");
                    if !s.visited {
                        break;
                    }
                    s.visited = false;
                    hand = if s.newer == NIL { self.tail } else { s.newer };
                }
                hand
            }
        };
        let next_hand = self.slots[victim as usize].as_ref().map_or(NIL, |s| s.newer);
        self.remove_idx(victim);
        self.hand = next_hand;
        self.stats.evictions += 1;
        true
    }

    fn remove_idx(&mut self, idx: u32) {
        if self.hand == idx {
            self.hand = self.slots[idx as usize].as_ref().map_or(NIL, |s| s.newer);
        }
        self.unlink(idx);
        let slot = self.slots[idx as usize].take().expect("removing an occupied slot");
        self.map.remove(&slot.key);
        self.free.push(idx);
        self.stats.bytes -= slot.entry.size_bytes as u64;
        self.stats.entries -= 1;
    }

    fn unlink(&mut self, idx: u32) {
        let (older, newer) = {
            let s = self.slots[idx as usize].as_ref().expect("unlinking an occupied slot");
            (s.older, s.newer)
        };
        if older != NIL {
            self.slots[older as usize].as_mut().expect("linked").newer = newer;
        } else {
            self.tail = newer;
        }
        if newer != NIL {
            self.slots[newer as usize].as_mut().expect("linked").older = older;
        } else {
            self.head = older;
        }
    }

    fn link_head(&mut self, idx: u32) {
        let old_head = self.head;
        {
            let s = self.slots[idx as usize].as_mut().expect("linking an occupied slot");
            s.older = old_head;
            s.newer = NIL;
        }
        if old_head != NIL {
            self.slots[old_head as usize].as_mut().expect("linked").newer = idx;
        } else {
            self.tail = idx;
        }
        self.head = idx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(entries: usize, eviction: Eviction) -> TierConfig {
        TierConfig { bytes_max: 1 << 20, entries_max: entries, ttl: Duration::from_secs(60), eviction }
    }

    fn entry(lsn: u64, size: u32) -> Entry<u32> {
        Entry { value: lsn as u32, lsn: Lsn(lsn), deps: Deps::default(), size_bytes: size, expires_at: Instant::MAX }
    }

    #[test]
    fn hit_miss_ttl() {
        let mut t = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
        let now = Instant::from_millis(0);
        assert!(t.insert(now, 1, entry(1, 10)));
        assert!(matches!(t.get(now, 1, |_| true), Lookup::Hit(_)));
        assert!(matches!(t.get(now, 2, |_| true), Lookup::Miss));
        assert!(matches!(t.get(now + Duration::from_secs(61), 1, |_| true), Lookup::Miss));
        let s = t.stats();
        assert_eq!((s.hits, s.misses, s.expirations, s.entries, s.bytes), (1, 2, 1, 0, 0));
    }

    /// Fresh, not expired: a tier told to keep entries fresh keeps one
    /// whose every dependency is a keyed row past its TTL, up to the fresh
    /// TTL; an entry depending on a table, on anything or on nothing, and
    /// every entry of a tier not told, expire at the TTL.
    #[test]
    fn entries_the_stream_vouches_for_row_by_row_outlive_the_ttl() {
        let t0 = Instant::from_millis(0);
        let with = |deps: Vec<Dep>| Entry { deps: Deps::from(deps), ..entry(1, 10) };
        let table = crate::sql::TableId(1);
        let cases = [
            (vec![Dep::Key(table, 7)], true),
            (vec![Dep::Key(table, 7), Dep::Key(table, 8)], true),
            (vec![Dep::Key(table, 7), Dep::Table(table)], false),
            (vec![Dep::Table(table)], false),
            (vec![Dep::Any], false),
            (vec![], false),
        ];
        for (deps, vouched) in cases {
            let mut fresh = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
            fresh.keep_fresh(Duration::from_secs(3600));
            let mut plain = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
            assert!(fresh.insert(t0, 1, with(deps.clone())) && plain.insert(t0, 1, with(deps.clone())));
            let later = t0 + Duration::from_secs(61);
            assert_eq!(matches!(fresh.get(later, 1, |_| true), Lookup::Hit(_)), vouched, "{deps:?}");
            assert!(matches!(plain.get(later, 1, |_| true), Lookup::Miss), "{deps:?}");
            // the fresh TTL still bounds it
            assert!(matches!(fresh.get(t0 + Duration::from_secs(3601), 1, |_| true), Lookup::Miss), "{deps:?}");
        }
        // a fill that asks for less than the tier gives gets what it asked
        let mut fresh = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
        fresh.keep_fresh(Duration::from_secs(3600));
        let short = Entry { expires_at: t0 + Duration::from_secs(5), ..with(vec![Dep::Key(table, 7)]) };
        assert!(fresh.insert(t0, 1, short));
        assert!(matches!(fresh.get(t0 + Duration::from_secs(6), 1, |_| true), Lookup::Miss));
    }

    #[test]
    fn rehint_finds_the_slot_from_any_hint() {
        let mut t = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
        let now = Instant::from_millis(0);
        for k in 1..=5u128 {
            assert!(t.insert(now, k, entry(1, 10)));
        }
        let slot_of = |t: &Tier<u32>, k: u128| t.map.get(&k).copied().unwrap_or(NO_SLOT);
        for k in 1..=6u128 {
            for start in [NO_SLOT, 0, 1, 4, 1000] {
                let mut hint = start;
                t.rehint(k, &mut hint);
                assert_eq!(hint, slot_of(&t, k), "key {k} from hint {start}");
            }
        }
        // a re-inserted key moves: its old hint is repaired
        let mut hint = slot_of(&t, 2);
        t.remove(2);
        t.rehint(2, &mut hint);
        assert_eq!(hint, NO_SLOT);
        t.remove(1);
        assert!(t.insert(now, 2, entry(2, 10)));
        let mut hint = slot_of(&t, 3);
        t.rehint(2, &mut hint);
        assert_eq!(hint, slot_of(&t, 2));
        assert!(t.refresh_hinted(2, &mut hint, Lsn(3), |_| Some((3, 10))));
        assert_eq!(t.peek(2).map(|e| e.value), Some(3));
    }

    #[test]
    fn entries_are_what_the_tier_holds() {
        let mut t = Tier::new(cfg(3, Eviction::Lru)).expect("valid");
        let now = Instant::ZERO;
        for k in 1..=5u64 {
            assert!(t.insert(now, u128::from(k), entry(k, 10)));
        }
        t.remove(4);
        let mut held: Vec<u32> = t.entries().map(|e| e.value).collect();
        held.sort_unstable();
        // 1 and 2 evicted (three entries at most), 4 removed
        assert_eq!(held, [3, 5]);
        assert_eq!(t.entries().count(), t.len());
        t.clear();
        assert_eq!(t.entries().count(), 0);
    }

    #[test]
    fn invalid_entries_are_dropped() {
        let mut t = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
        let now = Instant::ZERO;
        t.insert(now, 1, entry(1, 10));
        assert!(matches!(t.get(now, 1, |e| e.lsn >= Lsn(2)), Lookup::Miss));
        assert_eq!(t.stats().invalidations, 1);
        assert!(t.is_empty());
    }

    #[test]
    fn older_fill_never_replaces_newer() {
        let mut t = Tier::new(cfg(10, Eviction::Sieve)).expect("valid");
        t.insert(Instant::ZERO, 1, entry(5, 10));
        assert!(!t.insert(Instant::ZERO, 1, entry(3, 10)));
        match t.get(Instant::ZERO, 1, |_| true) {
            Lookup::Hit(e) => assert_eq!(e.lsn, Lsn(5)),
            Lookup::Miss => panic!("expected hit"),
        }
    }

    #[test]
    fn budgets_hold_and_sieve_keeps_visited() {
        for ev in [Eviction::Sieve, Eviction::Lru] {
            let mut t = Tier::new(TierConfig { bytes_max: 100, ..cfg(5, ev) }).expect("valid");
            let now = Instant::ZERO;
            for k in 0..5u128 {
                t.insert(now, k, entry(1, 10));
            }
            // touch key 0 so it survives
            assert!(matches!(t.get(now, 0, |_| true), Lookup::Hit(_)));
            for k in 5..20u128 {
                t.insert(now, k, entry(1, 10));
                assert!(t.len() <= 5);
                assert!(t.stats().bytes <= 100);
                if k == 5 {
                    assert!(t.contains(0), "{ev:?} evicted the visited key first");
                }
            }
            // bytes budget
            t.insert(now, 100, entry(1, 95));
            assert!(t.stats().bytes <= 100);
            assert!(!t.insert(now, 101, entry(1, 101)));
            assert_eq!(t.stats().oversized, 1);
        }
    }

    #[test]
    fn bad_config_is_refused() {
        assert_eq!(Tier::<u32>::new(cfg(0, Eviction::Sieve)).err(), Some(TierConfigError::Entries));
    }
}

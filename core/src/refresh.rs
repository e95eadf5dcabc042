//! Refresh in place ("update edge caches" in the product's write flow): a CDC
//! event that carries the new row image refreshes the cached results of point
//! reads of that row (`SELECT cols FROM t WHERE pk = $1`) instead of only
//! invalidating them, so a write does not cost every site a miss.
//!
//! Only shapes the analyser marks `refreshable` qualify: one table, the WHERE
//! clause exactly `pk = arg`, plain columns, no LIMIT, aggregates or DISTINCT.
//! Their result is a function of that one row, so the row image at LSN L gives
//! the result at L whatever else was committed.
//!
//! Cost: applying a change is memory-bound (a row lookup, then the entry in
//! each tier, each a likely cache miss on a node holding many entries). Each
//! tracked entry keeps a hint per tier (the slot it was last found in), so a
//! refresh reads the slot directly instead of the tier's map, and a batch of
//! events is applied in phases (all row lookups, then each tier's slots), so
//! that the lookups of different rows overlap in the memory system instead of
//! waiting for each other. Most changed rows have no entry at a given node: a
//! row filter answers them without a lookup in the index.

use crate::Lsn;
use crate::cache::{NO_SLOT, Tier};
use crate::invalidation::{CdcEvent, ChangeTarget};
use crate::open_map::{OpenKey, OpenMap};
use crate::sql::TableId;

/// Renders a refreshed result from a CDC row image: `(table, key hash, old
/// value, lsn) -> (new value, size)`; `None` leaves the entry to invalidation.
pub type RefreshFn<'a, V> = dyn FnMut(TableId, u64, &V, Lsn) -> Option<(V, u32)> + 'a;

/// Tiers whose slots a tracked entry remembers (a node's L1 and L2); tiers
/// past these are looked up by key.
const HINTED: usize = 2;

/// A refreshable cache entry of a row, and where it was last found per tier.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The cache key's halves (8-byte aligned, so that a row's slot in the
    /// index stays within a cache line more often).
    cache_key: [u64; 2],
    hints: [u32; HINTED],
}

impl Tracked {
    fn new(cache_key: u128) -> Self {
        Tracked { cache_key: [cache_key as u64, (cache_key >> 64) as u64], hints: [NO_SLOT; HINTED] }
    }
    fn cache_key(&self) -> u128 {
        u128::from(self.cache_key[0]) | (u128::from(self.cache_key[1]) << 64)
    }
}

/// The entries of one row: nearly always one (one session context), so it is
/// kept inline.
#[derive(Debug)]
enum Entries {
    One(Tracked),
    Many(Vec<Tracked>),
}

/// No entries: what a row holds for the moment between its insertion in the
/// index and its first entry.
impl Default for Entries {
    fn default() -> Self {
        Entries::Many(Vec::new())
    }
}

impl Entries {
    fn as_slice(&self) -> &[Tracked] {
        match self {
            Entries::One(t) => std::slice::from_ref(t),
            Entries::Many(v) => v,
        }
    }
    fn as_mut_slice(&mut self) -> &mut [Tracked] {
        match self {
            Entries::One(t) => std::slice::from_mut(t),
            Entries::Many(v) => v,
        }
    }
}

/// One entry to refresh in a batch: the row, the change's LSN, the entry.
#[derive(Clone, Copy, Debug)]
struct Due {
    table: TableId,
    key: u64,
    lsn: Lsn,
    /// Index of the entry among its row's entries.
    nth: u32,
    tracked: Tracked,
    hints_before: [u32; HINTED],
}

/// A set of rows that may have false positives and no false negatives: one
/// bit per hash bucket, about 8 bits per entry the index can hold. Most
/// changed rows have no entry at a given node, and for them a lookup in the
/// index is the longest probe (to the first empty slot) and a cache miss;
/// the filter, a bit per hash bucket (64 KB for a 40 000-entry index, whose
/// rows take megabytes), answers most of them from the cache.
#[derive(Debug)]
struct RowFilter {
    words: Vec<u64>,
    /// log2 of the number of bits.
    bits: u32,
}

impl RowFilter {
    fn new(entries_max: usize) -> Self {
        // clamped before rounding up: next_power_of_two overflows near usize::MAX (wasm32)
        let bits = entries_max.saturating_mul(8).clamp(1 << 9, 1 << 24).next_power_of_two().trailing_zeros();
        RowFilter { words: vec![0; 1 << (bits - 6)], bits }
    }

    #[inline]
    fn bit(&self, row: &(TableId, u64)) -> (usize, u64) {
        let b = (row.hash64() >> (64 - self.bits)) as usize;
        (b >> 6, 1u64 << (b & 63))
    }

    fn insert(&mut self, row: &(TableId, u64)) {
        let (w, m) = self.bit(row);
        self.words[w] |= m;
    }

    #[inline]
    fn may_contain(&self, row: &(TableId, u64)) -> bool {
        let (w, m) = self.bit(row);
        self.words[w] & m != 0
    }

    fn clear(&mut self) {
        self.words.fill(0);
    }
}

/// Row key -> cache keys of refreshable entries for that row. Bounded: past
/// `entries_max` it starts over (entries then fall back to invalidation).
#[derive(Debug)]
pub struct RefreshIndex {
    by_row: OpenMap<(TableId, u64), Entries>,
    /// Every row of `by_row`, and a few more.
    filter: RowFilter,
    entries: usize,
    entries_max: usize,
    /// Scratch space of a batch (kept to avoid an allocation per batch).
    due: Vec<Due>,
    /// Entries refreshed in place.
    pub refreshed: u64,
}

impl RefreshIndex {
    pub fn new(entries_max: usize) -> Self {
        RefreshIndex {
            by_row: OpenMap::new(),
            filter: RowFilter::new(entries_max),
            entries: 0,
            entries_max: entries_max.max(1),
            due: Vec::new(),
            refreshed: 0,
        }
    }

    /// A refreshable entry for row `(table, key)` was filled under `cache_key`.
    pub fn track(&mut self, table: TableId, key: u64, cache_key: u128) {
        if self.entries >= self.entries_max {
            self.by_row.clear();
            self.filter.clear();
            self.entries = 0;
        }
        self.filter.insert(&(table, key));
        let entries = self.by_row.get_or_default((table, key));
        if entries.as_slice().iter().any(|t| t.cache_key() == cache_key) {
            return;
        }
        match entries {
            Entries::Many(v) if v.is_empty() => *entries = Entries::One(Tracked::new(cache_key)),
            Entries::One(t) => *entries = Entries::Many(vec![*t, Tracked::new(cache_key)]),
            Entries::Many(v) => v.push(Tracked::new(cache_key)),
        }
        self.entries += 1;
    }

    /// Prefetches the filter's word for the row: [`Self::prefetch`] reads it.
    pub fn prefetch_filter(&self, table: TableId, key: u64) {
        let (w, _) = self.filter.bit(&(table, key));
        crate::open_map::prefetch(&self.filter.words[w]);
    }

    /// Prefetches the row's entry list (see [`OpenMap::prefetch`]), if the
    /// row may have one.
    pub fn prefetch(&self, table: TableId, key: u64) {
        if self.filter.may_contain(&(table, key)) {
            self.by_row.prefetch(&(table, key));
        }
    }

    /// Applies the row images of `event` to every tracked entry in `tiers`.
    /// `refresh(table, key, old value, lsn)` computes the new value (and its
    /// size) from the event's row image; `None` leaves the entry to invalidation.
    pub fn apply<V: Clone>(&mut self, event: &CdcEvent, tiers: &mut [&mut Tier<V>], refresh: &mut RefreshFn<'_, V>) {
        self.apply_batch(std::iter::once(event), tiers, refresh);
    }

    /// Applies a batch of events, in order: the same result as [`Self::apply`]
    /// on each, with the memory accesses of different rows overlapped.
    pub fn apply_batch<'e, V: Clone>(
        &mut self,
        events: impl IntoIterator<Item = &'e CdcEvent>,
        tiers: &mut [&mut Tier<V>],
        refresh: &mut RefreshFn<'_, V>,
    ) {
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        // phase 1: the rows' entries (independent lookups)
        for event in events {
            let lsn = event.change.lsn;
            for target in &event.change.targets {
                let ChangeTarget::Keys(t, ks) = target else { continue };
                for k in ks {
                    let row = (*t, *k);
                    if !self.filter.may_contain(&row) {
                        continue;
                    }
                    let Some(entries) = self.by_row.get(&row) else { continue };
                    for (nth, tracked) in entries.as_slice().iter().enumerate() {
                        due.push(Due {
                            table: *t,
                            key: *k,
                            lsn,
                            nth: nth as u32,
                            tracked: *tracked,
                            hints_before: tracked.hints,
                        });
                    }
                }
            }
        }
        // phase 2: each tier's slots, in event order: prefetched, stale hints
        // looked up again (their slots prefetched), then refreshed, so that
        // the misses of each step overlap
        for (i, tier) in tiers.iter_mut().enumerate() {
            for d in &due {
                tier.prefetch(d.tracked.cache_key(), d.tracked.hints.get(i).copied().unwrap_or(NO_SLOT));
            }
            for d in due.iter_mut() {
                let key = d.tracked.cache_key();
                if let Some(hint) = d.tracked.hints.get_mut(i) {
                    tier.rehint(key, hint);
                }
            }
            for d in due.iter_mut() {
                let (table, key, lsn, cache_key) = (d.table, d.key, d.lsn, d.tracked.cache_key());
                let compute = |old: &V| refresh(table, key, old, lsn);
                let done = match d.tracked.hints.get_mut(i) {
                    Some(hint) => tier.refresh_hinted(cache_key, hint, lsn, compute),
                    None => tier.refresh(cache_key, lsn, compute),
                };
                if done {
                    self.refreshed += 1;
                }
            }
        }
        // phase 3: remember where the entries were found (rarely changes)
        for d in due.iter().filter(|d| d.tracked.hints != d.hints_before) {
            if let Some(entries) = self.by_row.get_mut(&(d.table, d.key))
                && let Some(t) = entries.as_mut_slice().get_mut(d.nth as usize)
                && t.cache_key == d.tracked.cache_key
            {
                t.hints = d.tracked.hints;
            }
        }
        self.due = due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Entry, Eviction, TierConfig};
    use crate::invalidation::{Change, Dep};
    use crate::{Duration, Instant, Lsn};

    const T: TableId = TableId(1);

    fn tier(rows: &[u64]) -> Tier<u64> {
        let config =
            TierConfig { bytes_max: 1 << 20, entries_max: 64, ttl: Duration::from_secs(60), eviction: Eviction::Sieve };
        let mut t = Tier::new(config).expect("tier");
        for &r in rows {
            let entry = Entry {
                value: 0,
                lsn: Lsn(1),
                deps: vec![Dep::Key(T, r)].into(),
                size_bytes: 8,
                expires_at: Instant::ZERO + Duration::from_secs(60),
            };
            t.insert(Instant::ZERO, u128::from(r), entry);
        }
        t
    }

    fn change(lsn: u64, rows: &[u64]) -> CdcEvent {
        CdcEvent {
            prev_lsn: Lsn(lsn - 1),
            change: Change { lsn: Lsn(lsn), targets: vec![ChangeTarget::Keys(T, rows.to_vec())] },
        }
    }

    #[test]
    fn the_row_filter_has_no_false_negatives_and_few_false_positives() {
        let entries_max = 10_000;
        let mut f = RowFilter::new(entries_max);
        let rows: Vec<(TableId, u64)> = (0..entries_max as u64).map(|k| (T, k * 7919)).collect();
        for r in &rows {
            f.insert(r);
        }
        assert!(rows.iter().all(|r| f.may_contain(r)));
        let others = (0..100_000u64).filter(|k| f.may_contain(&(TableId(2), *k))).count();
        // one bit per row in 8 * entries_max (rounded up): about 1 - e^(-1/8)
        assert!(others < 15_000, "{others} false positives in 100000");
        f.clear();
        assert!(!rows.iter().any(|r| f.may_contain(r)));
        // sizes are clamped, also for bounds whose bit count overflows
        assert_eq!((RowFilter::new(0).bits, RowFilter::new(usize::MAX).bits), (9, 24));
    }

    #[test]
    fn refreshes_tracked_rows_only_and_forgets_when_full() {
        let mut t = tier(&[1, 2, 3]);
        let mut index = RefreshIndex::new(4);
        for r in [1, 2, 3] {
            index.track(T, r, u128::from(r));
        }
        let mut calls = Vec::new();
        let mut refresh = |_: TableId, k: u64, _: &u64, lsn: Lsn| {
            calls.push(k);
            Some((lsn.0, 8))
        };
        // rows 1 and 3 tracked, 7 and 1000 not: only the tracked are rendered
        index.apply(&change(5, &[1, 7, 3, 1000]), &mut [&mut t], &mut refresh);
        assert_eq!(calls, vec![1, 3]);
        assert_eq!(index.refreshed, 2);
        let v = |t: &mut Tier<u64>, k: u128| t.peek(k).map(|e| (e.value, e.lsn));
        assert_eq!(v(&mut t, 1), Some((5, Lsn(5))));
        assert_eq!(v(&mut t, 2), Some((0, Lsn(1))));
        // the fifth row starts the index over: rows 1-3 fall back to invalidation
        index.track(T, 4, 4);
        index.track(T, 5, 5);
        calls.clear();
        let mut refresh = |_: TableId, k: u64, _: &u64, lsn: Lsn| {
            calls.push(k);
            Some((lsn.0, 8))
        };
        index.apply(&change(6, &[1, 2, 3, 5]), &mut [&mut t], &mut refresh);
        assert_eq!(calls, Vec::<u64>::new(), "row 5 has no entry in the tier; 1-3 were forgotten");
        assert_eq!(v(&mut t, 2), Some((0, Lsn(1))));
    }

    #[test]
    fn a_batch_equals_its_events_one_by_one_even_with_stale_hints() {
        let rows: Vec<u64> = (0..20).collect();
        let events: Vec<CdcEvent> =
            (0..30u64).map(|i| change(10 + i, &[i % 7, (i * 3) % 20, 100 + i, i % 7])).collect();
        let run = |batched: bool| {
            let (mut l1, mut l2) = (tier(&rows[..8]), tier(&rows));
            let mut index = RefreshIndex::new(1000);
            for &r in &rows {
                index.track(T, r, u128::from(r));
            }
            // hints learnt, then made stale: entries removed and filled again
            // into other slots, one removed for good
            let mut refresh = |_: TableId, _: u64, _: &u64, lsn: Lsn| Some((lsn.0, 8));
            index.apply(&change(2, &rows), &mut [&mut l1, &mut l2], &mut refresh);
            for r in [1u128, 3, 5] {
                l2.remove(r);
            }
            for r in [3u64, 1] {
                let e =
                    Entry { value: 0, lsn: Lsn(1), deps: Default::default(), size_bytes: 8, expires_at: Instant::MAX };
                l2.insert(Instant::ZERO, u128::from(r), e);
            }
            if batched {
                index.apply_batch(&events, &mut [&mut l1, &mut l2], &mut refresh);
            } else {
                for e in &events {
                    index.apply(e, &mut [&mut l1, &mut l2], &mut refresh);
                }
            }
            let dump = |t: &Tier<u64>| (0..200u128).map(|k| t.peek(k).map(|e| (e.value, e.lsn))).collect::<Vec<_>>();
            (dump(&l1), dump(&l2), index.refreshed)
        };
        let (one_by_one, batched) = (run(false), run(true));
        assert_eq!(one_by_one, batched);
        assert_eq!(batched.1[5], None, "removed for good");
        assert_eq!(
            batched.1[3],
            Some((34, Lsn(34))),
            "refilled into another slot, still refreshed (last change of row 3: event 24)"
        );
    }
}

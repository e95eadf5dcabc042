//! Refresh in place ("update edge caches" in the product's write flow): a CDC
//! event that carries the new row image refreshes the cached results of point
//! reads of that row (`SELECT cols FROM t WHERE pk = $1`) instead of only
//! invalidating them, so a write does not cost every site a miss.
//!
//! Only shapes the analyser marks `refreshable` qualify: one table, the WHERE
//! clause exactly `pk = arg`, plain columns, no LIMIT, aggregates or DISTINCT.
//! Their result is a function of that one row, so the row image at LSN L gives
//! the result at L whatever else was committed.

use crate::cache::Tier;
use crate::hash::FixedMap;
use crate::invalidation::{CdcEvent, ChangeTarget};
use crate::sql::TableId;
use crate::{Instant, Lsn};

/// Renders a refreshed result from a CDC row image: `(table, key hash, old
/// value, lsn) -> (new value, size)`; `None` leaves the entry to invalidation.
pub type RefreshFn<'a, V> = dyn FnMut(TableId, u64, &V, Lsn) -> Option<(V, u32)> + 'a;

/// Row key -> cache keys of refreshable entries for that row. Bounded: past
/// `entries_max` it starts over (entries then fall back to invalidation).
#[derive(Debug)]
pub struct RefreshIndex {
    by_row: FixedMap<(TableId, u64), Vec<u128>>,
    entries: usize,
    entries_max: usize,
    /// Entries refreshed in place.
    pub refreshed: u64,
}

impl RefreshIndex {
    pub fn new(entries_max: usize) -> Self {
        RefreshIndex { by_row: FixedMap::default(), entries: 0, entries_max: entries_max.max(1), refreshed: 0 }
    }

    /// A refreshable entry for row `(table, key)` was filled under `cache_key`.
    pub fn track(&mut self, table: TableId, key: u64, cache_key: u128) {
        if self.entries >= self.entries_max {
            self.by_row.clear();
            self.entries = 0;
        }
        let keys = self.by_row.entry((table, key)).or_default();
        if !keys.contains(&cache_key) {
            keys.push(cache_key);
            self.entries += 1;
        }
    }

    /// Applies the row images of `event` to every tracked entry in `tiers`.
    /// `refresh(table, key, old value, lsn)` computes the new value (and its
    /// size) from the event's row image; `None` leaves the entry to invalidation.
    pub fn apply<V: Clone>(
        &mut self,
        now: Instant,
        event: &CdcEvent,
        tiers: &mut [&mut Tier<V>],
        refresh: &mut RefreshFn<'_, V>,
    ) {
        let lsn = event.change.lsn;
        for target in &event.change.targets {
            let ChangeTarget::Keys(t, ks) = target else { continue };
            for k in ks {
                let Some(cache_keys) = self.by_row.get(&(*t, *k)) else { continue };
                for ck in cache_keys {
                    for tier in tiers.iter_mut() {
                        if tier.refresh(now, *ck, lsn, |old| refresh(*t, *k, old, lsn)) {
                            self.refreshed += 1;
                        }
                    }
                }
            }
        }
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
                deps: vec![Dep::Key(T, r)],
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
        index.apply(Instant::ZERO, &change(5, &[1, 7, 3, 1000]), &mut [&mut t], &mut refresh);
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
        index.apply(Instant::ZERO, &change(6, &[1, 2, 3, 5]), &mut [&mut t], &mut refresh);
        assert_eq!(calls, Vec::<u64>::new(), "row 5 has no entry in the tier; 1-3 were forgotten");
        assert_eq!(v(&mut t, 2), Some((0, Lsn(1))));
    }
}

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

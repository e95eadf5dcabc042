//! Versions of tables and keys, advanced by writes and CDC events. An entry is
//! served only while none of its dependencies moved past the entry's LSN.
//! Applying a change is idempotent and monotone (a max), so duplicated and
//! reordered CDC events are harmless. The key map is bounded: evicting a key
//! raises its table's key watermark, which is conservative (it can only make
//! entries invalid, never valid).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use crate::hash::{FixedHasher, FixedMap};
use crate::open_map::OpenMap;
use crate::sql::TableId;
use std::hash::Hasher;

/// A commit position in the primary's WAL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Lsn(pub u64);

/// What a cached entry depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dep {
    /// Any change to the table.
    Table(TableId),
    /// A change to the row with this key hash (see [`key_hash`]).
    Key(TableId, u64),
    /// Any change to any table (a result that may read anything).
    Any,
}

/// The dependencies of a cached result, a slice ([`Deref`]): one is held
/// inline (a point read's row, the common case), more in a `Vec`. A lookup
/// reads them to validate the entry; inline, they are in the entry's own
/// cache line instead of a second allocation's.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Deps(DepsRepr);

#[derive(Clone, Default, PartialEq, Eq)]
enum DepsRepr {
    #[default]
    None,
    One(Dep),
    Many(Vec<Dep>),
}

impl Deps {
    pub fn push(&mut self, dep: Dep) {
        match &mut self.0 {
            DepsRepr::None => self.0 = DepsRepr::One(dep),
            DepsRepr::One(first) => self.0 = DepsRepr::Many(vec![*first, dep]),
            DepsRepr::Many(v) => v.push(dep),
        }
    }
}

impl Deref for Deps {
    type Target = [Dep];
    fn deref(&self) -> &[Dep] {
        match &self.0 {
            DepsRepr::None => &[],
            DepsRepr::One(d) => std::slice::from_ref(d),
            DepsRepr::Many(ds) => ds,
        }
    }
}

impl<'a> IntoIterator for &'a Deps {
    type Item = &'a Dep;
    type IntoIter = std::slice::Iter<'a, Dep>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<Dep>> for Deps {
    fn from(v: Vec<Dep>) -> Self {
        match v.as_slice() {
            [] => Deps(DepsRepr::None),
            [d] => Deps(DepsRepr::One(*d)),
            _ => Deps(DepsRepr::Many(v)),
        }
    }
}

impl FromIterator<Dep> for Deps {
    fn from_iter<I: IntoIterator<Item = Dep>>(iter: I) -> Self {
        let mut deps = Deps::default();
        iter.into_iter().for_each(|d| deps.push(d));
        deps
    }
}

impl fmt::Debug for Deps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// What one committed change touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeTarget {
    /// Effect unknown (DDL, DO blocks, multi-statement strings): everything.
    All,
    /// Rows of the table, keys unknown.
    Table(TableId),
    /// These rows of the table.
    Keys(TableId, Vec<u64>),
}

/// A committed change, from a write's reply or from the CDC stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub lsn: Lsn,
    pub targets: Vec<ChangeTarget>,
}

/// One CDC message: the commit at `lsn`, whose predecessor in the primary's
/// commit order was at `prev_lsn`. `prev_lsn == lsn` with no targets is a
/// keepalive saying nothing was committed after `lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CdcEvent {
    pub prev_lsn: Lsn,
    pub change: Change,
}

impl CdcEvent {
    /// Everything changed, at a position before the previous commit's: the
    /// stream goes on on a new history (a new slot on a promoted primary,
    /// whose timeline gives the positions the old one lost to other
    /// commits). What was known of the old positions says nothing of the
    /// new ones ([`VersionMap::restart_at`]).
    pub fn starts_history(&self) -> bool {
        self.change.lsn < self.prev_lsn && self.change.targets.iter().any(|t| matches!(t, ChangeTarget::All))
    }
}

/// Hash of a primary-key value (canonical text) within a table.
pub fn key_hash(table: TableId, canonical: &[u8]) -> u64 {
    let mut h = FixedHasher::default();
    h.write_u32(table.0);
    h.write(canonical);
    h.finish()
}

#[derive(Clone, Debug)]
pub struct VersionMapConfig {
    /// Upper bound on tracked keys.
    pub keys_max: usize,
    /// Upper bound on CDC events buffered while waiting for a gap to fill.
    pub pending_max: usize,
}

impl Default for VersionMapConfig {
    fn default() -> Self {
        VersionMapConfig { keys_max: 1 << 20, pending_max: 4096 }
    }
}

/// A [`VersionMapConfig`] the map cannot work with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("versions: keys_max must be positive")]
pub struct VersionMapConfigError;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VersionStats {
    pub changes_applied: u64,
    pub keys_evicted: u64,
    pub keys: u64,
    pub cdc_gaps_dropped: u64,
    /// Gaps in the change stream given up on ([`VersionMap::skip_gap`]).
    pub cdc_gaps_skipped: u64,
}

#[derive(Debug)]
pub struct VersionMap {
    config: VersionMapConfig,
    global: Lsn,
    /// The newest change to any table.
    any_table: Lsn,
    table_any: FixedMap<TableId, Lsn>,
    table_whole: FixedMap<TableId, Lsn>,
    keys: OpenMap<(TableId, u64), Lsn>,
    key_watermark: FixedMap<TableId, Lsn>,
    /// Every commit up to here has been applied (contiguous CDC prefix).
    complete_through: Lsn,
    /// The newest commit the stream has announced. Above `complete_through`,
    /// an event between them is missing: what it changed is unknown.
    max_seen: Lsn,
    /// CDC events past a gap: prev_lsn -> (lsn).
    pending: BTreeMap<Lsn, Lsn>,
    stats: VersionStats,
}

impl VersionMap {
    /// `start` is the LSN from which the CDC stream is complete (the slot's start).
    pub fn new(config: VersionMapConfig, start: Lsn) -> Result<Self, VersionMapConfigError> {
        if config.keys_max == 0 {
            return Err(VersionMapConfigError);
        }
        Ok(VersionMap {
            config,
            global: Lsn(0),
            any_table: Lsn(0),
            table_any: FixedMap::default(),
            table_whole: FixedMap::default(),
            keys: OpenMap::new(),
            key_watermark: FixedMap::default(),
            complete_through: start,
            max_seen: start,
            pending: BTreeMap::new(),
            stats: VersionStats::default(),
        })
    }

    /// A new history starts at `start` ([`CdcEvent::starts_history`]): every
    /// version known is of the old one, whose positions the new one reuses,
    /// and is forgotten; nothing older than `start` is valid, and the stream
    /// is complete from there. The owner drops what it cached (an entry
    /// filed at a position of the old history past `start` would pass).
    pub fn restart_at(&mut self, start: Lsn) {
        let stats = self.stats;
        let config = self.config.clone();
        if let Ok(fresh) = VersionMap::new(config, start) {
            *self = fresh;
        }
        self.global = start;
        self.stats = stats;
    }

    pub fn stats(&self) -> VersionStats {
        VersionStats { keys: self.keys.len() as u64, ..self.stats }
    }

    /// Every commit at or below this LSN is reflected in the map.
    pub fn complete_through(&self) -> Lsn {
        self.complete_through
    }

    /// Applies a change (a write's own reply or a CDC event's payload).
    pub fn apply(&mut self, change: &Change) {
        let lsn = change.lsn;
        self.stats.changes_applied += 1;
        if !change.targets.is_empty() {
            self.any_table = self.any_table.max(lsn);
        }
        for target in &change.targets {
            match target {
                ChangeTarget::All => self.global = self.global.max(lsn),
                ChangeTarget::Table(t) => {
                    bump(&mut self.table_whole, *t, lsn);
                    bump(&mut self.table_any, *t, lsn);
                }
                ChangeTarget::Keys(t, ks) => {
                    bump(&mut self.table_any, *t, lsn);
                    for k in ks {
                        let v = self.keys.get_or_default((*t, *k));
                        *v = (*v).max(lsn);
                    }
                }
            }
        }
        self.enforce_bounds();
    }

    /// Whether an event of the stream is missing: one with a later commit
    /// arrived, and the frontier has not reached it.
    pub fn has_gap(&self) -> bool {
        self.complete_through < self.max_seen
    }

    /// Gives up on the missing events: everything older than the newest
    /// commit announced is invalid, and the stream is complete from there.
    pub fn skip_gap(&mut self) {
        if !self.has_gap() {
            return;
        }
        let at = self.max_seen;
        self.apply(&Change { lsn: at, targets: vec![ChangeTarget::All] });
        self.complete_through = at;
        self.pending.clear();
        self.stats.cdc_gaps_skipped += 1;
    }

    /// Applies a CDC event and advances the contiguous frontier when it can.
    pub fn apply_cdc(&mut self, event: &CdcEvent) {
        if !event.change.targets.is_empty() {
            self.apply(&event.change);
        }
        let lsn = event.change.lsn;
        self.max_seen = self.max_seen.max(lsn);
        if lsn <= self.complete_through {
            return;
        }
        if event.prev_lsn <= self.complete_through {
            self.complete_through = lsn;
            while let Some((&prev, &next)) = self.pending.first_key_value() {
                if prev > self.complete_through {
                    break;
                }
                self.pending.pop_first();
                self.complete_through = self.complete_through.max(next);
            }
        } else {
            if self.pending.len() >= self.config.pending_max {
                // the frontier stays where it is: correct, only less useful
                self.pending.clear();
                self.stats.cdc_gaps_dropped += 1;
            }
            let e = self.pending.entry(event.prev_lsn).or_insert(lsn);
            *e = (*e).max(lsn);
        }
    }

    /// Prefetches the key's version (see [`OpenMap::prefetch`]): a batch
    /// prefetches its keys before applying them, so that their cache misses
    /// overlap.
    pub fn prefetch(&self, table: TableId, key: u64) {
        self.keys.prefetch(&(table, key));
    }

    /// Whether an entry reflecting commits up to `lsn`, with `deps`, is current
    /// as far as this map knows. Past a gap in the change stream, only an
    /// entry at least as new as everything the stream announced is: the
    /// missing event may have changed any row.
    pub fn is_valid(&self, lsn: Lsn, deps: &[Dep]) -> bool {
        if self.global > lsn || (lsn < self.max_seen && self.complete_through < self.max_seen) {
            return false;
        }
        deps.iter().all(|d| match *d {
            Dep::Any => self.any_table <= lsn,
            Dep::Table(t) => get(&self.table_any, t) <= lsn,
            Dep::Key(t, k) => {
                get(&self.table_whole, t) <= lsn
                    && get(&self.key_watermark, t) <= lsn
                    && self.keys.get(&(t, k)).copied().unwrap_or(Lsn(0)) <= lsn
            }
        })
    }

    /// The newest version among `deps` (the LSN an entry must reflect to be valid).
    pub fn required_lsn(&self, deps: &[Dep]) -> Lsn {
        let mut need = self.global;
        for d in deps {
            let v = match *d {
                Dep::Any => self.any_table,
                Dep::Table(t) => get(&self.table_any, t),
                Dep::Key(t, k) => get(&self.table_whole, t)
                    .max(get(&self.key_watermark, t))
                    .max(self.keys.get(&(t, k)).copied().unwrap_or(Lsn(0))),
            };
            need = need.max(v);
        }
        need
    }

    /// Past `keys_max`, evicts the oldest eighth of the keys at once (amortised
    /// O(1) per change), raising each table's watermark to the newest evicted.
    fn enforce_bounds(&mut self) {
        if self.keys.len() <= self.config.keys_max {
            return;
        }
        let mut all: Vec<(Lsn, TableId, u64)> = self.keys.iter().map(|(&(t, k), &lsn)| (lsn, t, k)).collect();
        let evict = (self.keys.len() - self.config.keys_max + self.config.keys_max / 8).min(all.len());
        if evict == 0 {
            return;
        }
        all.select_nth_unstable(evict - 1);
        for &(lsn, t, k) in &all[..evict] {
            self.keys.remove(&(t, k));
            bump(&mut self.key_watermark, t, lsn);
            self.stats.keys_evicted += 1;
        }
    }
}

fn get(map: &FixedMap<TableId, Lsn>, t: TableId) -> Lsn {
    map.get(&t).copied().unwrap_or(Lsn(0))
}

fn bump(map: &mut FixedMap<TableId, Lsn>, t: TableId, lsn: Lsn) {
    let v = map.entry(t).or_insert(Lsn(0));
    *v = (*v).max(lsn);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_without_room_for_keys_is_refused() {
        let config = VersionMapConfig { keys_max: 0, pending_max: 8 };
        assert_eq!(VersionMap::new(config, Lsn(0)).err(), Some(VersionMapConfigError));
    }

    const T: TableId = TableId(1);
    const U: TableId = TableId(2);

    #[test]
    fn deps_hold_what_they_were_built_from() {
        for n in [0usize, 1, 2, 3, 17] {
            let v: Vec<Dep> =
                (0..n as u64).map(|i| if i % 3 == 2 { Dep::Table(U) } else { Dep::Key(T, i * 31) }).collect();
            let from_vec = Deps::from(v.clone());
            let collected: Deps = v.iter().copied().collect();
            assert_eq!(&from_vec[..], &v[..]);
            assert_eq!(&collected[..], &v[..]);
            assert_eq!(from_vec, collected);
            assert_eq!(format!("{from_vec:?}"), format!("{v:?}"));
        }
        assert!(Deps::default().is_empty());
        // no larger than the Vec it replaces
        assert!(size_of::<Deps>() <= size_of::<Vec<Dep>>());
    }

    fn keys(lsn: u64, t: TableId, ks: &[u64]) -> Change {
        Change { lsn: Lsn(lsn), targets: vec![ChangeTarget::Keys(t, ks.to_vec())] }
    }

    #[test]
    fn key_level_and_table_level() {
        let mut m = VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config");
        m.apply(&keys(10, T, &[1]));
        assert!(!m.is_valid(Lsn(5), &[Dep::Key(T, 1)]));
        assert!(m.is_valid(Lsn(5), &[Dep::Key(T, 2)]));
        assert!(!m.is_valid(Lsn(5), &[Dep::Table(T)]));
        assert!(m.is_valid(Lsn(5), &[Dep::Table(U)]));
        m.apply(&Change { lsn: Lsn(20), targets: vec![ChangeTarget::Table(U)] });
        assert!(!m.is_valid(Lsn(15), &[Dep::Key(U, 7)]));
        m.apply(&Change { lsn: Lsn(30), targets: vec![ChangeTarget::All] });
        assert!(!m.is_valid(Lsn(25), &[]));
        assert_eq!(m.required_lsn(&[Dep::Key(T, 1)]), Lsn(30));
    }

    #[test]
    fn eviction_is_conservative() {
        let mut m = VersionMap::new(VersionMapConfig { keys_max: 2, pending_max: 8 }, Lsn(0)).expect("valid");
        m.apply(&keys(1, T, &[1]));
        m.apply(&keys(2, T, &[2]));
        m.apply(&keys(3, T, &[3]));
        assert_eq!(m.stats().keys, 2);
        // key 1 was evicted: an entry for it at lsn 0 is still invalid
        assert!(!m.is_valid(Lsn(0), &[Dep::Key(T, 1)]));
        assert!(m.is_valid(Lsn(3), &[Dep::Key(T, 1)]));
    }

    #[test]
    fn nothing_older_than_a_gap_is_valid_until_it_fills_or_is_skipped() {
        let mut m = VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config");
        let ev = |prev: u64, lsn: u64, key: u64| CdcEvent { prev_lsn: Lsn(prev), change: keys(lsn, T, &[key]) };
        m.apply_cdc(&ev(0, 10, 1));
        assert!(m.is_valid(Lsn(10), &[Dep::Key(T, 2)]));
        // 20 (row 2) is missing; 30 (row 3) arrives
        m.apply_cdc(&ev(20, 30, 3));
        assert!(m.has_gap());
        assert!(!m.is_valid(Lsn(10), &[Dep::Key(T, 2)]), "the missing event may have changed row 2");
        assert!(m.is_valid(Lsn(30), &[Dep::Key(T, 2)]), "an entry newer than the gap");
        m.apply_cdc(&ev(10, 20, 2));
        assert!(!m.has_gap());
        assert!(!m.is_valid(Lsn(10), &[Dep::Key(T, 2)]), "row 2 changed at 20");
        assert!(m.is_valid(Lsn(10), &[Dep::Key(T, 4)]), "row 4 did not");
        // a gap never filled: skipped, everything older invalid
        m.apply_cdc(&ev(40, 50, 5));
        m.skip_gap();
        assert!(!m.has_gap());
        assert_eq!(m.complete_through(), Lsn(50));
        assert!(!m.is_valid(Lsn(45), &[Dep::Key(T, 9)]));
        assert!(m.is_valid(Lsn(50), &[Dep::Key(T, 9)]));
        assert_eq!(m.stats().cdc_gaps_skipped, 1);
    }

    #[test]
    fn cdc_frontier_survives_reordering_and_duplicates() {
        let mut m = VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config");
        let ev = |prev: u64, lsn: u64| CdcEvent { prev_lsn: Lsn(prev), change: keys(lsn, T, &[lsn]) };
        m.apply_cdc(&ev(10, 20));
        assert_eq!(m.complete_through(), Lsn(0));
        m.apply_cdc(&ev(20, 30));
        m.apply_cdc(&ev(0, 10));
        assert_eq!(m.complete_through(), Lsn(30));
        m.apply_cdc(&ev(0, 10));
        assert_eq!(m.complete_through(), Lsn(30));
        assert!(!m.is_valid(Lsn(25), &[Dep::Key(T, 30)]));
    }
}

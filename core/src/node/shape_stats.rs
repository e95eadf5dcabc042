//! What each statement shape asked of this node: calls, the answers its
//! tiers gave, what went upstream and how long that took. The optimization
//! engine reads it beside `pg_stat_statements`, which never sees the
//! answers the cache gave. Counted by shape id (an index, not a lookup, on
//! the hot path); a catalog change renumbers shapes, so the counts so far
//! are kept by the shapes' fingerprints first.

use std::collections::HashMap;

use crate::sql::{Analyzer, ShapeId};

/// One shape's counts. Its calls are what the tiers answered and what
/// went upstream ([`ShapeCounters::calls`]): one counter less on the hot path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShapeCounters {
    pub l1_hits: u64,
    pub l2_hits: u64,
    /// Sent upstream (misses, uncacheable statements, writes).
    pub upstream: u64,
    /// Time from the request to its upstream answer, in microseconds.
    pub upstream_us: u64,
}

impl ShapeCounters {
    pub fn calls(&self) -> u64 {
        self.l1_hits + self.l2_hits + self.upstream
    }

    fn add(&mut self, o: &ShapeCounters) {
        self.l1_hits += o.l1_hits;
        self.l2_hits += o.l2_hits;
        self.upstream += o.upstream;
        self.upstream_us += o.upstream_us;
    }
}

/// One shape's row of [`ShapeStats::rows`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShapeRow {
    pub fingerprint: u64,
    /// The normalised text, literals as `$n`.
    pub text: String,
    pub counters: ShapeCounters,
}

/// Shapes of earlier catalogs kept at most.
pub const RETIRED_MAX: usize = 10_000;

#[derive(Debug, Default)]
pub struct ShapeStats {
    current: Vec<ShapeCounters>,
    /// Shapes of earlier catalogs, by fingerprint.
    retired: HashMap<u64, ShapeRow>,
}

impl ShapeStats {
    /// The counters of shape `id` (`None` for a shape over the analyzer's limit).
    #[inline]
    pub fn of(&mut self, id: ShapeId) -> Option<&mut ShapeCounters> {
        let i = id.0 as usize;
        if i < self.current.len() {
            return self.current.get_mut(i);
        }
        self.grow(id)
    }

    /// A shape first counted: room up to its id.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, id: ShapeId) -> Option<&mut ShapeCounters> {
        if id.0 == u32::MAX {
            return None;
        }
        self.current.resize(id.0 as usize + 1, ShapeCounters::default());
        self.current.last_mut()
    }

    /// Before the catalog changes (shapes are numbered anew): the counts so
    /// far kept by fingerprint.
    pub fn retire(&mut self, analyzer: &Analyzer) {
        for (i, c) in self.current.drain(..).enumerate() {
            let Some(shape) = analyzer.shape(ShapeId(i as u32)) else { continue };
            if c == ShapeCounters::default() {
                continue;
            }
            let row = self.retired.entry(shape.fingerprint).or_insert_with(|| ShapeRow {
                fingerprint: shape.fingerprint,
                text: shape.text.clone(),
                counters: ShapeCounters::default(),
            });
            row.counters.add(&c);
        }
        if self.retired.len() > RETIRED_MAX {
            // bounded: clients can make shapes, and DDL renumber them; the
            // shapes called least go first
            let mut rows: Vec<ShapeRow> = self.retired.drain().map(|(_, r)| r).collect();
            rows.sort_by_key(|r| std::cmp::Reverse(r.counters.calls()));
            rows.truncate(RETIRED_MAX);
            self.retired = rows.into_iter().map(|r| (r.fingerprint, r)).collect();
        }
    }

    /// Every shape counted so far, most calls first.
    pub fn rows(&self, analyzer: &Analyzer) -> Vec<ShapeRow> {
        let mut by: HashMap<u64, ShapeRow> = self.retired.clone();
        for (i, c) in self.current.iter().enumerate() {
            let Some(shape) = analyzer.shape(ShapeId(i as u32)) else { continue };
            if *c == ShapeCounters::default() {
                continue;
            }
            let row = by.entry(shape.fingerprint).or_insert_with(|| ShapeRow {
                fingerprint: shape.fingerprint,
                text: shape.text.clone(),
                counters: ShapeCounters::default(),
            });
            row.counters.add(c);
        }
        let mut rows: Vec<ShapeRow> = by.into_values().collect();
        rows.sort_by(|a, b| b.counters.calls().cmp(&a.counters.calls()).then(a.text.cmp(&b.text)));
        rows
    }
}

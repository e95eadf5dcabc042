//! Checkers over the full history of every simulated request: latency, hit
//! rate, staleness against the committed history, read-your-writes,
//! durability, recovery, safety, availability.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use postai_core::failover::Epoch;
use postai_core::node::Served;
use postai_core::router::Zone;
use postai_core::{Instant, Lsn};

/// Acknowledged commits of one key, in LSN order: (lsn, acknowledged at).
#[derive(Default, Debug)]
pub struct KeyHistory {
    pub commits: Vec<(Lsn, Instant)>,
}

pub struct Latency {
    pub hist: Histogram<u64>,
}

impl Latency {
    pub fn new() -> Self {
        Latency { hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid") }
    }
    pub fn record_ms(&mut self, ms: f64) {
        let us = (ms * 1000.0).round().clamp(1.0, 600_000_000.0) as u64;
        self.hist.saturating_record(us);
    }
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    pub fn count(&self) -> u64 {
        self.hist.len()
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
pub struct Checker {
    pub measure_from: Instant,
    pub reads: Latency,
    pub writes: Latency,
    pub reads_by_zone: BTreeMap<Zone, Latency>,
    pub writes_by_zone: BTreeMap<Zone, Latency>,
    pub reads_by_served: BTreeMap<Served, Latency>,
    pub reads_by_site: Vec<Latency>,
    pub read_ok: u64,
    pub write_ok: u64,
    pub read_failed: u64,
    pub write_failed: u64,
    /// One entry per fault, in the order they began.
    pub recovering: Vec<Recovering>,
    pub stale_reads: u64,
    pub staleness_ms_max: f64,
    pub ryw_violations: u64,
    pub residency_violations: u64,
    pub history: Vec<KeyHistory>,
    /// Acknowledged writes by LSN: (acknowledged at). Lost ones are RPO.
    pub acked: BTreeMap<Lsn, Instant>,
    pub lost_acked: Vec<(Lsn, Instant, Instant)>,
    pub l3_lookups: u64,
    pub l3_hits: u64,
    pub upstream_reads: u64,
}

impl Checker {
    pub fn new(keys: u64, sites: usize, measure_from: Instant) -> Self {
        Checker {
            measure_from,
            history: (0..keys).map(|_| KeyHistory::default()).collect(),
            reads_by_site: (0..sites).map(|_| Latency::new()).collect(),
            ..Default::default()
        }
    }

    pub fn measured(&self, started: Instant) -> bool {
        started >= self.measure_from
    }

    /// An acknowledged write of `key` at `lsn`.
    pub fn ack_write(&mut self, key: u64, lsn: Lsn, at: Instant) {
        if let Some(h) = self.history.get_mut(key as usize) {
            let pos = h.commits.partition_point(|(l, _)| *l < lsn);
            h.commits.insert(pos, (lsn, at));
        }
        self.acked.insert(lsn, at);
    }

    /// Commits were lost in a failover: acknowledged ones are RPO violations.
    pub fn lose(&mut self, lsns: &[Lsn], now: Instant) {
        for l in lsns {
            if let Some(at) = self.acked.remove(l) {
                self.lost_acked.push((*l, at, now));
            }
            for h in &mut self.history {
                h.commits.retain(|(c, _)| c != l);
            }
        }
    }

    /// Checks a read of `keys` that started at `started` and saw the state at
    /// `snapshot`. Returns the staleness in ms when it missed an acknowledged commit.
    pub fn check_read(&mut self, keys: &[u64], snapshot: Lsn, started: Instant) -> Option<f64> {
        let mut oldest_missed: Option<Instant> = None;
        for k in keys {
            let Some(h) = self.history.get(*k as usize) else { continue };
            let pos = h.commits.partition_point(|(l, _)| *l <= snapshot);
            for (_, acked) in &h.commits[pos..] {
                if *acked <= started {
                    oldest_missed = Some(oldest_missed.map_or(*acked, |o: Instant| o.min(*acked)));
                }
            }
        }
        let missed = oldest_missed?;
        let ms = started.saturating_since(missed).as_secs_f64() * 1e3;
        if self.measured(started) {
            self.stale_reads += 1;
            self.staleness_ms_max = self.staleness_ms_max.max(ms);
        }
        Some(ms)
    }
}

/// Which requests a fault affects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every write (a primary failure).
    Writes,
    /// Requests from sites in the zone that needed the region (not answered
    /// from the site's own tiers): a regional outage or an edge partition.
    Upstream(Zone),
    /// Every read at sites in the zone (a lost tier), or everywhere.
    Zone(Zone),
    All,
}

/// Recovery of the requests in `scope` after a fault at `at`. Requests that
/// started after the fault are bucketed by start time into 100 ms windows; a
/// request is good when it succeeded within `disrupted_ms`.
#[derive(Clone, Debug)]
pub struct Recovering {
    pub label: String,
    pub at: Instant,
    pub scope: Scope,
    /// (good, total) per window.
    pub windows: Vec<(u32, u32)>,
    pub failed: u64,
    pub disrupted_ms: f64,
}

/// Faults are observed for this long after they begin.
pub const RECOVERY_HORIZON_S: u64 = 120;
/// Width of a recovery window.
pub const WINDOW_MS: u64 = 100;
/// A window has recovered when this share of its requests is good.
pub const GOOD_SHARE: f64 = 0.99;

impl Recovering {
    pub fn new(label: String, at: Instant, scope: Scope, disrupted_ms: f64) -> Self {
        let n = (RECOVERY_HORIZON_S * 1000 / WINDOW_MS) as usize;
        Recovering { label, at, scope, windows: vec![(0, 0); n], failed: 0, disrupted_ms }
    }

    /// Time from the fault to the end of the last window in which fewer than
    /// 99 % of the requests in scope succeeded within the disruption threshold:
    /// from then on, service was normal. 0 when no window was disrupted.
    pub fn rto_ms(&self) -> f64 {
        let last_bad =
            self.windows.iter().rposition(|&(good, total)| total > 0 && (good as f64) < GOOD_SHARE * total as f64);
        last_bad.map_or(0.0, |i| ((i + 1) as u64 * WINDOW_MS) as f64)
    }
}

impl Checker {
    /// A request that started at `started` finished at `now`.
    pub fn observe(&mut self, started: Instant, now: Instant, write: bool, upstream: bool, zone: Zone, ok: bool) {
        for r in &mut self.recovering {
            if started < r.at {
                continue;
            }
            let w = (started.saturating_since(r.at).as_millis() as u64 / WINDOW_MS) as usize;
            if w >= r.windows.len() {
                continue;
            }
            let in_scope = match r.scope {
                Scope::Writes => write,
                Scope::Upstream(z) => upstream && z == zone,
                Scope::Zone(z) => z == zone,
                Scope::All => true,
            };
            if !in_scope {
                continue;
            }
            let took_ms = now.saturating_since(started).as_secs_f64() * 1e3;
            let good = ok && took_ms <= r.disrupted_ms;
            r.windows[w].1 += 1;
            r.windows[w].0 += u32::from(good);
            r.failed += u64::from(!ok);
        }
    }
}

/// Writes accepted per epoch by more than one node: split brain.
pub fn split_brain(accepted: &[(Epoch, usize)]) -> Vec<Epoch> {
    let mut by_epoch: BTreeMap<Epoch, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for (e, n) in accepted {
        match by_epoch.get(e) {
            Some(m) if m != n => bad.push(*e),
            Some(_) => {}
            None => {
                by_epoch.insert(*e, *n);
            }
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

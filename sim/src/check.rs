//! Checkers over the full history of every simulated request: latency, hit
//! rate, staleness against the committed history, read-your-writes,
//! durability, recovery, safety, availability.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use postai_core::failover::Epoch;
use postai_core::node::Served;
use postai_core::router::Zone;
use postai_core::{Instant, Lsn};

/// Acknowledged commits of one key, in LSN order: (lsn, acknowledged at);
/// and the key's commits a promotion dropped: (lsn, when it dropped them).
#[derive(Default, Debug)]
pub struct KeyHistory {
    pub commits: Vec<(Lsn, Instant)>,
    pub lost: Vec<(Lsn, Instant)>,
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
    /// Stale reads and the largest staleness, of the reads judged at once
    /// (see [`Checker::stale`] for all of them).
    pub stale_reads: u64,
    pub staleness_ms_max: f64,
    /// Reads that missed an acknowledged commit for longer than
    /// [`RECHECK_MS`], judged again at the end against the history as it
    /// ended: a commit a failover later lost (asynchronous replication)
    /// was never going to be read, and missing it is not staleness.
    late_reads: Vec<LateRead>,
    pub ryw_violations: u64,
    /// Reads by a session that did not show its own acknowledged write
    /// because a failover lost it (asynchronous replication): the lost
    /// write's consequence, counted apart from read-your-writes bugs.
    pub ryw_lost_writes: u64,
    /// Reads that missed acknowledged commits only the crashed primary had
    /// (asynchronous replication: WAL that had not reached any node that is
    /// up): no node could have shown them; they come back if the primary
    /// does, and are lost (RPO) if a promotion replaces it. Counted apart
    /// from staleness, which is judged on the commits some live node had.
    pub limbo_reads: u64,
    /// Commits only a crashed primary had, `(from, to]` by LSN, that a read
    /// can show again from the instant given (the primary came back and is
    /// followed): a read's staleness counts from then, not from their
    /// acknowledgement.
    reachable_again: Vec<(Lsn, Lsn, Instant)>,
    pub residency_violations: u64,
    pub history: Vec<KeyHistory>,
    /// Acknowledged writes by LSN: (committed at, acknowledged at). Lost ones are RPO.
    pub acked: BTreeMap<Lsn, (Instant, Instant)>,
    pub lost_acked: Vec<LostWrite>,
    /// Writes a pool cut off from the primary relayed through another pool.
    pub relayed_writes: u64,
    /// Sites' subscriptions opened again after a break: continued where
    /// they broke off (`C`), or started over (what the site held dropped).
    pub streams_resumed: u64,
    pub streams_started_over: u64,
    /// Resets a site received (a new slot: what it held dropped).
    pub streams_new_history: u64,
    pub l3_lookups: u64,
    pub l3_hits: u64,
    pub upstream_reads: u64,
    /// The Workers edge's design (`[worker]`): feeds pulled, pulls that
    /// heard no live keepalive, isolates started cold.
    pub worker_pulls: u64,
    pub worker_pulls_failed: u64,
    pub worker_isolates: u64,
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

    /// A write of `key` committed at `committed` as `lsn`, acknowledged at `at`.
    pub fn ack_write(&mut self, key: Option<u64>, lsn: Lsn, committed: Instant, at: Instant) {
        if let Some(h) = key.and_then(|k| self.history.get_mut(k as usize)) {
            let pos = h.commits.partition_point(|(l, _)| *l < lsn);
            h.commits.insert(pos, (lsn, at));
        }
        self.acked.insert(lsn, (committed, at));
    }

    /// A write acknowledged when the history it was committed on was already
    /// gone (asynchronous replication: an ex-primary not yet fenced).
    pub fn ack_lost_write(&mut self, lsn: Lsn, committed: Instant, at: Instant) {
        self.lost_acked.push(LostWrite { lsn, committed, acked: at, lost_at: at, window_ms: 0.0 });
    }

    /// A promotion at `now` dropped `lost` (LSN, committed at) from the
    /// history; the failed primary stopped at `failure` (its crash), if it
    /// did. The acknowledged ones are lost writes; the window of data lost
    /// (what RPO measures) runs from the oldest of them to the failure. A
    /// primary that came back and took writes nobody followed before its
    /// fence reached it loses a second window: from the first to the last
    /// of those.
    pub fn lose(&mut self, lost: &[(Lsn, Instant)], failure: Option<Instant>, now: Instant) {
        let acked: Vec<(Lsn, Instant, Instant)> =
            lost.iter().filter_map(|(l, _)| self.acked.remove(l).map(|(c, a)| (*l, c, a))).collect();
        let before = |c: Instant| failure.is_none_or(|f| c <= f);
        for part in [true, false] {
            let mine: Vec<&(Lsn, Instant, Instant)> = acked.iter().filter(|(_, c, _)| before(*c) == part).collect();
            let (Some(oldest), Some(newest)) =
                (mine.iter().map(|(_, c, _)| *c).min(), mine.iter().map(|(_, c, _)| *c).max())
            else {
                continue;
            };
            let end = if part { failure.unwrap_or(newest) } else { newest };
            let window_ms = end.saturating_since(oldest).as_secs_f64() * 1e3;
            for (lsn, committed, at) in mine {
                self.lost_acked.push(LostWrite {
                    lsn: *lsn,
                    committed: *committed,
                    acked: *at,
                    lost_at: now,
                    window_ms,
                });
            }
        }
        if lost.is_empty() {
            return;
        }
        let mut dropped: Vec<Lsn> = lost.iter().map(|(l, _)| *l).collect();
        dropped.sort_unstable();
        for h in &mut self.history {
            h.commits.retain(|(c, _)| dropped.binary_search(c).is_err());
        }
    }

    /// A promotion at `now` dropped these commits of `key` (acknowledged or
    /// not): a read that starts later and still shows one shows a value
    /// the history no longer has.
    pub fn lose_values(&mut self, lost: impl IntoIterator<Item = (u64, Lsn)>, now: Instant) {
        for (key, lsn) in lost {
            if let Some(h) = self.history.get_mut(key as usize) {
                h.lost.push((lsn, now));
            }
        }
    }

    /// When the oldest commit a failover lost that a read of `keys` started
    /// at `started` still shows was lost (`shows`: whether the read's
    /// snapshot has a commit): such a read is stale from then on, as if
    /// it missed the value the new history has.
    fn lost_shown(
        &self,
        keys: std::ops::RangeInclusive<u64>,
        started: Instant,
        shows: &dyn Fn(Lsn) -> bool,
    ) -> Option<Instant> {
        let lost = keys.filter_map(|k| self.history.get(k as usize)).flat_map(|h| &h.lost);
        lost.filter(|(l, at)| *at <= started && shows(*l)).map(|(_, at)| *at).min()
    }

    /// The window of acknowledged data lost, in ms: the RPO measured.
    pub fn rpo_ms(&self) -> f64 {
        self.lost_acked.iter().map(|l| l.window_ms).fold(0.0, f64::max)
    }

    /// How stale a read of `keys` (consecutive) that started at `started` and
    /// saw the state at `snapshot` is, against the history as it is now:
    /// from the oldest acknowledged commit it missed, in ms. Commits after
    /// `on_no_live_node` (only a crashed primary had them) are not counted.
    fn staleness(
        &self,
        keys: std::ops::RangeInclusive<u64>,
        snapshot: Lsn,
        started: Instant,
        on_no_live_node: Option<Lsn>,
        lost_shown: Option<Instant>,
    ) -> Option<f64> {
        let mut oldest_missed: Option<Instant> = lost_shown;
        let reachable = on_no_live_node.unwrap_or(Lsn(u64::MAX));
        for k in keys {
            let Some(h) = self.history.get(k as usize) else { continue };
            let pos = h.commits.partition_point(|(l, _)| *l <= snapshot);
            for (lsn, acked) in &h.commits[pos..] {
                let since = self.visible_since(*lsn, *acked);
                if since <= started && *lsn <= reachable {
                    oldest_missed = Some(oldest_missed.map_or(since, |o: Instant| o.min(since)));
                }
            }
        }
        Some(started.saturating_since(oldest_missed?).as_secs_f64() * 1e3)
    }

    /// Commits in `(from, to]` were on no node that was up (only on the
    /// crashed primary) until `since`, when it came back and was followed.
    pub fn reachable_again(&mut self, from: Lsn, to: Lsn, since: Instant) {
        if to > from {
            self.reachable_again.push((from, to, since));
        }
    }

    /// From when a read could show the commit at `lsn` acknowledged at `acked`.
    fn visible_since(&self, lsn: Lsn, acked: Instant) -> Instant {
        let back = self.reachable_again.iter().filter(|(from, to, _)| lsn > *from && lsn <= *to);
        back.map(|(_, _, since)| *since).fold(acked, Instant::max)
    }

    /// Checks a read of `keys` (consecutive) that started at `started` and
    /// saw the state at `snapshot`; `on_no_live_node`: while the primary is
    /// down, the newest commit some node that is up has received (later
    /// ones only the crashed primary has); `shows`: whether the snapshot
    /// has a commit (a lost one too). Returns the staleness in ms when it
    /// missed an acknowledged commit some live node had, or showed a commit
    /// a failover had lost before it started.
    pub fn check_read(
        &mut self,
        keys: &[u64],
        snapshot: Lsn,
        started: Instant,
        on_no_live_node: Option<Lsn>,
        shows: &dyn Fn(Lsn) -> bool,
    ) -> Option<f64> {
        let (lo, hi) = (*keys.iter().min()?, *keys.iter().max()?);
        let lost_shown = self.lost_shown(lo..=hi, started, shows);
        let stale = self.staleness(lo..=hi, snapshot, started, on_no_live_node, lost_shown);
        if on_no_live_node.is_some()
            && self.measured(started)
            && stale.is_none()
            && self.staleness(lo..=hi, snapshot, started, None, None).is_some()
        {
            self.limbo_reads += 1;
        }
        let ms = stale?;
        if self.measured(started) {
            if ms > RECHECK_MS {
                self.late_reads.push(LateRead { started, snapshot, lo, hi, on_no_live_node, lost_shown });
            } else {
                self.stale_reads += 1;
                self.staleness_ms_max = self.staleness_ms_max.max(ms);
            }
        }
        Some(ms)
    }

    /// Every measured stale read and the largest staleness, the reads that
    /// missed a commit for longer than [`RECHECK_MS`] judged against the
    /// history as it ended.
    pub fn stale(&self) -> (u64, f64) {
        let (mut n, mut max) = (self.stale_reads, self.staleness_ms_max);
        for r in &self.late_reads {
            if let Some(ms) = self.staleness(r.lo..=r.hi, r.snapshot, r.started, r.on_no_live_node, r.lost_shown) {
                n += 1;
                max = max.max(ms);
            }
        }
        (n, max)
    }
}

/// Reads staler than this are judged again at the end ([`Checker::stale`]).
pub const RECHECK_MS: f64 = 500.0;

/// A read that missed a commit for longer than [`RECHECK_MS`].
#[derive(Clone, Copy, Debug)]
struct LateRead {
    started: Instant,
    snapshot: Lsn,
    /// The keys it read: `lo..=hi`.
    lo: u64,
    hi: u64,
    on_no_live_node: Option<Lsn>,
    /// It showed a commit lost at this instant (before it started).
    lost_shown: Option<Instant>,
}

/// An acknowledged write a failover lost.
#[derive(Clone, Copy, Debug)]
pub struct LostWrite {
    pub lsn: Lsn,
    pub committed: Instant,
    pub acked: Instant,
    pub lost_at: Instant,
    /// The window of data lost it belongs to (see [`Checker::lose`]).
    pub window_ms: f64,
}

/// Which requests a fault affects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every write (a primary failure).
    Writes,
    /// Requests from sites in the zone that needed the region (not answered
    /// from the site's own tiers): a regional outage or an edge partition.
    Upstream(Zone),
    /// Every read at sites in the zone (a lost tier).
    Zone(Zone),
    /// Every read (a lost tier everywhere, a stalled change stream).
    Reads,
    /// Writes from sites in the zone (its pool cut off from the primary).
    ZoneWrites(Zone),
    All,
}

/// Recovery of the requests in `scope` after a fault at `at`. Requests that
/// started after the fault are bucketed by start time into 100 ms windows; a
/// request is good when it succeeded within `disrupted_ms`.
#[derive(Clone, Debug)]
pub struct Recovering {
    pub label: String,
    /// The fault's index in the scenario file.
    pub fault: usize,
    /// Its recovery-time target, chosen from the fault itself when it began.
    pub target_ms: Option<f64>,
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
    pub fn new(
        label: String,
        fault: usize,
        target_ms: Option<f64>,
        at: Instant,
        scope: Scope,
        disrupted_ms: f64,
    ) -> Self {
        let n = (RECOVERY_HORIZON_S * 1000 / WINDOW_MS) as usize;
        Recovering { label, fault, target_ms, at, scope, windows: vec![(0, 0); n], failed: 0, disrupted_ms }
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
                Scope::Zone(z) => !write && z == zone,
                Scope::Reads => !write,
                Scope::ZoneWrites(z) => write && z == zone,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::ZERO + Duration::from_millis(ms)
    }

    /// A value a failover dropped is stale from the promotion on: a read
    /// that starts later and still shows it counts, one that started
    /// before does not, nor one whose snapshot does not show it.
    #[test]
    fn a_read_showing_a_lost_commit_after_its_loss_is_stale() {
        let mut c = Checker::new(4, 1, Instant::ZERO);
        c.ack_write(Some(1), Lsn(10), at(1_000), at(1_000));
        c.lose(&[(Lsn(11), at(2_000))], Some(at(2_100)), at(5_000));
        c.lose_values([(1, Lsn(11))], at(5_000));
        let shows_11 = |l: Lsn| l <= Lsn(11);
        assert_eq!(c.check_read(&[1], Lsn(11), at(4_000), None, &shows_11), None, "before the loss");
        assert_eq!(c.check_read(&[1], Lsn(11), at(6_000), None, &shows_11), Some(1_000.0));
        assert_eq!(c.check_read(&[1], Lsn(12), at(6_000), None, &|l| l != Lsn(11)), None, "the new history's state");
        assert_eq!(c.check_read(&[0, 1, 2], Lsn(11), at(7_000), None, &shows_11), Some(2_000.0), "a range over it");
        assert_eq!(c.stale(), (2, 2_000.0), "judged again at the end, as late reads");
    }
}

//! The Workers edge's design (`[worker]` in a scenario; `worker/` is the
//! real one): a site does not follow its regional's stream. A request that
//! finds the site's feed older than `feed_ms` pulls it after it is answered
//! (as `worker/` does, in `waitUntil`), or first, waiting for it
//! (`pull_waits`): a new connection to the regional (`pull_round_trips`
//! round trips), a subscription from the last commit applied that replays
//! what the regional kept since, and the regional's next poll (its live
//! keepalive).
//! A regional that is down, cut off from its sites, or cannot read its slot
//! (no live keepalive) makes the pull wait `pull_timeout_ms` and apply
//! nothing: the node's silence bound then stops the cache. An isolate lives
//! `isolate_life_s` on average (exponential); the next one starts with an
//! empty cache and no feed. Both of the node's tiers are the isolate's
//! memory (an L2 hit costs what an L1 hit does); nothing persists past the
//! isolate (the Worker keeps no file; D1 is not used).
//!
//! Modelling shortcut: a pull is applied at once, with what the regional
//! had published by then (a waiting request is charged its whole duration):
//! the site learns of changes up to one pull's duration earlier than the
//! Worker would.

use postai_core::Instant;
use postai_core::cache::TierName;

use super::World;
use super::stream::SiteStream;
use crate::scenario::WorkerDesign;

/// A site's isolate and feed.
#[derive(Clone, Copy, Debug)]
pub struct WorkerSite {
    /// When the feed last caught up; `None`: this isolate never pulled.
    fed: Option<Instant>,
    /// When this isolate ends.
    until: Instant,
}

impl World {
    /// The Workers edge's sites start as isolates alive since before the
    /// run, fed at its start (as the native sites are subscribed).
    pub(super) fn start_workers(&mut self) {
        let Some(wd) = self.sc.worker.clone() else { return };
        for s in 0..self.sites.len() {
            let until = self.isolate_end(Instant::ZERO, wd.isolate_life_s);
            let site = &mut self.sites[s];
            // the isolate left its subscription: the next pull subscribes again
            site.stream.leave();
            site.worker = Some(WorkerSite { fed: Some(Instant::ZERO), until });
        }
    }

    fn isolate_end(&mut self, now: Instant, mean_s: f64) -> Instant {
        // exponential, from the Worker's own stream of draws (the world's
        // draws stay those of the native edge)
        let u = self.worker_rng.unit_f64().max(1e-12);
        now + postai_core::Duration::from_secs_f64(-u.ln() * mean_s)
    }

    /// Before a request at site `s`: a new isolate if the last one ended;
    /// the ms the request waits for a pull of the feed (`pull_waits`), and
    /// whether the feed is due to be pulled after it ([`World::worker_after`]).
    pub(super) fn worker_before(&mut self, s: usize, now: Instant) -> (f64, bool) {
        let (Some(wd), Some(mut ws)) = (self.sc.worker.clone(), self.sites[s].worker) else { return (0.0, false) };
        if now >= ws.until {
            let site = &mut self.sites[s];
            site.node.restart();
            site.node.clear_tier(TierName::L1);
            site.node.clear_tier(TierName::L2);
            site.stream = SiteStream::default();
            ws = WorkerSite { fed: None, until: self.isolate_end(now, wd.isolate_life_s) };
            self.checker.worker_isolates += 1;
        }
        let due = ws.fed.is_none_or(|at| now.saturating_since(at).as_millis() >= u128::from(wd.feed_ms));
        let waited = if due && wd.pull_waits { self.worker_pull(s, &mut ws, &wd, now) } else { 0.0 };
        self.sites[s].worker = Some(ws);
        (waited, due && !wd.pull_waits)
    }

    /// After a request was answered (its lookup made): the pull it found
    /// due, off its path (the Worker's `waitUntil`). Applied at once: later
    /// requests see it up to a pull's duration earlier than the Worker's would.
    pub(super) fn worker_after(&mut self, s: usize, now: Instant) {
        let (Some(wd), Some(mut ws)) = (self.sc.worker.clone(), self.sites[s].worker) else { return };
        self.worker_pull(s, &mut ws, &wd, now);
        self.sites[s].worker = Some(ws);
    }

    /// One pull of site `s`'s feed: the ms it takes.
    fn worker_pull(&mut self, s: usize, ws: &mut WorkerSite, wd: &WorkerDesign, now: Instant) -> f64 {
        self.checker.worker_pulls += 1;
        let r = self.sites[s].home;
        let rtt = 2.0 * self.sites[s].region_oneway_ms[r];
        let reg = &self.regions[r];
        if !(reg.up && !reg.edge_partitioned && self.reaches_slot(r)) {
            // no live keepalive: the pull waits its timeout and applies nothing
            self.checker.worker_pulls_failed += 1;
            return wd.pull_timeout_ms as f64;
        }
        let took = f64::from(wd.pull_round_trips) * rtt + self.worker_rng.unit_f64() * wd.poll_ms;
        self.site_follows(s, r);
        self.sites[s].stream.leave();
        ws.fed = Some(now);
        took.min(wd.pull_timeout_ms as f64)
    }
}

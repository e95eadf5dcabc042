//! The change stream as it reaches one regional pool: every event the
//! primary's stream carries arrives, in order of arrival, possibly twice,
//! possibly overtaken by the next one; none is lost. The pool reads the
//! events that have arrived (arrivals never decrease), put back in the
//! slot's order by [`InOrder`]; its sites follow what it publishes
//! (`world/stream.rs`), not this link.
//!
//! Each event also carries when it would have arrived on a live stream (its
//! send time plus the way): what a consumer that receives it knows is as
//! fresh as that, however late it arrives (after a stall, or replayed to a
//! site that reconnects). The CDC-silence clock runs on it.
//!
//! A reordered event is held back until the next event is sent and arrives
//! right after it: the consumer sees the later event first (its `prev_lsn`
//! names the missing one, a gap), then the missing one, which fills it. It is
//! delayed by at most the time to the next event (a keepalive follows every
//! event within 200 ms). Reordering never touches an event already sent on:
//! the model this replaces swapped the new event with the one before it, even
//! when that one had been applied, and the new one was then never delivered.

use std::collections::BTreeMap;

use postai_core::invalidation::CdcEvent;
use postai_core::{Instant, Lsn};

/// Events before the first one every consumer has passed are dropped in
/// chunks of this many (a drain moves what is left).
const TRIM_CHUNK: usize = 4096;

#[derive(Debug, Default)]
pub struct CdcLink {
    /// Events in arrival order. Arrivals never decrease.
    log: Vec<Sent>,
    /// Index (counted from the first event ever sent) of `log[0]`.
    base: usize,
    /// Events the pool has applied, counted from the first ever sent.
    applied: usize,
    /// An event the next one overtakes, and whether it arrives twice.
    held: Option<(Sent, bool)>,
}

#[derive(Clone, Debug)]
struct Sent {
    arrival: Instant,
    /// When it would have arrived on a live stream (not stalled, not held).
    live: Instant,
    event: CdcEvent,
}

impl CdcLink {
    pub fn new() -> Self {
        CdcLink::default()
    }

    /// Sends `event`, which would reach the pool at `live` on a live stream
    /// and reaches it at `arrival` (or with the last event sent, if that is
    /// later). With `reorder` the next event sent overtakes it; with
    /// `duplicate` it arrives twice.
    pub fn send(&mut self, live: Instant, arrival: Instant, event: CdcEvent, reorder: bool, duplicate: bool) {
        let arrival = self.log.last().map_or(arrival, |last| arrival.max(last.arrival));
        let sent = Sent { arrival, live, event };
        if let Some((held, held_twice)) = self.held.take() {
            self.push(sent, duplicate);
            self.push(Sent { arrival, ..held }, held_twice);
        } else if reorder {
            self.held = Some((sent, duplicate));
        } else {
            self.push(sent, duplicate);
        }
    }

    fn push(&mut self, sent: Sent, twice: bool) {
        if twice {
            self.log.push(sent.clone());
        }
        self.log.push(sent);
    }

    /// Events the pool has applied (an index into the stream).
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// The next event the pool has not applied, if it has arrived by `now`.
    pub fn next_arrived(&self, now: Instant) -> Option<&CdcEvent> {
        self.log.get(self.applied - self.base).filter(|s| s.arrival <= now).map(|s| &s.event)
    }

    /// The slot these events come from was dropped: whatever it held that
    /// the pool has not read (arrived or not) is gone.
    pub fn drop_unread(&mut self) {
        self.held = None;
        self.applied = self.base + self.log.len();
    }

    /// The pool applied the event [`Self::next_arrived`] returned.
    pub fn mark_applied(&mut self) {
        debug_assert!(self.applied - self.base < self.log.len());
        self.applied += 1;
    }

    /// When event `i` (an index into the stream, not yet trimmed) reached the pool.
    #[cfg(test)]
    pub fn arrival(&self, i: usize) -> Instant {
        self.log[i - self.base].arrival
    }

    /// When event `i` would have reached the pool on a live stream: how
    /// fresh what it tells is.
    pub fn live(&self, i: usize) -> Instant {
        self.log[i - self.base].live
    }

    /// Every consumer has passed event `upto`: what is before it may go.
    pub fn trim(&mut self, upto: usize) {
        let drop = upto.min(self.applied) - self.base;
        if drop > TRIM_CHUNK {
            self.log.drain(..drop);
            self.base += drop;
        }
    }
}

/// The events a pool's link delivered, put back in the primary's order as a
/// replication slot gives them (once each, no gap): an event waits until the
/// one it follows (`prev_lsn`) was released; one already released (a
/// duplicate) is dropped.
#[derive(Debug, Default)]
pub struct InOrder {
    /// The last commit released.
    last: Lsn,
    /// Events that arrived before the one they follow, by (prev_lsn, lsn).
    held: BTreeMap<(Lsn, Lsn), CdcEvent>,
}

impl InOrder {
    /// `event` arrived: the events now in order, appended to `out`.
    pub fn push(&mut self, event: &CdcEvent, out: &mut Vec<CdcEvent>) {
        let (prev, lsn) = (event.prev_lsn, event.change.lsn);
        if lsn < self.last || (lsn == self.last && prev < self.last) {
            return;
        }
        if prev != self.last {
            self.held.insert((prev, lsn), event.clone());
            return;
        }
        self.release(event.clone(), out);
        while let Some((&key, _)) = self.held.range((self.last, Lsn(0))..).next() {
            if key.0 != self.last {
                break;
            }
            if let Some(e) = self.held.remove(&key) {
                self.release(e, out);
            }
        }
        // what the released ones passed can never be released
        self.held.retain(|&(p, _), _| p >= self.last);
    }

    /// A new slot: the stream goes on after `lsn` (what came before is gone).
    pub fn restart_at(&mut self, lsn: Lsn) {
        self.last = lsn;
        self.held.clear();
    }

    fn release(&mut self, event: CdcEvent, out: &mut Vec<CdcEvent>) {
        self.last = self.last.max(event.change.lsn);
        out.push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postai_core::Lsn;
    use postai_core::invalidation::Change;

    fn ev(lsn: u64) -> CdcEvent {
        CdcEvent { prev_lsn: Lsn(lsn - 1), change: Change { lsn: Lsn(lsn), targets: Vec::new() } }
    }

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// Applies what has arrived by `now`; returns the LSNs in order.
    fn drain(link: &mut CdcLink, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(e) = link.next_arrived(now) {
            out.push(e.change.lsn.0);
            link.mark_applied();
        }
        out
    }

    #[test]
    fn a_reordered_event_arrives_right_after_the_next_one() {
        let mut link = CdcLink::new();
        link.send(at(10), at(10), ev(1), false, false);
        link.send(at(11), at(11), ev(2), true, false);
        assert_eq!(drain(&mut link, at(100)), [1], "held until the next event");
        link.send(at(150), at(150), ev(3), false, true);
        assert_eq!(drain(&mut link, at(149)), Vec::<u64>::new());
        assert_eq!(drain(&mut link, at(150)), [3, 3, 2]);
        // it arrived late, and tells what was fresh when it was sent
        assert_eq!((link.arrival(3), link.live(3)), (at(150), at(11)));
        assert_eq!((1..4).map(|i| link.live(i)).max(), Some(at(150)));
    }

    /// A stall delivers late what was sent during it: as fresh as when it
    /// was sent, not as when it arrived.
    #[test]
    fn what_a_stall_delivers_late_is_as_fresh_as_when_it_was_sent() {
        let mut link = CdcLink::new();
        link.send(at(10), at(5_000), ev(1), false, false);
        link.send(at(20), at(1_000), ev(2), false, false);
        assert_eq!(drain(&mut link, at(4_999)), Vec::<u64>::new());
        assert_eq!(drain(&mut link, at(5_000)), [1, 2], "arrivals never decrease");
        assert_eq!((0..2).map(|i| link.live(i)).max(), Some(at(20)));
    }

    /// The bug this replaces: the new event was swapped with the one before
    /// it, which had already been applied, so the new one never arrived.
    /// Here every event sent arrives (once or twice), whatever is reordered
    /// and whenever the pool applies.
    #[test]
    fn every_event_arrives_whatever_is_reordered_and_whenever_the_pool_applies() {
        let mut rng = postai_core::rng::Rng::new(5);
        let mut link = CdcLink::new();
        let mut seen = Vec::new();
        let mut last_arrival = Instant::ZERO;
        for lsn in 1..=20_000u64 {
            let now = at(lsn);
            let reorder = rng.unit_f64() < 0.3;
            let dup = rng.unit_f64() < 0.2;
            let arrival = now + postai_core::Duration::from_millis(rng.below(50));
            link.send(arrival, arrival, ev(lsn), reorder, dup);
            if rng.below(3) == 0 {
                let before = link.applied();
                seen.extend(drain(&mut link, now));
                for i in before..link.applied() {
                    assert!(link.arrival(i) >= last_arrival, "arrivals never decrease");
                    last_arrival = link.arrival(i);
                }
                link.trim(link.applied());
            }
        }
        link.send(at(30_000), at(30_000), ev(20_001), false, false);
        seen.extend(drain(&mut link, at(40_000)));
        let out_of_order = seen.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(out_of_order > 1_000, "{out_of_order} events out of order");
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (1..=20_001).collect::<Vec<_>>(), "every event arrived");
    }

    #[test]
    fn duplicated_and_reordered_events_come_out_in_order_once() {
        let mut rng = postai_core::rng::Rng::new(9);
        let mut link = CdcLink::new();
        let mut order = InOrder::default();
        let mut out = Vec::new();
        let keepalive =
            |lsn: u64| CdcEvent { prev_lsn: Lsn(lsn), change: Change { lsn: Lsn(lsn), targets: Vec::new() } };
        for lsn in 1..=5_000u64 {
            let now = at(lsn);
            link.send(now, now, ev(lsn), rng.unit_f64() < 0.3, rng.unit_f64() < 0.2);
            if lsn % 7 == 0 {
                link.send(now, now, keepalive(lsn), rng.unit_f64() < 0.3, rng.unit_f64() < 0.2);
            }
            while let Some(e) = link.next_arrived(now) {
                order.push(e, &mut out);
                link.mark_applied();
            }
        }
        link.send(at(9_000), at(9_000), keepalive(5_000), false, false);
        while let Some(e) = link.next_arrived(at(9_000)) {
            order.push(e, &mut out);
            link.mark_applied();
        }
        let commits: Vec<u64> = out.iter().filter(|e| e.prev_lsn != e.change.lsn).map(|e| e.change.lsn.0).collect();
        assert_eq!(commits, (1..=5_000).collect::<Vec<_>>(), "every commit once, in order");
        assert!(out.windows(2).all(|w| w[1].prev_lsn == w[0].change.lsn), "each follows the one before");
    }
}

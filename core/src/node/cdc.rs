//! The change stream applied to a node: events one at a time or in
//! batches, gaps, the silence clock.

use super::*;

impl<V: Clone> EdgeNode<V> {
    /// A CDC event from the primary's logical decoding stream.
    pub fn handle_cdc(&mut self, now: Instant, event: &CdcEvent) {
        if event.starts_history() {
            self.note_cdc(now, 1);
            return self.start_history(event.change.lsn);
        }
        if self.note_cdc(now, 1) {
            self.versions.apply_cdc(event);
            self.check_gap(now);
        }
    }

    /// A gap in the change stream (an event missing while later ones
    /// arrived) makes every older entry unusable until it fills; one that
    /// has not filled within the CDC-silence bound is given up on: what is
    /// older than the newest commit announced is invalidated.
    fn check_gap(&mut self, now: Instant) {
        if !self.versions.has_gap() {
            self.gap_since = None;
            return;
        }
        let since = *self.gap_since.get_or_insert(now);
        let bound = self.config.cdc_silence_max.unwrap_or(Duration::from_secs(2));
        if now.saturating_since(since) > bound {
            self.versions.skip_gap();
            self.gap_since = None;
        }
    }

    /// Runs `f`, which applies change-stream events, without taking them as
    /// news that the stream is live: the silence clock stays where it was
    /// (and a node that never heard the stream still has not). For what a
    /// relayed stream repeats when it opens ([`crate::stream::Step::live`]):
    /// a regional whose own stream stalled still opens every subscription.
    pub fn unproven<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let heard = self.last_cdc;
        let out = f(self);
        self.last_cdc = heard;
        out
    }

    /// Counts `events` CDC events received at `now`; returns whether the
    /// invalidation mode applies them (every mode but `TtlOnly`).
    fn note_cdc(&mut self, now: Instant, events: usize) -> bool {
        self.stats.cdc_events += events as u64;
        self.last_cdc = Some(self.last_cdc.map_or(now, |t| t.max(now)));
        self.config.invalidation != InvalidationMode::TtlOnly
    }

    /// A CDC event with row images: applied as [`Self::handle_cdc`], then, in
    /// `Refresh` mode, the cached point reads of the changed rows are refreshed
    /// in place. `refresh(table, key, old, lsn)` renders the new result from
    /// the event's row image (`None` leaves the entry to invalidation).
    pub fn handle_cdc_rows(&mut self, now: Instant, event: &CdcEvent, refresh: &mut RefreshFn<'_, V>) {
        self.handle_cdc_batch(now, std::iter::once(event), refresh);
    }

    /// Consecutive CDC events with row images, in stream order: the same
    /// state as [`Self::handle_cdc`] and then the refresh in place of each
    /// event, one at a time (versions and refreshes do not read each other),
    /// applied in phases so that the memory accesses of different rows
    /// overlap (see [`RefreshIndex::apply_batch`]).
    pub fn handle_cdc_batch<'e>(
        &mut self,
        now: Instant,
        events: impl IntoIterator<Item = &'e CdcEvent> + Clone,
        refresh: &mut RefreshFn<'_, V>,
    ) {
        if events.clone().into_iter().any(CdcEvent::starts_history) {
            // the batch in the order of its histories
            for event in events {
                if event.starts_history() {
                    self.handle_cdc(now, event);
                } else {
                    self.handle_cdc_batch(now, std::iter::once(event), refresh);
                }
            }
            return;
        }
        let n = events.clone().into_iter().count();
        if n == 0 || !self.note_cdc(now, n) {
            return;
        }
        // every changed row's lookups first: their cache misses overlap, and
        // the updates then find the rows cached. The refresh index is
        // prefetched after its filter (itself prefetched with the versions)
        // has arrived, so only rows that may have entries cost a miss there.
        let refreshing = self.config.invalidation == InvalidationMode::Refresh;
        let rows = || {
            events.clone().into_iter().flat_map(|e| &e.change.targets).flat_map(|target| {
                let (t, ks): (TableId, &[u64]) = match target {
                    ChangeTarget::Keys(t, ks) => (*t, ks),
                    _ => (TableId(0), &[]),
                };
                ks.iter().map(move |k| (t, *k))
            })
        };
        for (t, k) in rows() {
            self.versions.prefetch(t, k);
            if refreshing {
                self.refresh.prefetch_filter(t, k);
            }
        }
        for event in events.clone() {
            self.versions.apply_cdc(event);
        }
        self.check_gap(now);
        if refreshing {
            for (t, k) in rows() {
                self.refresh.prefetch(t, k);
            }
        }
        if self.config.invalidation == InvalidationMode::Refresh {
            self.refresh.apply_batch(events, &mut [&mut self.l1, &mut self.l2], refresh);
        }
    }

    /// Entries refreshed in place so far.
    pub fn refreshed(&self) -> u64 {
        self.refresh.refreshed
    }
}

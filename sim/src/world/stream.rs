//! The change stream through the machines the proxy runs: each regional
//! pool reads its slot with the core's `SlotReader` (the link's events put
//! back in the slot's order first), applies the batch to its version map
//! and L3, and publishes the rows as a `Feed` to its `History`; each site
//! follows its home pool with the core's `Subscriber`, over the lines the
//! core's `publisher` writes (`O`, `C`, `K`, `R`, `X`), resuming after a
//! break where the pool's history vouches for every commit since, and
//! dropping everything when it cannot (a pool restarted past the site's
//! position, a new slot after a failover).

use std::collections::VecDeque;
use std::sync::Arc;

use postai_core::stream::history::{Feed, HISTORY_ROWS, History};
use postai_core::stream::reader::{Slot, SlotReader, SlotStep};
use postai_core::stream::subscriber::{Step, Subscriber};
use postai_core::stream::{Line, Record, fmt_lsn, parse_lsn, publisher};

use super::*;
use crate::cdc::InOrder;

/// A regional pool's side of the stream.
#[derive(Debug)]
pub struct RegionStream {
    reader: SlotReader,
    history: History,
    order: InOrder,
    /// Feeds published, oldest first: `published[0]` is feed number `base`.
    published: VecDeque<Published>,
    base: usize,
    /// Which start of the pool's process this is: a restart ends every
    /// subscription (their connections close with the process).
    incarnation: u64,
    /// The reader read its slot since this process started: the stream has
    /// a position to open subscriptions at (before, they are refused, as
    /// the proxy refuses them while its `cdc_last` is 0).
    open: bool,
    /// The timeline its slot is on: the history its positions name commits of.
    timeline: u32,
}

#[derive(Debug)]
struct Published {
    feed: Arc<Feed>,
    /// When the pool published it.
    at: Instant,
    /// How fresh what it tells is (when its news would have arrived live).
    live: Instant,
    /// The timeline its positions are on.
    timeline: u32,
}

/// A site's subscription to its home pool.
#[derive(Debug)]
pub struct SiteStream {
    sub: Subscriber,
    /// Open: the number of the next feed to deliver.
    next: Option<usize>,
    /// The pool process the open subscription is to.
    incarnation: u64,
    /// After a restart: the L2 file's position and history, for the first
    /// subscription.
    file: Option<(Lsn, Option<String>)>,
    /// The timeline of the positions it last received (a row image's
    /// position read back to the commit it shows, for the checker).
    timeline: u32,
}

impl SiteStream {
    /// The subscription's connection closes: the next one subscribes again
    /// from the last commit applied (a Worker's pull, `world/worker.rs`).
    pub(super) fn leave(&mut self) {
        self.next = None;
    }
}

impl Default for SiteStream {
    fn default() -> Self {
        // (the simulated sites persist nothing: no L2 file)
        SiteStream { sub: Subscriber::without_changes(), next: None, incarnation: 0, file: None, timeline: 0 }
    }
}

/// The history name of timeline `t` (what `O` lines carry).
fn origin(timeline: u32) -> String {
    format!("sim/{timeline}")
}

impl RegionStream {
    /// The pool's stream when the fleet starts: its slot at LSN 0, on the
    /// first timeline, open (every commit after 0 comes).
    pub fn new() -> Self {
        let mut s = RegionStream::restarted(Lsn(0), 0);
        s.reader.handle_records(std::iter::empty());
        s.open = true;
        s
    }

    /// A pool process starting on its slot at `confirmed` (what it had
    /// advanced it to): its history is complete from there, nothing before.
    fn restarted(confirmed: Lsn, timeline: u32) -> Self {
        let mut reader = SlotReader::new();
        let opening = reader.open(Slot::Existing(confirmed));
        let mut history = History::default();
        history.set_origin(Some(origin(timeline)));
        if let Some(from) = opening.history_from {
            history.start_at(from);
        }
        // an existing slot, not replaced: nothing to invalidate
        let opened = reader.opened();
        debug_assert!(opened.is_empty());
        RegionStream {
            reader,
            history,
            order: InOrder::default(),
            published: VecDeque::new(),
            base: 0,
            incarnation: 0,
            open: false,
            timeline,
        }
    }

    fn end(&self) -> usize {
        self.base + self.published.len()
    }

    /// Where the pool's stream stands, once it opened.
    fn last_applied(&self) -> Option<Lsn> {
        self.open.then(|| self.reader.last())
    }

    fn publish(&mut self, feed: Feed, now: Instant, live: Instant) {
        let feed = Arc::new(feed);
        self.history.push(feed.clone(), HISTORY_ROWS);
        self.published.push_back(Published { feed, at: now, live, timeline: self.timeline });
    }

    /// Every open subscription has passed feed `upto`.
    fn trim(&mut self, upto: usize) {
        while self.base < upto && self.published.pop_front().is_some() {
            self.base += 1;
        }
    }
}

/// A commit's records and its rows as the pool's slot gives them (the row
/// text is what `decode_row` reads back). No BEGIN row: every site reads
/// every row, and a BEGIN only clears what a COMMIT already took.
fn commit_rows(event: &CdcEvent, records: &mut Vec<Record>, rows: &mut Vec<(String, String)>) {
    let lsn = fmt_lsn(event.change.lsn);
    for t in &event.change.targets {
        records.push(Record::Change(vec![t.clone()]));
        let data = match t {
            ChangeTarget::All => "A".to_string(),
            ChangeTarget::Table(t) => format!("T {}", t.0),
            ChangeTarget::Keys(t, keys) => {
                let keys: Vec<String> = keys.iter().map(u64::to_string).collect();
                format!("K {} {}", t.0, keys.join(","))
            }
        };
        rows.push((lsn.clone(), data));
    }
    records.push(Record::Commit(Some(event.change.lsn)));
    rows.push((lsn, "COMMIT".into()));
}

/// A row of the sites' stream read back (the inverse of `commit_rows`; by
/// hand: every site reads every row).
fn decode_row(lsn: &str, data: &str) -> Record {
    let number = |s: &str| {
        let digits = (!s.is_empty()).then_some(s)?;
        digits.bytes().try_fold(0u64, |n, b| {
            b.is_ascii_digit().then_some(())?;
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })
    };
    let table = |s: &str| number(s).and_then(|n| u32::try_from(n).ok()).map(TableId);
    match data.as_bytes().first() {
        Some(b'B') => Record::Begin,
        Some(b'C') => Record::Commit(parse_lsn(lsn)),
        Some(b'A') => Record::Change(vec![ChangeTarget::All]),
        Some(b'T') => {
            data.get(2..).and_then(table).map_or(Record::Other, |t| Record::Change(vec![ChangeTarget::Table(t)]))
        }
        Some(b'K') => {
            let Some((t, ks)) = data.get(2..).and_then(|d| d.split_once(' ')) else { return Record::Other };
            let keys: Option<Vec<u64>> = ks.split(',').map(number).collect();
            match (table(t), keys) {
                (Some(t), Some(keys)) => Record::Change(vec![ChangeTarget::Keys(t, keys)]),
                _ => Record::Other,
            }
        }
        _ => Record::Other,
    }
}

impl World {
    /// Delivers arrived CDC events to regions and, through their
    /// subscriptions, to their sites.
    pub fn pump_cdc(&mut self) {
        for r in 0..self.regions.len() {
            if self.regions[r].up && self.reaches_slot(r) {
                self.pool_reads(r);
            }
            let mut oldest = self.regions[r].stream.end();
            for s in 0..self.sites.len() {
                // a Worker's site pulls on request instead (`world/worker.rs`)
                if self.sites[s].home == r && self.sites[s].worker.is_none() {
                    self.site_follows(s, r);
                    oldest = oldest.min(self.sites[s].stream.next.unwrap_or(usize::MAX));
                }
            }
            self.regions[r].stream.trim(oldest);
        }
    }

    /// Whether pool `r` reaches the server its slot is on (the primary): a
    /// pool that cannot reads nothing, as the proxy's poll loop fails, and
    /// its sites hear nothing (they stop serving from their tiers after the
    /// silence bound).
    pub(super) fn reaches_slot(&self, r: usize) -> bool {
        let p = self.db.primary;
        self.db.nodes[p].up && self.regions[r].cut_from != Some(p)
    }

    /// The pool reads what arrived on its slot: applied to its version map
    /// and L3, then published.
    fn pool_reads(&mut self, r: usize) {
        let now = self.now();
        let mode = self.mode;
        let entry_bytes = self.sc.tiers.entry_bytes;
        let db = &self.db;
        let reg = &mut self.regions[r];
        let (mut ordered, mut records, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut live = None;
        while let Some(ev) = reg.cdc.next_arrived(now) {
            live = live.max(Some(reg.cdc.live(reg.cdc.applied())));
            reg.stream.order.push(ev, &mut ordered);
            reg.cdc.mark_applied();
        }
        // the sites read the published feeds, not the link: what the pool
        // read may go
        reg.cdc.trim(reg.cdc.applied());
        let Some(live) = live else { return };
        for e in &ordered {
            // (a commit a new slot's start already covers is not streamed again)
            if e.change.lsn != e.prev_lsn && e.change.lsn > reg.stream.reader.last() {
                commit_rows(e, &mut records, &mut rows);
            }
        }
        let batch = reg.stream.reader.handle_records(records);
        reg.stream.open = true;
        for ev in &batch.events {
            reg.versions.apply_cdc(ev);
            if mode == InvalidationMode::Refresh {
                let timeline = reg.stream.timeline;
                let mut render = |_, _, _: &Val, pos| Some((Val { lsn: db.id_at(timeline, pos)? }, entry_bytes));
                reg.refresh.apply(ev, &mut [&mut reg.l3], &mut render);
            }
        }
        // as fresh as the freshest event (late after a stall: older news)
        reg.last_cdc = reg.last_cdc.max(live.min(now));
        let current = Some(reg.stream.reader.last().0);
        let feed = Feed { rows, current, max_commit: batch.max_commit, ..Feed::default() };
        reg.stream.publish(feed, now, live);
        // the slot advances past what was applied (nothing idle to emit for)
        while let Some(SlotStep::Advance(t)) = reg.stream.reader.poll_step(None) {
            reg.stream.reader.handle_advanced(t, None);
        }
    }

    /// Site `s` follows its home pool `r`: subscribes (again) when it can
    /// reach it, then gets each feed after its one-way delay. A pool that is
    /// down or cut off breaks the subscription.
    pub(super) fn site_follows(&mut self, s: usize, r: usize) {
        let now = self.now();
        let reg = &self.regions[r];
        let site = &mut self.sites[s];
        if !reg.up || reg.edge_partitioned || site.stream.incarnation != reg.stream.incarnation {
            // the subscription's connection broke (or its pool restarted)
            site.stream.next = None;
            site.stream.incarnation = reg.stream.incarnation;
        }
        if !reg.up || reg.edge_partitioned {
            return;
        }
        let delay = Duration::from_secs_f64(site.region_oneway_ms[r] / 1e3);
        let mut step = Step::default();
        let mut heard = None;
        let mut opened_at = None;
        let stream = &mut site.stream;
        let mut decode = decode_row;
        if stream.next.is_none() {
            let from = stream.sub.connect(stream.file.clone());
            let (history, last) = (&reg.stream.history, reg.stream.last_applied());
            let mut handle = |line: Line<'_>| stream.sub.handle_line_into(line, &mut decode, &mut step);
            if publisher::opening(history, from, last, &mut handle).is_err() {
                return;
            }
            stream.next = Some(reg.stream.end());
            stream.file = None;
            stream.timeline = reg.stream.timeline;
            opened_at = Some(stream.sub.last());
            self.checker.streams_resumed += u64::from(step.resumed);
            self.checker.streams_started_over += u64::from(!step.resumed);
            step.resumed = false;
        }
        let mut next = stream.next.unwrap_or(usize::MAX);
        while let Some(p) = reg.stream.published.get(next.wrapping_sub(reg.stream.base))
            && p.at + delay <= now
        {
            publisher::feed_lines(&p.feed, 0, &mut |line| stream.sub.handle_line_into(line, &mut decode, &mut step));
            stream.timeline = p.timeline;
            heard = heard.max(Some(p.live));
            next += 1;
        }
        stream.next = Some(next);
        // the site hears the stream as fresh as the freshest news it gets:
        // when that news would have reached it live (a backlog is old news)
        let heard = heard.map_or(now, |live| (live + delay).min(now));
        self.checker.streams_new_history += u64::from(step.new_history);
        site.apply_step(heard, step, self.sc.tiers.entry_bytes, &self.db);
        if let Some(at) = opened_at {
            // the stream opened there: nothing older is filed
            site.node.fills_from(at);
        }
    }

    /// A regional pool's process starts again (after an outage): its slot
    /// is where it advanced it, its history and version map are new.
    pub(super) fn restart_pool(&mut self, r: usize) {
        let timeline = self.db.timeline;
        let reg = &mut self.regions[r];
        // the slot's position is the server's: a process restarted again
        // before it read anything finds it where the last one left it
        let confirmed = reg.stream.reader.slot_position().unwrap_or(reg.stream.reader.last());
        let order = std::mem::take(&mut reg.stream.order);
        let incarnation = reg.stream.incarnation + 1;
        reg.stream = RegionStream::restarted(confirmed, timeline);
        // the link's undelivered events are the slot's unread changes
        reg.stream.order = order;
        reg.stream.incarnation = incarnation;
        reg.versions = VersionMap::new(VersionMapConfig::default(), confirmed).expect("the default config");
        reg.l3.clear();
        reg.history += 1;
        // its stream opens at the slot's position: nothing older is filed
        reg.fills_from = confirmed;
    }

    /// A promotion completed: each pool's slot on the new primary is new
    /// (PostgreSQL 15 keeps no slot across a failover). What was committed
    /// before its start may never be streamed: the pools and, through the
    /// reset on their streams, every site drop what they hold.
    pub(super) fn new_slots(&mut self) {
        let now = self.now();
        // the new primary's position: the new timeline's events follow it
        let start = self.db.commit_pos();
        self.last_cdc_lsn = start;
        let o = origin(self.db.timeline);
        for reg in &mut self.regions {
            // what the old slot held unread is gone with it
            reg.cdc.drop_unread();
            reg.stream.order.restart_at(start);
            let opening = reg.stream.reader.open(Slot::Created(start));
            reg.stream.timeline = self.db.timeline;
            reg.stream.history.set_origin(Some(o.clone()));
            let reset = Feed { reset: opening.reset, origin: Some(o.clone()), ..Feed::default() };
            let live = reg.last_cdc;
            reg.stream.publish(reset, now, live);
            for ev in reg.stream.reader.opened() {
                if ev.starts_history() {
                    // the new timeline's positions start below the old
                    // one's: nothing known of those says anything of these
                    reg.versions.restart_at(ev.change.lsn);
                    reg.fills_from = ev.change.lsn;
                } else {
                    reg.versions.apply_cdc(&ev);
                }
            }
            reg.l3.clear();
            reg.history += 1;
        }
    }
}

impl World {
    /// Region `r`'s pool finds its slot gone and creates a new one at the
    /// primary's position: what the old slot held unread is lost, a reset
    /// goes to its sites (they drop what they hold), its own version map
    /// and L3 are invalidated before it.
    pub(super) fn slot_dropped(&mut self, r: usize) {
        let now = self.now();
        let start = self.last_cdc_lsn;
        let reg = &mut self.regions[r];
        reg.cdc.drop_unread();
        reg.stream.order.restart_at(start);
        let opening = reg.stream.reader.open(Slot::Created(start));
        let reset =
            Feed { reset: opening.reset, origin: reg.stream.history.origin().map(str::to_string), ..Feed::default() };
        let live = reg.last_cdc;
        reg.stream.publish(reset, now, live);
        for ev in reg.stream.reader.opened() {
            reg.versions.apply_cdc(&ev);
        }
        reg.l3.clear();
    }

    /// Every site of region `r` restarts: its L1 is lost; its L2 comes back
    /// from its file, whose position is the last commit the site applied, on
    /// the history it was on; its subscription opens again from there.
    pub(super) fn sites_restart(&mut self, r: usize) {
        for site in self.sites.iter_mut().filter(|s| s.home == r) {
            let old = std::mem::take(&mut site.stream);
            site.stream.file = Some((old.sub.last(), old.sub.announced().map(str::to_string)));
            site.stream.incarnation = old.incarnation;
            site.node.restart();
        }
    }
}

impl Site {
    /// Subscribes the site before the fleet starts (its stream opens at 0,
    /// so what the warm start fills at LSN 0 stands).
    pub(super) fn subscribe_at_start(&mut self, pool: &RegionStream, base: usize, db: &Database) {
        let mut step = Step::default();
        let from = self.stream.sub.connect(None);
        let mut handle = |line: Line<'_>| self.stream.sub.handle_line_into(line, &mut decode_row, &mut step);
        if publisher::opening(&pool.history, from, pool.last_applied(), &mut handle).is_ok() {
            self.stream.next = Some(base);
        }
        // the fleet starts in steady state: its sites' streams were live before
        step.live = true;
        self.apply_step(Instant::ZERO, step, 0, db);
    }

    /// The subscriber's lines of one delivery applied to the node: a new
    /// history drops everything held (what was filed may be at positions
    /// the new one reuses), and files nothing in flight.
    /// A row image refreshes an entry with the commit its position names on
    /// the stream's timeline (an event of an older timeline in the same
    /// batch as a reset is dropped by it); none found: invalidated.
    fn apply_step(&mut self, heard: Instant, step: Step, entry_bytes: u32, db: &Database) {
        let timeline = self.stream.timeline;
        let mut render = |_, _, _: &Val, pos| Some((Val { lsn: db.id_at(timeline, pos)? }, entry_bytes));
        if step.live {
            self.node.handle_cdc_batch(heard, &step.events, &mut render);
        } else {
            // what the pool repeats when it opens: not news that its stream is live
            self.node.unproven(|n| n.handle_cdc_batch(heard, &step.events, &mut render));
        }
        if step.new_history {
            self.node.primary_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_as_the_records_they_came_from() {
        let event = CdcEvent {
            prev_lsn: Lsn(9),
            change: Change {
                lsn: Lsn(0x1_0000_0010),
                targets: vec![
                    ChangeTarget::Keys(TableId(3), vec![7, u64::MAX]),
                    ChangeTarget::Table(TableId(4)),
                    ChangeTarget::All,
                ],
            },
        };
        let (mut records, mut rows) = (Vec::new(), Vec::new());
        commit_rows(&event, &mut records, &mut rows);
        let back: Vec<Record> = rows.iter().map(|(l, d)| decode_row(l, d)).collect();
        assert_eq!(back, records);
        assert_eq!(decode_row("0/1", "K x 1"), Record::Other, "an unreadable row is no change");
        assert_eq!(decode_row("0/1", "T"), Record::Other);
        assert_eq!(decode_row("0/1", "K 1 2,"), Record::Other);
        assert_eq!(decode_row("0/1", "K 1 18446744073709551616"), Record::Other, "past u64");
    }
}

//! The slot reader: a logical decoding slot peeked, its changes applied to
//! the cache, and only then the slot advanced, to the last commit applied (a
//! driver with an L2 file advances it once the file reflects them too: the
//! slot's position never runs ahead of what the caches reflect).
//!
//! The driver's turn, per connection: [`SlotReader::open`] with the slot it
//! found or created, the L2 file adopted at [`Opening::adopt_at`], the reset
//! published, then [`SlotReader::opened`]'s events applied; then per poll
//! [`SlotReader::check_position`] (the slot is where this reader left it),
//! [`SlotReader::handle_records`] (events to apply, changes to persist), and
//! [`SlotReader::poll_step`] until it says nothing (advance the slot, or emit
//! a message so that an idle slot has a position to advance to).

use crate::invalidation::{CdcEvent, Change, ChangeTarget, Lsn};
use crate::stream::{Record, fmt_lsn};

/// WAL past the slot's position with nothing of this database to decode
/// (other databases' writes): past this, a logical message gives the next
/// peek a position to advance the slot to, so that the slot does not hold
/// the primary's WAL forever.
pub const IDLE_ADVANCE_BYTES: u64 = 16 << 20;

/// Why the stream cannot go on over this connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the slot is gone")]
    SlotGone,
    #[error("the slot stands at {}, not where this reader left it ({})", fmt_lsn(*.at), fmt_lsn(*.expected))]
    SlotMoved { at: Lsn, expected: Lsn },
}

/// The slot as a connection finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Created by this connection; its first position.
    Created(Lsn),
    /// It existed; its `confirmed_flush_lsn`.
    Existing(Lsn),
}

/// What opening the slot asks of the driver, in this order: adopt the L2
/// file at `adopt_at` (`fresh`: the file cannot vouch for what came before
/// it), publish `reset` to subscribers, then apply [`SlotReader::opened`]'s
/// events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opening {
    pub adopt_at: Lsn,
    pub fresh: bool,
    /// A new slot there: commits before it may never be streamed.
    pub reset: Option<Lsn>,
    /// An existing slot someone else moved (dropped and created again,
    /// advanced) since this reader left it.
    pub replaced: bool,
    /// A regional's history is complete from here.
    pub history_from: Option<Lsn>,
}

/// One poll's outcome: apply `events` in order, under one hold of the
/// node's lock; persist `changes` (the L2 file) up to `through`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub events: Vec<CdcEvent>,
    /// The commits that changed something cached.
    pub changes: Vec<Change>,
    /// The last position applied (a commit or a barrier): where the slot may advance to.
    pub through: Option<Lsn>,
    /// The newest commit among the records.
    pub max_commit: Option<Lsn>,
}

impl Batch {
    /// Whether a change reaches everything (DDL): the catalog is read again.
    pub fn ddl(&self) -> bool {
        self.changes.iter().any(|c| c.targets.contains(&ChangeTarget::All))
    }
}

/// What the driver does to the slot next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotStep {
    /// `pg_replication_slot_advance` to this position (after the L2 file
    /// holds the changes up to it), then [`SlotReader::handle_advanced`].
    Advance(Lsn),
    /// `pg_logical_emit_message(false, ...)`: the next peek gets a position.
    Emit,
}

#[derive(Debug, Default)]
pub struct SlotReader {
    /// The last commit applied: the `prev_lsn` of the next event.
    last: Lsn,
    /// Where this reader left the slot.
    slot_at: Option<Lsn>,
    /// A slot this reader created whose opening did not complete (the
    /// connection failed first): whatever the next connection finds, what
    /// came before it is unknown.
    created_unopened: Option<Lsn>,
    /// The opening waiting for [`SlotReader::opened`].
    opening: Option<(Slot, bool)>,
    conn: Conn,
}

/// What one connection's reading knows.
#[derive(Debug, Default)]
struct Conn {
    /// Where the slot re-delivers from: an event opens the stream there.
    start_event: Option<Lsn>,
    /// The slot's position as this reader moved it.
    advanced: Lsn,
    /// Where WAL stood when a logical message was last emitted.
    emitted: u64,
    /// The open transaction's targets.
    pending: Vec<ChangeTarget>,
    /// The last position applied.
    through: Option<Lsn>,
}

impl SlotReader {
    pub fn new() -> Self {
        SlotReader::default()
    }

    /// The last commit applied.
    pub fn last(&self) -> Lsn {
        self.last
    }

    /// A connection found (or created) the slot.
    /// Where the slot stands as this reader last knew it (created, found
    /// or advanced); `None` before it opened one. A reader opened on an
    /// existing slot knows its position before it has read anything.
    pub fn slot_position(&self) -> Option<Lsn> {
        self.slot_at
    }

    pub fn open(&mut self, slot: Slot) -> Opening {
        self.conn = Conn::default();
        let slot = match (slot, self.created_unopened) {
            // created, and the connection failed before the stream opened:
            // the slot found now is that one, as new as then
            (Slot::Existing(at), Some(_)) => Slot::Created(at),
            _ => slot,
        };
        let opening = match slot {
            Slot::Created(start) => {
                self.created_unopened = Some(start);
                Opening { adopt_at: start, fresh: true, reset: Some(start), replaced: false, history_from: None }
            }
            Slot::Existing(confirmed) => {
                let replaced = self.slot_at.is_some_and(|at| at != confirmed);
                Opening {
                    adopt_at: confirmed,
                    fresh: replaced,
                    reset: replaced.then(|| confirmed.max(self.last)),
                    replaced,
                    history_from: Some(confirmed),
                }
            }
        };
        self.opening = Some((slot, opening.replaced));
        opening
    }

    /// The opening done (file adopted, reset published): the events that
    /// open the cache, to apply before anything else.
    pub fn opened(&mut self) -> Vec<CdcEvent> {
        let Some((slot, replaced)) = self.opening.take() else { return Vec::new() };
        // everything cached from a snapshot older than the slot's start is of
        // unknown freshness (and a restored entry may come from another
        // cluster's LSNs, which this event cannot order)
        let all =
            |prev_lsn: Lsn, lsn: Lsn| CdcEvent { prev_lsn, change: Change { lsn, targets: vec![ChangeTarget::All] } };
        let mut events = Vec::new();
        match slot {
            Slot::Created(start) => {
                // a new slot's positions start at its own: on a promoted
                // primary's timeline, before what was read on the old one
                // (the event then starts a new history)
                events.push(all(self.last, start));
                self.last = start;
                self.conn.advanced = start;
                self.slot_at = Some(start);
                self.created_unopened = None;
            }
            Slot::Existing(confirmed) => {
                if replaced {
                    let at = confirmed.max(self.last);
                    events.push(all(self.last, at));
                    self.last = at;
                }
                self.conn.start_event = Some(confirmed);
                self.conn.advanced = confirmed;
                self.slot_at = Some(confirmed);
            }
        }
        events
    }

    /// The slot's `confirmed_flush_lsn` before a peek's rows are applied:
    /// a slot dropped and created again, or moved, has lost changes.
    pub fn check_position(&self, position: Option<Lsn>) -> Result<(), StreamError> {
        match position {
            None => Err(StreamError::SlotGone),
            Some(at) if at != self.conn.advanced => Err(StreamError::SlotMoved { at, expected: self.conn.advanced }),
            Some(_) => Ok(()),
        }
    }

    /// One peek's records, in order: the events to apply, then a keepalive
    /// (nothing committed after the last commit that was not seen).
    pub fn handle_records(&mut self, records: impl IntoIterator<Item = Record>) -> Batch {
        let mut batch = Batch::default();
        if let Some(start) = self.conn.start_event.take()
            && start > self.last
        {
            // the stream is complete from the slot's position on
            batch.events.push(CdcEvent { prev_lsn: self.last, change: Change { lsn: start, targets: Vec::new() } });
            self.last = start;
        }
        for record in records {
            match record {
                Record::Barrier(at) => batch.through = batch.through.max(at),
                record => {
                    if let Some(commit) = apply(record, &mut self.conn.pending, &mut self.last, &mut batch.events) {
                        batch.max_commit = batch.max_commit.max(Some(commit.lsn));
                        batch.through = batch.through.max(Some(commit.lsn));
                        if !commit.targets.is_empty() {
                            batch.changes.push(commit.clone());
                        }
                    }
                }
            }
        }
        batch.events.push(keepalive(self.last));
        self.conn.through = batch.through;
        batch
    }

    /// What to do to the slot after a poll, given where the primary's WAL
    /// stands (`current`).
    pub fn poll_step(&mut self, current: Option<u64>) -> Option<SlotStep> {
        let conn = &mut self.conn;
        if let Some(t) = conn.through.filter(|t| *t > conn.advanced) {
            return Some(SlotStep::Advance(t));
        }
        let idle = current.filter(|c| c.saturating_sub(conn.advanced.0.max(conn.emitted)) > IDLE_ADVANCE_BYTES)?;
        // once: the next peek sees it, or the WAL moves on by as much again
        conn.emitted = idle;
        Some(SlotStep::Emit)
    }

    /// The slot advanced as asked; `end`: where PostgreSQL says it stands.
    pub fn handle_advanced(&mut self, asked: Lsn, end: Option<Lsn>) {
        let at = end.unwrap_or(asked);
        self.conn.advanced = at;
        self.slot_at = Some(at);
    }
}

/// The keepalive after a batch: nothing committed up to `last` is missing.
pub(crate) fn keepalive(last: Lsn) -> CdcEvent {
    CdcEvent { prev_lsn: last, change: Change { lsn: last, targets: Vec::new() } }
}

/// One record of a transaction applied: at a COMMIT, its event is pushed
/// and its change returned (its targets may be empty).
pub(crate) fn apply<'e>(
    record: Record,
    pending: &mut Vec<ChangeTarget>,
    last: &mut Lsn,
    events: &'e mut Vec<CdcEvent>,
) -> Option<&'e Change> {
    match record {
        Record::Begin => pending.clear(),
        // (the first change of a transaction moved, not copied)
        Record::Change(targets) if pending.is_empty() => *pending = targets,
        Record::Change(targets) => pending.extend(targets),
        Record::Commit(at) => {
            let lsn = at.unwrap_or(*last);
            let change = Change { lsn, targets: std::mem::take(pending) };
            events.push(CdcEvent { prev_lsn: *last, change });
            *last = (*last).max(lsn);
            return events.last().map(|e| &e.change);
        }
        Record::Barrier(_) | Record::Other => {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::TableId;

    fn table(t: u32) -> Record {
        Record::Change(vec![ChangeTarget::Table(TableId(t))])
    }

    fn all_at(e: &CdcEvent) -> Option<Lsn> {
        (e.change.targets == [ChangeTarget::All]).then_some(e.change.lsn)
    }

    /// A new slot on a promoted primary whose timeline starts below what
    /// the old slot had streamed: the reader's position goes back to the
    /// slot's start with an event that starts a new history, and the new
    /// timeline's commits at the old positions follow it.
    #[test]
    fn a_new_slot_below_the_position_starts_a_new_history() {
        let mut r = SlotReader::new();
        let _ = r.open(Slot::Created(Lsn(100)));
        let _ = r.opened();
        let _ = r.handle_records([Record::Begin, table(1), Record::Commit(Some(Lsn(300)))]);
        assert_eq!(r.last(), Lsn(300));
        let _ = r.open(Slot::Created(Lsn(200)));
        let ev = r.opened();
        assert!(ev[0].starts_history(), "{ev:?}");
        assert_eq!(r.last(), Lsn(200));
        let b = r.handle_records([Record::Begin, table(2), Record::Commit(Some(Lsn(250)))]);
        assert_eq!(b.events[0].prev_lsn, Lsn(200));
        assert_eq!(b.events[0].change.lsn, Lsn(250));
        assert_eq!(r.last(), Lsn(250));
        // a new slot above (the same timeline, a slot dropped): no new history
        let _ = r.open(Slot::Created(Lsn(400)));
        assert!(!r.opened()[0].starts_history());
    }

    #[test]
    fn a_new_slot_invalidates_what_came_before_and_advances_only_past_applied_commits() {
        let mut r = SlotReader::new();
        let o = r.open(Slot::Created(Lsn(100)));
        assert_eq!((o.adopt_at, o.fresh, o.reset), (Lsn(100), true, Some(Lsn(100))));
        let ev = r.opened();
        assert_eq!(ev.iter().filter_map(all_at).collect::<Vec<_>>(), [Lsn(100)]);
        assert_eq!(r.check_position(Some(Lsn(100))), Ok(()));
        let b = r.handle_records([Record::Begin, table(1), Record::Commit(Some(Lsn(120))), Record::Begin]);
        assert_eq!(b.changes.len(), 1);
        assert_eq!((b.through, b.max_commit), (Some(Lsn(120)), Some(Lsn(120))));
        assert_eq!(b.events.last(), Some(&keepalive(Lsn(120))));
        assert_eq!(r.poll_step(Some(200)), Some(SlotStep::Advance(Lsn(120))));
        r.handle_advanced(Lsn(120), Some(Lsn(121)));
        assert_eq!(r.check_position(Some(Lsn(121))), Ok(()));
        assert_eq!(r.check_position(Some(Lsn(120))), Err(StreamError::SlotMoved { at: Lsn(120), expected: Lsn(121) }));
        assert_eq!(r.check_position(None), Err(StreamError::SlotGone));
        // a transaction the peek cut in two: its changes wait for its commit
        let b = r.handle_records([Record::Begin, table(2)]);
        assert!(b.changes.is_empty() && b.through.is_none());
        assert_eq!(r.poll_step(Some(300)), None, "nothing applied: the slot stays");
        let b = r.handle_records([Record::Commit(Some(Lsn(140)))]);
        assert_eq!(b.changes[0].targets, [ChangeTarget::Table(TableId(2))]);
    }

    #[test]
    fn a_slot_created_by_a_connection_that_failed_is_still_new_to_the_next() {
        let mut r = SlotReader::new();
        let _ = r.open(Slot::Created(Lsn(100)));
        // the connection fails before the opening completes (catalog, file)
        let o = r.open(Slot::Existing(Lsn(100)));
        assert!(o.fresh && o.reset == Some(Lsn(100)), "{o:?}");
        let ev = r.opened();
        assert_eq!(ev.iter().filter_map(all_at).collect::<Vec<_>>(), [Lsn(100)]);
        // once opened, the next connection continues it
        let o = r.open(Slot::Existing(Lsn(100)));
        assert!(!o.fresh && o.reset.is_none(), "{o:?}");
        assert!(r.opened().is_empty());
    }

    #[test]
    fn an_existing_slot_continues_unless_someone_moved_it() {
        let mut r = SlotReader::new();
        let o = r.open(Slot::Existing(Lsn(50)));
        assert!(!o.fresh && !o.replaced && o.history_from == Some(Lsn(50)));
        assert!(r.opened().is_empty());
        // the start event opens the stream at the slot's position
        let b = r.handle_records([]);
        assert_eq!(b.events[0].change, Change { lsn: Lsn(50), targets: Vec::new() });
        let _ = r.handle_records([Record::Begin, table(1), Record::Commit(Some(Lsn(60)))]);
        r.handle_advanced(Lsn(60), None);
        // reconnected: the slot is where this reader left it
        assert!(!r.open(Slot::Existing(Lsn(60))).replaced);
        // reconnected again: someone advanced it (or dropped and made it again)
        let o = r.open(Slot::Existing(Lsn(90)));
        assert!(o.replaced && o.fresh && o.reset == Some(Lsn(90)), "{o:?}");
        assert_eq!(r.opened().iter().filter_map(all_at).collect::<Vec<_>>(), [Lsn(90)]);
        // behind what was applied (a slot on a promoted replica): reset past it
        let o = r.open(Slot::Existing(Lsn(70)));
        assert_eq!(o.reset, Some(Lsn(90)));
    }

    #[test]
    fn an_idle_slot_gets_a_position_once_per_stretch_of_foreign_wal() {
        let mut r = SlotReader::new();
        let _ = r.open(Slot::Created(Lsn(0)));
        let _ = r.opened();
        let _ = r.handle_records([]);
        assert_eq!(r.poll_step(Some(IDLE_ADVANCE_BYTES)), None);
        assert_eq!(r.poll_step(Some(IDLE_ADVANCE_BYTES + 1)), Some(SlotStep::Emit));
        assert_eq!(r.poll_step(Some(IDLE_ADVANCE_BYTES + 2)), None, "once");
        // the message's position arrives as a barrier: the slot advances to it
        let b = r.handle_records([Record::Barrier(Some(Lsn(IDLE_ADVANCE_BYTES + 1)))]);
        assert!(b.events.iter().all(|e| e.change.targets.is_empty()));
        assert_eq!(r.poll_step(None), Some(SlotStep::Advance(Lsn(IDLE_ADVANCE_BYTES + 1))));
    }

    #[test]
    fn an_unreadable_commit_position_is_the_last_one() {
        let mut r = SlotReader::new();
        let _ = r.open(Slot::Created(Lsn(10)));
        let _ = r.opened();
        let b = r.handle_records([Record::Begin, table(3), Record::Commit(None)]);
        assert_eq!(b.changes[0].lsn, Lsn(10));
        assert_eq!(b.events.iter().filter(|e| e.prev_lsn > e.change.lsn).count(), 0);
    }
}

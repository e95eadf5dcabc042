//! An edge following a regional proxy's stream (`POSTAI SUBSCRIBE`, see
//! [`crate::stream::Line`]). What happened before the subscription is
//! unknown: the first keepalive's position opens the stream with an event
//! that invalidates everything older. Subscribing again (`FROM` the last
//! commit applied, or the L2 file's position at start), the regional answers
//! `C` when it kept every row since and sends them up to a keepalive: they
//! are applied in one batch (a restored entry is never served between two of
//! them), and nothing else is invalidated.

use crate::invalidation::{CdcEvent, Change, ChangeTarget, Lsn};
use crate::stream::reader::{apply, keepalive};
use crate::stream::{Line, Record};

#[derive(Debug, Default)]
pub struct Subscriber {
    /// The last commit applied.
    last: Lsn,
    /// A subscription was open: the next one continues after `last`.
    subscribed: bool,
    /// This connection's stream opened.
    opened: bool,
    /// The rows a resumed stream replays, up to its first keepalive.
    replay: Option<Vec<(String, String)>>,
    /// The open transaction's targets.
    pending: Vec<ChangeTarget>,
}

/// One line's outcome: apply `events` in order, under one hold of the
/// node's lock; persist `changes` (the L2 file) up to [`Subscriber::last`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub events: Vec<CdcEvent>,
    pub changes: Vec<Change>,
    /// The stream continued where the last one ended (`C`).
    pub resumed: bool,
    /// A keepalive: where the primary's WAL stands.
    pub current: Option<Lsn>,
}

impl Step {
    /// Whether a change reaches everything (DDL, a reset): the catalog is read again.
    pub fn ddl(&self) -> bool {
        self.changes.iter().any(|c| c.targets.contains(&ChangeTarget::All))
    }
}

impl Subscriber {
    pub fn new() -> Self {
        Subscriber::default()
    }

    /// The last commit applied.
    pub fn last(&self) -> Lsn {
        self.last
    }

    /// Whether a subscription was open before (the L2 file was adopted then).
    pub fn subscribed(&self) -> bool {
        self.subscribed
    }

    /// A new connection: where to subscribe `FROM` (`file_at`: the L2 file's
    /// position, for the first subscription of this process).
    pub fn connect(&mut self, file_at: Option<Lsn>) -> Option<Lsn> {
        self.opened = false;
        self.replay = None;
        self.pending.clear();
        if self.subscribed { Some(self.last) } else { file_at }
    }

    /// The line that opens this connection's stream: its position, and
    /// whether what came before it is unknown (`true` for a `K`). The driver
    /// reads the catalog and adopts the L2 file there before handling it.
    pub fn opening(&self, line: &Line) -> Option<(Lsn, bool)> {
        match (self.opened, line) {
            (false, Line::Continue(at)) => Some((*at, false)),
            (false, Line::Keepalive(at)) => Some((*at, true)),
            _ => None,
        }
    }

    /// One line; `decode` reads a row against the current catalog.
    pub fn handle_line(&mut self, line: Line, decode: &mut dyn FnMut(&str, &str) -> Record) -> Step {
        let mut step = Step::default();
        let all = |prev_lsn: Lsn, lsn: Lsn| Change { lsn, targets: vec![ChangeTarget::All] }.after(prev_lsn);
        match line {
            Line::Continue(from) => {
                // every commit up to `from` is reflected (the file's invariant)
                step.events.push(Change { lsn: from, targets: Vec::new() }.after(self.last));
                self.last = self.last.max(from);
                self.opened = true;
                self.subscribed = true;
                self.replay = Some(Vec::new());
                step.resumed = true;
            }
            Line::Reset(start) => {
                // a new slot on the regional proxy: commits before it may never come
                let start = start.max(self.last);
                let event = all(self.last, start);
                step.changes.push(event.change.clone());
                step.events.push(event);
                self.last = start;
            }
            Line::Keepalive(current) => {
                for (lsn, data) in self.replay.take().unwrap_or_default() {
                    self.apply(decode(&lsn, &data), &mut step);
                }
                if !self.opened {
                    // everything cached before is of unknown freshness (the file's too)
                    let start = current.max(self.last);
                    let event = all(self.last, start);
                    step.changes.push(event.change.clone());
                    step.events.push(event);
                    self.last = start;
                    self.opened = true;
                    self.subscribed = true;
                }
                step.events.push(keepalive(self.last));
                step.current = Some(current);
            }
            Line::Row { lsn, data } => match (self.opened, self.replay.as_mut()) {
                (false, _) => {}
                (true, Some(rows)) => rows.push((lsn.to_string(), data.to_string())),
                (true, None) => self.apply(decode(lsn, data), &mut step),
            },
        }
        step
    }

    fn apply(&mut self, record: Record, step: &mut Step) {
        let commit = apply(record, &mut self.pending, &mut self.last, &mut step.events);
        step.changes.extend(commit.filter(|c| !c.targets.is_empty()));
    }
}

impl Change {
    /// This change as the event that follows the commit at `prev_lsn`.
    pub fn after(self, prev_lsn: Lsn) -> CdcEvent {
        CdcEvent { prev_lsn, change: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::TableId;

    /// Rows as `table <n>` changes, `commit <lsn>`, `begin`.
    fn decode(_: &str, data: &str) -> Record {
        match data.split_once(' ') {
            Some(("table", t)) => Record::Change(vec![ChangeTarget::Table(TableId(t.parse().unwrap_or(0)))]),
            Some(("commit", l)) => Record::Commit(l.parse().ok().map(Lsn)),
            _ if data == "begin" => Record::Begin,
            _ => Record::Other,
        }
    }

    fn run(s: &mut Subscriber, lines: &[&str]) -> Step {
        let mut out = Step::default();
        for l in lines {
            let line = Line::parse(l).unwrap_or_else(|| panic!("a line: {l}"));
            let step = s.handle_line(line, &mut decode);
            out.events.extend(step.events);
            out.changes.extend(step.changes);
            out.resumed |= step.resumed;
            out.current = step.current.or(out.current);
        }
        out
    }

    #[test]
    fn a_first_subscription_opens_at_its_first_keepalive_and_forgets_before() {
        let mut s = Subscriber::new();
        assert_eq!(s.connect(Some(Lsn(7))), Some(Lsn(7)), "the file's position first");
        let k = Line::Keepalive(Lsn(0x100));
        assert_eq!(s.opening(&k), Some((Lsn(0x100), true)));
        let step = run(&mut s, &["R 0/50\tbegin", "K 0/100"]);
        assert!(step.ddl(), "everything before the stream is of unknown freshness");
        assert_eq!(step.changes.len(), 1, "a row before the stream opened is not applied");
        let step = run(&mut s, &["R 0/110\tbegin", "R 0/111\ttable 4", "R 0/120\tcommit 288", "K 0/130"]);
        assert_eq!(step.changes, [Change { lsn: Lsn(288), targets: vec![ChangeTarget::Table(TableId(4))] }]);
        assert_eq!(s.last(), Lsn(288));
        assert_eq!(s.opening(&k), None, "opened");
        // reconnected: continue after the last commit applied
        assert_eq!(s.connect(Some(Lsn(7))), Some(Lsn(288)));
    }

    #[test]
    fn a_resume_replays_its_rows_in_one_step_and_invalidates_nothing_else() {
        let mut s = Subscriber::new();
        let _ = s.connect(Some(Lsn(200)));
        assert_eq!(s.opening(&Line::Continue(Lsn(200))), Some((Lsn(200), false)));
        let rows = run(&mut s, &["C 0/C8", "R 0/D0\tbegin", "R 0/D1\ttable 2", "R 0/D2\tcommit 220"]);
        assert!(rows.resumed);
        assert!(rows.changes.is_empty(), "held until the keepalive");
        let step = run(&mut s, &["K 0/F0"]);
        assert_eq!(step.changes, [Change { lsn: Lsn(220), targets: vec![ChangeTarget::Table(TableId(2))] }]);
        assert!(!step.ddl());
        assert_eq!(step.events.last(), Some(&keepalive(Lsn(220))));
        assert_eq!(step.current, Some(Lsn(0xF0)));
    }

    #[test]
    fn a_reset_invalidates_everything_past_what_was_applied() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ = run(&mut s, &["K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1", "R 0/120\tcommit 500"]);
        let step = run(&mut s, &["X 0/10"]);
        assert_eq!(step.changes, [Change { lsn: Lsn(500), targets: vec![ChangeTarget::All] }]);
        assert_eq!(s.last(), Lsn(500));
    }

    #[test]
    fn a_transaction_cut_by_a_reconnection_is_not_half_applied() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ = run(&mut s, &["K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1"]);
        let _ = s.connect(None);
        let step = run(&mut s, &["C 0/100", "R 0/112\ttable 2", "R 0/120\tcommit 300", "K 0/130"]);
        // the regional replays whole transactions from BEGIN; a stray tail
        // commits only what it names
        assert_eq!(step.changes, [Change { lsn: Lsn(300), targets: vec![ChangeTarget::Table(TableId(2))] }]);
    }
}

//! An edge following a regional proxy's stream (`POSTAI SUBSCRIBE`, see
//! [`crate::stream::Line`]). What happened before the subscription is
//! unknown: the first keepalive's position opens the stream with an event
//! that invalidates everything older. Subscribing again (`FROM` the last
//! commit applied, or the L2 file's position at start), the regional answers
//! `C` when it kept every row since and sends them up to a keepalive: they
//! are applied in one batch (a restored entry is never served between two of
//! them), and nothing else is invalidated. A position is continued only on
//! the history it was taken on (`O`, [`Line::Origin`]): after a failover
//! that lost commits, the new timeline reuses their positions for other
//! commits, so a regional restarted since (which kept no history of the
//! old timeline) could otherwise continue an old position as if it were
//! its own, and what the edge cached of the lost commits would stay.
//!
//! Only a keepalive after the opening shows the regional's stream is live
//! ([`Step::live`]): a regional whose own stream has stalled still opens
//! every subscription with the last position it applied (and a resume with
//! the rows it kept), so an edge that took the opening for news would serve
//! for one more silence window per reconnection, for as long as the stall
//! lasts.

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
    /// This connection's stream sent a keepalive after its opening.
    live: bool,
    /// The rows a resumed stream replays, up to its first keepalive.
    replay: Option<Vec<(String, String)>>,
    /// The open transaction's targets.
    pending: Vec<ChangeTarget>,
    /// The history `last` is a position on (the regional's word, or the L2
    /// file's at start).
    origin: Option<String>,
    /// The history this connection's stream announced.
    announced: Option<String>,
    /// Nothing to persist: `Step::changes` stays empty.
    skip_changes: bool,
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
    /// A new history (a reset, or a position of another one): what is held
    /// may have been filed at positions this history reuses for other
    /// commits, above what the invalidation reaches; the driver drops it
    /// all, and files no answer in flight.
    pub new_history: bool,
    /// The regional's stream is live: a keepalive came after the opening
    /// (in this step or before it on this connection). The driver applies
    /// a step that is not as the stream's content but not as news that it
    /// is live (the silence clock stays where it was).
    pub live: bool,
    /// The newest `V` line: every commit up to it is visible on the
    /// primary (see [`Line::Visible`]).
    pub visible: Option<Lsn>,
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

    /// A subscriber for a driver with nothing to persist (no L2 file): its
    /// steps carry no `changes`.
    pub fn without_changes() -> Self {
        Subscriber { skip_changes: true, ..Subscriber::default() }
    }

    /// The last commit applied.
    pub fn last(&self) -> Lsn {
        self.last
    }

    /// Whether a subscription was open before (the L2 file was adopted then).
    pub fn subscribed(&self) -> bool {
        self.subscribed
    }

    /// The history the stream announced (`O`), once it did.
    pub fn announced(&self) -> Option<&str> {
        self.announced.as_deref()
    }

    /// A new connection: where to subscribe `FROM` (`file`: the L2 file's
    /// position and the history it is on, for the first subscription of
    /// this process).
    pub fn connect(&mut self, file: Option<(Lsn, Option<String>)>) -> Option<Lsn> {
        self.opened = false;
        self.live = false;
        self.replay = None;
        self.pending.clear();
        self.announced = None;
        if self.subscribed {
            return Some(self.last);
        }
        let (at, origin) = file?;
        self.origin = origin;
        Some(at)
    }

    /// Whether this connection's stream is on the history of `last` (a
    /// stream that names none is on no known one).
    fn same_history(&self) -> bool {
        self.announced.is_some() && self.announced == self.origin
    }

    /// The line that opens this connection's stream: its position, and
    /// whether what came before it is unknown (`true` for a `K`, or a `C`
    /// on another history than the position asked for). The driver reads
    /// the catalog and adopts the L2 file there before handling it.
    pub fn opening(&self, line: &Line) -> Option<(Lsn, bool)> {
        match (self.opened, line) {
            (false, Line::Continue(at)) => Some((*at, !self.same_history())),
            (false, Line::Keepalive(at)) => Some((*at, true)),
            _ => None,
        }
    }

    /// One line; `decode` reads a row against the current catalog.
    pub fn handle_line(&mut self, line: Line, decode: &mut dyn FnMut(&str, &str) -> Record) -> Step {
        let mut step = Step::default();
        self.handle_line_into(line, decode, &mut step);
        step
    }

    /// [`Subscriber::handle_line`] for a driver that handles several lines
    /// at once: their outcome added to `step` (events in order; a new
    /// history anywhere among them drops everything held once they are
    /// applied, which is the same as at its line when nothing is filed in
    /// between).
    pub fn handle_line_into(&mut self, line: Line, decode: &mut dyn FnMut(&str, &str) -> Record, step: &mut Step) {
        // a keepalive once the opening's own (a `K`, or the one that ends a
        // resume's rows) has come
        if matches!(line, Line::Keepalive(_)) && self.opened && self.replay.is_none() {
            self.live = true;
        }
        step.live |= self.live;
        match line {
            Line::Origin(origin) => self.announced = Some(origin.to_string()),
            Line::Visible(at) => step.visible = step.visible.max(Some(at)),
            Line::Continue(from) if !self.same_history() => {
                // a position of another history (a timeline a failover
                // ended): what is held reflects commits that may be lost,
                // and misses some of this history's
                self.start_history(from, step);
                self.open();
                self.replay = Some(Vec::new());
            }
            Line::Continue(from) => {
                // every commit up to `from` is reflected (the file's invariant)
                step.events.push(Change { lsn: from, targets: Vec::new() }.after(self.last));
                self.last = self.last.max(from);
                self.open();
                self.replay = Some(Vec::new());
                step.resumed = true;
            }
            Line::Reset(start) => {
                // a new slot on the regional proxy: commits before it may never come
                self.start_history(start, step);
                self.origin.clone_from(&self.announced);
            }
            Line::Keepalive(current) => {
                for (lsn, data) in self.replay.take().unwrap_or_default() {
                    self.apply(decode(&lsn, &data), step);
                }
                if !self.opened {
                    // everything cached before is of unknown freshness (the file's too)
                    if self.same_history() {
                        self.forget_before(current, step);
                    } else {
                        self.start_history(current, step);
                    }
                    self.open();
                }
                step.events.push(keepalive(self.last));
                step.current = Some(current);
            }
            Line::Row { lsn, data } => match (self.opened, self.replay.as_mut()) {
                (false, _) => {}
                (true, Some(rows)) => rows.push((lsn.to_string(), data.to_string())),
                (true, None) => self.apply(decode(lsn, data), step),
            },
        }
    }

    /// Everything before `at` (or `last`, if later) is of unknown freshness:
    /// an event that invalidates it, persisted too.
    fn forget_before(&mut self, at: Lsn, step: &mut Step) {
        let start = at.max(self.last);
        let event = Change { lsn: start, targets: vec![ChangeTarget::All] }.after(self.last);
        step.changes.push(event.change.clone());
        step.events.push(event);
        self.last = start;
    }

    /// A new history from `at` on (a new slot, another timeline): its
    /// positions may be below `last`, and reuse ones seen on the old one.
    /// The event goes back to `at` when they are, which makes the node
    /// start again there ([`CdcEvent::starts_history`]).
    fn start_history(&mut self, at: Lsn, step: &mut Step) {
        let event = Change { lsn: at, targets: vec![ChangeTarget::All] }.after(self.last);
        step.changes.push(event.change.clone());
        step.events.push(event);
        self.last = at;
        step.new_history = true;
    }

    /// The stream opened: `last` is a position on its history from now on.
    fn open(&mut self) {
        self.opened = true;
        self.subscribed = true;
        self.origin.clone_from(&self.announced);
    }

    fn apply(&mut self, record: Record, step: &mut Step) {
        let commit = apply(record, &mut self.pending, &mut self.last, &mut step.events);
        if !self.skip_changes {
            step.changes.extend(commit.filter(|c| !c.targets.is_empty()).cloned());
        }
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
            out.new_history |= step.new_history;
            out.current = step.current.or(out.current);
            out.live |= step.live;
            out.visible = out.visible.max(step.visible);
        }
        out
    }

    /// A regional whose own stream stalled still opens each subscription
    /// with the last position it applied (and a resume with the rows it
    /// kept): only a keepalive after that shows its stream is live.
    #[test]
    fn only_a_keepalive_after_the_opening_shows_the_stream_is_live() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let open = run(&mut s, &["O h", "K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1", "R 0/120\tcommit 288"]);
        assert!(!open.live, "the opening and what follows it before a keepalive");
        assert_eq!(open.changes.len(), 2, "applied all the same");
        assert!(run(&mut s, &["K 0/130"]).live);
        assert!(run(&mut s, &["R 0/140\tbegin"]).live, "rows on a live stream");
        // reconnected: the rows kept since and the keepalive ending them are the regional's past
        assert_eq!(s.connect(None), Some(Lsn(288)));
        let resume = run(&mut s, &["O h", "C 0/120", "R 0/150\tbegin", "R 0/151\ttable 2", "R 0/160\tcommit 400"]);
        let resume_k = run(&mut s, &["K 0/170"]);
        assert!(resume_k.resumed || resume.resumed);
        assert!(!resume.live && !resume_k.live, "a resume is not news");
        assert_eq!(resume_k.changes.len(), 1, "its rows applied at its keepalive");
        assert!(run(&mut s, &["K 0/180"]).live);
        // again, with nothing kept: the opening keepalive alone
        let _ = s.connect(None);
        assert!(!run(&mut s, &["O h", "K 0/180"]).live);
        assert!(run(&mut s, &["K 0/190"]).live);
        // a batch that holds the opening and a later keepalive is live
        let _ = s.connect(None);
        let mut step = Step::default();
        for l in ["O h", "V 0/180", "K 0/190", "V 0/170", "K 0/1A0"] {
            s.handle_line_into(Line::parse(l).expect("line"), &mut decode, &mut step);
        }
        assert!(step.live);
        assert_eq!(step.visible, Some(Lsn(0x180)), "the newest visible position, whatever opens");
    }

    #[test]
    fn a_first_subscription_opens_at_its_first_keepalive_and_forgets_before() {
        let mut s = Subscriber::new();
        assert_eq!(s.connect(Some((Lsn(7), None))), Some(Lsn(7)), "the file's position first");
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
        assert_eq!(s.connect(Some((Lsn(7), None))), Some(Lsn(288)));
    }

    #[test]
    fn a_resume_replays_its_rows_in_one_step_and_invalidates_nothing_else() {
        let mut s = Subscriber::new();
        let _ = s.connect(Some((Lsn(200), Some("h".into()))));
        let _ = run(&mut s, &["O h"]);
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

    /// A regional restarted after a failover that lost commits: its new
    /// slot is on the promoted replica's timeline, whose positions the old
    /// one also used. Continuing the edge's old position would keep what it
    /// cached of the lost commits and skip the new timeline's commits up to
    /// it.
    #[test]
    fn a_position_is_continued_only_on_its_own_history() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ =
            run(&mut s, &["O sys/00000001", "K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1", "R 0/120\tcommit 500"]);
        assert_eq!(s.last(), Lsn(500));
        // the same history: continued
        assert_eq!(s.connect(None), Some(Lsn(500)));
        let o = run(&mut s, &["O sys/00000001"]);
        assert!(o.events.is_empty());
        assert_eq!(s.opening(&Line::Continue(Lsn(500))), Some((Lsn(500), false)));
        let step = run(&mut s, &["C 0/1F4", "K 0/200"]);
        assert!(step.resumed && !step.ddl());
        // the regional restarted on timeline 2, which reuses the position
        assert_eq!(s.connect(None), Some(Lsn(500)));
        let _ = run(&mut s, &["O sys/00000002"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(500))), Some((Lsn(500), true)), "what came before is unknown");
        let step = run(&mut s, &["C 0/1F4", "R 0/300\tbegin", "R 0/301\ttable 2", "R 0/310\tcommit 784", "K 0/320"]);
        assert!(!step.resumed, "not a resume");
        assert!(step.new_history, "what is held may be filed above the invalidation: dropped");
        assert_eq!(
            step.changes,
            [
                Change { lsn: Lsn(500), targets: vec![ChangeTarget::All] },
                Change { lsn: Lsn(784), targets: vec![ChangeTarget::Table(TableId(2))] }
            ]
        );
        // and the new history is the position's from now on
        assert_eq!(s.connect(None), Some(Lsn(784)));
        let _ = run(&mut s, &["O sys/00000002"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(784))), Some((Lsn(784), false)));
        // a reset moves to the history announced before it
        let step = run(&mut s, &["C 0/310", "K 0/320", "O sys/00000003", "X 0/400"]);
        assert!(step.new_history);
        assert_eq!(s.connect(None), Some(Lsn(0x400)));
        let _ = run(&mut s, &["O sys/00000003"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(0x400))), Some((Lsn(0x400), false)));
    }

    /// A reset to a new slot on a promoted primary whose timeline starts
    /// below what the subscriber applied (the old primary's last commits,
    /// streamed before the failover, were lost): the positions go back to
    /// the reset's, with an event that says so, and the new history's rows
    /// at positions the old one used are applied, not taken for ones seen.
    #[test]
    fn a_reset_below_the_position_starts_the_new_history_there() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ = run(&mut s, &["O sys/00000001", "K 0/100", "R 0/110\tbegin", "R 0/120\tcommit 500"]);
        assert_eq!(s.last(), Lsn(500));
        let step = run(&mut s, &["O sys/00000002", "X 0/190"]);
        assert!(step.new_history);
        let back = &step.events[0];
        assert!(back.starts_history(), "{back:?}");
        assert_eq!((back.prev_lsn, back.change.lsn), (Lsn(500), Lsn(0x190)));
        assert_eq!(s.last(), Lsn(0x190));
        let step = run(&mut s, &["R 0/1A0\tbegin", "R 0/1A1\ttable 3", "R 0/1B0\tcommit 450", "K 0/1C0"]);
        let change = Change { lsn: Lsn(450), targets: vec![ChangeTarget::Table(TableId(3))] };
        assert_eq!(step.changes, std::slice::from_ref(&change), "a reused position is a new commit");
        assert_eq!(step.events[0], change.after(Lsn(0x190)));
        assert_eq!(s.last(), Lsn(450));
    }

    /// The L2 file's position is on the history it was written on; a file
    /// of another one (or of none known) is not continued.
    #[test]
    fn a_file_position_is_continued_only_on_the_file_s_history() {
        let mut s = Subscriber::new();
        assert_eq!(s.connect(Some((Lsn(300), Some("sys/00000001".into())))), Some(Lsn(300)));
        let _ = run(&mut s, &["O sys/00000001"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(300))), Some((Lsn(300), false)));
        let mut s = Subscriber::new();
        let _ = s.connect(Some((Lsn(300), Some("sys/00000001".into()))));
        let _ = run(&mut s, &["O sys/00000002"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(300))), Some((Lsn(300), true)));
        let mut s = Subscriber::new();
        let _ = s.connect(Some((Lsn(300), None)));
        let _ = run(&mut s, &["O sys/00000001"]);
        assert_eq!(s.opening(&Line::Continue(Lsn(300))), Some((Lsn(300), true)), "a file of no known history");
        let mut quiet = Subscriber::new();
        let _ = quiet.connect(Some((Lsn(300), None)));
        assert_eq!(quiet.opening(&Line::Continue(Lsn(300))), Some((Lsn(300), true)), "a stream of no known history");
        let step = run(&mut s, &["C 0/12C", "K 0/200"]);
        assert!(step.ddl() && !step.resumed);
    }

    /// A reset (no history named) invalidates everything; below what was
    /// applied, the positions go back to it (only a new timeline's slot
    /// starts below what the old one streamed).
    #[test]
    fn a_reset_invalidates_everything_and_positions_follow_it() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ = run(&mut s, &["K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1", "R 0/120\tcommit 500"]);
        let step = run(&mut s, &["X 0/10"]);
        assert_eq!(step.changes, [Change { lsn: Lsn(0x10), targets: vec![ChangeTarget::All] }]);
        assert!(step.events[0].starts_history() && step.new_history);
        assert_eq!(s.last(), Lsn(0x10));
        let step = run(&mut s, &["X 0/900"]);
        assert_eq!(step.changes, [Change { lsn: Lsn(0x900), targets: vec![ChangeTarget::All] }]);
        assert!(!step.events[0].starts_history(), "above: an invalidation, positions go on");
        assert_eq!(s.last(), Lsn(0x900));
    }

    #[test]
    fn a_transaction_cut_by_a_reconnection_is_not_half_applied() {
        let mut s = Subscriber::new();
        let _ = s.connect(None);
        let _ = run(&mut s, &["O h", "K 0/100", "R 0/110\tbegin", "R 0/111\ttable 1"]);
        let _ = s.connect(None);
        let step = run(&mut s, &["O h", "C 0/100", "R 0/112\ttable 2", "R 0/120\tcommit 300", "K 0/130"]);
        // the regional replays whole transactions from BEGIN; a stray tail
        // commits only what it names
        assert_eq!(step.changes, [Change { lsn: Lsn(300), targets: vec![ChangeTarget::Table(TableId(2))] }]);
    }
}

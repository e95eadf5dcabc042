//! What a regional proxy published lately, kept for the edges that subscribe
//! again (`POSTAI SUBSCRIBE FROM`): a reconnecting edge misses nothing and
//! keeps its cache.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::invalidation::Lsn;

/// Rows a regional proxy keeps for resumes.
pub const HISTORY_ROWS: usize = 100_000;

/// One poll's rows as the slot gave them, and the primary's current LSN:
/// what a regional proxy relays to the edges subscribed to it. Or a reset:
/// the reader started a new slot at this LSN (after a failover), and what was
/// committed before it may never be streamed.
#[derive(Debug, Default)]
pub struct Feed {
    pub rows: Vec<(String, String)>,
    pub current: Option<u64>,
    pub reset: Option<Lsn>,
    /// The newest commit among the rows.
    pub max_commit: Option<Lsn>,
    /// With a reset: the history the new slot is on (see
    /// [`crate::stream::Line::Origin`]).
    pub origin: Option<String>,
}

/// The feeds a regional proxy published lately: every commit after `floor`
/// is in them (or still to come).
#[derive(Debug, Default)]
pub struct History {
    feeds: VecDeque<Arc<Feed>>,
    rows: usize,
    floor: Option<Lsn>,
    /// The newest commit published.
    newest: Option<Lsn>,
    /// The history the slot read now is on: told to every subscriber first.
    origin: Option<String>,
}

impl History {
    /// The feeds with a commit after `from`, when every commit after `from`
    /// is in them or still to come; `None` when some may be gone.
    pub fn since(&self, from: Lsn) -> Option<Vec<Arc<Feed>>> {
        let floor = self.floor?;
        (from >= floor).then(|| self.feeds.iter().filter(|f| f.max_commit.is_some_and(|c| c > from)).cloned().collect())
    }

    /// The history the slot read now is on, if known.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The reader found its slot on `origin` (for a new slot, with its reset).
    pub fn set_origin(&mut self, origin: Option<String>) {
        self.origin = origin;
    }

    /// The reader starts at `position` (the slot's): history is complete from there.
    pub fn start_at(&mut self, position: Lsn) {
        if self.floor.is_none() {
            self.floor = Some(position);
        }
    }

    /// The stream broke off (the slot gone or moved): commits after the
    /// last one published may never come, so no position is continued until
    /// the reader starts again (a reset, or [`History::start_at`]).
    pub fn break_off(&mut self) {
        self.feeds.clear();
        self.rows = 0;
        self.floor = None;
    }

    /// `feed` published; the oldest feeds go past `keep_rows` rows.
    pub fn push(&mut self, feed: Arc<Feed>, keep_rows: usize) {
        self.newest = self.newest.max(feed.max_commit);
        if let Some(start) = feed.reset {
            // a new slot, perhaps on a promoted replica: a position published
            // before (a subscriber's) may be past commits the old primary lost
            // and the new one made anew; none of them is continued
            self.feeds.clear();
            self.rows = 0;
            self.floor = Some(self.newest.map_or(start, |n| start.max(Lsn(n.0 + 1))));
            return;
        }
        if feed.max_commit.is_none() {
            // keepalives only: nothing to replay
            return;
        }
        self.rows += feed.rows.len();
        self.feeds.push_back(feed);
        while self.rows > keep_rows {
            let Some(old) = self.feeds.pop_front() else { break };
            self.rows -= old.rows.len();
            self.floor = self.floor.max(old.max_commit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_answers_resumes_it_can_vouch_for() {
        let feed = |commit: u64, rows: usize| {
            Arc::new(Feed {
                rows: vec![(String::new(), String::new()); rows],
                max_commit: Some(Lsn(commit)),
                ..Feed::default()
            })
        };
        let mut h = History::default();
        assert!(h.since(Lsn(0)).is_none(), "nothing known before the reader starts");
        h.start_at(Lsn(100));
        h.push(feed(110, 2), 4);
        h.push(Arc::new(Feed { current: Some(115), ..Feed::default() }), 4);
        h.push(feed(120, 2), 4);
        assert_eq!(h.since(Lsn(100)).map(|f| f.len()), Some(2));
        assert_eq!(h.since(Lsn(110)).map(|f| f.len()), Some(1));
        assert_eq!(h.since(Lsn(500)).map(|f| f.len()), Some(0), "ahead: nothing to replay, nothing missed");
        assert!(h.since(Lsn(99)).is_none(), "commits before the reader's start are not kept");
        // past 4 rows the oldest feed goes, and with it positions before its commits
        h.push(feed(130, 2), 4);
        assert!(h.since(Lsn(100)).is_none());
        assert_eq!(h.since(Lsn(110)).map(|f| f.len()), Some(2), "the keepalive-only poll was not kept");
        // a new slot (start 125): no position published before it is continued
        h.push(Arc::new(Feed { reset: Some(Lsn(125)), ..Feed::default() }), 4);
        assert!(h.since(Lsn(125)).is_none());
        assert!(h.since(Lsn(130)).is_none(), "published before the reset: maybe a lost timeline");
        assert_eq!(h.since(Lsn(131)).map(|f| f.len()), Some(0));
        // a fresh process's first slot: continued from its start
        let mut fresh = History::default();
        fresh.push(Arc::new(Feed { reset: Some(Lsn(50)), ..Feed::default() }), 4);
        assert_eq!(fresh.since(Lsn(50)).map(|f| f.len()), Some(0));
        // the slot found gone: nothing is continued until the reader starts again
        fresh.push(feed(60, 1), 4);
        fresh.break_off();
        assert!(fresh.since(Lsn(50)).is_none() && fresh.since(Lsn(60)).is_none());
        fresh.push(Arc::new(Feed { reset: Some(Lsn(55)), ..Feed::default() }), 4);
        assert!(fresh.since(Lsn(60)).is_none(), "published before the break");
        assert_eq!(fresh.since(Lsn(61)).map(|f| f.len()), Some(0));
    }
}

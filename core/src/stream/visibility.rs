//! Which WAL position every visible commit is below: what a fill may be
//! dated with.
//!
//! PostgreSQL writes a commit's WAL record before the commit becomes visible
//! to other snapshots (with a synchronous standby, a round trip to it later,
//! or never while the standby is gone). `pg_current_wal_lsn()` read before a
//! read is therefore no lower bound of what the read's snapshot sees: a
//! commit below it may still be invisible, and an answer dated past it would
//! outlive the commit's change when that arrives. The driver probes the
//! primary with two statements: the WAL position `L`, then the transactions
//! running (each backend's `backend_xid`, and the prepared ones). A
//! transaction whose commit record is below `L` had its id before `L` was
//! read; if it is not running at the second statement it has ended, and its
//! commit is visible. `L` is visible once every transaction running then
//! has ended (none of them runs at a later probe), or at once when none
//! ran. (The snapshot's in-progress list would not do: a transaction whose
//! id is past the newest one completed is not listed.) A long open
//! transaction holds the position back: fills are then dated earlier (and
//! rows changed since are not filled until it ends), never later.

use crate::invalidation::Lsn;

#[derive(Debug, Default)]
pub struct Visibility {
    /// A probe's position and the transactions running at it, waiting for
    /// them to end.
    pending: Option<(Lsn, Vec<u64>)>,
    /// Every commit below this was visible at the last probe.
    visible: Lsn,
}

impl Visibility {
    pub fn new() -> Self {
        Visibility::default()
    }

    /// A probe: `lsn` read, then, in a later statement, the ids of the
    /// transactions `running`. Returns the visible position.
    pub fn handle_probe(&mut self, lsn: Lsn, running: &[u64]) -> Lsn {
        if let Some((at, waited)) = &self.pending
            && !waited.iter().any(|x| running.contains(x))
        {
            self.visible = self.visible.max(*at);
            self.pending = None;
        }
        if running.is_empty() {
            // every transaction that had an id when `lsn` was read has ended
            self.visible = self.visible.max(lsn);
            self.pending = None;
        } else if self.pending.is_none() {
            self.pending = Some((lsn, running.to_vec()));
        }
        self.visible
    }
}

/// The probe's second statement: the ids of the transactions running, one
/// list (`NULL` when none).
pub const RUNNING_SQL: &str = "SELECT pg_catalog.string_agg(r.x::pg_catalog.text, ',') FROM \
     (SELECT a.backend_xid AS x FROM pg_catalog.pg_stat_activity a WHERE a.backend_xid IS NOT NULL \
     UNION SELECT p.transaction FROM pg_catalog.pg_prepared_xacts p) r";

/// [`RUNNING_SQL`]'s answer: `None` when unreadable.
pub fn parse_running(text: Option<&str>) -> Option<Vec<u64>> {
    match text {
        None | Some("") => Some(Vec::new()),
        Some(t) => t.split(',').map(|x| x.trim().parse().ok()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_visible_once_what_ran_when_it_was_read_has_ended() {
        let mut v = Visibility::new();
        assert_eq!(v.handle_probe(Lsn(100), &[]), Lsn(100), "nothing running: visible at once");
        // 60 (in its commit, or just open) and 61 run when 200 is read
        assert_eq!(v.handle_probe(Lsn(200), &[60, 61]), Lsn(100));
        // 61 still runs: 200 waits; 300 is not taken meanwhile
        assert_eq!(v.handle_probe(Lsn(300), &[61, 70]), Lsn(100));
        // 60 and 61 ended: 200 is visible; 400 waits for 70
        assert_eq!(v.handle_probe(Lsn(400), &[70]), Lsn(200));
        assert_eq!(v.handle_probe(Lsn(500), &[71]), Lsn(400));
        // nothing running settles everything up to its position
        assert_eq!(v.handle_probe(Lsn(600), &[]), Lsn(600));
    }

    /// The case the snapshot's list misses: the newest transaction, in its
    /// commit while a synchronous standby does not answer, is past the
    /// snapshot's xmax and not listed; as a running id it holds the
    /// position back until it ends.
    #[test]
    fn a_long_transaction_holds_the_position_back() {
        let mut v = Visibility::new();
        let _ = v.handle_probe(Lsn(100), &[729]);
        for lsn in 2..50u64 {
            assert_eq!(v.handle_probe(Lsn(lsn * 100), &[729, lsn + 800]), Lsn(0), "never past what 729 may hide");
        }
        assert_eq!(v.handle_probe(Lsn(9_000), &[900]), Lsn(100), "729 ended: the probe taken with it pending");
    }

    #[test]
    fn running_lists_parse() {
        assert_eq!(parse_running(Some("10,14,15")), Some(vec![10, 14, 15]));
        assert_eq!(parse_running(None), Some(vec![]));
        assert_eq!(parse_running(Some("1,x")), None);
    }
}

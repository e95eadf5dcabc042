//! A modelled PostgreSQL: a commit log with LSNs, replicas that replay it with
//! lag, synchronous or asynchronous replication, crash and promotion. Each
//! acknowledged commit survives exactly when the replication mode says it must.
//!
//! A commit has two numbers. Its identity (`Commit::lsn`, never reused) is
//! what the checker judges by: what a read holds is named by the newest
//! commit it shows. Its WAL position (`Commit::pos`) is what everything
//! the proxy sees carries (change events, snapshots told, replay progress,
//! read-your-writes floors): as on PostgreSQL, a promotion starts a new
//! timeline at the promoted node's position, so the positions of the
//! commits it lost are given again to new ones ([`Database::id_at`] reads a
//! position back on one timeline's history).
//!
//! Acknowledgement follows `synchronous_commit = on`: with synchronous
//! replication a commit is acknowledged once the synchronous standby has
//! received it and its answer came back ([`Database::acknowledged`]), never
//! at commit. A primary that crashed and restarted while a promotion was
//! already under way commits on a history no standby follows: its commits
//! wait for an answer that never comes, and the promotion drops them.

use postai_core::failover::{Epoch, Fence, FenceError};
use postai_core::router::Zone;
use postai_core::{Instant, Lsn};

use crate::scenario::Replication;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Key(u64),
    Table,
}

#[derive(Clone, Debug)]
pub struct Commit {
    /// The commit's identity (never reused).
    pub lsn: Lsn,
    /// Its WAL position (reused by a later timeline when a promotion drops it).
    pub pos: Lsn,
    pub at: Instant,
    pub key: Option<u64>,
    /// Dropped from the history by the promotion that began this timeline
    /// (`None`: in the history). A commit made on a node the others no
    /// longer follow is dropped at once.
    pub lost: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct DbNode {
    pub name: String,
    pub zone: Zone,
    pub lat: f64,
    pub lon: f64,
    pub up: bool,
    pub fence: Fence,
    /// One-way network delay from the current primary, in ms.
    pub oneway_ms: f64,
    /// Time to replay a received record, in ms.
    pub apply_ms: f64,
    /// Highest LSN this node holds durably (for a replica: what it replayed
    /// when it was last up, frozen while down).
    pub frozen_replay: Option<Lsn>,
    /// This node was primary up to this LSN and its later commits are not in
    /// the current history (it must rejoin before serving again).
    pub needs_rejoin: bool,
    /// When this node last crashed (a promotion begun before is void).
    pub crashed_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Database {
    pub replication: Replication,
    pub nodes: Vec<DbNode>,
    pub primary: usize,
    /// The synchronous standby (the most caught-up replica by construction).
    pub sync_standby: usize,
    pub log: Vec<Commit>,
    pub next_lsn: u64,
    /// (epoch, node) pairs that accepted a write: the safety checker reads it.
    pub accepted: Vec<(Epoch, usize)>,
    /// The walsender's batching delay before WAL leaves the primary, in ms.
    pub send_ms: f64,
    /// The primary crashed here: WAL not sent by then never arrives anywhere
    /// (until it restarts before anyone replaced it).
    pub cutoff: Option<Instant>,
    /// One-way delay between every two nodes, in ms.
    pub links_ms: Vec<Vec<f64>>,
    /// Promotions so far (the history's timeline).
    pub timeline: u32,
    /// The next WAL position on the current timeline.
    next_pos: u64,
    /// Per timeline: the position it began after (its parent's history up
    /// to there is its own) and the identities of the commits made on it,
    /// by position.
    timelines: Vec<TimelineLog>,
}

#[derive(Debug, Default)]
struct TimelineLog {
    fork: u64,
    ids: Vec<Lsn>,
}

/// The walsender's batching window under asynchronous replication, in ms
/// (the scenario's `db.wal_send_ms` sets it).
pub const ASYNC_SEND_MS: f64 = 10.0;

impl Database {
    pub fn new(
        replication: Replication,
        mut nodes: Vec<DbNode>,
        links_ms: Vec<Vec<f64>>,
        primary: usize,
        sync_standby: usize,
    ) -> Self {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.oneway_ms = links_ms[primary][i];
        }
        Database {
            replication,
            nodes,
            primary,
            sync_standby,
            log: Vec::new(),
            next_lsn: 1,
            accepted: Vec::new(),
            send_ms: match replication {
                // synchronous commit sends WAL at once and waits; asynchronous
                // streaming leaves the walsender's batching window at risk
                Replication::Sync => 0.0,
                Replication::Async => ASYNC_SEND_MS,
            },
            cutoff: None,
            links_ms,
            timeline: 0,
            next_pos: 1,
            timelines: vec![TimelineLog::default()],
        }
    }

    /// Drops the history once a run's report is built (see `World::release`).
    pub fn release(&mut self) {
        self.log = Vec::new();
        self.accepted = Vec::new();
        self.timelines = Vec::new();
    }

    /// The commit a position names on `timeline`'s history (position 0:
    /// the initial state); `None`: no commit of that history is there.
    pub fn id_at(&self, timeline: u32, pos: Lsn) -> Option<Lsn> {
        if pos.0 == 0 {
            return Some(Lsn(0));
        }
        let mut t = (timeline as usize).min(self.timelines.len().checked_sub(1)?);
        loop {
            let tl = &self.timelines[t];
            if pos.0 > tl.fork {
                return tl.ids.get((pos.0 - tl.fork - 1) as usize).copied();
            }
            t = t.checked_sub(1)?;
        }
    }

    /// The position of the commit `id` (0 for the initial state).
    pub fn pos_of(&self, id: Lsn) -> Lsn {
        self.commit(id).map_or(Lsn(0), |c| c.pos)
    }

    /// The position of the newest commit in the history.
    pub fn commit_pos(&self) -> Lsn {
        self.pos_of(self.commit_lsn())
    }

    /// [`Self::replay_lsn`] as a position.
    pub fn replay_pos(&self, node: usize, now: Instant) -> Lsn {
        self.pos_of(self.replay_lsn(node, now))
    }

    /// [`Self::received_lsn`] as a position.
    pub fn received_pos(&self, node: usize, now: Instant) -> Lsn {
        self.pos_of(self.received_lsn(node, now))
    }

    pub fn commit_lsn(&self) -> Lsn {
        self.log.iter().rev().find(|c| c.lost.is_none()).map_or(Lsn(0), |c| c.lsn)
    }

    /// The LSN `node` has replayed at `now`.
    pub fn replay_lsn(&self, node: usize, now: Instant) -> Lsn {
        self.position(node, now, true)
    }

    /// The LSN `node` has received (flushed) at `now`: what survives a promotion.
    pub fn received_lsn(&self, node: usize, now: Instant) -> Lsn {
        self.position(node, now, false)
    }

    fn position(&self, node: usize, now: Instant, applied: bool) -> Lsn {
        if node == self.primary && self.nodes[node].up {
            return self.commit_lsn();
        }
        let n = &self.nodes[node];
        if let Some(l) = n.frozen_replay {
            return l;
        }
        let delay_ms = self.send_ms + n.oneway_ms + if applied { n.apply_ms } else { 0.0 };
        let mut horizon = now - std::time::Duration::from_secs_f64(delay_ms / 1e3);
        if let Some(cut) = self.cutoff {
            horizon = horizon.min(cut - std::time::Duration::from_secs_f64(self.send_ms / 1e3));
        }
        // the log is in commit-time order
        let idx = self.log.partition_point(|c| c.at <= horizon);
        self.log[..idx].iter().rev().find(|c| c.lost.is_none()).map_or(Lsn(0), |c| c.lsn)
    }

    /// While the primary is down: the newest commit a node that is up has
    /// received. Later commits only the crashed primary has (WAL it had not
    /// sent, asynchronous replication): no read can show them until it
    /// comes back, and a promotion drops them. `None` while the primary is up.
    pub fn on_no_live_node(&self, now: Instant) -> Option<Lsn> {
        if self.nodes[self.primary].up {
            return None;
        }
        let live = (0..self.nodes.len()).filter(|&i| i != self.primary && self.nodes[i].up);
        Some(live.map(|i| self.received_lsn(i, now)).max().unwrap_or(Lsn(0)))
    }

    /// The commit at `lsn` (the log is in LSN order).
    fn commit(&self, lsn: Lsn) -> Option<&Commit> {
        let i = self.log.partition_point(|c| c.lsn < lsn);
        self.log.get(i).filter(|c| c.lsn == lsn)
    }

    /// The key the commit at `lsn` wrote, if it wrote one.
    pub fn key_of(&self, lsn: Lsn) -> Option<u64> {
        self.commit(lsn)?.key
    }

    /// The promotion that dropped the commit at `lsn`, if one did.
    pub fn lost_in(&self, lsn: Lsn) -> Option<u32> {
        self.commit(lsn).and_then(|c| c.lost)
    }

    pub fn is_lost(&self, lsn: Lsn) -> bool {
        self.lost_in(lsn).is_some()
    }

    /// Whether a snapshot at `snapshot` (a commit's LSN, as every snapshot
    /// in the model is) shows the commit at `write`. A snapshot of a history
    /// a promotion later dropped shows what was in that history; a snapshot
    /// of the history after the promotion does not show what it dropped,
    /// whatever its LSN.
    pub fn includes(&self, snapshot: Lsn, write: Lsn) -> bool {
        if write > snapshot {
            return false;
        }
        match (self.lost_in(write), self.lost_in(snapshot)) {
            (None, _) => true,
            (Some(_), None) => false,
            // both on a dropped history: the same one, or the write's outlived the snapshot's
            (Some(w), Some(s)) => s <= w,
        }
    }

    /// When a commit is acknowledged to its client at the earliest, in ms
    /// after it (synchronous: the standby's flush and its answer).
    pub fn ack_delay_ms(&self) -> f64 {
        match self.replication {
            Replication::Sync => 2.0 * self.nodes[self.sync_standby].oneway_ms,
            Replication::Async => 0.0,
        }
    }

    /// Whether the commit at `lsn`, made on `node`, has been acknowledged to
    /// its client by `now`: asynchronous at once (if the node is up to
    /// answer); synchronous (`synchronous_commit = on`) once the synchronous
    /// standby has received it and its answer has come back. A commit that
    /// no standby will receive (its node crashed and came back as a primary
    /// nobody follows) is never acknowledged.
    pub fn acknowledged(&self, node: usize, lsn: Lsn, now: Instant) -> bool {
        if !self.nodes[node].up {
            return false;
        }
        match self.replication {
            Replication::Async => true,
            Replication::Sync => {
                let s = self.sync_standby;
                let back = std::time::Duration::from_secs_f64(self.nodes[s].oneway_ms / 1e3);
                !self.is_lost(lsn) && s != node && self.received_lsn(s, now - back) >= lsn
            }
        }
    }

    /// Executes a write on `node` stamped with `epoch`: committed on the
    /// node (not yet acknowledged: see [`Self::acknowledged`]). Returns its
    /// identity and its WAL position.
    pub fn write(
        &mut self,
        node: usize,
        epoch: Epoch,
        now: Instant,
        key: Option<u64>,
    ) -> Result<(Lsn, Lsn), WriteError> {
        let n = &self.nodes[node];
        if !n.up {
            return Err(WriteError::Down);
        }
        n.fence.check_write(epoch).map_err(WriteError::Fenced)?;
        let followed = node == self.primary;
        if followed
            && self.replication == Replication::Sync
            && (!self.nodes[self.sync_standby].up || self.sync_standby == node)
        {
            // synchronous_standby_names = 'ANY 1 (...)': the nearest live replica
            self.sync_standby = self.nearest_standby(node).ok_or(WriteError::NoSyncStandby)?;
        }
        let lsn = Lsn(self.next_lsn);
        self.next_lsn += 1;
        // a node the others no longer follow (an ex-primary not yet fenced
        // after a promotion) commits on a history that is already gone
        let lost = (!followed).then_some(self.timeline);
        // a node nobody follows writes positions the history goes on to
        // give to other commits
        let pos = Lsn(self.next_pos);
        if followed {
            self.next_pos += 1;
            if let Some(tl) = self.timelines.last_mut() {
                tl.ids.push(lsn);
            }
        }
        self.log.push(Commit { lsn, pos, at: now, key, lost });
        self.accepted.push((epoch, node));
        Ok((lsn, pos))
    }

    pub fn crash(&mut self, node: usize, now: Instant) {
        // (an ex-primary that came back and nobody follows keeps the cutoff
        // of its first crash)
        if node == self.primary && self.cutoff.is_none() {
            self.cutoff = Some(now);
        }
        let replay = self.replay_lsn(node, now);
        let n = &mut self.nodes[node];
        n.up = false;
        n.frozen_replay = Some(replay);
        n.crashed_at = Some(now);
    }

    pub fn restart(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.up = true;
        // a restarted replica catches up by streaming; an ex-primary keeps its
        // old fence until the controller tells it otherwise
        n.frozen_replay = None;
    }

    /// The crashed primary came back before anyone replaced it: the
    /// replicas reconnect and stream from it again (what it had not sent
    /// before the crash is in its WAL and follows).
    pub fn resume_streaming(&mut self) {
        self.cutoff = None;
    }

    /// Promotes `node`: commits it never received are dropped from the
    /// history. Returns them: (LSN, commit time).
    pub fn promote(&mut self, node: usize, epoch: Epoch, now: Instant) -> Vec<(Lsn, Instant)> {
        let have = self.received_lsn(node, now);
        // the new timeline's positions follow the promoted node's
        let fork = self.pos_of(have).0;
        self.next_pos = fork + 1;
        self.timelines.push(TimelineLog { fork, ids: Vec::new() });
        self.timeline += 1;
        let mut lost = Vec::new();
        for c in self.log.iter_mut() {
            if c.lsn > have && c.lost.is_none() {
                c.lost = Some(self.timeline);
                lost.push((c.lsn, c.at));
            }
        }
        let old = self.primary;
        self.nodes[old].needs_rejoin = true;
        self.nodes[node].fence.handle_epoch(epoch, true);
        self.nodes[node].frozen_replay = None;
        self.primary = node;
        self.cutoff = None;
        // every other node now follows the new primary from `have` on, at
        // the new primary's distance
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if i != node && n.frozen_replay.is_some_and(|l| l > have) {
                n.frozen_replay = Some(have);
            }
            n.oneway_ms = self.links_ms[node][i];
        }
        self.sync_standby = self.nearest_standby(node).unwrap_or(node);
        lost
    }

    fn nearest_standby(&self, primary: usize) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|&i| i != primary && self.nodes[i].up && !self.nodes[i].needs_rejoin)
            .min_by(|&a, &b| self.nodes[a].oneway_ms.total_cmp(&self.nodes[b].oneway_ms))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("node is down")]
    Down,
    #[error("{0}")]
    Fenced(FenceError),
    #[error("synchronous standby unavailable")]
    NoSyncStandby,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// A primary, its standby 1 ms away and a replica 50 ms away.
    fn db(replication: Replication) -> Database {
        let node = |name: &str, primary: bool| DbNode {
            name: name.into(),
            zone: Zone::Us,
            lat: 0.0,
            lon: 0.0,
            up: true,
            fence: Fence { epoch: Epoch(1), is_primary: primary },
            oneway_ms: 0.0,
            apply_ms: 5.0,
            frozen_replay: None,
            needs_rejoin: false,
            crashed_at: None,
        };
        let links = vec![vec![0.0, 1.0, 50.0], vec![1.0, 0.0, 50.0], vec![50.0, 50.0, 0.0]];
        Database::new(replication, vec![node("p", true), node("s", false), node("r", false)], links, 0, 1)
    }

    #[test]
    fn a_synchronous_commit_is_acknowledged_once_the_standby_has_it() {
        let mut d = db(Replication::Sync);
        let lsn = d.write(0, Epoch(1), at(1_000), Some(1)).expect("the primary writes").0;
        assert!(!d.acknowledged(0, lsn, at(1_000)), "not at commit");
        assert!(!d.acknowledged(0, lsn, at(1_001)), "the standby has it, its answer is on its way");
        assert!(d.acknowledged(0, lsn, at(1_002)));
        let mut a = db(Replication::Async);
        let lsn = a.write(0, Epoch(1), at(1_000), Some(1)).expect("the primary writes").0;
        assert!(a.acknowledged(0, lsn, at(1_000)), "asynchronous: at once");
    }

    /// Issue 13: the primary crashes, its failure is declared, and it comes
    /// back before the promotion completes; what it commits then reaches no
    /// standby: never acknowledged, and dropped by the promotion.
    #[test]
    fn a_primary_back_during_its_replacement_commits_nothing_acknowledged() {
        let mut d = db(Replication::Sync);
        let before = d.write(0, Epoch(1), at(1_000), Some(1)).expect("writes").0;
        d.crash(0, at(2_000));
        d.restart(0);
        let after = d.write(0, Epoch(1), at(8_000), Some(2)).expect("an old-epoch primary accepts").0;
        assert!(d.acknowledged(0, before, at(8_100)));
        assert!(!d.acknowledged(0, after, at(9_000)), "no standby receives it");
        let lost = d.promote(1, Epoch(2), at(9_000));
        assert_eq!(lost, vec![(after, at(8_000))]);
        assert!(d.is_lost(after) && !d.is_lost(before));
        // the old primary, not yet fenced, commits on a history that is gone
        let later = d.write(0, Epoch(1), at(9_100), Some(3)).expect("not yet fenced").0;
        assert!(d.is_lost(later) && !d.acknowledged(0, later, at(10_000)));
    }

    /// Found by the swarm (seed 56): the returning ex-primary crashed again
    /// and its second crash moved the cutoff, so the promoted standby
    /// "received" what it committed while nobody followed it.
    #[test]
    fn a_second_crash_of_a_primary_nobody_follows_keeps_the_first_cutoff() {
        let mut d = db(Replication::Async);
        d.crash(0, at(2_000));
        d.restart(0);
        let after = d.write(0, Epoch(1), at(8_000), Some(2)).expect("an old-epoch primary accepts").0;
        d.crash(0, at(8_500));
        assert_eq!(d.promote(1, Epoch(2), at(9_000)), vec![(after, at(8_000))]);
    }

    #[test]
    fn a_primary_back_before_anyone_replaced_it_is_followed_again() {
        let mut d = db(Replication::Sync);
        d.crash(0, at(2_000));
        d.restart(0);
        d.resume_streaming();
        let lsn = d.write(0, Epoch(1), at(3_000), Some(1)).expect("writes").0;
        assert!(d.acknowledged(0, lsn, at(3_002)));
        assert_eq!(d.received_lsn(2, at(3_050)), lsn, "the replica streams from it again");
    }

    /// After a promotion dropped a write, a snapshot of the new history
    /// does not show it whatever its LSN (the new history's LSNs are
    /// higher); a snapshot of the old history taken before did.
    #[test]
    fn a_higher_lsn_after_a_loss_does_not_show_the_lost_write() {
        let mut d = db(Replication::Async);
        let kept = d.write(0, Epoch(1), at(1_000), Some(1)).expect("writes").0;
        let lost = d.write(0, Epoch(1), at(1_995), Some(1)).expect("writes").0;
        d.crash(0, at(2_000));
        assert_eq!(d.promote(1, Epoch(2), at(8_000)), vec![(lost, at(1_995))]);
        let newer = d.write(1, Epoch(2), at(8_100), Some(1)).expect("the new primary writes").0;
        assert!(newer > lost);
        assert!(!d.includes(newer, lost), "the new history does not have it");
        assert!(d.includes(lost, lost), "a snapshot of the old history had it");
        assert!(d.includes(newer, kept) && d.includes(lost, kept));
        assert!(!d.includes(kept, lost));
    }

    #[test]
    fn a_promotion_measures_delays_from_the_new_primary() {
        let mut d = db(Replication::Sync);
        d.crash(0, at(1_000));
        d.promote(2, Epoch(2), at(8_000));
        assert_eq!(d.nodes[1].oneway_ms, 50.0);
        assert_eq!(d.sync_standby, 1, "the nearest live replica that did not diverge");
        assert_eq!(d.ack_delay_ms(), 100.0);
    }

    /// A lossy promotion: the new timeline gives the positions of the lost
    /// commits to new ones; each timeline's history reads a position back
    /// to its own commit, the positions up to the fork to the common one.
    #[test]
    fn a_new_timeline_reuses_the_positions_of_what_it_lost() {
        let mut d = db(Replication::Async);
        let kept = d.write(0, Epoch(1), at(1_000), Some(1)).expect("writes");
        let lost = d.write(0, Epoch(1), at(1_995), Some(1)).expect("writes");
        d.crash(0, at(2_000));
        d.promote(1, Epoch(2), at(8_000));
        let newer = d.write(1, Epoch(2), at(8_100), Some(1)).expect("the new primary writes");
        assert_eq!(kept.1, Lsn(1));
        assert_eq!(lost.1, Lsn(2));
        assert_eq!(newer.1, Lsn(2), "the lost commit's position, given again");
        assert_ne!(newer.0, lost.0, "a new identity");
        assert_eq!(d.id_at(0, Lsn(2)), Some(lost.0));
        assert_eq!(d.id_at(1, Lsn(2)), Some(newer.0));
        assert_eq!(d.id_at(1, Lsn(1)), Some(kept.0), "the common history");
        assert_eq!(d.id_at(1, Lsn(3)), None);
        assert_eq!(d.commit_pos(), Lsn(2));
        assert_eq!(d.pos_of(newer.0), Lsn(2));
    }
}

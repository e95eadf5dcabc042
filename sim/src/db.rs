//! A modelled PostgreSQL: a commit log with LSNs, replicas that replay it with
//! lag, synchronous or asynchronous replication, crash and promotion. Each
//! acknowledged commit survives exactly when the replication mode says it must.

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
    pub lsn: Lsn,
    pub at: Instant,
    pub key: Option<u64>,
    /// Lost in a failover (never acknowledged if replication was synchronous).
    pub lost: bool,
}

#[derive(Clone, Debug)]
pub struct DbNode {
    pub name: String,
    pub zone: Zone,
    pub lat: f64,
    pub lon: f64,
    pub up: bool,
    pub fence: Fence,
    /// One-way network delay from the primary, in ms.
    pub oneway_ms: f64,
    /// Time to replay a received record, in ms.
    pub apply_ms: f64,
    /// Highest LSN this node holds durably (for a replica: what it replayed
    /// when it was last up, frozen while down).
    pub frozen_replay: Option<Lsn>,
    /// This node was primary up to this LSN and its later commits are not in
    /// the current history (it must rejoin before serving again).
    pub needs_rejoin: bool,
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
    /// The primary crashed here: WAL not sent by then never arrives anywhere.
    pub cutoff: Option<Instant>,
}

impl Database {
    pub fn new(replication: Replication, nodes: Vec<DbNode>, primary: usize, sync_standby: usize) -> Self {
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
                Replication::Async => 10.0,
            },
            cutoff: None,
        }
    }

    pub fn commit_lsn(&self) -> Lsn {
        self.log.iter().rev().find(|c| !c.lost).map_or(Lsn(0), |c| c.lsn)
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
        self.log[..idx].iter().rev().find(|c| !c.lost).map_or(Lsn(0), |c| c.lsn)
    }

    /// When a commit at `at` is acknowledged to its client (synchronous:
    /// after the standby's flush).
    pub fn ack_delay_ms(&self) -> f64 {
        match self.replication {
            Replication::Sync => 2.0 * self.nodes[self.sync_standby].oneway_ms,
            Replication::Async => 0.0,
        }
    }

    /// Executes a write on `node` stamped with `epoch`.
    pub fn write(&mut self, node: usize, epoch: Epoch, now: Instant, key: Option<u64>) -> Result<Lsn, WriteError> {
        let n = &self.nodes[node];
        if !n.up {
            return Err(WriteError::Down);
        }
        n.fence.check_write(epoch).map_err(WriteError::Fenced)?;
        if self.replication == Replication::Sync && (!self.nodes[self.sync_standby].up || self.sync_standby == node) {
            // synchronous_standby_names = 'ANY 1 (...)': the nearest live replica
            self.sync_standby = self.nearest_standby(node).ok_or(WriteError::NoSyncStandby)?;
        }
        let lsn = Lsn(self.next_lsn);
        self.next_lsn += 1;
        self.log.push(Commit { lsn, at: now, key, lost: false });
        self.accepted.push((epoch, node));
        Ok(lsn)
    }

    pub fn crash(&mut self, node: usize, now: Instant) {
        if node == self.primary {
            self.cutoff = Some(now);
        }
        let replay = self.replay_lsn(node, now);
        let n = &mut self.nodes[node];
        n.up = false;
        n.frozen_replay = Some(replay);
    }

    pub fn restart(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.up = true;
        // a restarted replica catches up by streaming; an ex-primary keeps its
        // old fence until the controller tells it otherwise
        n.frozen_replay = None;
    }

    /// Promotes `node`: commits it never received are lost from the history.
    /// Returns the number of lost commits.
    pub fn promote(&mut self, node: usize, epoch: Epoch, now: Instant) -> Vec<Lsn> {
        let have = self.received_lsn(node, now);
        let mut lost = Vec::new();
        for c in self.log.iter_mut() {
            if c.lsn > have && !c.lost {
                c.lost = true;
                lost.push(c.lsn);
            }
        }
        let old = self.primary;
        self.nodes[old].needs_rejoin = true;
        self.nodes[node].fence.handle_epoch(epoch, true);
        self.nodes[node].frozen_replay = None;
        self.primary = node;
        self.cutoff = None;
        // every other node now follows the new primary from `have` on
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if i != node && n.frozen_replay.is_some_and(|l| l > have) {
                n.frozen_replay = Some(have);
            }
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

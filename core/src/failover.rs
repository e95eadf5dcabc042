//! Primary failure detection and promotion. Heartbeats carry each database
//! node's LSN; when the primary is silent past the timeout, the most caught-up
//! reachable replica is promoted in a new epoch, and the old primary is fenced:
//! a write stamped with an older epoch is refused.

use std::collections::VecDeque;

use crate::router::EndpointId;
use crate::{Duration, Instant, Lsn};

/// A term of primaryship. Strictly increasing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Epoch(pub u64);

#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// Primary silence after which it is declared failed.
    pub heartbeat_timeout: Duration,
    /// How long a promotion may take before another candidate is tried.
    pub promote_timeout: Duration,
    pub nodes_max: usize,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            heartbeat_timeout: Duration::from_secs(10),
            promote_timeout: Duration::from_secs(10),
            nodes_max: 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverOutput {
    /// Promote `node` to primary in `epoch` (pg_promote()).
    Promote { node: EndpointId, epoch: Epoch },
    /// `node` must no longer accept writes (it is a former primary).
    Fence { node: EndpointId, epoch: Epoch },
    /// Re-point every route: `primary` accepts writes stamped with `epoch`.
    RoutesChanged { primary: EndpointId, epoch: Epoch },
    /// No candidate could be promoted.
    NoCandidate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Healthy,
    Promoting { node: EndpointId, since: Instant },
}

#[derive(Clone, Debug)]
struct Node {
    id: EndpointId,
    last_seen: Option<Instant>,
    lsn: Lsn,
    /// Excluded from promotion (fenced, or a failed promotion).
    excluded: bool,
}

#[derive(Debug)]
pub struct FailoverController {
    config: FailoverConfig,
    nodes: Vec<Node>,
    primary: EndpointId,
    epoch: Epoch,
    state: State,
    outputs: VecDeque<FailoverOutput>,
    started: Instant,
}

impl FailoverController {
    pub fn new(config: FailoverConfig, now: Instant, primary: EndpointId, replicas: &[EndpointId]) -> Self {
        assert!(replicas.len() < config.nodes_max, "more database nodes than nodes_max");
        let mut nodes = vec![Node { id: primary, last_seen: None, lsn: Lsn(0), excluded: false }];
        nodes.extend(replicas.iter().map(|&id| Node { id, last_seen: None, lsn: Lsn(0), excluded: false }));
        FailoverController {
            config,
            nodes,
            primary,
            epoch: Epoch(1),
            state: State::Healthy,
            outputs: VecDeque::new(),
            started: now,
        }
    }

    pub fn primary(&self) -> EndpointId {
        self.primary
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn is_promoting(&self) -> bool {
        matches!(self.state, State::Promoting { .. })
    }

    /// A heartbeat from `node` with its current LSN (flush LSN on the primary,
    /// receive/replay LSN on a replica).
    pub fn handle_heartbeat(&mut self, now: Instant, node: EndpointId, lsn: Lsn) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.id == node) {
            n.last_seen = Some(now);
            n.lsn = n.lsn.max(lsn);
        }
    }

    /// The promoted node confirmed it accepts writes in `epoch`.
    pub fn handle_promoted(&mut self, _now: Instant, node: EndpointId, epoch: Epoch) {
        if let State::Promoting { node: n, .. } = self.state
            && n == node
            && epoch == self.epoch
        {
            self.state = State::Healthy;
            self.outputs.push_back(FailoverOutput::RoutesChanged { primary: node, epoch });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Healthy => {
                let last =
                    self.nodes.iter().find(|n| n.id == self.primary).and_then(|n| n.last_seen).unwrap_or(self.started);
                Some(last + self.config.heartbeat_timeout)
            }
            State::Promoting { since, .. } => Some(since + self.config.promote_timeout),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Healthy => {
                let last =
                    self.nodes.iter().find(|n| n.id == self.primary).and_then(|n| n.last_seen).unwrap_or(self.started);
                if now.saturating_since(last) >= self.config.heartbeat_timeout {
                    let old = self.primary;
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.id == old) {
                        n.excluded = true;
                    }
                    self.promote_next(now, old);
                }
            }
            State::Promoting { node, since } => {
                if now.saturating_since(since) >= self.config.promote_timeout {
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.id == node) {
                        n.excluded = true;
                    }
                    self.promote_next(now, node);
                }
            }
        }
    }

    fn promote_next(&mut self, now: Instant, previous: EndpointId) {
        // most caught-up live replica; ties to the lowest id (deterministic)
        let horizon = self.config.heartbeat_timeout;
        let candidate = self
            .nodes
            .iter()
            .filter(|n| !n.excluded && n.last_seen.is_some_and(|t| now.saturating_since(t) < horizon))
            .max_by(|a, b| a.lsn.cmp(&b.lsn).then(b.id.cmp(&a.id)))
            .map(|n| n.id);
        let Some(node) = candidate else {
            self.outputs.push_back(FailoverOutput::NoCandidate);
            // try again after another timeout
            self.state = State::Promoting { node: previous, since: now };
            return;
        };
        self.epoch = Epoch(self.epoch.0 + 1);
        self.outputs.push_back(FailoverOutput::Fence { node: previous, epoch: self.epoch });
        self.outputs.push_back(FailoverOutput::Promote { node, epoch: self.epoch });
        self.primary = node;
        self.state = State::Promoting { node, since: now };
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<FailoverOutput> {
        self.outputs.pop_front()
    }
}

/// The write fence a database node (or the proxy in front of it) applies: it
/// accepts a write only when it is the primary of exactly the write's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub epoch: Epoch,
    pub is_primary: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("write refused: node is not a primary")]
    NotPrimary,
    #[error("write refused: stamped with epoch {write:?}, node is in epoch {node:?}")]
    StaleEpoch { write: Epoch, node: Epoch },
}

impl Fence {
    pub fn check_write(&self, write_epoch: Epoch) -> Result<(), FenceError> {
        if !self.is_primary {
            return Err(FenceError::NotPrimary);
        }
        if write_epoch != self.epoch {
            return Err(FenceError::StaleEpoch { write: write_epoch, node: self.epoch });
        }
        Ok(())
    }

    /// A fence or promotion message: never moves back in epochs.
    pub fn handle_epoch(&mut self, epoch: Epoch, is_primary: bool) {
        if epoch >= self.epoch {
            self.epoch = epoch;
            self.is_primary = is_primary;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(c: &mut FailoverController) -> Vec<FailoverOutput> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    #[test]
    fn promotes_most_caught_up() {
        let t0 = Instant::ZERO;
        let (p, r1, r2) = (EndpointId(0), EndpointId(1), EndpointId(2));
        let mut c = FailoverController::new(FailoverConfig::default(), t0, p, &[r1, r2]);
        c.handle_heartbeat(t0, p, Lsn(100));
        c.handle_heartbeat(t0, r1, Lsn(90));
        c.handle_heartbeat(t0, r2, Lsn(99));
        let t1 = t0 + Duration::from_secs(5);
        c.handle_heartbeat(t1, r1, Lsn(95));
        c.handle_heartbeat(t1, r2, Lsn(100));
        c.handle_timeout(t1);
        assert!(drain(&mut c).is_empty());
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(c.poll_timeout(), Some(t2));
        c.handle_timeout(t2);
        assert_eq!(
            drain(&mut c),
            vec![
                FailoverOutput::Fence { node: p, epoch: Epoch(2) },
                FailoverOutput::Promote { node: r2, epoch: Epoch(2) }
            ]
        );
        c.handle_promoted(t2, r2, Epoch(2));
        assert_eq!(drain(&mut c), vec![FailoverOutput::RoutesChanged { primary: r2, epoch: Epoch(2) }]);
        assert_eq!(c.primary(), r2);
    }

    #[test]
    fn fence_refuses_old_epochs() {
        let mut f = Fence { epoch: Epoch(1), is_primary: true };
        assert!(f.check_write(Epoch(1)).is_ok());
        f.handle_epoch(Epoch(2), false);
        assert_eq!(f.check_write(Epoch(1)), Err(FenceError::NotPrimary));
        f.handle_epoch(Epoch(1), true);
        assert!(!f.is_primary, "an old epoch never re-arms a fence");
        let g = Fence { epoch: Epoch(3), is_primary: true };
        assert_eq!(g.check_write(Epoch(2)), Err(FenceError::StaleEpoch { write: Epoch(2), node: Epoch(3) }));
    }
}

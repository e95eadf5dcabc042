//! The database nodes behind the proxy: which one is the primary, how far
//! each replica has replayed, and failover. A health task checks every node
//! on an interval and drives the core's `Router` (read routing with replay-LSN
//! floors, breakers) and `FailoverController` (promotion of the most
//! caught-up replica in a new epoch, fencing of the old primary). The task
//! does the I/O (`pg_promote()`, fencing a returning ex-primary); the
//! decisions are the core's.

use postai_core::failover::{Epoch, FailoverConfig, FailoverController, FailoverOutput};
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::{Duration, Instant, Lsn};

/// The weight the router gives the primary as a read endpoint: higher than any
/// replica's latency, so a fresh replica always wins and the primary answers
/// reads only when no replica has replayed far enough (or none is healthy).
const PRIMARY_READ_COST: Duration = Duration::from_secs(1);

/// One database node as configured.
#[derive(Clone, Debug)]
pub struct DbNode {
    pub id: EndpointId,
    pub addr: String,
    /// A former primary: never routed to again.
    pub fenced: bool,
}

/// Routing state shared by every connection (behind the proxy's mutex).
#[derive(Debug)]
pub struct Topology {
    nodes: Vec<DbNode>,
    router: Router,
    failover: Option<FailoverController>,
    primary: EndpointId,
    epoch: Epoch,
    /// The primary was fenced (a failover began): no write goes to it any
    /// more, even before the promotion completes (an old primary that comes
    /// back meanwhile would accept writes the promotion then drops).
    primary_fenced: bool,
    /// The replica being promoted.
    promoting: Option<EndpointId>,
    /// Bumped whenever writes move (fence, promotion): a session connected
    /// to the primary under an older value must not write there again.
    primary_generation: u64,
    /// Promotions completed.
    pub failovers: u64,
    /// Reads answered by a replica (cache misses routed off the primary).
    pub replica_reads: u64,
    /// Ex-primaries made read-only when they came back.
    pub fenced_returns: u64,
    /// The timeline the current primary writes, once its check said.
    primary_timeline: Option<u32>,
}

/// Where a read goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRoute {
    pub id: EndpointId,
    pub addr: String,
    /// The replica has replayed at least this far (the result's snapshot).
    pub replayed: Lsn,
}

impl Topology {
    pub fn new(primary: &str, replicas: &[String], failover: Option<FailoverConfig>, now: Instant) -> Topology {
        let mut nodes = vec![DbNode { id: EndpointId(0), addr: primary.to_string(), fenced: false }];
        for (i, r) in replicas.iter().enumerate() {
            nodes.push(DbNode { id: EndpointId(i as u32 + 1), addr: r.clone(), fenced: false });
        }
        let mut router = Router::new(RouterConfig { endpoints_max: nodes.len().max(1), ..RouterConfig::default() }, 1);
        for n in &nodes {
            let role = if n.id == EndpointId(0) { Role::Primary } else { Role::Replica };
            // one zone: the proxy's replicas are all "near"; residency is the sim's concern
            let guess = if role == Role::Primary { PRIMARY_READ_COST.as_secs_f64() * 1e3 } else { 1.0 };
            let _ = router.add_endpoint(n.id, Zone::Eu, role, guess);
        }
        let ids: Vec<EndpointId> = nodes.iter().skip(1).map(|n| n.id).collect();
        let failover = failover.filter(|_| !ids.is_empty()).map(|c| {
            FailoverController::new(FailoverConfig { nodes_max: nodes.len() + 1, ..c }, now, EndpointId(0), &ids)
        });
        Topology {
            nodes,
            router,
            failover,
            primary: EndpointId(0),
            epoch: Epoch(1),
            primary_fenced: false,
            promoting: None,
            primary_generation: 0,
            failovers: 0,
            replica_reads: 0,
            fenced_returns: 0,
            primary_timeline: None,
        }
    }

    /// Where writes go: the primary; during a failover the replica being
    /// promoted (writes fail read-only there until it is promoted, but never
    /// reach the fenced old primary).
    pub fn primary_addr(&self) -> String {
        self.write_target().and_then(|id| self.addr(id)).unwrap_or_default()
    }

    /// The node writes go to; none while the primary is fenced and no
    /// replica is being promoted (writes fail: the old one may not take them).
    fn write_target(&self) -> Option<EndpointId> {
        if self.primary_fenced { self.promoting } else { Some(self.primary) }
    }

    /// Changes whenever writes move to another node (see `primary_generation`).
    pub fn primary_generation(&self) -> u64 {
        self.primary_generation
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn nodes(&self) -> &[DbNode] {
        &self.nodes
    }

    fn addr(&self, id: EndpointId) -> Option<String> {
        self.nodes.iter().find(|n| n.id == id).map(|n| n.addr.clone())
    }

    /// A replica that has replayed past `floor`, or `None`: use the primary.
    pub fn route_read(&mut self, now: Instant, floor: Option<Lsn>) -> Option<ReplicaRoute> {
        let id = self.router.route_read(now, ReadRequest { residency: None, floor, strong: false }).ok()?;
        if id == self.primary {
            self.router.handle_result(now, id, Ok(PRIMARY_READ_COST));
            return None;
        }
        let replayed = self.router.endpoints().iter().find(|e| e.id == id).map(|e| e.replay_lsn)?;
        Some(ReplicaRoute { id, addr: self.addr(id)?, replayed })
    }

    /// The outcome of a read routed to a replica.
    pub fn read_done(&mut self, now: Instant, id: EndpointId, result: Result<Duration, ()>) {
        if result.is_ok() {
            self.replica_reads += 1;
        }
        self.router.handle_result(now, id, result);
    }

    /// A health check of `id` answered in `took`: at `lsn`, on `timeline`
    /// (a replica's: the one it receives, `None` when it receives none). A
    /// replica that does not follow the primary's timeline (cut off from
    /// it, or diverged past where the promotion began) takes no reads: what
    /// it holds may be commits the failover lost.
    pub fn checked(&mut self, now: Instant, id: EndpointId, lsn: Lsn, timeline: Option<u32>, took: Duration) {
        if id == self.primary {
            self.primary_timeline = timeline.or(self.primary_timeline);
        } else if timeline.is_none() || timeline != self.primary_timeline {
            if let Some(f) = self.failover.as_mut() {
                f.handle_heartbeat(now, id, lsn);
            }
            return self.unhealthy(now, id);
        }
        self.healthy(now, id, lsn, took);
    }

    /// A health check of `id` answered in `took`: at `lsn`.
    fn healthy(&mut self, now: Instant, id: EndpointId, lsn: Lsn, took: Duration) {
        self.router.handle_replay_lsn(id, lsn);
        let latency = if id == self.primary { PRIMARY_READ_COST } else { took };
        self.router.handle_result(now, id, Ok(latency));
        if let Some(f) = self.failover.as_mut() {
            f.handle_heartbeat(now, id, lsn);
        }
    }

    pub fn unhealthy(&mut self, now: Instant, id: EndpointId) {
        // a silent node takes no client reads until a check succeeds again
        for _ in 0..RouterConfig::default().failures_to_open {
            self.router.handle_result(now, id, Err(()));
        }
    }

    /// Advances the failover controller; returns what the health task must do.
    pub fn poll_failover(&mut self, now: Instant) -> Vec<FailoverOutput> {
        let Some(f) = self.failover.as_mut() else { return Vec::new() };
        if f.poll_timeout().is_some_and(|t| now >= t) {
            f.handle_timeout(now);
        }
        let mut out = Vec::new();
        while let Some(o) = f.poll_output() {
            out.push(o);
        }
        for o in &out {
            let before = self.write_target();
            match o {
                FailoverOutput::Fence { node, .. } => {
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.id == *node) {
                        n.fenced = true;
                    }
                    self.router.remove_endpoint(*node);
                    if *node == self.primary {
                        self.primary_fenced = true;
                    }
                    if self.promoting == Some(*node) {
                        // a promotion that did not finish in time: its
                        // candidate is fenced like an old primary
                        self.promoting = None;
                    }
                }
                FailoverOutput::Promote { node, .. } => self.promoting = Some(*node),
                FailoverOutput::RoutesChanged { primary, epoch } => {
                    // the new primary's timeline reuses the positions of
                    // whatever the old one lost: replicas are routed to
                    // again once they follow it, at positions on it
                    self.router.forget_positions();
                    self.primary_timeline = None;
                    self.router.set_primary(*primary);
                    self.primary = *primary;
                    self.epoch = *epoch;
                    self.primary_fenced = false;
                    self.promoting = None;
                    self.failovers += 1;
                }
                FailoverOutput::NoCandidate => {}
            }
            // a session whose connection is to where writes went before
            // must not write there again (a session that connected to the
            // candidate while it was promoted keeps its connection)
            if self.write_target() != before {
                self.primary_generation += 1;
            }
        }
        out
    }

    /// A health check found `node` out of recovery: if it is the replica
    /// being promoted, its promotion is done (`pg_promote` may have given up
    /// waiting while the promotion went on).
    pub fn out_of_recovery(&mut self, now: Instant, node: EndpointId) {
        if self.promoting == Some(node)
            && let Some(epoch) = self.failover.as_ref().map(|f| f.epoch())
        {
            self.promoted(now, node, epoch);
        }
    }

    pub fn promoted(&mut self, now: Instant, node: EndpointId, epoch: Epoch) {
        if let Some(f) = self.failover.as_mut() {
            f.handle_promoted(now, node, epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary and one replica, failover after 100 ms of silence.
    fn one_replica() -> Topology {
        let fo = FailoverConfig {
            heartbeat_timeout: Duration::from_millis(100),
            promote_timeout: Duration::from_secs(10),
            nodes_max: 3,
        };
        let mut t = Topology::new("p:1", &["r:2".to_string()], Some(fo), Instant::ZERO);
        t.healthy(Instant::ZERO, EndpointId(1), Lsn(5), Duration::from_millis(1));
        t
    }

    #[test]
    fn writes_leave_a_fenced_primary_before_the_promotion_completes() {
        let mut t = one_replica();
        assert_eq!(t.primary_addr(), "p:1");
        let g = t.primary_generation();
        // the primary is silent past the timeout: fenced, the replica promoted
        let later = Instant::from_millis(1000);
        t.healthy(later, EndpointId(1), Lsn(5), Duration::from_millis(1));
        let out = t.poll_failover(later);
        assert!(out.iter().any(|o| matches!(o, FailoverOutput::Promote { .. })), "{out:?}");
        assert_eq!(t.primary_addr(), "r:2", "writes go to the replica being promoted, not the old primary");
        assert_ne!(t.primary_generation(), g, "sessions on the old primary stop writing");
    }

    #[test]
    fn a_candidate_that_does_not_promote_in_time_is_left_like_an_old_primary() {
        let fo = FailoverConfig {
            heartbeat_timeout: Duration::from_millis(100),
            promote_timeout: Duration::from_secs(10),
            nodes_max: 4,
        };
        let replicas = ["r:2".to_string(), "s:3".to_string()];
        let mut t = Topology::new("p:1", &replicas, Some(fo), Instant::ZERO);
        let seen = |t: &mut Topology, at: Instant| {
            t.healthy(at, EndpointId(1), Lsn(6), Duration::from_millis(1));
            t.healthy(at, EndpointId(2), Lsn(5), Duration::from_millis(1));
        };
        seen(&mut t, Instant::ZERO);
        let at = Instant::from_millis(1000);
        seen(&mut t, at);
        t.poll_failover(at);
        assert_eq!(t.primary_addr(), "r:2", "the most caught-up replica first");
        let g = t.primary_generation();
        // its promotion does not finish: the next candidate, and sessions
        // that connected to the first one while it was promoted stop writing
        let at = Instant::from_millis(11_050);
        t.healthy(at, EndpointId(2), Lsn(5), Duration::from_millis(1));
        let out = t.poll_failover(at);
        let epoch = out.iter().find_map(|o| match o {
            FailoverOutput::Promote { node, epoch } if *node == EndpointId(2) => Some(*epoch),
            _ => None,
        });
        assert_eq!(t.primary_addr(), "s:3", "{out:?}");
        assert_ne!(t.primary_generation(), g);
        let g = t.primary_generation();
        // its promotion completes: writes stay where they went, sessions keep
        // their connections
        t.promoted(at, EndpointId(2), epoch.unwrap_or_default());
        let out = t.poll_failover(at);
        assert!(out.iter().any(|o| matches!(o, FailoverOutput::RoutesChanged { .. })), "{out:?}");
        assert_eq!((t.primary_addr().as_str(), t.primary_generation()), ("s:3", g));
    }

    #[test]
    fn a_late_promotion_completes_the_failover() {
        let mut t = one_replica();
        let at = Instant::from_millis(1000);
        t.healthy(at, EndpointId(1), Lsn(5), Duration::from_millis(1));
        t.poll_failover(at);
        assert_eq!(t.primary_addr(), "r:2");
        // the promotion takes longer than its timeout and no other replica
        // can be promoted: writes wait for it, never on the old primary
        let at = Instant::from_millis(11_050);
        let out = t.poll_failover(at);
        assert!(out.iter().any(|o| matches!(o, FailoverOutput::NoCandidate)), "{out:?}");
        assert_eq!(t.primary_addr(), "r:2");
        let g = t.primary_generation();
        // it comes out of recovery late: that is its promotion
        t.out_of_recovery(at, EndpointId(1));
        let out = t.poll_failover(at);
        assert!(out.iter().any(|o| matches!(o, FailoverOutput::RoutesChanged { .. })), "{out:?}");
        assert_eq!((t.primary_addr().as_str(), t.primary_generation(), t.failovers), ("r:2", g, 1));
    }
}

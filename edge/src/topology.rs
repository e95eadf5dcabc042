//! The database nodes behind the proxy: which one is the primary, how far
//! each replica has replayed, and failover. A health task checks every node
//! on an interval and drives the core's `Router` (read routing with replay-LSN
//! floors, breakers) and `FailoverController` (promotion of the most
//! caught-up replica in a new epoch, fencing of the old primary). The task
//! does the I/O (`pg_promote()`, fencing a returning ex-primary); the
//! decisions are the core's.

use std::sync::Arc;

use postai_core::failover::{Epoch, FailoverConfig, FailoverController, FailoverOutput};
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::{Duration, Instant, Lsn};

use crate::protocol;
use crate::proxy::Proxy;
use crate::upstream::{Conn, error_message};

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
    fn checked(&mut self, now: Instant, id: EndpointId, lsn: Lsn, timeline: Option<u32>, took: Duration) {
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

    fn unhealthy(&mut self, now: Instant, id: EndpointId) {
        // a silent node takes no client reads until a check succeeds again
        for _ in 0..RouterConfig::default().failures_to_open {
            self.router.handle_result(now, id, Err(()));
        }
    }

    /// Advances the failover controller; returns what the health task must do.
    fn poll_failover(&mut self, now: Instant) -> Vec<FailoverOutput> {
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
    fn out_of_recovery(&mut self, now: Instant, node: EndpointId) {
        if self.promoting == Some(node)
            && let Some(epoch) = self.failover.as_ref().map(|f| f.epoch())
        {
            self.promoted(now, node, epoch);
        }
    }

    fn promoted(&mut self, now: Instant, node: EndpointId, epoch: Epoch) {
        if let Some(f) = self.failover.as_mut() {
            f.handle_promoted(now, node, epoch);
        }
    }
}

/// In recovery, the replay or current LSN, and the timeline: a replica's
/// the one its WAL receiver streams (none when it streams nothing), the
/// primary's the one it writes (named by its current WAL file at once after
/// a promotion). Qualified: a database's search_path must not answer.
const HEALTH_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery()::pg_catalog.text, \
     (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
     ELSE pg_catalog.pg_current_wal_lsn() END)::pg_catalog.text, \
     (CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN (SELECT w.received_tli FROM pg_catalog.pg_stat_wal_receiver w WHERE w.status = 'streaming') \
     ELSE ('x' OPERATOR(pg_catalog.||) pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))\
     ::pg_catalog.bit(32)::pg_catalog.int4 END)::pg_catalog.text";

/// The health task: checks every node each `health_interval_ms`, feeds the
/// router and the failover controller, promotes and fences. Runs forever.
pub async fn run(proxy: Arc<Proxy>) {
    let cfg = proxy.config.failover.clone();
    let interval = std::time::Duration::from_millis(cfg.health_interval_ms);
    let timeout = std::time::Duration::from_millis(cfg.check_timeout_ms);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut followers = Followers::default();
    loop {
        let (nodes, generation) = {
            let t = proxy.topology();
            (t.nodes().to_vec(), t.primary_generation())
        };
        conns.resize_with(nodes.len(), || None);
        followers.recovering.clear();
        followers.recovering.resize(nodes.len(), false);
        for (i, n) in nodes.iter().enumerate() {
            let started = proxy.now();
            let checked = tokio::time::timeout(timeout, check(&proxy, &mut conns[i], &n.addr)).await;
            let now = proxy.now();
            match checked {
                Ok(Ok((in_recovery, lsn, timeline))) => {
                    followers.recovering[i] = in_recovery;
                    if n.fenced {
                        if !in_recovery && let Some(c) = conns[i].as_mut() {
                            fence(&proxy, c, &n.addr).await;
                        }
                        continue;
                    }
                    if !in_recovery {
                        proxy.saw_primary_lsn(generation, lsn);
                        proxy.topology().out_of_recovery(now, n.id);
                    }
                    proxy.topology().checked(now, n.id, lsn, timeline, now.saturating_since(started));
                }
                Ok(Err(_)) | Err(_) => {
                    conns[i] = None;
                    if !n.fenced {
                        proxy.topology().unhealthy(now, n.id);
                    }
                }
            }
        }
        let outputs = proxy.topology().poll_failover(proxy.now());
        for o in outputs {
            match o {
                FailoverOutput::Promote { node, epoch } => {
                    let i = nodes.iter().position(|n| n.id == node);
                    if let Some(c) = i.and_then(|i| conns[i].as_mut()) {
                        eprintln!(
                            "postai-edge: primary failed; promoting {} in epoch {}",
                            nodes[i.unwrap_or(0)].addr,
                            epoch.0
                        );
                        // bounded: a hung node must not stop the health task
                        // (a promotion finished later is seen by its check)
                        let wait = std::time::Duration::from_millis(cfg.promote_timeout_ms.min(60_000)) + timeout;
                        if let Ok(Ok(())) = tokio::time::timeout(wait, promote(c, wait)).await {
                            proxy.topology().promoted(proxy.now(), node, epoch);
                        }
                    }
                }
                FailoverOutput::RoutesChanged { primary, epoch } => {
                    // writes acknowledged by the old primary reached the new
                    // one (synchronous replication) but the CDC stream of the
                    // old one is gone: the cache restarts from the new stream
                    let now = proxy.now();
                    proxy.forget_cache(now);
                    let addr = nodes.iter().find(|n| n.id == primary).map(|n| n.addr.clone()).unwrap_or_default();
                    eprintln!("postai-edge: primary is now {addr} (epoch {})", epoch.0);
                }
                FailoverOutput::Fence { node, .. } => {
                    let addr = nodes.iter().find(|n| n.id == node).map(|n| n.addr.clone()).unwrap_or_default();
                    eprintln!("postai-edge: fenced {addr}: no request goes to it again");
                }
                FailoverOutput::NoCandidate => eprintln!("postai-edge: primary failed and no replica can be promoted"),
            }
        }
        followers.follow(&proxy, &nodes, &mut conns, timeout).await;
        tokio::time::sleep(interval).await;
    }
}

/// The replicas' upstream after a failover: each replica in recovery is
/// pointed at where writes go (the replica being promoted, then the new
/// primary: a cascading standby follows the promotion's timeline), so none
/// keeps following, and acknowledging, an old primary that comes back.
/// Retried on every round until it holds (a replica down at the failover is
/// pointed when it is back).
#[derive(Default)]
struct Followers {
    /// Per node: in recovery at this round's check.
    recovering: Vec<bool>,
    /// Per node: the address it was last pointed at (and the last one a
    /// failure was logged for).
    pointed: Vec<String>,
    warned: Vec<String>,
}

impl Followers {
    async fn follow(
        &mut self,
        proxy: &Proxy,
        nodes: &[DbNode],
        conns: &mut [Option<Conn>],
        timeout: std::time::Duration,
    ) {
        let (target, moved) = {
            let t = proxy.topology();
            (t.primary_addr(), t.primary_generation() > 0)
        };
        // before any failover the replicas' configuration is the operator's
        if !moved || target.is_empty() {
            return;
        }
        self.pointed.resize(nodes.len(), String::new());
        self.warned.resize(nodes.len(), String::new());
        for (i, n) in nodes.iter().enumerate() {
            if n.addr == target || self.pointed[i] == target || !self.recovering.get(i).copied().unwrap_or(false) {
                continue;
            }
            let Some(c) = conns.get_mut(i).and_then(|c| c.as_mut()) else { continue };
            let e = match tokio::time::timeout(timeout, repoint(c, &target)).await {
                Ok(Ok(())) => {
                    self.pointed[i] = target.clone();
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    conns[i] = None;
                    "timed out".to_string()
                }
            };
            if self.warned[i] != target {
                eprintln!("postai-edge: could not point {} at {target}: {e}; retrying", n.addr);
                self.warned[i] = target.clone();
            }
        }
    }
}

/// One health check: (in recovery, replay or current LSN, timeline).
async fn check(proxy: &Proxy, conn: &mut Option<Conn>, addr: &str) -> std::io::Result<(bool, Lsn, Option<u32>)> {
    if conn.is_none() {
        let cfg = &proxy.config.failover;
        *conn = Some(proxy.service_login(addr, &cfg.user, &cfg.database).await?);
    }
    let Some(c) = conn.as_mut() else { return Err(std::io::Error::other("no connection")) };
    let msgs = c.simple(HEALTH_SQL).await?;
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        return Err(std::io::Error::other(error_message(e)));
    }
    let row = msgs.iter().find(|m| m.tag == b'D').ok_or_else(|| std::io::Error::other("no row"))?;
    let cols = protocol::text_columns(row).ok_or_else(|| std::io::Error::other("bad row"))?;
    let in_recovery = cols.first().and_then(|c| c.as_deref()) == Some("true");
    let lsn = cols.get(1).and_then(|c| c.as_deref()).and_then(protocol::parse_lsn).map(Lsn).unwrap_or(Lsn(0));
    let timeline = cols.get(2).and_then(|c| c.as_deref()).and_then(|t| t.parse().ok());
    Ok((in_recovery, lsn, timeline))
}

async fn promote(c: &mut Conn, wait: std::time::Duration) -> std::io::Result<()> {
    let secs = wait.as_secs().clamp(1, 60);
    let msgs = c.simple(&format!("SELECT pg_promote(true, {secs})::text")).await?;
    match protocol::first_value(&msgs).as_deref() {
        Some("true") => Ok(()),
        _ => Err(std::io::Error::other(
            msgs.iter().find(|m| m.tag == b'E').map(error_message).unwrap_or_else(|| "pg_promote failed".into()),
        )),
    }
}

/// Points a replica at `primary` (`host:port`): its `primary_conninfo` with
/// the host and port replaced, applied by a reload (PostgreSQL 13+).
async fn repoint(c: &mut Conn, primary: &str) -> std::io::Result<()> {
    let (host, port) = primary.rsplit_once(':').ok_or_else(|| std::io::Error::other("no port"))?;
    let msgs = c
        .simple("SELECT CASE WHEN current_setting('server_version_num')::int >= 130000 THEN current_setting('primary_conninfo') END")
        .await?;
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        // without it the user, password and application_name would be lost
        return Err(std::io::Error::other(error_message(e)));
    }
    let Some(current) = protocol::first_value(&msgs) else {
        return Err(std::io::Error::other("PostgreSQL 13 or later re-reads primary_conninfo on a reload"));
    };
    let next = with_host_port(&current, host, port);
    if next == current {
        return Ok(());
    }
    // an E'' literal: the same whatever standard_conforming_strings says
    let literal = next.replace('\\', "\\\\").replace('\'', "''");
    let set = format!("ALTER SYSTEM SET primary_conninfo = E'{literal}'");
    for sql in [set.as_str(), "SELECT pg_reload_conf()"] {
        let msgs = c.simple(sql).await?;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            return Err(std::io::Error::other(error_message(e)));
        }
    }
    eprintln!("postai-edge: replica now follows {primary}");
    Ok(())
}

/// A libpq connection string with `host` and `port` set (other keys kept;
/// `hostaddr` dropped, it would override the host).
fn with_host_port(conninfo: &str, host: &str, port: &str) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut rest = conninfo.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, ch)) = chars.next() {
                match ch {
                    '\\' => v.extend(chars.next().map(|(_, c)| c)),
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end.min(q.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.trim().to_string(), value));
        rest = tail.trim_start();
    }
    pairs.retain(|(k, _)| !matches!(k.as_str(), "host" | "port" | "hostaddr"));
    pairs.push(("host".into(), host.into()));
    pairs.push(("port".into(), port.into()));
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A former primary came back and accepts writes: make it read-only for
/// everyone (the proxy already never routes to it).
async fn fence(proxy: &Proxy, c: &mut Conn, addr: &str) {
    let ro = c.simple("SHOW default_transaction_read_only").await.ok();
    if ro.as_deref().and_then(protocol::first_value).as_deref() == Some("on") {
        return;
    }
    let done = c.simple("ALTER SYSTEM SET default_transaction_read_only = on").await;
    let reloaded = c.simple("SELECT pg_reload_conf()").await;
    if done.is_ok() && reloaded.is_ok() {
        eprintln!("postai-edge: {addr} returned as a primary in an old epoch; made it read-only");
        proxy.topology().fenced_returns += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_points_at_the_new_primary() {
        let c = with_host_port("host=127.0.0.1 port=5432 user=postgres application_name=standby", "10.0.0.2", "6000");
        assert_eq!(c, "user='postgres' application_name='standby' host='10.0.0.2' port='6000'");
        let c = with_host_port("user='a b' password='it\\'s' hostaddr=1.2.3.4", "h", "1");
        assert_eq!(c, "user='a b' password='it\\'s' host='h' port='1'");
        assert_eq!(with_host_port("", "h", "1"), "host='h' port='1'");
    }

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

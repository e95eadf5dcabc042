//! The database nodes behind the proxy: which one is the primary, how far
//! each replica has replayed, and failover. A health task checks every node
//! on an interval and drives the core's `Router` (read routing with replay-LSN
//! floors, breakers) and `FailoverController` (promotion of the most
//! caught-up replica in a new epoch, fencing of the old primary). The task
//! does the I/O (`pg_promote()`, fencing a returning ex-primary); the
//! decisions are the core's.

use std::sync::Arc;
use std::sync::atomic::Ordering;

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
        }
    }

    /// Where writes go: the primary; during a failover the replica being
    /// promoted (writes fail read-only there until it is promoted, but never
    /// reach the fenced old primary).
    pub fn primary_addr(&self) -> String {
        let target = if self.primary_fenced { self.promoting.unwrap_or(self.primary) } else { self.primary };
        self.addr(target).unwrap_or_default()
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
            match &o {
                FailoverOutput::Fence { node, .. } => {
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.id == *node) {
                        n.fenced = true;
                    }
                    self.router.remove_endpoint(*node);
                    if *node == self.primary {
                        self.primary_fenced = true;
                        self.primary_generation += 1;
                    }
                }
                FailoverOutput::Promote { node, .. } => self.promoting = Some(*node),
                FailoverOutput::RoutesChanged { primary, epoch } => {
                    self.router.set_primary(*primary);
                    self.primary = *primary;
                    self.epoch = *epoch;
                    self.primary_fenced = false;
                    self.promoting = None;
                    self.primary_generation += 1;
                    self.failovers += 1;
                }
                FailoverOutput::NoCandidate => {}
            }
            out.push(o);
        }
        out
    }

    fn promoted(&mut self, now: Instant, node: EndpointId, epoch: Epoch) {
        if let Some(f) = self.failover.as_mut() {
            f.handle_promoted(now, node, epoch);
        }
    }
}

const HEALTH_SQL: &str = "SELECT pg_is_in_recovery()::text, (CASE WHEN pg_is_in_recovery() \
     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

/// The health task: checks every node each `health_interval_ms`, feeds the
/// router and the failover controller, promotes and fences. Runs forever.
pub async fn run(proxy: Arc<Proxy>) {
    let cfg = proxy.config.failover.clone();
    let interval = std::time::Duration::from_millis(cfg.health_interval_ms);
    let timeout = std::time::Duration::from_millis(cfg.check_timeout_ms);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    loop {
        let nodes: Vec<DbNode> = proxy.topology().nodes().to_vec();
        conns.resize_with(nodes.len(), || None);
        for (i, n) in nodes.iter().enumerate() {
            let started = proxy.now();
            let checked = tokio::time::timeout(timeout, check(&proxy, &mut conns[i], &n.addr)).await;
            let now = proxy.now();
            match checked {
                Ok(Ok((in_recovery, lsn))) => {
                    if n.fenced {
                        if !in_recovery && let Some(c) = conns[i].as_mut() {
                            fence(&proxy, c, &n.addr).await;
                        }
                        continue;
                    }
                    if !in_recovery {
                        proxy.lsn_seen.fetch_max(lsn.0, Ordering::Relaxed);
                    }
                    proxy.topology().healthy(now, n.id, lsn, now.saturating_since(started));
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
                        if promote(c).await.is_ok() {
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
                    // the other replicas follow the new primary: none keeps
                    // acknowledging an old primary that comes back
                    for (i, n) in nodes.iter().enumerate() {
                        if n.id != primary
                            && !n.fenced
                            && let Some(c) = conns[i].as_mut()
                            && let Err(e) = repoint(c, &addr).await
                        {
                            eprintln!("postai-edge: could not point {} at {addr}: {e}", n.addr);
                        }
                    }
                }
                FailoverOutput::Fence { node, .. } => {
                    let addr = nodes.iter().find(|n| n.id == node).map(|n| n.addr.clone()).unwrap_or_default();
                    eprintln!("postai-edge: fenced {addr}: no request goes to it again");
                }
                FailoverOutput::NoCandidate => eprintln!("postai-edge: primary failed and no replica can be promoted"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One health check: (in recovery, replay or current LSN).
async fn check(proxy: &Proxy, conn: &mut Option<Conn>, addr: &str) -> std::io::Result<(bool, Lsn)> {
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
    Ok((in_recovery, lsn))
}

async fn promote(c: &mut Conn) -> std::io::Result<()> {
    let msgs = c.simple("SELECT pg_promote(true, 60)::text").await?;
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
    let msgs = c.simple("SELECT current_setting('primary_conninfo')").await?;
    let current = protocol::first_value(&msgs).unwrap_or_default();
    let next = with_host_port(&current, host, port);
    if next == current {
        return Ok(());
    }
    let set = format!("ALTER SYSTEM SET primary_conninfo = '{}'", next.replace('\'', "''"));
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

    #[test]
    fn writes_leave_a_fenced_primary_before_the_promotion_completes() {
        let fo = FailoverConfig {
            heartbeat_timeout: Duration::from_millis(100),
            promote_timeout: Duration::from_secs(10),
            nodes_max: 3,
        };
        let mut t = Topology::new("p:1", &["r:2".to_string()], Some(fo), Instant::ZERO);
        t.healthy(Instant::ZERO, EndpointId(1), Lsn(5), Duration::from_millis(1));
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
}

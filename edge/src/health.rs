//! The health task: checks every database node each `health_interval_ms`
//! (`HEALTH_SQL`), feeds the router and the failover controller
//! ([`crate::topology::Topology`]), promotes, points the other replicas at
//! the new primary, and fences a primary that returns in an old epoch.

use std::sync::Arc;

use postai_core::Lsn;
use postai_core::failover::FailoverOutput;

use crate::protocol;
use crate::proxy::Proxy;
use crate::topology::DbNode;
use crate::upstream::{Conn, error_message};

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
}

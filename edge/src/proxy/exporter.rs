//! `GET /metrics`: every metric of the proxy in the Prometheus text format
//! (the counters live in `crate::metrics`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use postai_core::cache::TierName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Proxy;
use crate::metrics::PATHS;

/// Every metric in the Prometheus text format.
pub fn render(proxy: &Proxy) -> String {
    let mut out = String::with_capacity(8 << 10);
    cache_metrics(&mut out, proxy);
    topology_metrics(&mut out, proxy);
    connection_metrics(&mut out, proxy);
    histograms(&mut out, proxy);
    out
}

/// One metric: its HELP and TYPE lines, then a line per (labels, value).
fn metric(out: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, u64)]) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, v) in rows {
        if labels.is_empty() {
            out.push_str(&format!("{name} {v}\n"));
        } else {
            out.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
    }
}

/// A metric's one unlabelled value.
fn one(v: u64) -> Vec<(String, u64)> {
    vec![(String::new(), v)]
}

/// The node's counters and each tier's.
fn cache_metrics(out: &mut String, proxy: &Proxy) {
    let (stats, tiers) = {
        let n = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
        let tiers: Vec<(&str, postai_core::cache::TierStats)> = [(TierName::L1, "l1"), (TierName::L2, "l2")]
            .iter()
            .filter_map(|(t, name)| n.tier(*t).map(|tier| (*name, tier.stats())))
            .collect();
        (n.stats(), tiers)
    };
    metric(out, "postai_queries_total", "Queries the cache layer saw.", "counter", &one(stats.queries));
    metric(
        out,
        "postai_cache_hits_total",
        "Queries answered from a cache tier.",
        "counter",
        &[("tier=\"l1\"".into(), stats.l1_hits), ("tier=\"l2\"".into(), stats.l2_hits)],
    );
    metric(out, "postai_cache_misses_total", "Cacheable reads sent upstream.", "counter", &one(stats.misses));
    metric(out, "postai_upstream_total", "Queries sent upstream.", "counter", &one(stats.upstream));
    metric(out, "postai_uncacheable_total", "Queries that may not be cached.", "counter", &one(stats.uncacheable));
    metric(out, "postai_writes_total", "Writes seen by the proxy.", "counter", &one(stats.writes));
    metric(out, "postai_cdc_events_total", "CDC events applied.", "counter", &one(stats.cdc_events));
    metric(
        out,
        "postai_cdc_silent_misses_total",
        "Cacheable reads sent upstream because the CDC stream was silent.",
        "counter",
        &one(stats.cdc_silent_misses),
    );
    let per_tier = |f: fn(&postai_core::cache::TierStats) -> u64| -> Vec<(String, u64)> {
        tiers.iter().map(|(name, s)| (format!("tier=\"{name}\""), f(s))).collect()
    };
    metric(out, "postai_cache_entries", "Entries held per tier.", "gauge", &per_tier(|s| s.entries));
    metric(out, "postai_cache_bytes", "Bytes held per tier.", "gauge", &per_tier(|s| s.bytes));
    metric(
        out,
        "postai_cache_invalidations_total",
        "Entries dropped by invalidation per tier.",
        "counter",
        &per_tier(|s| s.invalidations),
    );
    metric(out, "postai_cache_evictions_total", "Entries evicted per tier.", "counter", &per_tier(|s| s.evictions));
    metric(
        out,
        "postai_cache_expirations_total",
        "Entries expired (TTL) per tier.",
        "counter",
        &per_tier(|s| s.expirations),
    );
}

/// Replica reads, failovers, the epoch, fenced returns.
fn topology_metrics(out: &mut String, proxy: &Proxy) {
    let (replica_reads, failovers, epoch, fenced) = {
        let t = proxy.topology();
        (t.replica_reads, t.failovers, t.epoch().0, t.fenced_returns)
    };
    metric(out, "postai_replica_reads_total", "Cache misses answered by a replica.", "counter", &one(replica_reads));
    metric(out, "postai_failovers_total", "Promotions of a replica to primary.", "counter", &one(failovers));
    metric(out, "postai_epoch", "The current primary epoch.", "gauge", &one(epoch));
    metric(
        out,
        "postai_fenced_returns_total",
        "Former primaries made read-only when they came back.",
        "counter",
        &one(fenced),
    );
}

/// Clients, upstream connections, subscriptions, the pool.
fn connection_metrics(out: &mut String, proxy: &Proxy) {
    let m = &proxy.metrics;
    metric(out, "postai_clients", "Client connections open.", "gauge", &one(m.clients.load(Ordering::Relaxed)));
    metric(
        out,
        "postai_clients_total",
        "Client connections accepted.",
        "counter",
        &one(m.clients_total.load(Ordering::Relaxed)),
    );
    metric(
        out,
        "postai_upstream_connections",
        "Upstream connections open, by role.",
        "gauge",
        &[
            ("role=\"primary\"".into(), m.upstream_connections.load(Ordering::Relaxed)),
            ("role=\"replica\"".into(), m.replica_connections.load(Ordering::Relaxed)),
        ],
    );
    metric(
        out,
        "postai_cdc_subscriptions_resumed_total",
        "Subscriptions to the regional proxy's stream continued where the last ended (nothing invalidated).",
        "counter",
        &one(m.cdc_resumed.load(Ordering::Relaxed)),
    );
    if let Some(pool) = &proxy.pool {
        let (idle, lent) = pool.counts();
        metric(
            out,
            "postai_pool_server_connections",
            "Pooled server connections, by state.",
            "gauge",
            &[("state=\"idle\"".into(), idle as u64), ("state=\"lent\"".into(), lent as u64)],
        );
    }
}

/// Query latency by where it was answered, and invalidation lag.
fn histograms(out: &mut String, proxy: &Proxy) {
    let m = &proxy.metrics;
    out.push_str(
        "# HELP postai_query_duration_seconds Time from a query's arrival to its answer, by where it was answered.\n",
    );
    out.push_str("# TYPE postai_query_duration_seconds histogram\n");
    for (path, name) in PATHS {
        m.latency(path).render(out, "postai_query_duration_seconds", &format!("served=\"{name}\""));
    }
    out.push_str(
        "# HELP postai_invalidation_lag_seconds From a commit on the primary to its invalidation at this proxy.\n",
    );
    out.push_str("# TYPE postai_invalidation_lag_seconds histogram\n");
    m.invalidation_lag.render(out, "postai_invalidation_lag_seconds", "");
}

/// Scrapes answered at once at most: past them a connection is closed at
/// once (the descriptors are the proxy's clients' too).
const SCRAPES_MAX: usize = 64;

/// Serves `GET /metrics` (anything else: 404). A failed accept (out of
/// descriptors) pauses it, as it does the clients' listener.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) -> std::io::Result<()> {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(SCRAPES_MAX));
    let mut backoff = crate::limits::AcceptBackoff::default();
    loop {
        let mut socket = crate::limits::accept(&listener, &mut backoff).await;
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // the request head, at most 8 KiB, within 5 s
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8 << 10 {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(head, Ok(true)) {
                return;
            }
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let response = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                let body = render(&p);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                let body = "not found: GET /metrics\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

//! Prometheus metrics: counters the core keeps (hits, misses, invalidations
//! per tier), the proxy's own (latency per serving path, invalidation lag,
//! connections, failovers), rendered in the text exposition format on
//! `GET /metrics` of a separate listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postai_core::cache::TierName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::proxy::Proxy;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A fixed-bucket histogram updated without a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}\n"));
        }
        let count = self.count();
        out.push_str(&format!("{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}\n"));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        out.push_str(&format!("{name}_sum{braces} {sum}\n{name}_count{braces} {count}\n"));
    }
}

/// Where a query was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    L1,
    L2,
    Replica,
    Primary,
    /// Answered by the proxy itself (admin commands, errors).
    Proxy,
}

const PATHS: [(Path, &str); 5] = [
    (Path::L1, "l1"),
    (Path::L2, "l2"),
    (Path::Replica, "replica"),
    (Path::Primary, "primary"),
    (Path::Proxy, "proxy"),
];

/// The proxy's own measurements.
#[derive(Debug, Default)]
pub struct Metrics {
    latency: [Histogram; 5],
    /// From a commit on the primary to its invalidation here (CDC).
    pub invalidation_lag: Histogram,
    pub clients: AtomicU64,
    pub clients_total: AtomicU64,
    pub upstream_connections: AtomicU64,
    pub replica_connections: AtomicU64,
    /// Subscriptions to a regional proxy continued where the last one ended.
    pub cdc_resumed: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, path: Path, d: std::time::Duration) {
        let i = PATHS.iter().position(|(p, _)| *p == path).unwrap_or(PATHS.len() - 1);
        self.latency[i].observe(d);
    }

    pub fn latency(&self, path: Path) -> &Histogram {
        let i = PATHS.iter().position(|(p, _)| *p == path).unwrap_or(PATHS.len() - 1);
        &self.latency[i]
    }
}

/// Every metric in the Prometheus text format.
pub fn render(proxy: &Proxy) -> String {
    let mut out = String::with_capacity(8 << 10);
    let counter = |out: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in rows {
            if labels.is_empty() {
                out.push_str(&format!("{name} {v}\n"));
            } else {
                out.push_str(&format!("{name}{{{labels}}} {v}\n"));
            }
        }
    };
    let (stats, tiers) = {
        let n = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
        let tiers: Vec<(&str, postai_core::cache::TierStats)> = [(TierName::L1, "l1"), (TierName::L2, "l2")]
            .iter()
            .filter_map(|(t, name)| n.tier(*t).map(|tier| (*name, tier.stats())))
            .collect();
        (n.stats(), tiers)
    };
    let one = |v: u64| vec![(String::new(), v)];
    counter(&mut out, "postai_queries_total", "Queries the cache layer saw.", "counter", &one(stats.queries));
    counter(
        &mut out,
        "postai_cache_hits_total",
        "Queries answered from a cache tier.",
        "counter",
        &[("tier=\"l1\"".into(), stats.l1_hits), ("tier=\"l2\"".into(), stats.l2_hits)],
    );
    counter(&mut out, "postai_cache_misses_total", "Cacheable reads sent upstream.", "counter", &one(stats.misses));
    counter(&mut out, "postai_upstream_total", "Queries sent upstream.", "counter", &one(stats.upstream));
    counter(
        &mut out,
        "postai_uncacheable_total",
        "Queries that may not be cached.",
        "counter",
        &one(stats.uncacheable),
    );
    counter(&mut out, "postai_writes_total", "Writes seen by the proxy.", "counter", &one(stats.writes));
    counter(&mut out, "postai_cdc_events_total", "CDC events applied.", "counter", &one(stats.cdc_events));
    counter(
        &mut out,
        "postai_cdc_silent_misses_total",
        "Cacheable reads sent upstream because the CDC stream was silent.",
        "counter",
        &one(stats.cdc_silent_misses),
    );
    let per_tier = |f: fn(&postai_core::cache::TierStats) -> u64| -> Vec<(String, u64)> {
        tiers.iter().map(|(name, s)| (format!("tier=\"{name}\""), f(s))).collect()
    };
    counter(&mut out, "postai_cache_entries", "Entries held per tier.", "gauge", &per_tier(|s| s.entries));
    counter(&mut out, "postai_cache_bytes", "Bytes held per tier.", "gauge", &per_tier(|s| s.bytes));
    counter(
        &mut out,
        "postai_cache_invalidations_total",
        "Entries dropped by invalidation per tier.",
        "counter",
        &per_tier(|s| s.invalidations),
    );
    counter(
        &mut out,
        "postai_cache_evictions_total",
        "Entries evicted per tier.",
        "counter",
        &per_tier(|s| s.evictions),
    );
    counter(
        &mut out,
        "postai_cache_expirations_total",
        "Entries expired (TTL) per tier.",
        "counter",
        &per_tier(|s| s.expirations),
    );
    let (replica_reads, failovers, epoch, fenced) = {
        let t = proxy.topology();
        (t.replica_reads, t.failovers, t.epoch().0, t.fenced_returns)
    };
    counter(
        &mut out,
        "postai_replica_reads_total",
        "Cache misses answered by a replica.",
        "counter",
        &one(replica_reads),
    );
    counter(&mut out, "postai_failovers_total", "Promotions of a replica to primary.", "counter", &one(failovers));
    counter(&mut out, "postai_epoch", "The current primary epoch.", "gauge", &one(epoch));
    counter(
        &mut out,
        "postai_fenced_returns_total",
        "Former primaries made read-only when they came back.",
        "counter",
        &one(fenced),
    );
    let m = &proxy.metrics;
    counter(&mut out, "postai_clients", "Client connections open.", "gauge", &one(m.clients.load(Ordering::Relaxed)));
    counter(
        &mut out,
        "postai_clients_total",
        "Client connections accepted.",
        "counter",
        &one(m.clients_total.load(Ordering::Relaxed)),
    );
    counter(
        &mut out,
        "postai_upstream_connections",
        "Upstream connections open, by role.",
        "gauge",
        &[
            ("role=\"primary\"".into(), m.upstream_connections.load(Ordering::Relaxed)),
            ("role=\"replica\"".into(), m.replica_connections.load(Ordering::Relaxed)),
        ],
    );
    counter(
        &mut out,
        "postai_cdc_subscriptions_resumed_total",
        "Subscriptions to the regional proxy's stream continued where the last ended (nothing invalidated).",
        "counter",
        &one(m.cdc_resumed.load(Ordering::Relaxed)),
    );
    if let Some(pool) = &proxy.pool {
        let (idle, lent) = pool.counts();
        counter(
            &mut out,
            "postai_pool_server_connections",
            "Pooled server connections, by state.",
            "gauge",
            &[("state=\"idle\"".into(), idle as u64), ("state=\"lent\"".into(), lent as u64)],
        );
    }
    out.push_str(
        "# HELP postai_query_duration_seconds Time from a query's arrival to its answer, by where it was answered.\n",
    );
    out.push_str("# TYPE postai_query_duration_seconds histogram\n");
    for (i, (_, name)) in PATHS.iter().enumerate() {
        m.latency[i].render(&mut out, "postai_query_duration_seconds", &format!("served=\"{name}\""));
    }
    out.push_str(
        "# HELP postai_invalidation_lag_seconds From a commit on the primary to its invalidation at this proxy.\n",
    );
    out.push_str("# TYPE postai_invalidation_lag_seconds histogram\n");
    m.invalidation_lag.render(&mut out, "postai_invalidation_lag_seconds", "");
    out
}

/// Serves `GET /metrics` (anything else: 404) until the listener fails.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut socket, _) = listener.accept().await?;
        let p = proxy.clone();
        tokio::spawn(async move {
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

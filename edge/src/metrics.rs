//! Prometheus metrics: counters the core keeps (hits, misses, invalidations
//! per tier), the proxy's own (latency per serving path, invalidation lag,
//! connections, failovers), rendered in the text exposition format on
//! `GET /metrics` of a separate listener.

use std::sync::atomic::{AtomicU64, Ordering};

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

    /// The histogram in the Prometheus text format, as `name{labels}`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
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

pub const PATHS: [(Path, &str); 5] = [
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

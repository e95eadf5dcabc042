//! Scenario files: seed, topology, workload, faults, targets. Data, not code.

use postai_core::consistency::Consistency;
use postai_core::node::InvalidationMode;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("{path}: invalid scenario: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub seed: u64,
    /// Simulated seconds, warm-up included.
    pub duration_s: u64,
    /// Requests before this are not measured (caches start cold).
    #[serde(default = "d_warmup")]
    pub warmup_s: u64,
    /// Caches start as this many seconds of steady traffic would leave them
    /// (each key cached with the probability that the workload touched it),
    /// at most the TTL; 0 starts cold. The measured part of a run is steady
    /// state, as in production.
    #[serde(default = "d_warm_start")]
    pub warm_start_s: u64,
    /// Query rate multiplier during the warm-up, so that a short run measures
    /// caches as warm as hours of steady traffic would leave them.
    #[serde(default = "d_warmup_rate")]
    pub warmup_rate_factor: f64,
    /// Number of edge sites taken from sites.csv (spread over all of it).
    #[serde(default = "d_sites")]
    pub sites: usize,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub tiers: Tiers,
    #[serde(default)]
    pub db: Db,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub targets: Targets,
    /// Draw topology and fault rates from the seed (VOPR-style swarm).
    #[serde(default)]
    pub swarm: bool,
    /// Run the same workload once per invalidation strategy and compare.
    #[serde(default)]
    pub compare_invalidation: bool,
    /// A small world (the sweep's `--small`): after any swarm draw, 3 to 12
    /// sites, their share of the query rate, fewer keys and sessions
    /// (`swarm::small_world`), so that thousands of seeds are cheap.
    #[serde(default)]
    pub small: bool,
    /// The sites are the Workers edge (`worker/`) instead of the native
    /// proxy: they pull the regional's feed on request, their cache lives in
    /// isolates that come and go, they have no L2. `None`: the native edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerDesign>,
}

/// The Workers edge's constraints, as `worker/` runs (README, "The Workers edge").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerDesign {
    /// A request that finds its site's feed older than this has it pulled
    /// (`POSTAI_FEED_MS`); at most `db.cdc_silence_max_ms`.
    pub feed_ms: u64,
    /// The request waits for the pull before it is answered; `false`: the
    /// pull runs after the answer, as `worker/` runs it (`waitUntil`).
    pub pull_waits: bool,
    /// Round trips between the site and its regional before a pull's
    /// subscription answers (a new connection: TCP, startup and login, the
    /// subscription itself).
    pub pull_round_trips: u32,
    /// The regional's poll interval: a pull waits for the next live
    /// keepalive, uniformly up to this long.
    pub poll_ms: f64,
    /// A pull that hears no live keepalive gives up after this long (and
    /// applies nothing).
    pub pull_timeout_ms: u64,
    /// The mean life of an isolate (exponential): the next one starts with
    /// an empty cache and no feed.
    pub isolate_life_s: f64,
    /// Entries the isolate's second in-memory tier holds (the Worker's
    /// node has two, both in the isolate's memory: `tiers.l1_entries`, and
    /// this many in place of `tiers.l2_entries`, answered at L1's cost);
    /// nothing persists past the isolate.
    pub cache_entries: usize,
}

impl Default for WorkerDesign {
    fn default() -> Self {
        WorkerDesign {
            feed_ms: 1000,
            pull_waits: false,
            pull_round_trips: 3,
            poll_ms: 100.0,
            pull_timeout_ms: 1000,
            isolate_life_s: 60.0,
            cache_entries: 100_000,
        }
    }
}

fn d_warmup() -> u64 {
    10
}
fn d_warmup_rate() -> f64 {
    1.0
}
fn d_warm_start() -> u64 {
    600
}
fn d_sites() -> usize {
    300
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Fleet-wide queries per second at the daily peak.
    pub rate_qps: f64,
    pub keys: u64,
    /// Zipf exponent of read popularity.
    pub zipf_s: f64,
    /// Zipf exponent of write popularity (0 = uniform). Writes drawn from the
    /// read distribution would hit each hot key from 300 sites at once:
    /// see the hot-key-write-burst scenario for that case.
    pub write_zipf_s: f64,
    pub write_ratio: f64,
    /// Shares of reads: point lookups, ranges, joins (normalised).
    pub point: f64,
    pub range: f64,
    pub join: f64,
    pub sessions_per_site: u32,
    pub consistency: Consistency,
    /// Writes per second made directly on the primary, bypassing the edge:
    /// only CDC can invalidate them.
    pub bypass_write_qps: f64,
    /// UTC hour at simulated time zero; rates follow each site's local sun.
    pub utc_hour_start: f64,
    /// Simulated hours per simulated second (1/3600 = real time).
    pub sun_speed: f64,
    /// Fraction of keys whose rows are EU-resident (never leave EU).
    pub eu_resident_share: f64,
    /// A hot key receiving this share of all writes (hot-key write burst).
    pub hot_write_share: f64,
    pub invalidation: InvalidationMode,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            rate_qps: 30_000.0,
            keys: 20_000,
            zipf_s: 1.1,
            write_zipf_s: 0.0,
            write_ratio: 0.05,
            point: 0.85,
            range: 0.10,
            join: 0.05,
            sessions_per_site: 4,
            consistency: Consistency::ReadYourWrites,
            bypass_write_qps: 0.0,
            utc_hour_start: 14.0,
            sun_speed: 1.0 / 3600.0,
            eu_resident_share: 0.0,
            hot_write_share: 0.0,
            invalidation: InvalidationMode::Refresh,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tiers {
    pub l1_entries: usize,
    pub l1_ms: f64,
    pub l2_entries: usize,
    pub l2_ms: f64,
    pub l3_entries: usize,
    pub l3_ms: f64,
    pub ttl_s: u64,
    /// Fresh, not expired: an entry the change stream keeps valid row by
    /// row (a point read) lives up to this long at the sites and pools,
    /// evicted by the budget; 0: every entry has `ttl_s`.
    pub fresh_ttl_s: u64,
    pub entry_bytes: u32,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers {
            l1_entries: 2_000,
            l1_ms: 0.5,
            l2_entries: 20_000,
            l2_ms: 3.0,
            l3_entries: 200_000,
            l3_ms: 0.5,
            ttl_s: 300,
            fresh_ttl_s: 86_400,
            entry_bytes: 512,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    Sync,
    Async,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Db {
    pub replication: Replication,
    pub point_ms: f64,
    pub range_ms: f64,
    pub join_ms: f64,
    pub write_ms: f64,
    pub replica_apply_ms: f64,
    /// Asynchronous replication: how long WAL waits before it leaves the
    /// primary (the walsender's batching; larger for a replica that falls
    /// behind under load). A crash loses what had not left.
    pub wal_send_ms: f64,
    pub heartbeat_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Time a promotion takes (pg_promote and reconnects).
    pub promote_ms: u64,
    /// Extra delay of the CDC stream to the regions.
    pub cdc_lag_ms: f64,
    pub cdc_duplicate: f64,
    pub cdc_reorder: f64,
    /// Sites stop serving from their tiers after this long without a CDC
    /// event or keepalive (keepalives every 200 ms).
    pub cdc_silence_max_ms: u64,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            replication: Replication::Sync,
            point_ms: 0.3,
            range_ms: 3.0,
            join_ms: 6.0,
            write_ms: 1.0,
            replica_apply_ms: 5.0,
            wal_send_ms: crate::db::ASYNC_SEND_MS,
            heartbeat_ms: 1_000,
            heartbeat_timeout_ms: 5_000,
            promote_ms: 2_000,
            cdc_lag_ms: 50.0,
            cdc_duplicate: 0.0,
            cdc_reorder: 0.0,
            cdc_silence_max_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub fiber_km_per_ms: f64,
    /// Path length over great-circle distance for pairs 5 000 km apart
    /// and more (`sim/src/latency.rs`).
    pub route_factor: f64,
    /// The same for pairs up to 1 000 km apart (between the two, linear).
    pub route_factor_short: f64,
    /// Fixed cost per hop (equipment, the last mile), ms.
    pub hop_ms: f64,
    /// Jitter of a request: uniform over 0..`jitter_ms`, except a share
    /// `jitter_tail` of requests, which pay a heavy tail (Pareto, shape
    /// 1.5, scale `jitter_tail_ms`, capped at 100 times it) on top.
    pub jitter_ms: f64,
    pub jitter_tail: f64,
    pub jitter_tail_ms: f64,
    /// Probability that a message between a site and a regional pool is
    /// lost. The connection's transport resends it after its retransmission
    /// timeout (see `World::retransmit_ms`): loss delays a request, it does
    /// not fail it. A region that is down or cut off does fail it.
    pub loss: f64,
    pub client_rtt_ms_min: f64,
    pub client_rtt_ms_max: f64,
    /// A request upstream that gets no answer fails after this long.
    pub timeout_ms: u64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            fiber_km_per_ms: 200.0,
            route_factor: 1.72,
            route_factor_short: 2.5,
            hop_ms: 0.5,
            jitter_ms: 0.5,
            jitter_tail: 0.01,
            jitter_tail_ms: 2.0,
            loss: 0.0,
            client_rtt_ms_min: 1.0,
            client_rtt_ms_max: 5.0,
            timeout_ms: 1_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    PrimaryCrash {
        at_s: f64,
        restart_after_s: Option<f64>,
    },
    ReplicaCrash {
        at_s: f64,
        region: String,
        restart_after_s: Option<f64>,
    },
    RegionalOutage {
        at_s: f64,
        region: String,
        duration_s: f64,
    },
    TierLoss {
        at_s: f64,
        tier: String,
        region: Option<String>,
    },
    EdgePartition {
        at_s: f64,
        region: String,
        duration_s: f64,
    },
    PrimaryPartition {
        at_s: f64,
        region: String,
        duration_s: f64,
    },
    SlowLink {
        at_s: f64,
        region: String,
        extra_ms: f64,
        duration_s: f64,
    },
    CdcStall {
        at_s: f64,
        duration_s: f64,
    },
    /// The region's pool finds its slot gone (dropped by an operator, or
    /// invalidated by `max_slot_wal_keep_size`) and creates a new one: what
    /// the old one held unread is lost; its sites drop what they hold.
    SlotDrop {
        at_s: f64,
        region: String,
    },
    /// Every site of the region restarts: its L1 is lost, its L2 is read
    /// back from its file and its subscription continues from the file's
    /// position when the pool's history has every row since.
    EdgeRestart {
        at_s: f64,
        region: String,
    },
}

impl Fault {
    pub fn at_s(&self) -> f64 {
        match self {
            Fault::PrimaryCrash { at_s, .. }
            | Fault::ReplicaCrash { at_s, .. }
            | Fault::RegionalOutage { at_s, .. }
            | Fault::TierLoss { at_s, .. }
            | Fault::EdgePartition { at_s, .. }
            | Fault::PrimaryPartition { at_s, .. }
            | Fault::SlowLink { at_s, .. }
            | Fault::CdcStall { at_s, .. }
            | Fault::SlotDrop { at_s, .. }
            | Fault::EdgeRestart { at_s, .. } => *at_s,
        }
    }
    pub fn label(&self) -> String {
        match self {
            Fault::PrimaryCrash { .. } => "primary-crash".into(),
            Fault::ReplicaCrash { region, .. } => format!("replica-crash {region}"),
            Fault::RegionalOutage { region, .. } => format!("regional-outage {region}"),
            Fault::TierLoss { tier, region, .. } => format!("tier-loss {tier} {}", region.as_deref().unwrap_or("all")),
            Fault::EdgePartition { region, .. } => format!("edge-partition {region}"),
            Fault::PrimaryPartition { region, .. } => format!("primary-partition {region}"),
            Fault::SlowLink { region, .. } => format!("slow-link {region}"),
            Fault::CdcStall { .. } => "cdc-stall".into(),
            Fault::SlotDrop { region, .. } => format!("slot-drop {region}"),
            Fault::EdgeRestart { region, .. } => format!("edge-restart {region}"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Targets {
    pub read_p95_ms: f64,
    pub write_p95_ms: f64,
    pub hit_rate: f64,
    pub availability: f64,
    pub rto_primary_ms: f64,
    pub rto_regional_ms: f64,
    pub rto_cache_ms: f64,
    pub rpo_writes: u64,
    /// With asynchronous replication: the window of acknowledged data a
    /// failover may lose (the walsender's batch and the way to the standby).
    pub rpo_async_ms: f64,
    pub ryw_violations: u64,
    /// Every read's staleness (how long before it began a commit it missed
    /// was acknowledged) stays under this: the CDC-silence bound plus the
    /// stream's delivery (README, "What the simulation measures"). A breach
    /// is a safety violation.
    pub staleness_ms: f64,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            read_p95_ms: 10.0,
            write_p95_ms: 150.0,
            hit_rate: 0.90,
            availability: 0.9999,
            rto_primary_ms: 30_000.0,
            rto_regional_ms: 10_000.0,
            rto_cache_ms: 1_000.0,
            rpo_writes: 0,
            rpo_async_ms: 100.0,
            ryw_violations: 0,
            staleness_ms: 2_350.0,
        }
    }
}

fn scale_fault(f: &mut Fault, k: f64) {
    match f {
        Fault::PrimaryCrash { at_s, restart_after_s } | Fault::ReplicaCrash { at_s, restart_after_s, .. } => {
            *at_s *= k;
            if let Some(r) = restart_after_s {
                *r *= k;
            }
        }
        Fault::RegionalOutage { at_s, duration_s, .. }
        | Fault::EdgePartition { at_s, duration_s, .. }
        | Fault::PrimaryPartition { at_s, duration_s, .. }
        | Fault::SlowLink { at_s, duration_s, .. }
        | Fault::CdcStall { at_s, duration_s } => {
            *at_s *= k;
            *duration_s *= k;
        }
        Fault::TierLoss { at_s, .. } | Fault::SlotDrop { at_s, .. } | Fault::EdgeRestart { at_s, .. } => *at_s *= k,
    }
}

/// `v` within `[lo, hi]` (NaN is not), or an error naming the field.
fn range(name: &str, v: f64, lo: f64, hi: f64) -> Result<(), String> {
    if (lo..=hi).contains(&v) { Ok(()) } else { Err(format!("{name} must be in [{lo}, {hi}], not {v}")) }
}

/// `v` within `lo..=hi`, or an error naming the field.
fn int(name: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if (lo..=hi).contains(&v) { Ok(()) } else { Err(format!("{name} must be in {lo}..={hi}, not {v}")) }
}

/// The longest delay a scenario may state, in ms.
const MS_MAX: f64 = 600_000.0;

impl Scenario {
    pub fn load(path: &str) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Scenario::parse(path, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let sc: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: path.into(), source: Box::new(e) })?;
        sc.validate().map_err(|reason| ScenarioError::Invalid { path: path.into(), reason })?;
        Ok(sc)
    }

    /// The short form `cargo test` runs: 60 sites, 24 simulated seconds, the
    /// same rate per site, faults at the same relative times, warm start kept.
    pub fn short(&self, seed: u64) -> Scenario {
        let mut sc = self.clone();
        sc.seed = seed;
        let scale = 24.0 / self.duration_s as f64;
        sc.duration_s = 24;
        sc.warmup_s = ((self.warmup_s as f64 * scale).round() as u64).clamp(1, 5);
        sc.sites = 60.min(self.sites);
        let kept = sc.sites as f64 / self.sites as f64;
        sc.workload.rate_qps *= kept;
        sc.workload.bypass_write_qps *= kept;
        sc.warm_start_s = self.warm_start_s.min(300);
        for f in &mut sc.faults {
            scale_fault(f, scale);
        }
        sc
    }

    /// The small-world form (see [`Scenario::small`]'s field): the short
    /// form, made small when it runs.
    pub fn small(&self, seed: u64) -> Scenario {
        let mut sc = self.short(seed);
        sc.small = true;
        sc
    }

    /// Faults in the order they begin (ties keep file order).
    pub fn faults_sorted(&self) -> Vec<Fault> {
        let mut f = self.faults.clone();
        f.sort_by(|a, b| a.at_s().total_cmp(&b.at_s()));
        f
    }

    /// The range of every number: every duration, rate, share and size the
    /// world turns into time or memory (NaN is in no range).
    fn validate_numbers(&self) -> Result<(), String> {
        let (w, t, d, g, n) = (&self.workload, &self.tiers, &self.db, &self.targets, &self.network);
        int("duration_s", self.duration_s, 1, 86_400)?;
        range("warmup_rate_factor", self.warmup_rate_factor, 1.0, 20.0)?;
        int("sites", self.sites as u64, 1, 300)?;
        range("workload.rate_qps", w.rate_qps, f64::MIN_POSITIVE, 2_000_000.0)?;
        int("workload.keys", w.keys, 1, 10_000_000)?;
        for (name, v) in [
            ("workload.write_ratio", w.write_ratio),
            ("workload.eu_resident_share", w.eu_resident_share),
            ("workload.hot_write_share", w.hot_write_share),
        ] {
            range(name, v, 0.0, 1.0)?;
        }
        int("workload.sessions_per_site", u64::from(w.sessions_per_site), 1, 1000)?;
        range("workload.zipf_s", w.zipf_s, 0.0, 5.0)?;
        range("network.client_rtt_ms_min", n.client_rtt_ms_min, 0.0, 1e4)?;
        range("network.client_rtt_ms_max", n.client_rtt_ms_max, 0.0, 1e4)?;
        int("network.timeout_ms", n.timeout_ms, 1, MS_MAX as u64)?;
        range("network.fiber_km_per_ms", n.fiber_km_per_ms, 1e-3, 1e6)?;
        range("network.route_factor", n.route_factor, 1.0, 100.0)?;
        range("network.route_factor_short", n.route_factor_short, 1.0, 100.0)?;
        range("network.hop_ms", n.hop_ms, 0.0, 1e4)?;
        range("network.jitter_ms", n.jitter_ms, 0.0, 1e4)?;
        range("network.jitter_tail", n.jitter_tail, 0.0, 1.0)?;
        range("network.jitter_tail_ms", n.jitter_tail_ms, 0.0, 1e3)?;
        range("network.loss", n.loss, 0.0, 0.1)?;
        range("workload.bypass_write_qps", w.bypass_write_qps, 0.0, 100_000.0)?;
        for (name, v) in [("workload.point", w.point), ("workload.range", w.range), ("workload.join", w.join)] {
            range(name, v, 0.0, 1e6)?;
        }
        // the modelled database keeps every commit (the checkers read them
        // all): bound the run's volume, not only its rates
        let secs = self.duration_s as f64;
        let queries = (w.rate_qps + w.bypass_write_qps) * secs;
        let commits = (w.rate_qps * w.write_ratio + w.bypass_write_qps) * secs;
        if queries > 1e9 || commits > 5e7 {
            return Err(format!(
                "a run of {queries:.3e} queries and {commits:.3e} commits: at most 1e9 and 5e7 \
                 (lower duration_s, workload.rate_qps, write_ratio or bypass_write_qps)"
            ));
        }
        range("workload.write_zipf_s", w.write_zipf_s, 0.0, 5.0)?;
        range("workload.utc_hour_start", w.utc_hour_start, 0.0, 24.0)?;
        range("workload.sun_speed", w.sun_speed, 0.0, 1.0)?;
        for (name, v) in [("tiers.l1_ms", t.l1_ms), ("tiers.l2_ms", t.l2_ms), ("tiers.l3_ms", t.l3_ms)] {
            range(name, v, 0.0, 10_000.0)?;
        }
        for (name, v) in [("tiers.l1_entries", t.l1_entries), ("tiers.l2_entries", t.l2_entries)] {
            int(name, v as u64, 1, 10_000_000)?;
        }
        int("tiers.l3_entries", t.l3_entries as u64, 1, 100_000_000)?;
        int("tiers.ttl_s", t.ttl_s, 1, 30 * 86_400)?;
        int("warm_start_s", self.warm_start_s, 0, 30 * 86_400)?;
        // what the sites hold together, and what the warm start draws (a
        // key per site): each valid alone, too much memory or time together
        let held = self.sites as u64 * (t.l1_entries as u64 + t.l2_entries as u64);
        int("sites x (tiers.l1_entries + tiers.l2_entries)", held, 1, 200_000_000)?;
        if self.warm_start_s > 0 {
            int("sites x workload.keys (the warm start)", self.sites as u64 * w.keys, 1, 1_000_000_000)?;
        }
        if let Some(wd) = &self.worker {
            // a feed pulled less often than the silence bound would leave the cache unusable between pulls
            int("worker.feed_ms", wd.feed_ms, 1, self.db.cdc_silence_max_ms.max(1))?;
            int("worker.pull_round_trips", u64::from(wd.pull_round_trips), 0, 10)?;
            range("worker.poll_ms", wd.poll_ms, 0.0, 10_000.0)?;
            int("worker.pull_timeout_ms", wd.pull_timeout_ms, 1, MS_MAX as u64)?;
            range("worker.isolate_life_s", wd.isolate_life_s, 1.0, 1e7)?;
            int("worker.cache_entries", wd.cache_entries as u64, 1, 10_000_000)?;
        }
        int("tiers.entry_bytes", u64::from(t.entry_bytes), 1, 1 << 24)?;
        for (name, v) in [
            ("db.point_ms", d.point_ms),
            ("db.range_ms", d.range_ms),
            ("db.join_ms", d.join_ms),
            ("db.write_ms", d.write_ms),
            ("db.replica_apply_ms", d.replica_apply_ms),
            ("db.wal_send_ms", d.wal_send_ms),
            ("db.cdc_lag_ms", d.cdc_lag_ms),
        ] {
            range(name, v, 0.0, MS_MAX)?;
        }
        for (name, v) in [("db.cdc_duplicate", d.cdc_duplicate), ("db.cdc_reorder", d.cdc_reorder)] {
            range(name, v, 0.0, 1.0)?;
        }
        for (name, v) in [
            ("db.heartbeat_ms", d.heartbeat_ms),
            ("db.heartbeat_timeout_ms", d.heartbeat_timeout_ms),
            ("db.promote_ms", d.promote_ms),
            ("db.cdc_silence_max_ms", d.cdc_silence_max_ms),
        ] {
            int(name, v, 1, MS_MAX as u64)?;
        }
        for (name, v) in [
            ("targets.read_p95_ms", g.read_p95_ms),
            ("targets.write_p95_ms", g.write_p95_ms),
            ("targets.rto_primary_ms", g.rto_primary_ms),
            ("targets.rto_regional_ms", g.rto_regional_ms),
            ("targets.rto_cache_ms", g.rto_cache_ms),
            ("targets.rpo_async_ms", g.rpo_async_ms),
            ("targets.staleness_ms", g.staleness_ms),
        ] {
            range(name, v, 0.0, 1e9)?;
        }
        range("targets.hit_rate", g.hit_rate, 0.0, 1.0)?;
        range("targets.availability", g.availability, 0.0, 1.0)?;
        self.validate_fault_numbers()
    }

    /// Each fault's durations and sizes within their ranges.
    fn validate_fault_numbers(&self) -> Result<(), String> {
        let horizon = 86_400.0;
        for f in &self.faults {
            let label = f.label();
            match f {
                Fault::PrimaryCrash { restart_after_s: Some(x), .. }
                | Fault::ReplicaCrash { restart_after_s: Some(x), .. } => {
                    range(&format!("fault {label}: restart_after_s"), *x, 0.0, horizon)?
                }
                Fault::RegionalOutage { duration_s, .. }
                | Fault::EdgePartition { duration_s, .. }
                | Fault::PrimaryPartition { duration_s, .. }
                | Fault::CdcStall { duration_s, .. } => {
                    range(&format!("fault {label}: duration_s"), *duration_s, 0.0, horizon)?
                }
                Fault::SlowLink { extra_ms, duration_s, .. } => {
                    range(&format!("fault {label}: duration_s"), *duration_s, 0.0, horizon)?;
                    range(&format!("fault {label}: extra_ms"), *extra_ms, 0.0, MS_MAX)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        // (it names the report's files: `<dir>/<name>.svg`, `<name>-<seed>.toml`)
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty() || !self.name.chars().all(plain) || self.name.starts_with('.') {
            return Err(format!("name {:?}: letters, digits, '-', '_' and '.' only (it names files)", self.name));
        }
        self.validate_numbers()?;
        let w = &self.workload;
        if self.warmup_s >= self.duration_s {
            return Err("warmup_s must be shorter than duration_s".into());
        }
        if w.point + w.range + w.join <= 0.0 {
            return Err("workload.point/range/join must not all be zero".into());
        }
        if self.network.client_rtt_ms_min > self.network.client_rtt_ms_max {
            return Err("network.client_rtt_ms_min must not exceed network.client_rtt_ms_max".into());
        }
        for f in &self.faults {
            if !(0.0..self.duration_s as f64).contains(&f.at_s()) {
                return Err(format!("fault {}: at_s = {} is outside the run", f.label(), f.at_s()));
            }
            let region = match f {
                Fault::ReplicaCrash { region, .. }
                | Fault::RegionalOutage { region, .. }
                | Fault::EdgePartition { region, .. }
                | Fault::PrimaryPartition { region, .. }
                | Fault::SlowLink { region, .. }
                | Fault::SlotDrop { region, .. }
                | Fault::EdgeRestart { region, .. } => Some(region.as_str()),
                Fault::TierLoss { region, tier, .. } => {
                    if !matches!(tier.as_str(), "L1" | "L2" | "L3") {
                        return Err(format!("tier-loss tier {tier:?} is not L1, L2 or L3"));
                    }
                    region.as_deref()
                }
                _ => None,
            };
            if let Some(r) = region
                && postai_core::router::Zone::parse(r).is_none()
            {
                return Err(format!("fault {}: unknown region {r:?} (EU, US, APAC)", f.label()));
            }
        }
        Ok(())
    }
}

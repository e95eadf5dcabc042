//! Runs one scenario inside madsim and turns the history into a report.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures_util::StreamExt;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::FuturesUnordered;

use postai_core::node::{InvalidationMode, Served};
use postai_core::router::Zone;
use serde::Serialize;

use crate::check::split_brain;
use crate::geo::{SITES_CSV, parse_sites};
use crate::scenario::{Replication, Scenario};
use crate::world::{Shared, World};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub metric: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
    /// Safety rows fail the run whatever the flags.
    pub safety: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Recovery {
    pub fault: String,
    /// The fault's index in the scenario file.
    pub fault_index: usize,
    pub at_s: f64,
    /// Time from the fault to the end of the last 100 ms window in which fewer
    /// than 99 % of the requests in its scope succeeded within the timeout.
    pub rto_ms: f64,
    /// Requests in scope that failed.
    pub failed: u64,
    pub target_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StrategyResult {
    pub strategy: String,
    pub hit_rate: f64,
    pub stale_reads: u64,
    pub stale_share: f64,
    pub staleness_ms_max: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub sites: usize,
    pub simulated_s: u64,
    pub queries: u64,
    pub reads: Quantiles,
    pub writes: Quantiles,
    pub reads_by_region: Vec<(String, Quantiles)>,
    /// Writes by the region of the site they came from (the primary is in one).
    pub writes_by_region: Vec<(String, Quantiles)>,
    pub reads_by_tier: Vec<(String, Quantiles)>,
    /// Read latency CDF per region: (ms, share of reads at or below).
    pub read_cdf_by_region: Vec<(String, Vec<(f64, f64)>)>,
    pub hit_rate: f64,
    pub hit_rate_l1: f64,
    pub hit_rate_l2: f64,
    pub hit_rate_l3: f64,
    /// Share of reads answered at the site (L1 or L2): a read p95 within
    /// the site tiers' service times needs it at 95 % or more.
    pub site_share: f64,
    /// Share of the dataset (the rows of `items`) whose current data a site
    /// holds in L1 or L2 at the end, mean over sites: the rows its unexpired,
    /// valid entries depend on (a range's every row, a point read's one).
    pub edge_data_share: f64,
    pub stale_reads: u64,
    pub staleness_ms_max: f64,
    pub ryw_violations: u64,
    /// Reads that did not show the session's own write because a failover
    /// lost it (asynchronous replication; part of the RPO, not a
    /// read-your-writes bug).
    pub ryw_lost_writes: u64,
    /// Reads that missed only acknowledged commits the crashed primary alone
    /// had (asynchronous replication; see `Checker::limbo_reads`).
    pub limbo_reads: u64,
    /// Writes a pool cut off from the primary relayed through another.
    pub relayed_writes: u64,
    /// Sites' change-stream subscriptions opened again after a break that
    /// continued where they broke off, or started over (caches dropped);
    /// resets received from a pool's new slot (caches dropped).
    pub streams_resumed: u64,
    pub streams_started_over: u64,
    pub streams_new_history: u64,
    pub residency_violations: u64,
    pub acked_writes_lost: u64,
    /// The window of acknowledged data lost: from the oldest lost
    /// acknowledged commit to the end of the lost history.
    pub rpo_ms: f64,
    pub split_brain_epochs: usize,
    pub availability: f64,
    pub failovers: usize,
    /// The database node each failover made the primary, in order.
    pub failover_to: Vec<String>,
    /// Gaps in the change stream the sites gave up on (an event missing
    /// past the CDC-silence bound): the stream the model delivers loses
    /// none, so any is a bug.
    pub cdc_gaps_skipped: u64,
    /// Regional pools and sites whose change stream has a gap at the end
    /// (an event missing while later ones arrived): the model delivers every
    /// event, so any is a bug.
    pub cdc_gaps_open: usize,
    /// The Workers edge's design only: feeds pulled, pulls that failed,
    /// isolates started cold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<(u64, u64, u64)>,
    pub recoveries: Vec<Recovery>,
    pub site_read_p95_ms: Vec<(String, f64, f64, f64)>,
    pub strategies: Vec<StrategyResult>,
    /// Site tier statistics summed over all sites, and L3 over all regions.
    pub tier_stats: Vec<(String, postai_core::cache::TierStats)>,
    pub rows: Vec<Row>,
    /// What a swarm scenario drew from its seed.
    pub drawn: Option<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.pass)
    }
    pub fn safe(&self) -> bool {
        self.rows.iter().all(|r| r.pass || !r.safety)
    }
}

fn q(l: &crate::check::Latency) -> Quantiles {
    Quantiles {
        count: l.count(),
        p50_ms: r3(l.quantile_ms(0.50)),
        p95_ms: r3(l.quantile_ms(0.95)),
        p99_ms: r3(l.quantile_ms(0.99)),
    }
}

/// 101 points of the distribution: the latency at each percentile.
fn cdf(l: &crate::check::Latency) -> Vec<(f64, f64)> {
    if l.count() == 0 {
        return Vec::new();
    }
    (0..=100).map(|p| (r3(l.quantile_ms(p as f64 / 100.0)), p as f64 / 100.0)).collect()
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs `sc` (once, or once per invalidation strategy) on madsim with its seed.
pub fn run_scenario(sc: &Scenario) -> Report {
    run_scenario_with_progress(sc, false)
}

/// As [`run_scenario`]; with `progress`, a progress bar on stderr.
pub fn run_scenario_with_progress(sc: &Scenario, progress: bool) -> Report {
    let world = world(sc);
    let mut report = run_variants(&world, progress);
    report.drawn = (sc.swarm || sc.small).then(|| crate::swarm::describe(&world));
    report
}

/// The world a scenario runs: drawn from its seed when it is a swarm, made
/// small when it is small; neither is left to do in what this returns (run
/// with the same seed, it is the same run).
pub fn world(sc: &Scenario) -> Scenario {
    let mut world = if sc.swarm { crate::swarm::draw(sc) } else { sc.clone() };
    if world.small {
        crate::swarm::small_world(&mut world);
    }
    world
}

fn run_variants(sc: &Scenario, progress: bool) -> Report {
    let sc = sc.clone();
    if !sc.compare_invalidation {
        return run_once(&sc, sc.workload.invalidation, progress);
    }
    let mut base: Option<Report> = None;
    let mut strategies = Vec::new();
    for mode in [InvalidationMode::TtlOnly, InvalidationMode::Table, InvalidationMode::Key, InvalidationMode::Refresh] {
        let r = run_once(&sc, mode, progress);
        let reads = r.reads.count.max(1);
        strategies.push(StrategyResult {
            strategy: format!("{mode:?}"),
            hit_rate: r.hit_rate,
            stale_reads: r.stale_reads,
            stale_share: r3(r.stale_reads as f64 / reads as f64 * 100.0) / 100.0,
            staleness_ms_max: r.staleness_ms_max,
        });
        if mode == sc.workload.invalidation {
            base = Some(r);
        }
    }
    let mut report = base.unwrap_or_else(|| run_once(&sc, sc.workload.invalidation, progress));
    report.strategies = strategies;
    report
}

fn run_once(sc: &Scenario, mode: InvalidationMode, progress: bool) -> Report {
    let places = parse_sites(SITES_CSV).expect("sites.csv is checked by a test");
    let rt = madsim::runtime::Runtime::with_seed_and_config(sc.seed, madsim::Config::default());
    let sc2 = sc.clone();
    rt.block_on(async move { simulate(sc2, places, mode, progress).await })
}

/// The requests that went upstream, run as futures of one task rather than a
/// task each: madsim keeps a record of every task it ever spawned (a `Weak`
/// in a list it never trims, a few hundred bytes each), which made a one-hour
/// run grow by gigabytes; one task is also cheaper to schedule.
#[derive(Default)]
struct Upstreams {
    inbox: RefCell<Vec<LocalBoxFuture<'static, ()>>>,
    waker: RefCell<Option<Waker>>,
}

impl Upstreams {
    fn push(&self, request: impl Future<Output = ()> + 'static) {
        self.inbox.borrow_mut().push(Box::pin(request));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Runs every request pushed, for ever (the runtime drops it at the end).
    async fn drive(self: Rc<Self>) {
        let mut running: FuturesUnordered<LocalBoxFuture<'static, ()>> = FuturesUnordered::new();
        std::future::poll_fn(move |cx| {
            running.extend(self.inbox.borrow_mut().drain(..));
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        })
        .await
    }
}

async fn simulate(sc: Scenario, places: Vec<crate::geo::Place>, mode: InvalidationMode, progress: bool) -> Report {
    let world: Shared = Rc::new(RefCell::new(World::new(sc.clone(), &places, mode)));
    let duration = std::time::Duration::from_secs(sc.duration_s);
    let tick_ms = 10u64;
    let upstreams = Rc::new(Upstreams::default());
    madsim::task::spawn_local(upstreams.clone().drive());
    // (spawned in this order: the runtime's schedule, and so the run, follows it)
    spawn_workload(&world, &upstreams, duration, tick_ms);
    if sc.workload.bypass_write_qps > 0.0 {
        spawn_bypass_writes(&world, sc.workload.bypass_write_qps, duration, tick_ms);
    }
    spawn_cdc(&world);
    spawn_probes(&world);
    spawn_control(&world, sc.db.heartbeat_ms, sc.db.promote_ms);
    // faults
    for (index, fault) in sc.faults.clone().into_iter().enumerate() {
        let w = world.clone();
        madsim::task::spawn_local(async move {
            madsim::time::sleep(std::time::Duration::from_secs_f64(fault.at_s())).await;
            let end = w.borrow_mut().apply_fault(index, &fault, true);
            if let Some(after) = end {
                madsim::time::sleep(std::time::Duration::from_secs_f64(after)).await;
                w.borrow_mut().apply_fault(index, &fault, false);
            }
        });
    }
    if progress {
        let label = format!("{} ({mode:?})", sc.name);
        let total = sc.duration_s;
        madsim::task::spawn_local(async move {
            use std::io::Write;
            for step in 1..=20u64 {
                madsim::time::sleep(std::time::Duration::from_secs_f64(total as f64 / 20.0)).await;
                let bar: String = (0..20).map(|i| if i < step { '#' } else { '.' }).collect();
                eprint!("\r  {label} [{bar}] {:>3} / {total} s simulated", step * total / 20);
                let _ = std::io::stderr().flush();
            }
            eprintln!();
        });
    }
    // run, then let in-flight requests drain
    madsim::time::sleep(duration + std::time::Duration::from_secs(60)).await;
    let report = build_report(&world.borrow());
    world.borrow_mut().release();
    report
}

/// The workload: one generator for every site (one timer instead of one
/// per site: 300 wakeups per tick cost more than the loop).
fn spawn_workload(world: &Shared, upstreams: &Rc<Upstreams>, duration: std::time::Duration, tick_ms: u64) {
    {
        let w = world.clone();
        let upstreams = upstreams.clone();
        madsim::task::spawn_local(async move {
            let (sites, per_site) = {
                let wb = w.borrow();
                (wb.sites.len(), wb.sc.workload.rate_qps / wb.sites.len() as f64)
            };
            let mut carry = vec![0.0f64; sites];
            loop {
                madsim::time::sleep(std::time::Duration::from_millis(tick_ms)).await;
                let now = w.borrow().now();
                if now.as_nanos() >= duration.as_nanos() as u64 {
                    break;
                }
                let t_s = now.as_nanos() as f64 / 1e9;
                let mut wb = w.borrow_mut();
                let warm = if t_s < wb.sc.warmup_s as f64 { wb.sc.warmup_rate_factor } else { 1.0 };
                for (site, carry) in carry.iter_mut().enumerate() {
                    let expected = per_site * warm * wb.sun_factor(site, t_s) * tick_ms as f64 / 1e3 + *carry;
                    let n = expected.floor();
                    *carry = expected - n;
                    for _ in 0..n as u64 {
                        if let Some(u) = wb.start_query(site) {
                            upstreams.push(crate::world::upstream(w.clone(), site, u));
                        }
                    }
                }
            }
        });
    }
}

/// Writes that bypass the edge, at the scenario's rate.
fn spawn_bypass_writes(world: &Shared, rate: f64, duration: std::time::Duration, tick_ms: u64) {
    let w = world.clone();
    madsim::task::spawn_local(async move {
        let mut carry = 0.0;
        loop {
            madsim::time::sleep(std::time::Duration::from_millis(tick_ms)).await;
            if w.borrow().now().as_nanos() >= duration.as_nanos() as u64 {
                break;
            }
            let expected = rate * tick_ms as f64 / 1e3 + carry;
            let n = expected.floor();
            carry = expected - n;
            let mut wb = w.borrow_mut();
            for _ in 0..n as u64 {
                wb.bypass_write();
            }
            let now = wb.now();
            wb.settle_acks(now);
        }
    });
}

/// CDC delivery every 20 ms, and keepalives every 200 ms.
fn spawn_cdc(world: &Shared) {
    let w = world.clone();
    madsim::task::spawn_local(async move {
        let mut tick = 0u64;
        loop {
            madsim::time::sleep(std::time::Duration::from_millis(20)).await;
            tick += 1;
            if tick.is_multiple_of(10) {
                w.borrow_mut().emit_keepalive();
            }
            w.borrow_mut().pump_cdc();
        }
    });
}

/// Health probes of open circuit breakers.
fn spawn_probes(world: &Shared) {
    let w = world.clone();
    madsim::task::spawn_local(async move {
        loop {
            madsim::time::sleep(std::time::Duration::from_millis(100)).await;
            let probes = w.borrow_mut().due_probes();
            for p in probes {
                let w2 = w.clone();
                madsim::task::spawn_local(async move {
                    madsim::time::sleep(std::time::Duration::from_secs_f64(p.ms / 1e3)).await;
                    w2.borrow_mut().probe_result(&p);
                });
            }
        }
    });
}

/// The control plane: heartbeats, failover.
fn spawn_control(world: &Shared, hb: u64, promote_ms: u64) {
    let w = world.clone();
    madsim::task::spawn_local(async move {
        loop {
            madsim::time::sleep(std::time::Duration::from_millis(hb.min(500))).await;
            let promotions = w.borrow_mut().tick_control();
            let started = w.borrow().now();
            for (node, epoch) in promotions {
                let w2 = w.clone();
                madsim::task::spawn_local(async move {
                    madsim::time::sleep(std::time::Duration::from_millis(promote_ms)).await;
                    w2.borrow_mut().finish_promotion(node, epoch, started);
                });
            }
        }
    });
}

fn tier_stats(w: &World) -> Vec<(String, postai_core::cache::TierStats)> {
    use postai_core::cache::{TierName, TierStats};
    let add = |a: &mut TierStats, b: TierStats| {
        a.hits += b.hits;
        a.misses += b.misses;
        a.expirations += b.expirations;
        a.evictions += b.evictions;
        a.invalidations += b.invalidations;
        a.inserts += b.inserts;
        a.oversized += b.oversized;
        a.bytes += b.bytes;
        a.entries += b.entries;
    };
    let mut out = Vec::new();
    for t in [TierName::L1, TierName::L2] {
        let mut sum = TierStats::default();
        for s in &w.sites {
            if let Some(tier) = s.node.tier(t) {
                add(&mut sum, tier.stats());
            }
        }
        out.push((format!("{t:?}"), sum));
    }
    let mut sum = TierStats::default();
    for r in &w.regions {
        add(&mut sum, r.l3.stats());
    }
    out.push(("L3".to_string(), sum));
    out
}

/// What the target rows judge.
struct Measured {
    hit_rate: f64,
    availability: f64,
    lost: u64,
    rpo_ms: f64,
    staleness_ms_max: f64,
    split_epochs: usize,
}

/// A row per target: PASS or FAIL, and whether it is a safety row.
fn target_rows(
    sc: &Scenario,
    c: &crate::check::Checker,
    m: &Measured,
    reads: &Quantiles,
    writes: &Quantiles,
    recoveries: &[Recovery],
) -> Vec<Row> {
    let mut rows = Rows(service_rows(sc, m, reads, writes));
    let t = &sc.targets;
    let ryw_promised = sc.workload.consistency != postai_core::consistency::Consistency::Eventual;
    if ryw_promised {
        rows.add(
            "read-your-writes violations",
            format!("{}", t.ryw_violations),
            format!("{}", c.ryw_violations),
            c.ryw_violations <= t.ryw_violations,
            true,
        );
    }
    if sc.db.replication == Replication::Sync {
        rows.add(
            "RPO (acknowledged writes lost)",
            format!("{}", t.rpo_writes),
            format!("{} ({:.0} ms)", m.lost, m.rpo_ms),
            m.lost <= t.rpo_writes,
            true,
        );
    } else {
        // asynchronous replication may lose what the standby had not
        // received: judged by the window of data lost, not the count
        rows.add(
            "RPO (window of acknowledged data lost, async)",
            format!("< {:.0} ms", t.rpo_async_ms),
            format!("{:.0} ms ({} writes)", m.rpo_ms, m.lost),
            m.rpo_ms < t.rpo_async_ms,
            false,
        );
    }
    // the bound README states: the CDC-silence bound plus delivery
    rows.add(
        "max staleness",
        format!("< {:.0} ms", t.staleness_ms),
        format!("{:.0} ms", m.staleness_ms_max),
        m.staleness_ms_max < t.staleness_ms,
        true,
    );
    rows.add(
        "primaries accepting writes in one epoch",
        "<= 1".into(),
        format!("{} epochs with 2+", m.split_epochs),
        m.split_epochs == 0,
        true,
    );
    if sc.workload.eu_resident_share > 0.0 {
        rows.add(
            "EU rows cached or served outside EU",
            "0".into(),
            format!("{}", c.residency_violations),
            c.residency_violations == 0,
            true,
        );
    }
    for rec in recoveries {
        if let Some(target) = rec.target_ms {
            rows.add(
                &format!("RTO {}", rec.fault),
                format!("< {target:.0} ms"),
                format!("{:.0} ms", rec.rto_ms),
                rec.rto_ms < target,
                false,
            );
        }
    }

    rows.0
}

/// The rows of the service's targets: latency, hit rate, availability.
fn service_rows(sc: &Scenario, m: &Measured, reads: &Quantiles, writes: &Quantiles) -> Vec<Row> {
    let t = &sc.targets;
    let mut rows = Rows(Vec::new());
    rows.add(
        "read p95",
        format!("< {} ms", t.read_p95_ms),
        format!("{:.2} ms", reads.p95_ms),
        reads.p95_ms < t.read_p95_ms,
        false,
    );
    rows.add(
        "write p95",
        format!("< {} ms", t.write_p95_ms),
        format!("{:.2} ms", writes.p95_ms),
        writes.p95_ms < t.write_p95_ms,
        false,
    );
    rows.add(
        "cache hit rate",
        format!(">= {:.1} %", t.hit_rate * 100.0),
        format!("{:.2} %", m.hit_rate * 100.0),
        m.hit_rate >= t.hit_rate,
        false,
    );
    rows.add(
        "availability",
        format!(">= {:.2} %", t.availability * 100.0),
        format!("{:.4} %", m.availability * 100.0),
        m.availability >= t.availability,
        false,
    );
    rows.0
}

/// The rows of a report's targets, as they are added.
struct Rows(Vec<Row>);

impl Rows {
    fn add(&mut self, metric: &str, target: String, measured: String, pass: bool, safety: bool) {
        self.0.push(Row { metric: metric.into(), target, measured, pass, safety });
    }
}

fn build_report(w: &World) -> Report {
    let sc = &w.sc;
    let c = &w.checker;
    let reads_total = c.read_ok + c.read_failed;
    let served = |s: Served| c.reads_by_served.get(&s).map_or(0, |l| l.count());
    let (l1, l2, l3, rep, pri) =
        (served(Served::L1), served(Served::L2), served(Served::L3), served(Served::Replica), served(Served::Primary));
    let reads_ok = c.read_ok.max(1) as f64;
    let hit_rate = (l1 + l2 + l3) as f64 / reads_ok;
    let hit_rate_l1 = l1 as f64 / reads_ok;
    let site_share = (l1 + l2) as f64 / reads_ok;
    let l2_lookups = reads_ok - l1 as f64;
    let hit_rate_l2 = if l2_lookups > 0.0 { l2 as f64 / l2_lookups } else { 0.0 };
    let l3_lookups = (l3 + rep + pri) as f64;
    let hit_rate_l3 = if l3_lookups > 0.0 { l3 as f64 / l3_lookups } else { 0.0 };
    let edge_data_share = w.rows_held_per_site() / sc.workload.keys as f64;
    let total = reads_total + c.write_ok + c.write_failed;
    let availability = (c.read_ok + c.write_ok) as f64 / total.max(1) as f64;
    let lost = c.lost_acked.len() as u64;
    let rpo_ms = c.rpo_ms();
    let (stale_reads, staleness_ms_max) = c.stale();
    let split = split_brain(&w.db.accepted);

    // each fault with the target chosen from it when it began (faults at
    // the same instant begin in a seed-dependent order)
    let recoveries: Vec<Recovery> = c
        .recovering
        .iter()
        .map(|rec| Recovery {
            fault: rec.label.clone(),
            fault_index: rec.fault,
            at_s: r3(rec.at.as_nanos() as f64 / 1e9),
            rto_ms: r3(rec.rto_ms()),
            failed: rec.failed,
            target_ms: rec.target_ms,
        })
        .collect();

    let measured = Measured { hit_rate, availability, lost, rpo_ms, staleness_ms_max, split_epochs: split.len() };
    let reads = q(&c.reads);
    let writes = q(&c.writes);
    let rows = target_rows(sc, c, &measured, &reads, &writes, &recoveries);

    let zone_names = |z: &Zone| z.name().to_string();
    let site_read_p95_ms = w
        .sites
        .iter()
        .enumerate()
        .map(|(i, s)| (s.place.name.clone(), s.place.lat, s.place.lon, r3(c.reads_by_site[i].quantile_ms(0.95))))
        .collect();
    Report {
        scenario: sc.name.clone(),
        seed: sc.seed,
        sites: w.sites.len(),
        simulated_s: sc.duration_s,
        queries: w.queries,
        reads,
        writes,
        reads_by_region: c.reads_by_zone.iter().map(|(z, l)| (zone_names(z), q(l))).collect(),
        writes_by_region: c.writes_by_zone.iter().map(|(z, l)| (zone_names(z), q(l))).collect(),
        reads_by_tier: c.reads_by_served.iter().map(|(s, l)| (s.name().to_string(), q(l))).collect(),
        read_cdf_by_region: c.reads_by_zone.iter().map(|(z, l)| (zone_names(z), cdf(l))).collect(),
        hit_rate: r3(hit_rate * 100.0) / 100.0,
        hit_rate_l1: r3(hit_rate_l1 * 100.0) / 100.0,
        hit_rate_l2: r3(hit_rate_l2 * 100.0) / 100.0,
        hit_rate_l3: r3(hit_rate_l3 * 100.0) / 100.0,
        site_share: r3(site_share * 100.0) / 100.0,
        edge_data_share: r3(edge_data_share * 100.0) / 100.0,
        stale_reads,
        staleness_ms_max: r3(staleness_ms_max),
        ryw_violations: c.ryw_violations,
        ryw_lost_writes: c.ryw_lost_writes,
        limbo_reads: c.limbo_reads,
        relayed_writes: c.relayed_writes,
        streams_resumed: c.streams_resumed,
        streams_started_over: c.streams_started_over,
        streams_new_history: c.streams_new_history,
        residency_violations: c.residency_violations,
        acked_writes_lost: lost,
        rpo_ms: r3(rpo_ms),
        split_brain_epochs: split.len(),
        availability: (availability * 1e6).round() / 1e6,
        failovers: w.failovers.len(),
        failover_to: w.failovers.iter().map(|(_, node, _)| w.db.nodes[*node].name.clone()).collect(),
        cdc_gaps_skipped: w.sites.iter().map(|s| s.node.versions().stats().cdc_gaps_skipped).sum(),
        cdc_gaps_open: w.regions.iter().filter(|r| r.versions.has_gap()).count()
            + w.sites.iter().filter(|s| s.node.versions().has_gap()).count(),
        worker: w.sc.worker.as_ref().map(|_| (c.worker_pulls, c.worker_pulls_failed, c.worker_isolates)),
        recoveries,
        site_read_p95_ms,
        strategies: Vec::new(),
        tier_stats: tier_stats(w),
        rows,
        drawn: None,
    }
}

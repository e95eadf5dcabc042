//! The simulated fleet: sites running the core's `EdgeNode`, regional pools
//! with L3 and a `Router` over the database nodes, the modelled PostgreSQL,
//! the CDC stream, the failover controller, and the workload. Everything is
//! driven by madsim's virtual clock; sub-millisecond service times are added
//! to each request's latency account (madsim cannot sleep less than 1 ms).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use postai_core::cache::{Entry, Eviction, Lookup, Tier, TierConfig, TierName};
use postai_core::consistency::{Consistency, entry_meets_floor};
use postai_core::failover::{Epoch, FailoverConfig, FailoverController, FailoverOutput, Fence};
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget, Dep, VersionMap, VersionMapConfig, key_hash};
use postai_core::node::{
    EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Prepared, RequestId, Served, SessionId, UpstreamReply,
    UpstreamRequest,
};
use postai_core::refresh::RefreshIndex;
use postai_core::rng::Rng;
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::sql::{AnalyzerConfig, Catalog, TableId};
use postai_core::{Duration, Instant, Lsn};

mod build;
mod control;
mod faults;
mod stream;
mod upstream;
mod warm;
mod worker;

use stream::{RegionStream, SiteStream};
use warm::{warm_start, zipf_cdf};

pub use upstream::upstream;

use crate::cdc::CdcLink;
use crate::check::{Checker, Recovering, Scope};
use crate::db::{Database, DbNode};
use crate::geo::{Place, hub};
use crate::scenario::{Fault, Scenario};

/// A cached value in the simulation: the snapshot it was read at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Val {
    /// The identity of the newest commit the answer shows (not a WAL
    /// position: see `db.rs`).
    pub lsn: Lsn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Point,
    Range,
    Join,
    Write,
}

pub const RANGE_SPAN: u64 = 10;
/// The least retransmission timeout of a TCP connection (Linux's `TCP_RTO_MIN`).
const RTO_MIN_MS: f64 = 200.0;

/// What loss adds to one message on a connection whose round trip is
/// `rtt_ms`: each time the message is lost, the transport resends it after
/// its retransmission timeout (about a round trip plus Linux's 200 ms
/// minimum), doubled at each consecutive loss. 0 without loss, and then
/// nothing is drawn from `rng` (runs without loss keep their draws).
fn retransmit_ms(rng: &mut Rng, loss: f64, rtt_ms: f64) -> f64 {
    let mut rto = rtt_ms + RTO_MIN_MS;
    let mut ms = 0.0;
    // a run of losses ends: the scenario's loss is at most 0.1
    while loss > 0.0 && rng.unit_f64() < loss {
        ms += rto;
        rto *= 2.0;
    }
    ms
}

struct Stmts {
    point: Prepared,
    range: Prepared,
    join: Prepared,
    write: Prepared,
    point_eu: Prepared,
    write_eu: Prepared,
}

struct SessionInfo {
    id: SessionId,
    rtt_ms: f64,
    consistency: Consistency,
    /// Recent own writes: (key, lsn, acknowledged at), bounded.
    writes: VecDeque<(u64, Lsn, Instant)>,
}

pub struct Site {
    pub place: Place,
    pub node: EdgeNode<Val>,
    stmts: Stmts,
    sessions: Vec<SessionInfo>,
    /// Over the three regions (endpoint id = region index).
    regions: Router,
    region_oneway_ms: [f64; 3],
    /// Its subscription to the home region's stream (`world/stream.rs`).
    stream: SiteStream,
    home: usize,
    pub rate_share: f64,
    /// The Workers edge's isolate and feed (`[worker]`; `world/worker.rs`).
    worker: Option<worker::WorkerSite>,
}

pub struct Region {
    pub zone: Zone,
    pub place: Place,
    pub l3: Tier<Val>,
    pub versions: VersionMap,
    pub router: Router,
    pub epoch: Epoch,
    pub up: bool,
    /// Sites cannot reach this region.
    pub edge_partitioned: bool,
    /// This region cannot reach this database node (a primary partition).
    pub cut_from: Option<usize>,
    pub slow_ms: f64,
    db_oneway_ms: Vec<f64>,
    refresh: RefreshIndex,
    /// When this region last heard the CDC stream (the same silence rule as sites).
    last_cdc: Instant,
    /// The change stream as it reaches this region.
    cdc: CdcLink,
    /// Its slot read, its history, what it published (`world/stream.rs`).
    stream: RegionStream,
    /// Where its process's stream opened: no answer older is filed in L3
    /// (its version map knows nothing of what changed before).
    fills_from: Lsn,
    /// Starts of a new history on its stream (a new slot, a restart): an
    /// answer to a request sent before the current one is not filed, as
    /// the proxy's node files nothing in flight across a primary change
    /// (it may be of positions the new timeline gives to other commits).
    history: u64,
}

/// One in-flight client request.
#[derive(Clone, Copy, Debug)]
struct OpCtx {
    site: usize,
    session: usize,
    op: Op,
    key: u64,
    eu: bool,
    started: Instant,
    /// Latency already accounted before going upstream.
    base_ms: f64,
}

pub struct World {
    pub sc: Scenario,
    pub start: std::time::Instant,
    pub sites: Vec<Site>,
    pub regions: Vec<Region>,
    pub db: Database,
    pub controller: FailoverController,
    pub checker: Checker,
    pub rng: Rng,
    /// Draws of the Workers edge's design only (the native edge's draws stay).
    worker_rng: Rng,
    zipf_cdf: Vec<f64>,
    write_cdf: Vec<f64>,
    inflight: Vec<postai_core::hash::FixedMap<RequestId, OpCtx>>,
    pub items: TableId,
    pub items_eu: TableId,
    last_cdc_lsn: Lsn,
    cdc_stalled_until: Instant,
    pub faults_log: Vec<(Instant, String)>,
    pub failovers: Vec<(Instant, usize, Epoch)>,
    pending_fence: Vec<(usize, Epoch)>,
    pub queries: u64,
    pub mode: InvalidationMode,
    /// Writes that bypass the edge, committed and waiting for their
    /// acknowledgement (synchronous replication: the standby's answer).
    pending_acks: VecDeque<PendingAck>,
    /// The database node each fault (by its index in the scenario) crashed.
    fault_nodes: Vec<Option<usize>>,
    /// One-way delay between the regional pools, in ms (a pool cut off from
    /// the primary relays its writes through another).
    pool_links_ms: [[f64; 3]; 3],
}

/// A commit whose client waits for its acknowledgement.
#[derive(Clone, Copy, Debug)]
struct PendingAck {
    key: u64,
    lsn: Lsn,
    node: usize,
    committed: Instant,
    /// The earliest the answer can come.
    due: Instant,
    /// The client gives up (the outcome stays unknown to it).
    deadline: Instant,
}

pub type Shared = Rc<RefCell<World>>;

#[derive(Clone, Copy, Debug)]
pub enum ProbeFrom {
    Site(usize),
    Region(usize),
}

/// A health check of an endpoint whose breaker is open.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub from: ProbeFrom,
    pub endpoint: EndpointId,
    pub reachable: bool,
    pub ms: f64,
}

fn zone_index(z: Zone) -> usize {
    match z {
        Zone::Eu => 0,
        Zone::Us => 1,
        Zone::Apac => 2,
    }
}

impl World {
    pub fn now(&self) -> Instant {
        let d = madsim::time::Instant::now().saturating_duration_since(self.start);
        Instant::from_nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Drops the fleet's state (sites, regions, histories) once the report
    /// is built. madsim leaks the tasks still pending when its runtime ends
    /// (a task's record holds the task's own waker: a cycle), and with them
    /// their handle on the world: without this, every scenario run in one
    /// process kept its world (1-2 GB at 300 sites) until the process ended.
    pub fn release(&mut self) {
        self.sites = Vec::new();
        self.regions = Vec::new();
        self.inflight = Vec::new();
        self.zipf_cdf = Vec::new();
        self.write_cdf = Vec::new();
        self.db.release();
        self.checker = Checker::new(0, 0, Instant::ZERO);
    }

    fn jitter(&mut self) -> f64 {
        crate::latency::jitter_ms(&self.sc.network, self.rng.unit_f64())
    }

    /// Writes follow their own popularity (`write_zipf_s`; 0 is uniform).
    fn write_key(&mut self) -> u64 {
        let u = self.rng.unit_f64();
        self.write_cdf.partition_point(|c| *c < u).min(self.write_cdf.len() - 1) as u64
    }

    fn zipf_key(&mut self) -> u64 {
        let u = self.rng.unit_f64();
        self.zipf_cdf.partition_point(|c| *c < u).min(self.zipf_cdf.len() - 1) as u64
    }

    /// Relative query rate of a site at simulated time `t_s` (follows the sun).
    pub fn sun_factor(&self, site: usize, t_s: f64) -> f64 {
        let w = &self.sc.workload;
        let lon = self.sites[site].place.lon;
        let hour = (w.utc_hour_start + t_s * w.sun_speed * 3600.0 / 3600.0 + lon / 15.0).rem_euclid(24.0);
        // peak at 14:00 local, trough at 02:00 local: 0.25 .. 1.0
        0.625 + 0.375 * ((hour - 14.0) / 24.0 * std::f64::consts::TAU).cos()
    }

    /// Starts one client query at `site`. Cache hits complete synchronously;
    /// misses return the upstream work to spawn.
    pub fn start_query(&mut self, site: usize) -> Option<UpstreamRequest> {
        let now = self.now();
        self.queries += 1;
        // (before the request's draws: a Worker's pull draws from its own stream)
        let (pulled_ms, pull_after) = self.worker_before(site, now);
        let w = &self.sc.workload;
        let write = self.rng.unit_f64() < w.write_ratio;
        let (pt, rg) = (w.point, w.range);
        let total = w.point + w.range + w.join;
        let eu_share = w.eu_resident_share;
        let hot = w.hot_write_share;
        let op = if write {
            Op::Write
        } else {
            let u = self.rng.unit_f64() * total;
            if u < pt {
                Op::Point
            } else if u < pt + rg {
                Op::Range
            } else {
                Op::Join
            }
        };
        let mut key = if op == Op::Write { self.write_key() } else { self.zipf_key() };
        if op == Op::Write && hot > 0.0 && self.rng.unit_f64() < hot {
            key = 0;
        }
        let eu = matches!(op, Op::Point | Op::Write) && eu_share > 0.0 && self.rng.unit_f64() < eu_share;
        let session = self.rng.below(self.sites[site].sessions.len() as u64) as usize;
        let mut bufs = [[0u8; 20]; 2];
        let params = query_params(key, &mut bufs);
        let s = &mut self.sites[site];
        let sid = s.sessions[session].id;
        let stmt = match (op, eu) {
            (Op::Point, false) => &s.stmts.point,
            (Op::Point, true) => &s.stmts.point_eu,
            (Op::Range, _) => &s.stmts.range,
            (Op::Join, _) => &s.stmts.join,
            (Op::Write, false) => &s.stmts.write,
            (Op::Write, true) => &s.stmts.write_eu,
        };
        let nparams = if op == Op::Range { 2 } else { 1 };
        let req = s.node.handle_execute(now, sid, stmt, &params[..nparams]);
        let rtt = s.sessions[session].rtt_ms;
        let out = s.node.poll_output();
        let ctx = OpCtx { site, session, op, key, eu, started: now, base_ms: rtt + pulled_ms };
        if pull_after {
            self.worker_after(site, now);
        }
        match out {
            Some(NodeOutput::Reply { served, value, .. }) => {
                let tiers = &self.sc.tiers;
                // (a Worker's second tier is in the isolate's memory too)
                let l2_ms = if served == Served::L2 && self.sc.worker.is_none() { tiers.l2_ms } else { 0.0 };
                let ms = ctx.base_ms + tiers.l1_ms + l2_ms + self.jitter();
                self.complete_read(ctx, served, value.lsn, ms);
                None
            }
            Some(NodeOutput::Upstream(u)) => {
                let mut ctx = ctx;
                if u.cache_key.is_some() && !eu_foreign(eu, self.sites[site].place.zone) {
                    let l2_ms = if self.sc.worker.is_none() { self.sc.tiers.l2_ms } else { 0.0 };
                    ctx.base_ms += self.sc.tiers.l1_ms + l2_ms;
                }
                let _ = req;
                self.inflight[site].insert(u.req, ctx);
                Some(u)
            }
            Some(NodeOutput::Failed { .. }) | None => {
                self.fail(ctx, now);
                None
            }
        }
    }

    fn keys_of(op: Op, key: u64) -> Vec<u64> {
        match op {
            Op::Range => (key..=key + RANGE_SPAN).collect(),
            _ => vec![key],
        }
    }

    fn complete_read(&mut self, ctx: OpCtx, served: Served, snapshot: Lsn, ms: f64) {
        let now = self.now();
        let site_zone = self.sites[ctx.site].place.zone;
        if ctx.eu && site_zone != Zone::Eu && matches!(served, Served::L1 | Served::L2) {
            self.checker.residency_violations += 1;
        }
        // EU-resident rows are not in the simulated key history (their own table)
        if !ctx.eu {
            let keys = Self::keys_of(ctx.op, ctx.key);
            let on_no_live_node = self.db.on_no_live_node(now);
            let db = &self.db;
            self.checker.check_read(&keys, snapshot, ctx.started, on_no_live_node, &|l| db.includes(snapshot, l));
            let sess = &self.sites[ctx.site].sessions[ctx.session];
            if sess.consistency != Consistency::Eventual && self.checker.measured(ctx.started) {
                // judged by what the snapshot shows, not by LSN: after a
                // promotion dropped commits, the new history's LSNs are
                // higher than a lost write's and do not show it
                let (mut missed, mut missed_lost) = (false, false);
                for (_, l, _) in sess.writes.iter().filter(|(k, _, acked)| *acked <= ctx.started && keys.contains(k)) {
                    if !self.db.includes(snapshot, *l) {
                        if self.db.is_lost(*l) {
                            missed_lost = true;
                        } else {
                            missed = true;
                        }
                    }
                }
                // a write the failover lost cannot be read back: counted
                // with the lost writes (RPO), not as a read-your-writes bug
                self.checker.ryw_violations += u64::from(missed);
                self.checker.ryw_lost_writes += u64::from(missed_lost && !missed);
            }
        }
        let _ = now;
        let upstream = !matches!(served, Served::L1 | Served::L2);
        self.checker.observe(ctx.started, now, false, upstream, site_zone, true);
        if self.checker.measured(ctx.started) {
            self.checker.read_ok += 1;
            self.checker.reads.record_ms(ms);
            self.checker.reads_by_zone.entry(site_zone).or_default().record_ms(ms);
            self.checker.reads_by_served.entry(served).or_default().record_ms(ms);
            self.checker.reads_by_site[ctx.site].record_ms(ms);
        }
    }

    fn fail(&mut self, ctx: OpCtx, now: Instant) {
        if self.checker.measured(ctx.started) {
            if ctx.op == Op::Write {
                self.checker.write_failed += 1;
            } else {
                self.checker.read_failed += 1;
            }
        }
        let zone = self.sites[ctx.site].place.zone;
        self.checker.observe(ctx.started, now, ctx.op == Op::Write, true, zone, false);
    }

    /// The client of the commit at `lsn` (of `key`, if it is in the checked
    /// history) learned at `at` that it was acknowledged. Asynchronous
    /// replication may have lost it already (an ex-primary not yet fenced).
    pub(crate) fn acknowledge(&mut self, key: Option<u64>, lsn: Lsn, committed: Instant, at: Instant) {
        if self.db.is_lost(lsn) {
            self.checker.ack_lost_write(lsn, committed, at);
        } else {
            self.checker.ack_write(key, lsn, committed, at);
        }
    }

    /// Picks a region for an upstream request from `site`.
    fn pick_region(&mut self, site: usize, residency: Option<Zone>) -> Option<(usize, f64)> {
        let now = self.now();
        let s = &mut self.sites[site];
        let req = ReadRequest { residency, floor: None, strong: false };
        let id = s.regions.route_read(now, req).ok()?;
        let r = id.0 as usize;
        Some((r, s.region_oneway_ms[r]))
    }

    fn region_result(&mut self, site: usize, region: usize, result: Result<Duration, ()>) {
        let now = self.now();
        self.sites[site].regions.handle_result(now, EndpointId(region as u32), result);
    }

    fn region_reachable(&self, region: usize) -> bool {
        let r = &self.regions[region];
        r.up && !r.edge_partitioned
    }

    /// See [`retransmit_ms`].
    fn resent_ms(&mut self, rtt_ms: f64) -> f64 {
        retransmit_ms(&mut self.rng, self.sc.network.loss, rtt_ms)
    }

    /// L3 lookup at the region.
    /// A pool's L3 entry for `u`, if it may answer: what it holds and the
    /// position it was filed at.
    fn l3_lookup(&mut self, region: usize, u: &UpstreamRequest) -> Option<(Val, Lsn)> {
        let now = self.now();
        let key = u.cache_key?;
        if u.residency.is_some_and(|z| z != self.regions[region].zone) {
            return None;
        }
        let floor = match u.route {
            postai_core::node::Route::Read { floor } => floor,
            postai_core::node::Route::Primary => return None,
        };
        self.checker.l3_lookups += 1;
        let silence = Duration::from_millis(self.sc.db.cdc_silence_max_ms);
        if now.saturating_since(self.regions[region].last_cdc) > silence {
            return None;
        }
        let r = &mut self.regions[region];
        let versions = &r.versions;
        let complete = versions.complete_through();
        let ok = |e: &Entry<Val>| versions.is_valid(e.lsn, &e.deps) && entry_meets_floor(e.lsn, floor, complete, false);
        match r.l3.get(now, key, ok) {
            Lookup::Hit(e) => {
                self.checker.l3_hits += 1;
                Some((e.value, e.lsn))
            }
            Lookup::Miss => None,
        }
    }

    /// Files a pool's answer holding `snapshot` (a commit's identity) at
    /// its position `pos`.
    fn l3_fill(&mut self, region: usize, u: &UpstreamRequest, snapshot: Lsn, pos: Lsn) {
        let now = self.now();
        let Some(key) = u.cache_key else { return };
        if u.residency.is_some_and(|z| z != self.regions[region].zone) {
            return;
        }
        let r = &mut self.regions[region];
        if pos < r.fills_from || !r.versions.is_valid(pos, &u.deps) {
            return;
        }
        let entry = Entry {
            value: Val { lsn: snapshot },
            lsn: pos,
            deps: u.deps.clone(),
            size_bytes: self.sc.tiers.entry_bytes,
            expires_at: Instant::MAX,
        };
        r.l3.insert(now, key, entry);
    }

    /// A keepalive of the CDC stream: nothing committed after the last
    /// event (none while the primary is down: no poll of its slot returns).
    pub fn emit_keepalive(&mut self) {
        if !self.db.nodes[self.db.primary].up {
            return;
        }
        let lsn = self.last_cdc_lsn;
        self.emit_event(CdcEvent { prev_lsn: lsn, change: Change { lsn, targets: Vec::new() } });
    }

    fn emit_cdc(&mut self, lsn: Lsn, target: ChangeTarget) {
        let prev = self.last_cdc_lsn;
        self.last_cdc_lsn = lsn;
        self.emit_event(CdcEvent { prev_lsn: prev, change: Change { lsn, targets: vec![target] } });
    }

    fn emit_event(&mut self, event: CdcEvent) {
        let now = self.now();
        let primary = self.db.primary;
        let dup = self.sc.db.cdc_duplicate;
        let reorder = self.sc.db.cdc_reorder;
        for r in 0..self.regions.len() {
            let live =
                now + Duration::from_secs_f64((self.regions[r].db_oneway_ms[primary] + self.sc.db.cdc_lag_ms) / 1e3);
            let arrival = live.max(self.cdc_stalled_until);
            let overtaken = reorder > 0.0 && self.rng.unit_f64() < reorder;
            let twice = dup > 0.0 && self.rng.unit_f64() < dup;
            self.regions[r].cdc.send(live, arrival, event.clone(), overtaken, twice);
        }
    }
}

fn eu_foreign(eu: bool, zone: Zone) -> bool {
    eu && zone != Zone::Eu
}

/// The parameters of a query on `key`: the key and, for a range, its upper
/// bound, as text.
fn query_params(key: u64, bufs: &mut [[u8; 20]; 2]) -> [Option<&[u8]>; 2] {
    let [key_buf, hi_buf] = bufs;
    [Some(decimal(key, key_buf)), Some(decimal(key + RANGE_SPAN, hi_buf))]
}

/// `n` in decimal, written into `buf` (a query parameter's text without an
/// allocation per query).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests;

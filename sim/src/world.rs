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

use crate::check::{Checker, Recovering, Scope};
use crate::db::{Database, DbNode};
use crate::geo::{Place, distance_km, hub};
use crate::scenario::{Fault, Scenario};

/// A cached value in the simulation: the snapshot it was read at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Val {
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
    /// CDC events delivered from the home region's log up to here.
    cdc_cursor: usize,
    home: usize,
    pub rate_share: f64,
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
    /// This region cannot reach the primary's node.
    pub primary_partitioned: bool,
    pub slow_ms: f64,
    db_oneway_ms: Vec<f64>,
    refresh: RefreshIndex,
    /// When this region last heard the CDC stream (the same silence rule as sites).
    last_cdc: Instant,
    /// CDC events as they arrive at this region: (arrival, event).
    cdc_log: Vec<(Instant, CdcEvent)>,
    cdc_applied: usize,
    /// Index in `cdc_log` of the first entry (entries before were trimmed).
    cdc_base: usize,
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

    pub fn new(sc: Scenario, places: &[Place], mode: InvalidationMode) -> World {
        let mut rng = Rng::new(sc.seed);
        let net = &sc.network;
        let oneway = |a: (f64, f64), b: (f64, f64)| distance_km(a, b) / net.fiber_km_per_ms * net.route_factor + 0.5;

        // sites: spread evenly over the list
        let n = sc.sites.min(places.len());
        let chosen: Vec<Place> = (0..n).map(|i| places[i * places.len() / n].clone()).collect();

        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let items_eu = catalog.set_primary_key("items_eu", "id");
        catalog.set_primary_key("owners", "id");
        catalog.set_integer_key("items");
        catalog.set_integer_key("items_eu");

        let tier = |entries: usize| TierConfig {
            bytes_max: entries as u64 * sc.tiers.entry_bytes as u64 * 2,
            entries_max: entries,
            ttl: Duration::from_secs(sc.tiers.ttl_s),
            eviction: Eviction::Sieve,
        };
        let hubs: Vec<Place> = Zone::ALL.iter().map(|z| hub(*z)).collect();

        // database nodes: the primary's hub, a same-metro standby, one replica per other region
        let primary_zone = if sc.workload.eu_resident_share > 0.0 { Zone::Eu } else { Zone::Us };
        let mut db_places: Vec<(String, Zone, f64, f64)> = Vec::new();
        let ph = hub(primary_zone);
        db_places.push((format!("{}-primary", ph.name), primary_zone, ph.lat, ph.lon));
        db_places.push((format!("{}-standby", ph.name), primary_zone, ph.lat + 0.3, ph.lon + 0.3));
        for z in Zone::ALL {
            if z != primary_zone {
                let h = hub(z);
                db_places.push((format!("{}-replica", h.name), z, h.lat, h.lon));
            }
        }
        let nodes: Vec<DbNode> = db_places
            .iter()
            .enumerate()
            .map(|(i, (name, zone, lat, lon))| DbNode {
                name: name.clone(),
                zone: *zone,
                lat: *lat,
                lon: *lon,
                up: true,
                fence: Fence { epoch: Epoch(1), is_primary: i == 0 },
                oneway_ms: oneway((ph.lat, ph.lon), (*lat, *lon)),
                apply_ms: sc.db.replica_apply_ms,
                frozen_replay: None,
                needs_rejoin: false,
            })
            .collect();
        let db = Database::new(sc.db.replication, nodes, 0, 1);

        let regions: Vec<Region> = hubs
            .iter()
            .map(|h| {
                let mut router = Router::new(RouterConfig::default(), rng.next_u64());
                let mut db_oneway_ms = Vec::new();
                for (i, n) in db.nodes.iter().enumerate() {
                    let ow = oneway((h.lat, h.lon), (n.lat, n.lon));
                    db_oneway_ms.push(ow);
                    let role = if i == 0 { Role::Primary } else { Role::Replica };
                    router
                        .add_endpoint(EndpointId(i as u32), n.zone, role, 2.0 * ow)
                        .expect("fewer nodes than endpoints_max");
                }
                Region {
                    zone: h.zone,
                    place: h.clone(),
                    l3: Tier::new(tier(sc.tiers.l3_entries)).expect("validated tier config"),
                    versions: VersionMap::new(VersionMapConfig::default(), Lsn(0)),
                    router,
                    epoch: Epoch(1),
                    up: true,
                    edge_partitioned: false,
                    primary_partitioned: false,
                    slow_ms: 0.0,
                    db_oneway_ms,
                    refresh: RefreshIndex::new(sc.tiers.l3_entries * 2),
                    last_cdc: Instant::ZERO,
                    cdc_log: Vec::new(),
                    cdc_applied: 0,
                    cdc_base: 0,
                }
            })
            .collect();

        let node_config = |zone: Zone| NodeConfig {
            zone,
            l1: tier(sc.tiers.l1_entries),
            l2: tier(sc.tiers.l2_entries),
            versions: VersionMapConfig::default(),
            analyzer: AnalyzerConfig::default(),
            sessions_max: 10_000,
            pending_max: 100_000,
            residency: vec![(items_eu, Zone::Eu)],
            invalidation: mode,
            cdc_silence_max: Some(Duration::from_millis(sc.db.cdc_silence_max_ms)),
            fills_wait_for_cdc: false,
        };
        let mut sites = Vec::with_capacity(n);
        for place in chosen {
            let mut node =
                EdgeNode::new(node_config(place.zone), catalog.clone(), Lsn(0)).expect("validated node config");
            let prep =
                |node: &mut EdgeNode<Val>, sql: &str| node.prepare(sql).expect("the simulation's statements lex");
            let stmts = Stmts {
                point: prep(&mut node, "SELECT id, owner, v FROM items WHERE id = $1"),
                range: prep(&mut node, "SELECT id, v FROM items WHERE id BETWEEN $1 AND $2 ORDER BY id"),
                join: prep(
                    &mut node,
                    "SELECT i.id, i.v, o.name FROM items i JOIN owners o ON o.id = i.owner WHERE i.id = $1",
                ),
                write: prep(&mut node, "UPDATE items SET v = v + 1 WHERE id = $1"),
                point_eu: prep(&mut node, "SELECT id, v FROM items_eu WHERE id = $1"),
                write_eu: prep(&mut node, "UPDATE items_eu SET v = v + 1 WHERE id = $1"),
            };
            let mut sessions = Vec::new();
            for s in 0..sc.workload.sessions_per_site {
                let id = SessionId(s as u64);
                let consistency = sc.workload.consistency;
                node.open_session(id, "app", "app", consistency).expect("sessions_max is larger");
                let rtt_ms = net.client_rtt_ms_min + rng.unit_f64() * (net.client_rtt_ms_max - net.client_rtt_ms_min);
                sessions.push(SessionInfo { id, rtt_ms, consistency, writes: VecDeque::new() });
            }
            let mut regions_router = Router::new(
                RouterConfig { open_for: Duration::from_secs(5), ..RouterConfig::default() },
                rng.next_u64(),
            );
            let mut region_oneway_ms = [0.0; 3];
            for (i, h) in hubs.iter().enumerate() {
                region_oneway_ms[i] = oneway((place.lat, place.lon), (h.lat, h.lon));
                regions_router
                    .add_endpoint(EndpointId(i as u32), h.zone, Role::Replica, 2.0 * region_oneway_ms[i])
                    .expect("three regions");
            }
            let home = zone_index(place.zone);
            sites.push(Site {
                place,
                node,
                stmts,
                sessions,
                regions: regions_router,
                region_oneway_ms,
                cdc_cursor: 0,
                home,
                rate_share: 1.0,
            });
        }

        let cdf = zipf_cdf(sc.workload.keys, sc.workload.zipf_s);
        let write_cdf = zipf_cdf(sc.workload.keys, sc.workload.write_zipf_s);

        let controller = FailoverController::new(
            FailoverConfig {
                heartbeat_timeout: Duration::from_millis(sc.db.heartbeat_timeout_ms),
                promote_timeout: Duration::from_millis(sc.db.promote_ms * 3),
                nodes_max: 16,
            },
            Instant::ZERO,
            EndpointId(0),
            &(1..db.nodes.len() as u32).map(EndpointId).collect::<Vec<_>>(),
        );
        let mut world_rng = rng;
        if sc.warm_start_s > 0 {
            warm_start(&sc, &mut sites, &cdf, &mut world_rng);
        }
        let rng = world_rng;
        let measure_from = Instant::from_millis(sc.warmup_s * 1000);
        let checker = Checker::new(sc.workload.keys, n, measure_from);
        let inflight = (0..n).map(|_| postai_core::hash::FixedMap::default()).collect();
        World {
            start: madsim::time::Instant::now(),
            sites,
            regions,
            db,
            controller,
            checker,
            rng,
            zipf_cdf: cdf,
            write_cdf,
            inflight,
            items,
            items_eu,
            last_cdc_lsn: Lsn(0),
            cdc_stalled_until: Instant::ZERO,
            faults_log: Vec::new(),
            failovers: Vec::new(),
            pending_fence: Vec::new(),
            queries: 0,
            mode,
            sc,
        }
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
        self.db.log = Vec::new();
        self.db.accepted = Vec::new();
        self.checker = Checker::new(0, 0, Instant::ZERO);
    }

    /// Distinct rows of `items` held in a site's L1 or L2 (the key deps of
    /// its entries that it would serve now: unexpired and valid), mean over
    /// sites.
    pub fn rows_held_per_site(&self) -> f64 {
        let now = self.now();
        // a range near the end of the key space names rows past it
        let keys = self.sc.workload.keys;
        let absent: Vec<u64> =
            (keys..=keys + RANGE_SPAN).map(|k| key_hash(self.items, decimal(k, &mut [0; 20]))).collect();
        let mut rows = Vec::new();
        let mut total = 0usize;
        for s in &self.sites {
            rows.clear();
            let versions = s.node.versions();
            for tier in [TierName::L1, TierName::L2].into_iter().filter_map(|t| s.node.tier(t)) {
                for e in tier.entries().filter(|e| e.expires_at > now && versions.is_valid(e.lsn, &e.deps)) {
                    rows.extend(e.deps.iter().filter_map(|d| match *d {
                        Dep::Key(t, k) if t == self.items && !absent.contains(&k) => Some(k),
                        _ => None,
                    }));
                }
            }
            rows.sort_unstable();
            rows.dedup();
            total += rows.len();
        }
        total as f64 / self.sites.len().max(1) as f64
    }

    fn jitter(&mut self) -> f64 {
        self.rng.unit_f64() * self.sc.network.jitter_ms
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
        debug_assert!(s.node.poll_timeout().is_none());
        let ctx = OpCtx { site, session, op, key, eu, started: now, base_ms: rtt };
        match out {
            Some(NodeOutput::Reply { served, value, .. }) => {
                let tiers = &self.sc.tiers;
                let ms = rtt + tiers.l1_ms + if served == Served::L2 { tiers.l2_ms } else { 0.0 } + self.jitter();
                self.complete_read(ctx, served, value.lsn, ms);
                None
            }
            Some(NodeOutput::Upstream(u)) => {
                let mut ctx = ctx;
                if u.cache_key.is_some() && !eu_foreign(eu, self.sites[site].place.zone) {
                    ctx.base_ms += self.sc.tiers.l1_ms + self.sc.tiers.l2_ms;
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
            self.checker.check_read(&keys, snapshot, ctx.started);
            let sess = &self.sites[ctx.site].sessions[ctx.session];
            if sess.consistency != Consistency::Eventual
                && sess.writes.iter().any(|(k, l, acked)| *acked <= ctx.started && keys.contains(k) && *l > snapshot)
                && self.checker.measured(ctx.started)
            {
                self.checker.ryw_violations += 1;
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
    fn l3_lookup(&mut self, region: usize, u: &UpstreamRequest) -> Option<Val> {
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
                Some(e.value)
            }
            Lookup::Miss => None,
        }
    }

    fn l3_fill(&mut self, region: usize, u: &UpstreamRequest, snapshot: Lsn) {
        let now = self.now();
        let Some(key) = u.cache_key else { return };
        if u.residency.is_some_and(|z| z != self.regions[region].zone) {
            return;
        }
        let r = &mut self.regions[region];
        if !r.versions.is_valid(snapshot, &u.deps) {
            return;
        }
        let entry = Entry {
            value: Val { lsn: snapshot },
            lsn: snapshot,
            deps: u.deps.clone(),
            size_bytes: self.sc.tiers.entry_bytes,
            expires_at: Instant::MAX,
        };
        r.l3.insert(now, key, entry);
    }

    /// A keepalive of the CDC stream: nothing committed after the last event.
    pub fn emit_keepalive(&mut self) {
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
        let lsn = event.change.lsn;
        let primary = self.db.primary;
        let dup = self.sc.db.cdc_duplicate;
        let reorder = self.sc.db.cdc_reorder;
        for r in 0..self.regions.len() {
            let mut arrival =
                now + Duration::from_secs_f64((self.regions[r].db_oneway_ms[primary] + self.sc.db.cdc_lag_ms) / 1e3);
            arrival = arrival.max(self.cdc_stalled_until);
            let swap = reorder > 0.0 && self.rng.unit_f64() < reorder;
            let twice = dup > 0.0 && self.rng.unit_f64() < dup;
            let log = &mut self.regions[r].cdc_log;
            if let Some(last) = log.last() {
                arrival = arrival.max(last.0);
            }
            log.push((arrival, event.clone()));
            let n = log.len();
            if swap && n >= 2 && log[n - 2].1.change.lsn.0 + 1 >= lsn.0 {
                let (a, b) = (log[n - 2].1.clone(), log[n - 1].1.clone());
                log[n - 2].1 = b;
                log[n - 1].1 = a;
            }
            if twice {
                log.push((arrival, event.clone()));
            }
        }
    }

    /// Delivers arrived CDC events to regions and their sites.
    pub fn pump_cdc(&mut self) {
        let now = self.now();
        let mode = self.mode;
        let entry_bytes = self.sc.tiers.entry_bytes;
        for r in 0..self.regions.len() {
            let region_up = self.regions[r].up;
            {
                let reg = &mut self.regions[r];
                while reg.cdc_applied - reg.cdc_base < reg.cdc_log.len() {
                    let (arr, ev) = &reg.cdc_log[reg.cdc_applied - reg.cdc_base];
                    if *arr > now || !region_up {
                        break;
                    }
                    reg.versions.apply_cdc(ev);
                    reg.last_cdc = now;
                    if mode == InvalidationMode::Refresh {
                        reg.refresh.apply(ev, &mut [&mut reg.l3], &mut |_, _, _, lsn| Some((Val { lsn }, entry_bytes)));
                    }
                    reg.cdc_applied += 1;
                }
            }
            let applied = self.regions[r].cdc_applied;
            let base = self.regions[r].cdc_base;
            let mut min_cursor = applied;
            for s in 0..self.sites.len() {
                if self.sites[s].home != r {
                    continue;
                }
                let delay = Duration::from_secs_f64(self.sites[s].region_oneway_ms[r] / 1e3);
                let site = &mut self.sites[s];
                let log = &self.regions[r].cdc_log;
                let from = site.cdc_cursor;
                if !self.regions[r].edge_partitioned {
                    // arrivals are non-decreasing: the due events are a prefix
                    while site.cdc_cursor < applied && log[site.cdc_cursor - base].0 + delay <= now {
                        site.cdc_cursor += 1;
                    }
                }
                let due = log[from - base..site.cdc_cursor - base].iter().map(|(_, ev)| ev);
                site.node.handle_cdc_batch(now, due, &mut |_, _, _, lsn| Some((Val { lsn }, entry_bytes)));
                min_cursor = min_cursor.min(site.cdc_cursor);
            }
            let reg = &mut self.regions[r];
            let drop = min_cursor - reg.cdc_base;
            if drop > 4096 {
                reg.cdc_log.drain(..drop);
                reg.cdc_base += drop;
            }
        }
    }

    /// Heartbeats, health checks and the failover controller.
    pub fn tick_control(&mut self) -> Vec<(usize, Epoch)> {
        let now = self.now();
        for i in 0..self.db.nodes.len() {
            if self.db.nodes[i].up {
                let lsn = self.db.received_lsn(i, now);
                let partitioned =
                    i == self.db.primary && self.regions[zone_index(self.db.nodes[i].zone)].primary_partitioned;
                if !partitioned {
                    self.controller.handle_heartbeat(now, EndpointId(i as u32), lsn);
                }
                let replay = self.db.replay_lsn(i, now);
                for r in &mut self.regions {
                    r.router.handle_replay_lsn(EndpointId(i as u32), replay);
                }
            }
        }
        // a fenced node that comes back learns its fence
        let pending = std::mem::take(&mut self.pending_fence);
        for (node, epoch) in pending {
            if self.db.nodes[node].up {
                self.db.nodes[node].fence.handle_epoch(epoch, false);
            } else {
                self.pending_fence.push((node, epoch));
            }
        }
        if self.controller.poll_timeout().is_some_and(|t| t <= now) {
            self.controller.handle_timeout(now);
        }
        let mut promotions = Vec::new();
        while let Some(out) = self.controller.poll_output() {
            match out {
                FailoverOutput::Fence { node, epoch } => {
                    let n = node.0 as usize;
                    if self.db.nodes[n].up {
                        self.db.nodes[n].fence.handle_epoch(epoch, false);
                    } else {
                        self.pending_fence.push((n, epoch));
                    }
                }
                FailoverOutput::Promote { node, epoch } => promotions.push((node.0 as usize, epoch)),
                FailoverOutput::RoutesChanged { primary, epoch } => {
                    for r in &mut self.regions {
                        r.router.set_primary(primary);
                        r.epoch = epoch;
                    }
                    self.failovers.push((now, primary.0 as usize, epoch));
                }
                FailoverOutput::NoCandidate => {}
            }
        }
        promotions
    }

    pub fn finish_promotion(&mut self, node: usize, epoch: Epoch) {
        let now = self.now();
        if !self.db.nodes[node].up || self.controller.epoch() != epoch {
            return;
        }
        let lost = self.db.promote(node, epoch, now);
        self.checker.lose(&lost, now);
        self.controller.handle_promoted(now, EndpointId(node as u32), epoch);
        // route changes are drained on the next control tick
    }

    /// Health probes that routers ask for (open breakers past their wait):
    /// `(site or region, endpoint, reachable, round trip ms)`.
    pub fn due_probes(&mut self) -> Vec<Probe> {
        let now = self.now();
        let timeout_ms = self.sc.network.timeout_ms as f64;
        let mut out = Vec::new();
        for (i, site) in self.sites.iter_mut().enumerate() {
            while let Some(id) = site.regions.poll_probe(now) {
                let r = &self.regions[id.0 as usize];
                let reachable = r.up && !r.edge_partitioned;
                let ms = if reachable { 2.0 * site.region_oneway_ms[id.0 as usize] } else { timeout_ms };
                out.push(Probe { from: ProbeFrom::Site(i), endpoint: id, reachable, ms });
            }
        }
        for (i, region) in self.regions.iter_mut().enumerate() {
            while let Some(id) = region.router.poll_probe(now) {
                let node = id.0 as usize;
                let n = &self.db.nodes[node];
                let reachable = region.up && n.up && !(node == self.db.primary && region.primary_partitioned);
                let ms = if reachable { 2.0 * region.db_oneway_ms[node] } else { timeout_ms };
                out.push(Probe { from: ProbeFrom::Region(i), endpoint: id, reachable, ms });
            }
        }
        out
    }

    pub fn probe_result(&mut self, p: &Probe) {
        let now = self.now();
        let result = if p.reachable { Ok(Duration::from_secs_f64(p.ms / 1e3)) } else { Err(()) };
        match p.from {
            ProbeFrom::Site(i) => self.sites[i].regions.handle_result(now, p.endpoint, result),
            ProbeFrom::Region(i) => self.regions[i].router.handle_result(now, p.endpoint, result),
        }
    }

    /// A write that bypasses the edge, made directly on the primary.
    pub fn bypass_write(&mut self) {
        let now = self.now();
        let key = self.write_key();
        let p = self.db.primary;
        let epoch = self.db.nodes[p].fence.epoch;
        if let Ok(lsn) = self.db.write(p, epoch, now, Some(key)) {
            self.checker.ack_write(key, lsn, now);
            let h = key_hash(self.items, decimal(key, &mut [0; 20]));
            self.emit_cdc(lsn, ChangeTarget::Keys(self.items, vec![h]));
        }
    }

    pub fn apply_fault(&mut self, fault: &Fault, begin: bool) -> Option<f64> {
        let now = self.now();
        let region_of = |name: &str| Zone::parse(name).map(zone_index).unwrap_or(0);
        if begin {
            self.faults_log.push((now, fault.label()));
            let scope = match fault {
                Fault::PrimaryCrash { .. } => Scope::Writes,
                Fault::RegionalOutage { region, .. } | Fault::EdgePartition { region, .. } => {
                    Zone::parse(region).map_or(Scope::All, Scope::Upstream)
                }
                Fault::TierLoss { region: Some(region), .. } => Zone::parse(region).map_or(Scope::All, Scope::Zone),
                _ => Scope::All,
            };
            let disrupted_ms = self.sc.network.timeout_ms as f64;
            self.checker.recovering.push(Recovering::new(fault.label(), now, scope, disrupted_ms));
        }
        match fault {
            Fault::PrimaryCrash { restart_after_s, .. } => {
                if begin {
                    let p = self.db.primary;
                    self.db.crash(p, now);
                    *restart_after_s
                } else {
                    // the ex-primary restarts: it rejoins as a replica of the new primary
                    let old = (0..self.db.nodes.len()).find(|&i| !self.db.nodes[i].up && self.db.nodes[i].needs_rejoin);
                    if let Some(i) = old {
                        self.db.restart(i);
                        let epoch = self.controller.epoch();
                        self.db.nodes[i].fence.handle_epoch(epoch, false);
                        self.db.nodes[i].needs_rejoin = false;
                    } else if let Some(i) = (0..self.db.nodes.len()).find(|&i| !self.db.nodes[i].up) {
                        self.db.restart(i);
                    }
                    None
                }
            }
            Fault::ReplicaCrash { region, restart_after_s, .. } => {
                let z = Zone::parse(region).unwrap_or(Zone::Eu);
                let node = (0..self.db.nodes.len()).find(|&i| i != self.db.primary && self.db.nodes[i].zone == z);
                if let Some(i) = node {
                    if begin {
                        self.db.crash(i, now);
                    } else {
                        self.db.restart(i);
                    }
                }
                if begin { *restart_after_s } else { None }
            }
            Fault::RegionalOutage { region, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].up = !begin;
                if begin {
                    self.regions[r].l3.clear();
                }
                Some(*duration_s)
            }
            Fault::TierLoss { tier, region, .. } => {
                if !begin {
                    return None;
                }
                let zone = region.as_deref().and_then(Zone::parse);
                match tier.as_str() {
                    "L3" => {
                        for r in &mut self.regions {
                            if zone.is_none_or(|z| z == r.zone) {
                                r.l3.clear();
                            }
                        }
                    }
                    name => {
                        let t = if name == "L1" { TierName::L1 } else { TierName::L2 };
                        for s in &mut self.sites {
                            if zone.is_none_or(|z| z == s.place.zone) {
                                s.node.clear_tier(t);
                            }
                        }
                    }
                }
                None
            }
            Fault::EdgePartition { region, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].edge_partitioned = begin;
                Some(*duration_s)
            }
            Fault::PrimaryPartition { region, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].primary_partitioned = begin;
                Some(*duration_s)
            }
            Fault::SlowLink { region, extra_ms, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].slow_ms = if begin { *extra_ms } else { 0.0 };
                Some(*duration_s)
            }
            Fault::CdcStall { duration_s, .. } => {
                if begin {
                    self.cdc_stalled_until = now + Duration::from_secs_f64(*duration_s);
                }
                None
            }
        }
    }
}

/// Fills every site's tiers as `warm_start_s` seconds of steady reads would
/// have: a key is cached with the probability that at least one of those reads
/// touched it. Hottest keys are filled last, so that L1 holds them.
fn warm_start(sc: &Scenario, sites: &mut [Site], cdf: &[f64], rng: &mut Rng) {
    let w = &sc.workload;
    let total = w.point + w.range + w.join;
    let reads_per_site =
        w.rate_qps / sites.len().max(1) as f64 * (1.0 - w.write_ratio) * sc.warm_start_s as f64 * 0.625;
    let mut prob = Vec::with_capacity(cdf.len());
    let mut prev = 0.0;
    for c in cdf {
        prob.push(c - prev);
        prev = *c;
    }
    // the same for every site: computed once
    let ops = [(Op::Range, w.range), (Op::Join, w.join), (Op::Point, w.point)];
    let touched: Vec<Vec<f64>> = ops
        .iter()
        .map(|(_, share)| {
            let n = reads_per_site * share / total;
            prob.iter().map(|p| 1.0 - (1.0 - p).powf(n)).collect()
        })
        .collect();
    for site in sites.iter_mut() {
        for ((op, _), p_touched) in ops.iter().zip(&touched) {
            for key in (0..prob.len() as u64).rev() {
                if rng.unit_f64() >= p_touched[key as usize] {
                    continue;
                }
                let mut bufs = [[0u8; 20]; 2];
                let params = query_params(key, &mut bufs);
                let (stmt, np) = match op {
                    Op::Range => (&site.stmts.range, 2),
                    Op::Join => (&site.stmts.join, 1),
                    _ => (&site.stmts.point, 1),
                };
                let sid = site.sessions[0].id;
                let req = site.node.handle_execute(Instant::ZERO, sid, stmt, &params[..np]);
                while site.node.poll_output().is_some() {}
                let reply = UpstreamReply {
                    value: Val { lsn: Lsn(0) },
                    size_bytes: sc.tiers.entry_bytes,
                    served: Served::Primary,
                    snapshot_lsn: Lsn(0),
                    commit_lsn: None,
                    ttl: None,
                };
                site.node.handle_upstream(Instant::ZERO, req, Ok(reply));
                while site.node.poll_output().is_some() {}
            }
        }
    }
}

fn zipf_cdf(keys: u64, s: f64) -> Vec<f64> {
    let mut cdf: Vec<f64> = Vec::with_capacity(keys as usize);
    let mut acc = 0.0;
    for k in 0..keys {
        acc += 1.0 / ((k + 1) as f64).powf(s);
        cdf.push(acc);
    }
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
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

fn sleep_ms(ms: f64) -> madsim::time::Sleep {
    madsim::time::sleep(std::time::Duration::from_secs_f64(ms.max(0.0) / 1e3))
}

enum DbOutcome {
    Ok {
        snapshot: Lsn,
        commit: Option<Lsn>,
        served: Served,
        extra_ms: f64,
    },
    /// The request never reached the database: safe to retry.
    Unreachable,
    Refused(String),
}

/// The regional pool: L3, then a database endpoint chosen by the region's router.
async fn region_execute(w: &Shared, region: usize, u: &UpstreamRequest, ctx: OpCtx) -> DbOutcome {
    let (l3_ms, cost_ms) = {
        let wb = w.borrow();
        let db = &wb.sc.db;
        let cost = match ctx.op {
            Op::Point => db.point_ms,
            Op::Range => db.range_ms,
            Op::Join => db.join_ms,
            Op::Write => db.write_ms,
        };
        (wb.sc.tiers.l3_ms, cost)
    };
    if let Some(v) = w.borrow_mut().l3_lookup(region, u) {
        return DbOutcome::Ok { snapshot: v.lsn, commit: None, served: Served::L3, extra_ms: l3_ms };
    }
    let now = w.borrow().now();
    let routed = {
        let mut wb = w.borrow_mut();
        let r = &mut wb.regions[region];
        match u.route {
            postai_core::node::Route::Primary => r.router.route_write(now),
            postai_core::node::Route::Read { floor } => {
                r.router.route_read(now, ReadRequest { residency: u.residency, floor, strong: false })
            }
        }
    };
    let Ok(endpoint) = routed else { return DbOutcome::Unreachable };
    let node = endpoint.0 as usize;
    let (oneway, reachable, timeout_ms, slow) = {
        let mut wb = w.borrow_mut();
        let jitter = wb.jitter();
        let r = &wb.regions[region];
        let is_primary_node = node == wb.db.primary;
        let reachable = wb.db.nodes[node].up && !(is_primary_node && r.primary_partitioned);
        (r.db_oneway_ms[node] + jitter, reachable, wb.sc.network.timeout_ms as f64, r.slow_ms)
    };
    if !reachable {
        sleep_ms(timeout_ms).await;
        let now = w.borrow().now();
        w.borrow_mut().regions[region].router.handle_result(now, endpoint, Err(()));
        return DbOutcome::Unreachable;
    }
    sleep_ms(oneway + slow).await;
    let outcome = {
        let mut wb = w.borrow_mut();
        let now = wb.now();
        if ctx.op == Op::Write {
            let epoch = wb.regions[region].epoch;
            let key = if ctx.eu { None } else { Some(ctx.key) };
            match wb.db.write(node, epoch, now, key) {
                Ok(lsn) => {
                    let table = if ctx.eu { wb.items_eu } else { wb.items };
                    let h = key_hash(table, decimal(ctx.key, &mut [0; 20]));
                    wb.emit_cdc(lsn, ChangeTarget::Keys(table, vec![h]));
                    let ack = wb.db.ack_delay_ms();
                    let served = Served::Primary;
                    Ok((lsn, Some(lsn), served, ack))
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            let snap = wb.db.replay_lsn(node, now);
            let served = if node == wb.db.primary { Served::Primary } else { Served::Replica };
            Ok((snap, None, served, 0.0))
        }
    };
    match outcome {
        Ok((snapshot, commit, served, ack_ms)) => {
            if ack_ms > 0.0 {
                sleep_ms(ack_ms).await;
            }
            sleep_ms(oneway + slow).await;
            let mut wb = w.borrow_mut();
            let now = wb.now();
            let rtt = 2.0 * (oneway + slow) + cost_ms + ack_ms;
            wb.regions[region].router.handle_result(now, endpoint, Ok(Duration::from_secs_f64(rtt / 1e3)));
            if commit.is_none() {
                wb.l3_fill(region, u, snapshot);
            }
            DbOutcome::Ok { snapshot, commit, served, extra_ms: l3_ms + rtt }
        }
        Err(e) => {
            sleep_ms(oneway).await;
            DbOutcome::Refused(e)
        }
    }
}

/// Carries one upstream request from a site to a region and back.
pub async fn upstream(w: Shared, site: usize, u: UpstreamRequest) {
    let Some(ctx) = w.borrow_mut().inflight[site].remove(&u.req) else { return };
    let (timeout_ms, hold_ms) = {
        let wb = w.borrow();
        (
            wb.sc.network.timeout_ms as f64,
            wb.sc.db.heartbeat_timeout_ms as f64 + 3.0 * wb.sc.db.promote_ms as f64 + 5_000.0,
        )
    };
    let mut waited_ms = 0.0;
    let mut attempts = 0;
    let result: Result<(Val, Served, Option<Lsn>, f64), String> = loop {
        attempts += 1;
        let pick = w.borrow_mut().pick_region(site, u.residency);
        let Some((region, oneway)) = pick else {
            // every region's breaker is open: wait for a half-open probe
            if waited_ms > hold_ms {
                break Err("no region reachable".into());
            }
            sleep_ms(200.0).await;
            waited_ms += 200.0;
            continue;
        };
        // the draws in the order they were made before loss was modelled
        // (reachability, then jitter), so that runs without loss keep theirs
        let reachable = w.borrow().region_reachable(region);
        let (jitter, resent_ms) = if reachable {
            let mut wb = w.borrow_mut();
            let jitter = wb.jitter();
            (jitter, [wb.resent_ms(2.0 * oneway), wb.resent_ms(2.0 * oneway)])
        } else {
            (0.0, [0.0; 2])
        };
        // a request still being resent when the site's timeout fires was not
        // delivered: the site gives up on it and tries again (a late answer
        // to a delivered request is waited for)
        if !reachable || (resent_ms[0] > 0.0 && oneway + jitter + resent_ms[0] >= timeout_ms) {
            sleep_ms(timeout_ms).await;
            waited_ms += timeout_ms;
            w.borrow_mut().region_result(site, region, Err(()));
            if waited_ms > hold_ms || attempts > 50 {
                break Err("region unreachable".into());
            }
            continue;
        }
        sleep_ms(oneway + jitter + resent_ms[0]).await;
        let outcome = region_execute(&w, region, &u, ctx).await;
        sleep_ms(oneway + jitter + resent_ms[1]).await;
        let lost_ms = resent_ms[0] + resent_ms[1];
        match outcome {
            DbOutcome::Ok { snapshot, commit, served, extra_ms } => {
                let ms = waited_ms + 2.0 * (oneway + jitter) + lost_ms + extra_ms;
                w.borrow_mut().region_result(
                    site,
                    region,
                    Ok(Duration::from_secs_f64((2.0 * oneway + lost_ms + extra_ms) / 1e3)),
                );
                break Ok((Val { lsn: snapshot }, served, commit, ms));
            }
            DbOutcome::Unreachable => {
                // no database endpoint: hold the request (like PgBouncer's PAUSE)
                // until failover re-points the routes, then retry
                if waited_ms > hold_ms {
                    break Err("no database endpoint".into());
                }
                sleep_ms(250.0).await;
                waited_ms += 250.0 + 2.0 * oneway + lost_ms;
            }
            DbOutcome::Refused(e) => {
                if waited_ms > hold_ms {
                    break Err(e);
                }
                // a fenced or stale primary: wait for the new routes
                sleep_ms(250.0).await;
                waited_ms += 250.0 + 2.0 * oneway + lost_ms;
            }
        }
    };
    let mut wb = w.borrow_mut();
    let now = wb.now();
    match result {
        Ok((value, served, commit, up_ms)) => {
            let ms = ctx.base_ms + up_ms;
            let reply = UpstreamReply {
                value,
                size_bytes: wb.sc.tiers.entry_bytes,
                served,
                snapshot_lsn: value.lsn,
                commit_lsn: commit,
                ttl: None,
            };
            let node = &mut wb.sites[site].node;
            node.handle_upstream(now, u.req, Ok(reply));
            while let Some(out) = node.poll_output() {
                if let NodeOutput::Failed { .. } = out {
                    wb.fail(ctx, now);
                    return;
                }
            }
            if ctx.op == Op::Write {
                let lsn = commit.unwrap_or(value.lsn);
                if !ctx.eu {
                    wb.checker.ack_write(ctx.key, lsn, now);
                    let sess = &mut wb.sites[site].sessions[ctx.session];
                    sess.writes.push_back((ctx.key, lsn, now));
                    if sess.writes.len() > 16 {
                        sess.writes.pop_front();
                    }
                }
                let zone = wb.sites[site].place.zone;
                wb.checker.observe(ctx.started, now, true, true, zone, true);
                if wb.checker.measured(ctx.started) {
                    wb.checker.write_ok += 1;
                    wb.checker.writes.record_ms(ms);
                    wb.checker.writes_by_zone.entry(zone).or_default().record_ms(ms);
                }
            } else {
                wb.checker.upstream_reads += u64::from(wb.checker.measured(ctx.started));
                wb.complete_read(ctx, served, value.lsn, ms);
            }
        }
        Err(e) => {
            let node = &mut wb.sites[site].node;
            node.handle_upstream(now, u.req, Err(e));
            while node.poll_output().is_some() {}
            wb.fail(ctx, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Rng, decimal, retransmit_ms};

    #[test]
    fn loss_costs_retransmission_timeouts_that_double() {
        let mut rng = Rng::new(7);
        let before = rng.clone().unit_f64();
        assert_eq!(retransmit_ms(&mut rng, 0.0, 100.0), 0.0);
        assert_eq!(rng.unit_f64(), before, "no loss, no draw");
        // every delay is a sum of timeouts 300, 600, 1200, ... ms (a round
        // trip of 100 ms plus 200), and losses are as frequent as drawn
        let n = 100_000;
        let (mut lost, mut twice) = (0, 0);
        for _ in 0..n {
            let ms = retransmit_ms(&mut rng, 0.1, 100.0);
            let k = ((ms / 300.0) + 1.0).log2().round() as u32;
            assert_eq!(ms, 300.0 * f64::from((1u32 << k) - 1), "{ms} is not a run of doubling timeouts");
            lost += u32::from(k >= 1);
            twice += u32::from(k >= 2);
        }
        assert!((9_000..11_000).contains(&lost), "{lost} of {n} messages lost at 10 %");
        assert!((700..1_300).contains(&twice), "{twice} of {n} lost twice at 1 %");
    }

    #[test]
    fn decimal_is_to_string() {
        let mut n = 1u64;
        for x in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX - 1, u64::MAX] {
            assert_eq!(decimal(x, &mut [0; 20]), x.to_string().as_bytes());
        }
        while let Some(m) = n.checked_mul(7) {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
            n = m + 3;
        }
    }
}

//! The world a scenario starts from: the database nodes, one pool per
//! region, the sites with their sessions and routers, the failover
//! controller, every site subscribed to its pool, the warm start.

use super::*;

/// One-way delay between two points (ms): `latency::oneway_ms`.
fn oneway(net: &crate::scenario::Network, a: (f64, f64), b: (f64, f64)) -> f64 {
    crate::latency::oneway_ms(net, a, b)
}

/// A tier of `entries`, sized for the scenario's entries.
fn tier(sc: &Scenario, entries: usize) -> TierConfig {
    TierConfig {
        bytes_max: entries as u64 * sc.tiers.entry_bytes as u64 * 2,
        entries_max: entries,
        ttl: Duration::from_secs(sc.tiers.ttl_s),
        eviction: Eviction::Sieve,
    }
}

/// A pool's L3: kept fresh as the sites' tiers are (its lookups check its
/// version map and the silence bound).
fn l3_tier(sc: &Scenario) -> Tier<Val> {
    let mut l3 = Tier::new(tier(sc, sc.tiers.l3_entries)).expect("validated tier config");
    let key_level = matches!(sc.workload.invalidation, InvalidationMode::Key | InvalidationMode::Refresh);
    if let Some(ttl) = fresh_ttl(sc).filter(|_| key_level) {
        l3.keep_fresh(ttl);
    }
    l3
}

/// How long an entry the stream keeps valid row by row lives (`None`:
/// the tiers' TTL for every entry).
fn fresh_ttl(sc: &Scenario) -> Option<Duration> {
    (sc.tiers.fresh_ttl_s > 0).then(|| Duration::from_secs(sc.tiers.fresh_ttl_s))
}

/// The database: the primary at its region's hub, a same-metro standby,
/// one replica per other region.
fn database(sc: &Scenario) -> Database {
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
            oneway_ms: 0.0,
            apply_ms: sc.db.replica_apply_ms,
            frozen_replay: None,
            needs_rejoin: false,
            crashed_at: None,
        })
        .collect();
    let links_ms: Vec<Vec<f64>> = nodes
        .iter()
        .map(|a| nodes.iter().map(|b| oneway(&sc.network, (a.lat, a.lon), (b.lat, b.lon))).collect())
        .collect();
    let mut db = Database::new(sc.db.replication, nodes, links_ms, 0, 1);
    if sc.db.replication == crate::scenario::Replication::Async {
        db.send_ms = sc.db.wal_send_ms;
    }
    db
}

/// The regional pool at hub `h`: its L3, version map, router over the
/// database nodes, and its change stream.
fn region(sc: &Scenario, h: &Place, db: &Database, rng: &mut Rng) -> Region {
    let mut router = Router::new(RouterConfig::default(), rng.next_u64());
    let mut db_oneway_ms = Vec::new();
    for (i, n) in db.nodes.iter().enumerate() {
        let ow = oneway(&sc.network, (h.lat, h.lon), (n.lat, n.lon));
        db_oneway_ms.push(ow);
        let role = if i == 0 { Role::Primary } else { Role::Replica };
        router.add_endpoint(EndpointId(i as u32), n.zone, role, 2.0 * ow).expect("fewer nodes than endpoints_max");
    }
    Region {
        zone: h.zone,
        place: h.clone(),
        l3: l3_tier(sc),
        versions: VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config"),
        router,
        epoch: Epoch(1),
        up: true,
        edge_partitioned: false,
        cut_from: None,
        slow_ms: 0.0,
        db_oneway_ms,
        refresh: RefreshIndex::new(sc.tiers.l3_entries * 2),
        last_cdc: Instant::ZERO,
        cdc: CdcLink::new(),
        stream: RegionStream::new(),
        fills_from: Lsn(0),
        history: 0,
    }
}

/// The site at `place`: its node (the catalog, the statements it runs),
/// sessions and router over the three pools.
fn site(
    sc: &Scenario,
    place: Place,
    catalog: &Catalog,
    items_eu: TableId,
    mode: InvalidationMode,
    hubs: &[Place],
    rng: &mut Rng,
) -> Site {
    // a Worker's two tiers are the isolate's memory: nothing persists (no file; D1 is not used)
    let l2 = sc.worker.as_ref().map_or(sc.tiers.l2_entries, |wd| wd.cache_entries);
    let l1 = sc.tiers.l1_entries;
    let config = NodeConfig {
        zone: place.zone,
        l1: tier(sc, l1),
        l2: tier(sc, l2),
        versions: VersionMapConfig::default(),
        analyzer: AnalyzerConfig::default(),
        sessions_max: 10_000,
        pending_max: 100_000,
        residency: vec![(items_eu, Zone::Eu)],
        invalidation: mode,
        cdc_silence_max: Some(Duration::from_millis(sc.db.cdc_silence_max_ms)),
        fills_wait_for_cdc: false,
        fresh_ttl: fresh_ttl(sc),
    };
    let mut node = EdgeNode::new(config, catalog.clone(), Lsn(0)).expect("validated node config");
    let prep = |node: &mut EdgeNode<Val>, sql: &str| node.prepare(sql).expect("the simulation's statements lex");
    let stmts = Stmts {
        point: prep(&mut node, "SELECT id, owner, v FROM items WHERE id = $1"),
        range: prep(&mut node, "SELECT id, v FROM items WHERE id BETWEEN $1 AND $2 ORDER BY id"),
        join: prep(&mut node, "SELECT i.id, i.v, o.name FROM items i JOIN owners o ON o.id = i.owner WHERE i.id = $1"),
        write: prep(&mut node, "UPDATE items SET v = v + 1 WHERE id = $1"),
        point_eu: prep(&mut node, "SELECT id, v FROM items_eu WHERE id = $1"),
        write_eu: prep(&mut node, "UPDATE items_eu SET v = v + 1 WHERE id = $1"),
    };
    let net = &sc.network;
    let mut sessions = Vec::new();
    for s in 0..sc.workload.sessions_per_site {
        let id = SessionId(s as u64);
        let consistency = sc.workload.consistency;
        node.open_session(id, "app", "app", consistency).expect("sessions_max is larger");
        let rtt_ms = net.client_rtt_ms_min + rng.unit_f64() * (net.client_rtt_ms_max - net.client_rtt_ms_min);
        sessions.push(SessionInfo { id, rtt_ms, consistency, writes: VecDeque::new() });
    }
    let mut regions_router =
        Router::new(RouterConfig { open_for: Duration::from_secs(5), ..RouterConfig::default() }, rng.next_u64());
    let mut region_oneway_ms = [0.0; 3];
    for (i, h) in hubs.iter().enumerate() {
        region_oneway_ms[i] = oneway(net, (place.lat, place.lon), (h.lat, h.lon));
        regions_router
            .add_endpoint(EndpointId(i as u32), h.zone, Role::Replica, 2.0 * region_oneway_ms[i])
            .expect("three regions");
    }
    let home = zone_index(place.zone);
    Site {
        place,
        node,
        stmts,
        sessions,
        regions: regions_router,
        region_oneway_ms,
        stream: SiteStream::default(),
        home,
        rate_share: 1.0,
        worker: None,
    }
}

impl World {
    pub fn new(sc: Scenario, places: &[Place], mode: InvalidationMode) -> World {
        let mut rng = Rng::new(sc.seed);
        // sites: spread evenly over the list
        let n = sc.sites.min(places.len());
        let chosen: Vec<Place> = (0..n).map(|i| places[i * places.len() / n].clone()).collect();
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let items_eu = catalog.set_primary_key("items_eu", "id");
        catalog.set_primary_key("owners", "id");
        catalog.set_integer_key("items");
        catalog.set_integer_key("items_eu");
        let hubs: Vec<Place> = Zone::ALL.iter().map(|z| hub(*z)).collect();
        let db = database(&sc);
        let mut pool_links_ms = [[0.0; 3]; 3];
        for (i, a) in hubs.iter().enumerate() {
            for (j, b) in hubs.iter().enumerate() {
                pool_links_ms[i][j] = oneway(&sc.network, (a.lat, a.lon), (b.lat, b.lon));
            }
        }
        let regions: Vec<Region> = hubs.iter().map(|h| region(&sc, h, &db, &mut rng)).collect();
        let mut sites: Vec<Site> =
            chosen.into_iter().map(|place| site(&sc, place, &catalog, items_eu, mode, &hubs, &mut rng)).collect();
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
        for site in &mut sites {
            let pool = &regions[site.home].stream;
            site.subscribe_at_start(pool, 0, &db);
        }
        if sc.warm_start_s > 0 {
            warm_start(&sc, &mut sites, &cdf, &mut rng);
        }
        let measure_from = Instant::from_millis(sc.warmup_s * 1000);
        let checker = Checker::new(sc.workload.keys, n, measure_from);
        let inflight = (0..n).map(|_| postai_core::hash::FixedMap::default()).collect();
        let mut world = World {
            start: madsim::time::Instant::now(),
            sites,
            regions,
            db,
            controller,
            checker,
            rng,
            worker_rng: Rng::new(sc.seed ^ 0x5752_4b45_5253_0001),
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
            pending_acks: VecDeque::new(),
            fault_nodes: vec![None; sc.faults.len()],
            pool_links_ms,
            sc,
        };
        world.start_workers();
        world
    }
}

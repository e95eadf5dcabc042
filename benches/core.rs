//! Criterion benches of the core's hot paths, and the simulator's throughput.
//! `cargo bench --bench core`. Figures are in README.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use postai_core::cache::{Entry, Eviction, Lookup, Tier, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget, Lsn, VersionMap, VersionMapConfig, key_hash};
use postai_core::node::{EdgeNode, NodeConfig, NodeOutput, Served, SessionId, harness};
use postai_core::rng::Rng;
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::sql::{Analyzer, AnalyzerConfig, Catalog};
use postai_core::{Duration, Instant};

const SIMPLE_SQL: &str = "SELECT abalance, bid, filler FROM pgbench_accounts WHERE aid = 48213 AND bid = 3 LIMIT 1";

fn node() -> EdgeNode<u64> {
    let mut catalog = Catalog::new();
    catalog.set_primary_key("pgbench_accounts", "aid");
    let tier = |n| TierConfig {
        bytes_max: 1 << 30,
        entries_max: n,
        ttl: Duration::from_secs(3600),
        eviction: Eviction::Sieve,
    };
    let config = NodeConfig::new(Zone::Eu, tier(100_000), tier(1_000_000));
    let mut n = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
    n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
    n
}

/// Serves one query; fills from a fake origin on a miss.
fn serve(n: &mut EdgeNode<u64>) -> u64 {
    match harness::through(n, Instant::ZERO, |_| Ok(harness::read_reply(7, 64, Served::Replica, Lsn(1)))) {
        Some(NodeOutput::Reply { value, .. }) => value,
        _ => 0,
    }
}

fn hot_paths(c: &mut Criterion) {
    let mut n = node();
    let prepared = n.prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1").expect("lexes");
    let key = b"48213";
    n.handle_execute(Instant::ZERO, SessionId(1), &prepared, &[Some(key)]);
    serve(&mut n);
    c.bench_function("hit path, prepared (shape known, params hashed, L1)", |b| {
        b.iter(|| {
            n.handle_execute(Instant::ZERO, SessionId(1), &prepared, &[Some(black_box(key))]);
            black_box(n.poll_output())
        })
    });
    n.handle_simple_query(Instant::ZERO, SessionId(1), SIMPLE_SQL);
    serve(&mut n);
    c.bench_function("hit path, simple protocol ~100 B text (lex + lookup + L1)", |b| {
        b.iter(|| {
            n.handle_simple_query(Instant::ZERO, SessionId(1), black_box(SIMPLE_SQL));
            black_box(n.poll_output())
        })
    });
    let mut i = 0u64;
    c.bench_function("miss and fill, prepared (L1 + L2 miss, upstream reply, fill)", |b| {
        b.iter(|| {
            i += 1;
            let k = (1_000_000 + i).to_string();
            n.handle_execute(Instant::ZERO, SessionId(1), &prepared, &[Some(k.as_bytes())]);
            black_box(serve(&mut n))
        })
    });
    let mut catalog = Catalog::new();
    catalog.set_primary_key("pgbench_accounts", "aid");
    c.bench_function("first-seen shape (lex + sqlparser + analysis)", |b| {
        b.iter_batched(
            || Analyzer::new(AnalyzerConfig::default(), catalog.clone()),
            |mut a| black_box(a.lookup(SIMPLE_SQL).map(|(s, _)| s.kind)),
            BatchSize::SmallInput,
        )
    });
    let mut vm = VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config");
    let table = catalog.get("pgbench_accounts").expect("declared");
    let mut lsn = 0u64;
    c.bench_function("CDC apply (one key-level event)", |b| {
        b.iter(|| {
            lsn += 1;
            let h = key_hash(table, (lsn % 100_000).to_string().as_bytes());
            let ev = CdcEvent {
                prev_lsn: Lsn(lsn - 1),
                change: Change { lsn: Lsn(lsn), targets: vec![ChangeTarget::Keys(table, vec![h])] },
            };
            vm.apply_cdc(black_box(&ev));
        })
    });
    let mut router = Router::new(RouterConfig::default(), 1);
    for i in 0..6u32 {
        let zone = Zone::ALL[i as usize % 3];
        router
            .add_endpoint(EndpointId(i), zone, if i == 0 { Role::Primary } else { Role::Replica }, 10.0 + i as f64)
            .expect("room");
        router.handle_replay_lsn(EndpointId(i), Lsn(100));
    }
    c.bench_function("router decision (route + result)", |b| {
        b.iter(|| {
            let req = ReadRequest { residency: Some(Zone::Eu), floor: Some(Lsn(50)), strong: false };
            let id = router.route_read(Instant::ZERO, black_box(req)).expect("an EU replica is fresh");
            router.handle_result(Instant::ZERO, id, Ok(Duration::from_millis(10)));
            id
        })
    });
}

/// SIEVE vs LRU on a Zipf trace: hit ratio (printed) and time per access.
fn eviction(c: &mut Criterion) {
    let trace = zipf_trace(200_000, 100_000, 1.0, 42);
    for ev in [Eviction::Sieve, Eviction::Lru] {
        let (hits, _) = replay(&trace, ev);
        eprintln!("eviction {ev:?}: hit ratio {:.2} % on Zipf(1.0), 100k keys, cache of 5k entries", hits * 100.0);
        c.bench_function(&format!("tier access, {ev:?}, Zipf trace"), |b| {
            b.iter(|| black_box(replay(&trace[..20_000], ev)))
        });
    }
}

pub fn zipf_trace(n: usize, keys: u64, s: f64, seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(keys as usize);
    let mut acc = 0.0;
    for k in 0..keys {
        acc += 1.0 / ((k + 1) as f64).powf(s);
        cdf.push(acc);
    }
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let u = rng.unit_f64() * acc;
            cdf.partition_point(|c| *c < u) as u64
        })
        .collect()
}

fn replay(trace: &[u64], ev: Eviction) -> (f64, u64) {
    let mut t: Tier<u64> =
        Tier::new(TierConfig { bytes_max: 1 << 30, entries_max: 5_000, ttl: Duration::from_secs(3600), eviction: ev })
            .expect("valid");
    let mut hits = 0u64;
    for &k in trace {
        match t.get(Instant::ZERO, k as u128, |_| true) {
            Lookup::Hit(_) => hits += 1,
            Lookup::Miss => {
                t.insert(
                    Instant::ZERO,
                    k as u128,
                    Entry { value: k, lsn: Lsn(0), deps: Default::default(), size_bytes: 64, expires_at: Instant::MAX },
                );
            }
        }
    }
    (hits as f64 / trace.len() as f64, hits)
}

fn simulator(c: &mut Criterion) {
    let mut sc =
        postai_sim::Scenario::load(&postai_sim::scenarios_dir().join("global-read-heavy.toml").to_string_lossy())
            .expect("scenario loads");
    sc = sc.short(1);
    sc.duration_s = 8;
    sc.warmup_s = 1;
    let mut group = c.benchmark_group("simulator");
    group.sample_size(10);
    let queries = postai_sim::run_scenario(&sc).queries;
    group.throughput(criterion::Throughput::Elements(queries));
    group.bench_function("global-read-heavy, 60 sites, 8 s simulated", |b| {
        b.iter(|| black_box(postai_sim::run_scenario(&sc).queries))
    });
    group.finish();
}

criterion_group!(benches, hot_paths, eviction, simulator);
criterion_main!(benches);

//! Instruction counts of the hot paths (callgrind via gungraun): the CI gate.
//! Counts, unlike seconds, do not move with the load of a shared machine.
//! `.ci/run` compares them with the baseline in `benches/baseline/` and fails
//! on a regression over 5 %. To accept a change on purpose, see README.

use std::hint::black_box;

use gungraun::prelude::*;
use postai_core::cache::{Eviction, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget, Lsn, VersionMap, VersionMapConfig, key_hash};
use postai_core::node::{EdgeNode, NodeConfig, Prepared, Served, SessionId, harness};
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::sql::{Analyzer, AnalyzerConfig, Catalog};
use postai_core::{Duration, Instant};

const SIMPLE_SQL: &str = "SELECT abalance, bid, filler FROM pgbench_accounts WHERE aid = 48213 AND bid = 3 LIMIT 1";

fn catalog() -> Catalog {
    let mut c = Catalog::new();
    c.set_primary_key("pgbench_accounts", "aid");
    c
}

fn node() -> EdgeNode<u64> {
    let tier = |n| TierConfig {
        bytes_max: 1 << 30,
        entries_max: n,
        ttl: Duration::from_secs(3600),
        eviction: Eviction::Sieve,
    };
    let config = NodeConfig::new(Zone::Eu, tier(10_000), tier(100_000));
    let mut n = EdgeNode::new(config, catalog(), Lsn(0)).expect("valid config");
    n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
    n
}

fn fill(n: &mut EdgeNode<u64>) {
    harness::settle(n, Instant::ZERO, |_| Ok(harness::read_reply(7, 64, Served::Replica, Lsn(1))));
}

fn prepared_cached() -> (EdgeNode<u64>, Prepared) {
    let mut n = node();
    let p = n.prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1").expect("lexes");
    n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"48213")]);
    fill(&mut n);
    (n, p)
}

fn simple_cached() -> EdgeNode<u64> {
    let mut n = node();
    n.handle_simple_query(Instant::ZERO, SessionId(1), SIMPLE_SQL);
    fill(&mut n);
    n
}

#[library_benchmark]
#[bench::l1(setup = prepared_cached)]
fn hit_prepared(state: (EdgeNode<u64>, Prepared)) -> (EdgeNode<u64>, Prepared) {
    let (mut n, p) = state;
    n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(black_box(b"48213"))]);
    black_box(n.poll_output());
    (n, p)
}

#[library_benchmark]
#[bench::l1(setup = simple_cached)]
fn hit_simple_text(mut n: EdgeNode<u64>) -> EdgeNode<u64> {
    n.handle_simple_query(Instant::ZERO, SessionId(1), black_box(SIMPLE_SQL));
    black_box(n.poll_output());
    n
}

#[library_benchmark]
#[bench::fill(setup = prepared_cached)]
fn miss_and_fill(state: (EdgeNode<u64>, Prepared)) -> (EdgeNode<u64>, Prepared) {
    let (mut n, p) = state;
    n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(black_box(b"99"))]);
    fill(&mut n);
    (n, p)
}

#[library_benchmark]
#[bench::pgbench(setup = catalog)]
fn first_seen_shape(c: Catalog) -> Analyzer {
    let mut a = Analyzer::new(AnalyzerConfig::default(), c);
    black_box(a.lookup(black_box(SIMPLE_SQL)).map(|(s, _)| s.kind).ok());
    a
}

fn version_map() -> (VersionMap, CdcEvent) {
    let mut vm = VersionMap::new(VersionMapConfig::default(), Lsn(0)).expect("the default config");
    let t = catalog().get("pgbench_accounts").expect("declared");
    for i in 1..1000u64 {
        let h = key_hash(t, i.to_string().as_bytes());
        vm.apply_cdc(&CdcEvent {
            prev_lsn: Lsn(i - 1),
            change: Change { lsn: Lsn(i), targets: vec![ChangeTarget::Keys(t, vec![h])] },
        });
    }
    let h = key_hash(t, b"5000");
    (
        vm,
        CdcEvent {
            prev_lsn: Lsn(999),
            change: Change { lsn: Lsn(1000), targets: vec![ChangeTarget::Keys(t, vec![h])] },
        },
    )
}

#[library_benchmark]
#[bench::key_event(setup = version_map)]
fn cdc_apply(state: (VersionMap, CdcEvent)) -> (VersionMap, CdcEvent) {
    let (mut vm, ev) = state;
    vm.apply_cdc(black_box(&ev));
    (vm, ev)
}

fn router() -> Router {
    let mut r = Router::new(RouterConfig::default(), 1);
    for i in 0..6u32 {
        let zone = Zone::ALL[i as usize % 3];
        r.add_endpoint(EndpointId(i), zone, if i == 0 { Role::Primary } else { Role::Replica }, 10.0 + i as f64)
            .expect("room");
        r.handle_replay_lsn(EndpointId(i), Lsn(100));
    }
    r
}

#[library_benchmark]
#[bench::eu_floor(setup = router)]
fn router_decision(mut r: Router) -> Router {
    let req = ReadRequest { residency: Some(Zone::Eu), floor: Some(Lsn(50)), strong: false };
    if let Ok(id) = r.route_read(Instant::ZERO, black_box(req)) {
        r.handle_result(Instant::ZERO, id, Ok(Duration::from_millis(10)));
    }
    r
}

library_benchmark_group!(
    name = hot_paths;
    benchmarks = hit_prepared, hit_simple_text, miss_and_fill, first_seen_shape, cdc_apply, router_decision
);

main!(library_benchmark_groups = hot_paths);

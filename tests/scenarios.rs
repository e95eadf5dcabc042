//! Every scenario of the suite, in its short form, over several seeds: the
//! safety properties hold (read-your-writes, RPO 0 with synchronous
//! replication, one writable primary per epoch, residency), the run is
//! deterministic, and the checkers see what they must.
//!
//! A failure prints the seed and the command that reproduces it.

use postai_sim::{Report, SUITE, Scenario, run_scenario, scenarios_dir};

const SEEDS: [u64; 4] = [1, 2, 3, 4];

fn load(name: &str) -> Scenario {
    let path = scenarios_dir().join(format!("{name}.toml"));
    Scenario::load(&path.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"))
}

fn reproduce(name: &str, seed: u64) -> String {
    format!(
        "reproduce: cargo run --release -p postai-sim -- scenarios/{name}.toml --seed {seed} (full form; this test runs Scenario::short)"
    )
}

fn check_safety(name: &str, seed: u64, r: &Report) {
    let unsafe_rows: Vec<String> = r
        .rows
        .iter()
        .filter(|row| row.safety && !row.pass)
        .map(|row| format!("{} = {}", row.metric, row.measured))
        .collect();
    assert!(unsafe_rows.is_empty(), "{name} seed {seed}: safety violated: {unsafe_rows:?}\n{}", reproduce(name, seed));
    assert!(r.reads.count > 0 && r.queries > 0, "{name} seed {seed}: no reads measured\n{}", reproduce(name, seed));
}

fn run_suite_scenario(name: &str) {
    let base = load(name);
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety(name, seed, &r);
    }
}

#[test]
fn suite_lists_every_scenario_file() {
    let mut files: Vec<String> = std::fs::read_dir(scenarios_dir())
        .expect("scenarios/ exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".toml").map(str::to_string))
        .collect();
    files.sort();
    let mut suite: Vec<String> = SUITE.iter().map(|s| s.to_string()).collect();
    suite.sort();
    assert_eq!(files, suite);
    for name in SUITE {
        let sc = load(name);
        assert_eq!(&sc.name, name, "scenario file name and name field differ");
    }
}

#[test]
fn global_read_heavy() {
    run_suite_scenario("global-read-heavy");
    // writes by the region they come from: the primary is in Ashburn, so
    // APAC's writes cross the Pacific and US writes do not
    let r = run_scenario(&load("global-read-heavy").short(1));
    let p95 = |zone: &str| r.writes_by_region.iter().find(|(z, _)| z == zone).map(|(_, q)| q.p95_ms);
    let (us, apac) = (p95("US").expect("US writes"), p95("APAC").expect("APAC writes"));
    assert!(p95("EU").is_some() && us + 100.0 < apac, "write p95 US {us} ms, APAC {apac} ms");
}

#[test]
fn primary_failover() {
    let base = load("primary-failover");
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety("primary-failover", seed, &r);
        assert_eq!(r.failovers, 1, "seed {seed}: exactly one promotion\n{}", reproduce("primary-failover", seed));
        assert!(r.writes.count > 0, "seed {seed}: writes resumed");
        let rto = r.recoveries[0].rto_ms;
        assert!(rto > 4_000.0 && rto < 30_000.0, "seed {seed}: write RTO {rto} ms (detection 5 s + promotion 2 s)");
    }
}

#[test]
fn regional_outage() {
    let base = load("regional-outage");
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety("regional-outage", seed, &r);
        let rec = &r.recoveries[0];
        // simulated time, deterministic: EU sites route around the dark region
        assert!(rec.rto_ms < 10_000.0, "seed {seed}: RTO {} ms\n{}", rec.rto_ms, reproduce("regional-outage", seed));
        assert!(rec.rto_ms > 0.0, "seed {seed}: requests in flight to the dark region were disrupted");
    }
}

/// Packet loss on the links between sites and regions delays the requests
/// it hits by a retransmission timeout; it neither fails them nor hides a
/// recovery: the regional outage still recovers within its target, and no
/// request fails. 0.3 %: when loss failed attempts (the model before), every
/// seed measured the RTO at the end of the run (16 s). At 1 % a message lost
/// twice (one in 10 000) takes over a second, and in the short form's
/// windows of a few requests one such request marks a window disrupted (two
/// seeds of eight then measure 11 s; the full-size swarm at 0.9 %, 1.3 s).
#[test]
fn regional_outage_under_packet_loss() {
    let mut base = load("regional-outage");
    base.network.loss = 0.003;
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety("regional-outage (network.loss = 0.003)", seed, &r);
        let rec = &r.recoveries[0];
        assert!(
            rec.rto_ms < 10_000.0,
            "seed {seed}: RTO {} ms under 0.3 % loss\n{}, with [network] loss = 0.003 added",
            rec.rto_ms,
            reproduce("regional-outage", seed)
        );
        assert_eq!(r.availability, 1.0, "seed {seed}: loss failed requests");
    }
}

#[test]
fn cache_tier_loss() {
    run_suite_scenario("cache-tier-loss");
}

#[test]
fn edge_partition() {
    run_suite_scenario("edge-partition");
}

#[test]
fn hot_key_write_burst() {
    run_suite_scenario("hot-key-write-burst");
}

#[test]
fn residency_eu() {
    run_suite_scenario("residency-eu");
}

#[test]
fn cdc_lag_reorder() {
    let base = load("cdc-lag-reorder");
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety("cdc-lag-reorder", seed, &r);
        assert!(
            r.stale_reads > 0,
            "seed {seed}: writes that bypass the edge are visible as stale reads until CDC arrives"
        );
    }
}

#[test]
fn invalidation_strategies() {
    let base = load("invalidation-strategies");
    for seed in SEEDS {
        let r = run_scenario(&base.short(seed));
        check_safety("invalidation-strategies", seed, &r);
        let by = |s: &str| r.strategies.iter().find(|x| x.strategy == s).unwrap_or_else(|| panic!("{s} ran"));
        let (ttl, table, key, refresh) = (by("TtlOnly"), by("Table"), by("Key"), by("Refresh"));
        assert!(key.hit_rate > table.hit_rate, "seed {seed}: key-level invalidation keeps more hits than table-level");
        assert!(refresh.hit_rate > key.hit_rate, "seed {seed}: refreshing point reads in place keeps more hits");
        assert!(ttl.stale_reads > key.stale_reads, "seed {seed}: TTL-only serves more stale reads than key-level");
    }
}

#[test]
fn swarm() {
    run_suite_scenario("swarm");
}

/// The short form keeps each site's rate, whatever the number of sites.
#[test]
fn the_short_form_keeps_the_rate_per_site() {
    let mut few = load("global-read-heavy");
    few.sites = 6;
    let short = few.short(1);
    assert_eq!(short.sites, 6);
    assert_eq!(short.workload.rate_qps, few.workload.rate_qps, "6 sites keep their rate");
    let base = load("global-read-heavy");
    let short = base.short(1);
    let per_site = |s: &Scenario| s.workload.rate_qps / s.sites as f64;
    assert!((per_site(&short) - per_site(&base)).abs() < 1e-9 * per_site(&base));
}

#[test]
fn same_seed_same_report() {
    let sc = load("primary-failover").short(7);
    let a = serde_json::to_string(&run_scenario(&sc)).expect("report serialises");
    let b = serde_json::to_string(&run_scenario(&sc)).expect("report serialises");
    assert_eq!(a, b, "same seed, different report");
    let c = serde_json::to_string(&run_scenario(&load("primary-failover").short(8))).expect("report serialises");
    assert_ne!(a, c, "the seed changes the run");
}

#[test]
fn corrupt_scenarios_are_clear_errors() {
    let bad = [
        ("not toml", "name = "),
        ("unknown field", "name='x'\ndescription=''\nseed=1\nduration_s=10\nbogus=1"),
        ("zero duration", "name='x'\ndescription=''\nseed=1\nduration_s=0"),
        (
            "fault outside run",
            "name='x'\ndescription=''\nseed=1\nduration_s=20\nwarmup_s=1\n[[faults]]\nkind='primary-crash'\nat_s=99.0",
        ),
        (
            "bad region",
            "name='x'\ndescription=''\nseed=1\nduration_s=20\nwarmup_s=1\n[[faults]]\nkind='regional-outage'\nat_s=2.0\nregion='MARS'\nduration_s=1.0",
        ),
        (
            "bad fault kind",
            "name='x'\ndescription=''\nseed=1\nduration_s=20\nwarmup_s=1\n[[faults]]\nkind='meteor'\nat_s=2.0",
        ),
        ("every message lost", "name='x'\ndescription=''\nseed=1\nduration_s=20\n[network]\nloss=1.0"),
        ("negative loss", "name='x'\ndescription=''\nseed=1\nduration_s=20\n[network]\nloss=-0.1"),
        ("no speed of light", "name='x'\ndescription=''\nseed=1\nduration_s=20\n[network]\nfiber_km_per_ms=0.0"),
        ("routes shorter than fiber", "name='x'\ndescription=''\nseed=1\nduration_s=20\n[network]\nroute_factor=0.5"),
        ("infinite jitter", "name='x'\ndescription=''\nseed=1\nduration_s=20\n[network]\njitter_ms=inf"),
        ("a name that is a path", "name='../../x'\ndescription=''\nseed=1\nduration_s=20"),
        ("a warm start of ages", "name='x'\ndescription=''\nseed=1\nduration_s=20\nwarm_start_s=1000000000"),
        (
            "caches no memory holds",
            "name='x'\ndescription=''\nseed=1\nduration_s=20\nsites=300\n[tiers]\nl1_entries=10000000\nl2_entries=10000000",
        ),
    ];
    for (what, text) in bad {
        let err = Scenario::parse("test.toml", text).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(err.to_string().starts_with("test.toml"), "{what}: error names the file: {err}");
    }
}

/// The one-hour day-slice (scenarios/long, outside the default suite: it
/// runs for about half an hour): the file is valid and its short form runs.
#[test]
fn the_day_slice_is_an_hour_of_the_baseline() {
    let path = scenarios_dir().join("long").join("day-slice.toml");
    let sc = Scenario::load(&path.to_string_lossy()).expect("day-slice.toml loads");
    let base = load("global-read-heavy");
    assert_eq!((sc.name.as_str(), sc.duration_s), ("day-slice", 3600));
    assert_eq!(sc.workload.rate_qps, base.workload.rate_qps, "the baseline's workload");
    check_safety("long/day-slice", 1, &run_scenario(&sc.short(1)));
}

/// Every scenario file states the staleness bound as its target (README,
/// "What the simulation measures"; `postai_sim::bounds`): its CDC-silence
/// bound plus the longest delivery of a change event, rounded up to 50 ms;
/// the swarm's at the largest CDC lag it draws (500 ms).
#[test]
fn staleness_targets_are_the_stated_bound() {
    let places = postai_sim::geo::parse_sites(postai_sim::geo::SITES_CSV).expect("sites.csv parses");
    let dir = scenarios_dir();
    let mut files: Vec<std::path::PathBuf> = SUITE.iter().map(|n| dir.join(format!("{n}.toml"))).collect();
    for sub in ["long", "what-if"] {
        for entry in std::fs::read_dir(dir.join(sub)).expect("the directory exists") {
            files.push(entry.expect("a directory entry").path());
        }
    }
    for path in files {
        let mut sc = Scenario::load(&path.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"));
        if sc.swarm {
            sc.db.cdc_lag_ms = 500.0;
        }
        let bound = postai_sim::bounds::staleness_bound_ms(&sc, &places);
        let target = sc.targets.staleness_ms;
        assert!(
            target >= bound && target < bound + 50.0,
            "{}: staleness target {target} ms, the bound is {bound:.0} ms",
            path.display()
        );
    }
}

/// The swarm draws on purpose the cases issue 13 found: a primary coming
/// back while its replacement is promoted (with writes bypassing the edge),
/// back-to-back primary crashes, a pool cut off from the primary, a slow
/// link, asynchronous replication; and the draws made before them stay.
#[test]
fn the_swarm_draws_the_hard_cases() {
    use postai_sim::scenario::{Fault, Replication};
    let base = load("swarm");
    let (mut in_promotion, mut back_to_back, mut partitions, mut slow, mut asynchronous) = (0, 0, 0, 0, 0);
    let n = 300;
    for seed in 0..n {
        let sc = postai_sim::swarm::draw(&base.short(seed));
        let crashes: Vec<(f64, Option<f64>)> = sc
            .faults
            .iter()
            .filter_map(|f| match f {
                Fault::PrimaryCrash { at_s, restart_after_s } => Some((*at_s, *restart_after_s)),
                _ => None,
            })
            .collect();
        let detect = sc.db.heartbeat_timeout_ms as f64 / 1e3;
        let window = detect..detect + sc.db.promote_ms as f64 / 1e3 + 1.0;
        in_promotion += usize::from(
            sc.workload.bypass_write_qps > 0.0 && crashes.iter().any(|(_, r)| r.is_some_and(|r| window.contains(&r))),
        );
        back_to_back += usize::from(crashes.len() >= 2);
        partitions += usize::from(sc.faults.iter().any(|f| matches!(f, Fault::PrimaryPartition { .. })));
        slow += usize::from(sc.faults.iter().any(|f| matches!(f, Fault::SlowLink { .. })));
        asynchronous += usize::from(sc.db.replication == Replication::Async);
        for f in &sc.faults {
            assert!(f.at_s() < sc.duration_s as f64, "seed {seed}: {} after the run", f.label());
        }
        sc.validate().unwrap_or_else(|e| panic!("seed {seed}: the draw is invalid: {e}"));
    }
    let counts = [in_promotion, back_to_back, partitions, slow, asynchronous];
    assert!(counts.iter().all(|c| *c >= n as usize / 20), "of {n} draws: {counts:?}");
    // the reproductions still draw the worlds they drew
    let sc = postai_sim::swarm::draw(&{
        let mut b = base.clone();
        b.seed = 954;
        b
    });
    assert_eq!(sc.sites, 255, "seed 954 draws 255 sites, as when the issue was filed");
}

/// Every setting of `sc` but `fields` (top-level names), to compare two
/// scenarios.
fn settings_but(sc: &Scenario, fields: &[&str]) -> serde_json::Value {
    let mut v = serde_json::to_value(sc).expect("a scenario serialises");
    for field in fields {
        v.as_object_mut().expect("an object").remove(*field);
    }
    v
}

/// The steady-state runs (scenarios/long, README "Steady state"): each is
/// its base scenario with a longer run whose measured part starts after the
/// warm start's entries have expired (at least one TTL), and its short form
/// runs safely.
#[test]
fn steady_state_runs_are_their_base_measured_after_the_warm_start() {
    let comparable = |sc: &Scenario| settings_but(sc, &["name", "description", "duration_s", "warmup_s"]);
    for (name, base) in
        [("steady-baseline", "global-read-heavy.toml"), ("steady-points-ttl-1h", "what-if/points-ttl-1h.toml")]
    {
        let load_path = |p: std::path::PathBuf| Scenario::load(&p.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"));
        let sc = load_path(scenarios_dir().join("long").join(format!("{name}.toml")));
        let base = load_path(scenarios_dir().join(base));
        assert_eq!(sc.name, name);
        assert_eq!(comparable(&sc), comparable(&base), "{name}: only the run's length and its unmeasured part differ");
        assert!(sc.warmup_s >= sc.tiers.ttl_s && sc.warmup_s < sc.duration_s, "{name}: measured after one TTL");
        check_safety(&format!("long/{name}"), 1, &run_scenario(&sc.short(1)));
    }
}

/// The what-if variants of the baseline (scenarios/what-if, outside the
/// default suite; README "What it would take"): each is the baseline with a
/// change and runs safely, and point lookups with an hour's TTL keep more
/// reads and more rows at the site than the baseline (short form; it holds
/// in steady state too).
#[test]
fn what_if_variants_change_the_baseline_and_run_safely() {
    let base = load("global-read-heavy");
    let comparable = |sc: &Scenario| settings_but(sc, &["name", "description"]);
    let mut reports = Vec::new();
    for entry in std::fs::read_dir(scenarios_dir().join("what-if")).expect("scenarios/what-if exists") {
        let path = entry.expect("a directory entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
        let sc = Scenario::load(&path.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sc.name, stem, "file name and name field differ");
        assert_eq!(
            (sc.seed, sc.duration_s, sc.sites),
            (base.seed, base.duration_s, base.sites),
            "{stem}: the baseline's run"
        );
        assert_ne!(comparable(&sc), comparable(&base), "{stem}: no change from the baseline");
        let report = run_scenario(&sc.short(1));
        check_safety(&format!("what-if/{stem}"), 1, &report);
        reports.push((stem, report));
    }
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = reports.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["points-only", "points-ttl-1h", "read-only", "site-tiers-x4", "ttl-1h", "workers"]);
    let best = &reports[1].1;
    let baseline = run_scenario(&base.short(1));
    assert!(
        best.site_share > baseline.site_share + 0.05,
        "points-ttl-1h answers {} of reads at the site, the baseline {}",
        best.site_share,
        baseline.site_share
    );
    // an hour's TTL keeps more of the dataset at each site
    assert!(
        best.edge_data_share > baseline.edge_data_share && baseline.edge_data_share > 0.0,
        "rows held per site: points-ttl-1h {}, the baseline {}",
        best.edge_data_share,
        baseline.edge_data_share
    );
}

//! The Workers edge's design in the simulation (`[worker]`,
//! `sim/src/world/worker.rs`): sites pull their regional's feed on request
//! instead of following it, caches live in isolates that come and go, no
//! L2. Safety holds through the faults that cut the feed, and a pull that
//! hears no live keepalive applies nothing.

use postai_sim::run::Report;
use postai_sim::{Scenario, run_scenario};

fn run(worker: &str, faults: &str, seed: u64) -> Report {
    let text = format!(
        "name = \"worker\"\ndescription = \"the Workers edge's design\"\nseed = {seed}\nduration_s = 30\nwarmup_s = 3\n\
         sites = 40\nwarm_start_s = 300\n[workload]\nrate_qps = 4000.0\n[worker]\n{worker}\n{faults}"
    );
    let sc = Scenario::parse("worker.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    run_scenario(&sc)
}

/// Without faults: each site pulls about once a second while it has
/// traffic, isolates start cold about every `isolate_life_s`, no pull fails,
/// and the cache still answers most reads.
#[test]
fn sites_pull_the_feed_and_isolates_come_and_go() {
    let r = run("isolate_life_s = 10.0", "", 1);
    let (pulls, failed, isolates) = r.worker.expect("the Workers edge's counters");
    // 40 sites over 30 s, a pull a second at most
    assert!(pulls > 300 && pulls <= 40 * 31, "{pulls} pulls");
    assert_eq!(failed, 0);
    assert!(isolates > 40, "{isolates} isolates (40 sites, 30 s, 10 s each)");
    assert!(r.hit_rate > 0.3, "hit rate {}", r.hit_rate);
    assert!(r.safe(), "{:?}", r.rows);
}

/// The feed cut: a regional down, its sites cut off from it, the primary
/// crashed (a new history), the stream stalled. Pulls fail or start over;
/// nothing is served stale past the bound, no session misses its writes.
#[test]
fn faults_that_cut_the_feed_stay_safe() {
    let faults = [
        "[[faults]]\nkind = \"regional-outage\"\nat_s = 10.0\nregion = \"EU\"\nduration_s = 5.0\n",
        "[[faults]]\nkind = \"edge-partition\"\nat_s = 10.0\nregion = \"US\"\nduration_s = 4.0\n",
        "[[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n",
        "[[faults]]\nkind = \"cdc-stall\"\nat_s = 8.0\nduration_s = 6.0\n",
    ];
    for (i, f) in faults.iter().enumerate() {
        for seed in [1, 2] {
            let r = run("", f, seed);
            assert!(r.safe(), "fault {i}, seed {seed}: {:?}", r.rows);
            let (_, failed, _) = r.worker.expect("counters");
            if i < 2 {
                assert!(failed > 0, "fault {i}, seed {seed}: no pull failed");
            }
        }
    }
}

/// The native edge's report carries no Workers edge's counters, and a
/// scenario that asks for a feed pulled less often than the silence bound
/// is refused, naming the field.
#[test]
fn the_option_is_checked() {
    let text = "name = \"w\"\ndescription = \"d\"\nseed = 1\nduration_s = 5\n[db]\ncdc_silence_max_ms = 500\n[worker]\nfeed_ms = 800\n";
    let e = Scenario::parse("w.toml", text).expect_err("refused").to_string();
    assert!(e.contains("worker.feed_ms"), "{e}");
    let text = "name = \"w\"\ndescription = \"d\"\nseed = 1\nduration_s = 5\n[worker]\nfeed_mss = 800\n";
    assert!(Scenario::parse("w.toml", text).is_err());
}

/// The same world with the pull on the requests' path and off it (as
/// `worker/` runs it): the same pulls and hits, and a lower read p95 when
/// no request waits (simulated time: the same seed, the same numbers).
#[test]
fn pulls_off_the_requests_path_cost_them_nothing() {
    let waits = run("pull_waits = true", "", 3);
    let after = run("pull_waits = false", "", 3);
    assert_eq!(waits.worker.map(|w| w.0), after.worker.map(|w| w.0), "the same pulls");
    assert!(
        after.reads.p95_ms < waits.reads.p95_ms,
        "p95 {} off the path, {} on it",
        after.reads.p95_ms,
        waits.reads.p95_ms
    );
    assert!(after.safe() && waits.safe());
}

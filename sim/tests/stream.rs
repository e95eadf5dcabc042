//! The change stream in the simulation runs through the proxy's machines
//! (`SlotReader`, `History`, the publisher's lines, `Subscriber`): a cut
//! between sites and their pool is resumed from the pool's history, a
//! restarted pool (whose history starts at its slot's position, past what
//! its sites had received) makes its sites start over, a failover starts
//! every site on a new history (the pools' slots on the new primary are
//! new), and safety holds through all three.

use postai_sim::run::Report;
use postai_sim::{Scenario, run_scenario};

fn run(extra: &str, seed: u64) -> Report {
    let text = format!(
        "name = \"stream\"\ndescription = \"change stream machines\"\nseed = {seed}\nduration_s = 30\nwarmup_s = 3\n\
         sites = 40\nwarm_start_s = 300\n[workload]\nrate_qps = 4000.0\n{extra}"
    );
    let sc = Scenario::parse("stream.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    run_scenario(&sc)
}

/// Without faults every site follows one subscription from the start.
#[test]
fn sites_follow_one_subscription_without_faults() {
    let r = run("", 1);
    assert_eq!((r.streams_resumed, r.streams_started_over, r.streams_new_history), (0, 0, 0));
    assert!(r.safe(), "{:?}", r.rows);
}

/// A regional outage restarts the pool's process: its history starts at
/// its slot's position, which is past the last rows in flight to its sites
/// when it went down: they cannot continue, and start over (dropping what
/// they held) rather than miss those rows; safety holds.
#[test]
fn a_restarted_pool_makes_its_sites_start_over() {
    for seed in [1, 2] {
        let r = run("[[faults]]\nkind = \"regional-outage\"\nat_s = 10.0\nregion = \"EU\"\nduration_s = 5.0\n", seed);
        assert!(r.streams_started_over > 0, "seed {seed}: no site subscribed again");
        assert!(r.safe(), "seed {seed}: {:?}", r.rows);
    }
}

/// A cut between the sites and their pool: the pool keeps its history, and
/// every site resumes where it broke off.
#[test]
fn an_edge_partition_is_resumed_from_the_pools_history() {
    let r = run("[[faults]]\nkind = \"edge-partition\"\nat_s = 10.0\nregion = \"US\"\nduration_s = 4.0\n", 1);
    assert!(r.streams_resumed > 0, "no site resumed");
    assert_eq!(r.streams_started_over, 0, "the pool kept every row since");
    assert!(r.safe(), "{:?}", r.rows);
}

/// A promotion: each pool opens a new slot on the new primary and publishes
/// a reset; every site starts a new history (drops what it held). Before
/// the simulation ran the machines, the sites' caches crossed the failover
/// intact, which the proxy never does.
#[test]
fn a_failover_starts_every_site_on_a_new_history() {
    let r = run("[[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n", 1);
    assert_eq!(r.failovers, 1);
    assert_eq!(r.streams_new_history, 40, "the reset reached each site");
    assert!(r.safe(), "{:?}", r.rows);
}

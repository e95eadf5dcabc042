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

/// A pool's slot dropped: the pool opens a new one at the primary's
/// position and publishes a reset; only that region's sites drop what they
/// held, and nothing stale is served (what the old slot held unread is lost).
#[test]
fn a_dropped_slot_resets_only_its_regions_sites() {
    for seed in [1, 2, 3] {
        let r = run("[[faults]]\nkind = \"slot-drop\"\nat_s = 10.0\nregion = \"US\"\n", seed);
        assert!(r.streams_new_history > 0 && r.streams_new_history < 40, "seed {seed}: {}", r.streams_new_history);
        assert!(r.safe(), "seed {seed}: {:?}", r.rows);
    }
}

/// A region's sites restart from their L2 files: each subscribes again from
/// its file's position on the same history, and the pool, which kept every
/// row since, continues it: none starts over.
#[test]
fn sites_restarted_from_their_files_continue_their_stream() {
    for seed in [1, 2] {
        let r = run("[[faults]]\nkind = \"edge-restart\"\nat_s = 10.0\nregion = \"EU\"\n", seed);
        assert!(r.streams_resumed > 0, "seed {seed}: no site resumed");
        assert_eq!(r.streams_started_over, 0, "seed {seed}");
        assert!(r.safe(), "seed {seed}: {:?}", r.rows);
    }
}

/// Found by the small-world sweep (seed 4599): a pool restarted while its
/// stream is stalled has not read its slot yet; a site subscribing then
/// must be refused (the proxy refuses while its stream has no position),
/// not opened at position 0, where its restarted L2 (filled at the warm
/// start) was never invalidated: read 6-15 s stale.
#[test]
fn a_pool_restarted_before_it_read_its_slot_opens_no_subscription() {
    let faults = "[db]\ncdc_lag_ms = 400.0\n\
        [[faults]]\nkind = \"regional-outage\"\nat_s = 6.8\nregion = \"APAC\"\nduration_s = 8.0\n\
        [[faults]]\nkind = \"cdc-stall\"\nat_s = 9.7\nduration_s = 5.8\n\
        [[faults]]\nkind = \"slot-drop\"\nat_s = 12.5\nregion = \"APAC\"\n\
        [[faults]]\nkind = \"edge-restart\"\nat_s = 13.0\nregion = \"APAC\"\n\
        [targets]\nstaleness_ms = 2750.0\n";
    for seed in [1, 2] {
        let r = run(faults, seed);
        assert!(r.streams_started_over > 0, "seed {seed}: the restarted sites subscribed again");
        assert!(r.safe(), "seed {seed}: max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
    }
}

/// Found by review, in the proxy too: a process that opens its stream at a
/// position (sites restarted from their L2 files, a pool restarted on its
/// slot) has a version map that knows nothing of what changed before it. A
/// replica lagging behind that position answered a read that missed a
/// write made before it, and the answer was filed and served until the key
/// was written again (seed 3: 10.2 s stale). Now no answer older than where
/// the stream opened is filed (`EdgeNode::fills_from`); and a restarted
/// site keeps only the L2 entries its file still holds.
#[test]
fn a_restarted_process_files_nothing_older_than_where_its_stream_opened() {
    let faults = "[db]\nreplica_apply_ms = 1500.0\n\
        [[faults]]\nkind = \"edge-restart\"\nat_s = 10.0\nregion = \"EU\"\n\
        [[faults]]\nkind = \"edge-restart\"\nat_s = 15.0\nregion = \"US\"\n\
        [[faults]]\nkind = \"regional-outage\"\nat_s = 20.0\nregion = \"APAC\"\nduration_s = 2.0\n";
    for seed in [1, 2, 3] {
        let r = run(faults, seed);
        assert!(r.streams_resumed > 0, "seed {seed}: the restarted sites continued their streams");
        assert!(r.safe(), "seed {seed}: max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
    }
}

/// While the primary is down the pools' slot reads fail, as the proxy's
/// poll loop does: no keepalive reaches a site, and after the silence bound
/// the sites serve nothing from their tiers (they asked replicas) until a
/// new primary's slot opens. Before, the simulated stream kept its
/// keepalives through the outage and the sites kept serving their caches
/// (this world: 84.7 % hit rate with the outage, 22.2 % now).
#[test]
fn sites_stop_serving_their_caches_while_the_primary_is_down() {
    // the failure is declared only after 20 s: 8 s to 28 s without a primary
    let down = "[db]\nheartbeat_timeout_ms = 20000\n[[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n";
    let r = run(down, 1);
    let up = run("", 1);
    assert!(up.hit_rate > 0.8, "{}", up.hit_rate);
    assert!(
        r.hit_rate < up.hit_rate - 0.2,
        "cached reads served through the outage: {} vs {}",
        r.hit_rate,
        up.hit_rate
    );
    assert!(r.safe(), "{:?}", r.rows);
}

/// Interleaving A of the proxy's documented stale reads: a site's version
/// map runs ahead of its pool's L3 (its own sessions' writes are applied
/// at their commit, while the pool learns of them a stream lag later). A
/// miss of another session then finds the pool's older entry. The pool
/// says which position its answer reflects (the proxy: the answer LSN the
/// regional tells), so the site serves it once, within the pool's lag, but
/// never files it. Filed as if current (checked by telling the primary's
/// position with L3 hits), it was served until the key's next write reached
/// the site: seed 1 read 10.2 s stale, with 4 read-your-writes violations.
/// The checker judges what an answer holds, not what the pool tells.
#[test]
fn a_site_ahead_of_its_pool_files_no_older_answer_from_it() {
    let lagging = "write_ratio = 0.1\nkeys = 5000\nsessions_per_site = 8\n\
        [db]\ncdc_lag_ms = 1200.0\n[targets]\nstaleness_ms = 2750.0\n";
    for seed in [1, 2] {
        let r = run(lagging, seed);
        assert!(r.safe(), "seed {seed}: max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
    }
}

/// A region's pool down across a failover that lost commits (asynchronous
/// replication): its sites' positions are of the old timeline, whose
/// positions the new one gives again to other commits (the simulation
/// models the reuse, `db.rs`). When the pool is back, none of its sites
/// continues: each starts over, and nothing it held from the lost timeline
/// is served. Two mechanisms refuse, each enough here: the pool's history
/// began at its new slot (its floor), and the sites' position is of another
/// timeline (the origin check). Checked by hand: the test fails when both
/// are removed, passes with either. The origin check alone: the next test,
/// the core's subscriber tests, and on PostgreSQL `edge/tests/timeline.rs`
/// `a_regional_restarted_after_a_lossy_failover_does_not_continue_an_old_position`.
#[test]
fn sites_cut_off_across_a_lossy_failover_do_not_continue_the_old_timeline() {
    let lossy = "[db]\nreplication = \"async\"\nreplica_apply_ms = 300.0\n\
        [[faults]]\nkind = \"regional-outage\"\nat_s = 7.0\nregion = \"EU\"\nduration_s = 12.0\n\
        [[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n";
    for seed in [1, 2] {
        let r = run(lossy, seed);
        assert_eq!(r.failovers, 1, "seed {seed}");
        assert_eq!(r.streams_resumed, 0, "seed {seed}: a site continued across the failover");
        assert!(r.streams_started_over + r.streams_new_history >= 40, "seed {seed}: every site started over");
        assert!(r.safe(), "seed {seed}: max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
    }
}

/// Found by the small-world sweep once the latency model was calibrated
/// (seed 382, 11.5 s stale): a pool restarted a second time before it had
/// read its slot (the primary was down in between) took the position its
/// reader had read to (none yet: 0) for its slot's, so its history vouched
/// for every position and a site continued from before a commit the pool
/// had read, and lost, before the first outage. A slot's position is the
/// server's: the restarted process finds it where the last one left it.
#[test]
fn a_pool_restarted_twice_before_reading_keeps_its_slots_position() {
    let base = Scenario::load(&format!("{}/swarm.toml", postai_sim::scenarios_dir().display())).expect("swarm");
    let r = run_scenario(&base.small(382));
    assert!(r.safe(), "max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
}

/// Found by the small-world sweep once sites chose their region by the way
/// there (seed 2539, 2.96 s stale): a pool's read in flight across a
/// lossy promotion came back after the pool had cleared its L3 for the new
/// timeline, and filed the old timeline's answer at a position the new one
/// gives to other commits, where no new commit could invalidate it. The
/// pool, as the proxy's node does, files nothing in flight across a new
/// history.
#[test]
fn a_pool_files_no_answer_in_flight_across_a_new_history() {
    let base = Scenario::load(&format!("{}/swarm.toml", postai_sim::scenarios_dir().display())).expect("swarm");
    let r = run_scenario(&base.small(2539));
    assert!(r.safe(), "max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
}

/// Interleaving B where only the origin check refuses: WAL leaves the
/// primary a second late (asynchronous replication behind), so the EU
/// sites had applied commits the promoted replica never received when
/// their pool went down (and they were cut off from it) just before the
/// primary crashed. The pool comes back on its new slot, which the
/// promotion opened at the promoted replica's position: its history is
/// complete from below the sites' positions, and when the sites reach it
/// again, several feeds later, it would continue them (`C`). Only the
/// history their position was taken on (`O`) tells them it now names
/// other commits: each starts over. With the origin check removed, 15
/// sites continued and served values of the lost commits until the end
/// (seed 1: 14.3 s stale, judged as stale from the promotion that lost
/// them).
#[test]
fn sites_cut_off_just_before_a_lossy_failover_start_over_though_the_pool_could_continue() {
    let lossy = "[db]\nreplication = \"async\"\nwal_send_ms = 1000.0\n\
        [[faults]]\nkind = \"regional-outage\"\nat_s = 7.95\nregion = \"EU\"\nduration_s = 7.5\n\
        [[faults]]\nkind = \"edge-partition\"\nat_s = 7.95\nregion = \"EU\"\nduration_s = 13.0\n\
        [[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n";
    for seed in [1, 2] {
        let r = run(lossy, seed);
        assert_eq!(r.failovers, 1, "seed {seed}");
        assert_eq!(r.streams_resumed, 0, "seed {seed}: a site continued across the failover");
        assert!(r.safe(), "seed {seed}: max staleness {} ms; {:?}", r.staleness_ms_max, r.rows);
    }
}

//! Regression tests for issue 13: each fails on the model and report as
//! they were before its fix (the numbers quoted are what they measured).
//! Small worlds (40 sites, 30-45 simulated seconds, a fraction of a second
//! each); a failure names the scenario text and seed to reproduce it with
//! `cargo run --release -p postai-sim -- FILE --seed N`.

use postai_sim::run::Report;
use postai_sim::{Scenario, run_scenario};

/// A small world: 40 sites at 4 000 queries/s, caches warm, measured from 3 s.
fn world(name: &str, duration_s: u64, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ndescription = \"issue 13 regression\"\nseed = 1\nduration_s = {duration_s}\nwarmup_s = 3\n\
         sites = 40\nwarm_start_s = 300\n{extra}"
    )
}

fn run(text: &str, seed: u64) -> Report {
    let mut sc = Scenario::parse("issue13.toml", text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    sc.seed = seed;
    run_scenario(&sc)
}

fn row<'r>(r: &'r Report, metric: &str) -> Option<&'r postai_sim::run::Row> {
    r.rows.iter().find(|row| row.metric == metric)
}

/// Part 1. The primary crashes under synchronous replication and comes back
/// 4.8-6.2 s later, after its failure was declared and before the standby's
/// promotion completed, with writes bypassing the edge. It comes back as a
/// primary of the old epoch (as PostgreSQL does) and takes writes until its
/// fence arrives; no standby receives them, so none may be acknowledged.
/// Before: 20, 30, 40 and 30 acknowledged writes lost (the model
/// acknowledged at commit).
#[test]
fn no_acknowledged_write_is_lost_when_the_old_primary_returns_during_the_promotion() {
    for restart_after_s in [4.8, 5.2, 5.6, 6.2] {
        let text = world(
            "restart-during-promotion",
            30,
            &format!(
                "[workload]\nrate_qps = 4000.0\nbypass_write_qps = 100.0\n[db]\nreplication = \"sync\"\n\
                 [[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\nrestart_after_s = {restart_after_s}\n"
            ),
        );
        let r = run(&text, 1);
        assert_eq!(r.acked_writes_lost, 0, "restart after {restart_after_s} s: acknowledged writes lost\n{text}");
        assert_eq!(r.failovers, 1, "restart after {restart_after_s} s\n{text}");
        assert!(r.writes.count > 1_000, "restart after {restart_after_s} s: writes resumed\n{text}");
        assert!(r.safe(), "restart after {restart_after_s} s: {:?}\n{text}", r.rows);
    }
}

/// Part 1, the other side: a primary that comes back before its failure is
/// declared is followed again (the replicas reconnect), and nothing fails
/// over. Before: the replicas stayed cut off from it for the rest of the run
/// (max staleness 2 870 ms, reads from replicas frozen at the crash).
#[test]
fn a_primary_back_before_its_failure_is_declared_is_followed_again() {
    let text = world(
        "quick-restart",
        30,
        "[workload]\nrate_qps = 4000.0\nbypass_write_qps = 100.0\n[[faults]]\nkind = \"primary-crash\"\n\
         at_s = 8.0\nrestart_after_s = 2.0\n",
    );
    let r = run(&text, 1);
    assert_eq!(r.failovers, 0, "{text}");
    assert!(r.safe(), "{:?}\n{text}", r.rows);
    // replicas serve again what the primary commits after its return
    assert!(r.staleness_ms_max < 1_000.0, "max staleness {} ms\n{text}", r.staleness_ms_max);
}

/// Part 2. Change events reordered (half of them) and duplicated, writes
/// sparse enough that the event before a reordered one has often been
/// applied: every event arrives, so no consumer is left with a gap. Before
/// (the new event swapped into the slot of one already applied, never
/// delivered): 73 gaps given up on at the sites, 2 regional pools with a
/// gap at the end, the sites' hit rate 84 % instead of 95 %.
#[test]
fn reordered_change_events_all_arrive() {
    let text = world(
        "reorder",
        30,
        "[workload]\nrate_qps = 4000.0\nwrite_ratio = 0.0\nkeys = 2000\nbypass_write_qps = 2.0\n\
         [db]\ncdc_reorder = 0.5\ncdc_duplicate = 0.1\n",
    );
    for seed in [1, 2] {
        let r = run(&text, seed);
        assert_eq!((r.cdc_gaps_skipped, r.cdc_gaps_open), (0, 0), "seed {seed}: change events lost\n{text}");
        assert!(r.safe(), "seed {seed}: {:?}\n{text}", r.rows);
    }
}

/// Part 2, found by the swarm once staleness was judged: news that arrives
/// late is as old as when it was sent. Before: a site reconnecting (an edge
/// partition healing) while its pool's stream was stalled, or while its
/// pool was down, received the pool's backlog and served for 2 s more from
/// news seconds old (max staleness 5 120 and 5 711 ms); the first of two
/// overlapping CDC stalls ending delivered events sent up to the second
/// one's start as if fresh (3 527 ms). The bound here is 2 300 ms.
#[test]
fn a_backlog_delivered_late_does_not_restart_the_silence_clock() {
    let faults = [
        "[[faults]]\nkind = \"edge-partition\"\nat_s = 6.0\nregion = \"EU\"\nduration_s = 6.0\n\
         [[faults]]\nkind = \"cdc-stall\"\nat_s = 8.0\nduration_s = 8.0\n",
        "[[faults]]\nkind = \"cdc-stall\"\nat_s = 4.0\nduration_s = 9.0\n\
         [[faults]]\nkind = \"cdc-stall\"\nat_s = 11.0\nduration_s = 6.0\n",
        "[[faults]]\nkind = \"edge-partition\"\nat_s = 6.0\nregion = \"EU\"\nduration_s = 5.0\n\
         [[faults]]\nkind = \"regional-outage\"\nat_s = 7.0\nregion = \"EU\"\nduration_s = 8.0\n",
    ];
    for f in faults {
        let text = world("backlog", 30, &format!("[workload]\nrate_qps = 4000.0\nbypass_write_qps = 50.0\n{f}"));
        for seed in [1, 2] {
            let r = run(&text, seed);
            let stale = row(&r, "max staleness").expect("a staleness row");
            assert!(stale.pass, "seed {seed}: {stale:?}\n{text}");
            assert!(r.safe(), "seed {seed}: {:?}\n{text}", r.rows);
        }
    }
}

/// Part 3. Two faults at the same instant begin in a seed-dependent order;
/// each is judged against its own target. Before: faults were paired with
/// targets by firing order, and seeds 4, 7, 11 and 12 printed the primary
/// crash against the cache's 1 000 ms and the tier loss against 5 000 ms.
#[test]
fn each_fault_is_judged_against_its_own_target() {
    let text = world(
        "same-instant",
        30,
        "[workload]\nrate_qps = 4000.0\n[[faults]]\nkind = \"tier-loss\"\nat_s = 8.0\ntier = \"L1\"\n\
         [[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n[targets]\nrto_primary_ms = 5000.0\nrto_cache_ms = 1000.0\n",
    );
    for seed in [4, 7, 11, 12] {
        let r = run(&text, seed);
        assert_eq!(r.recoveries.len(), 2);
        for rec in &r.recoveries {
            let want = if rec.fault == "primary-crash" { 5_000.0 } else { 1_000.0 };
            assert_eq!(rec.target_ms, Some(want), "seed {seed}: {} judged against {:?}", rec.fault, rec.target_ms);
            let printed = row(&r, &format!("RTO {}", rec.fault)).expect("a row per fault");
            assert_eq!(printed.target, format!("< {want:.0} ms"), "seed {seed}");
        }
    }
}

/// Part 3. APAC's pool loses the primary for 25 s: its writes go through the
/// nearest pool that reaches the primary, and the fault has a recovery row.
/// Before: no row, and availability 99.84 % (writes held, then failed).
#[test]
fn a_pool_cut_off_from_the_primary_relays_its_writes_and_is_judged() {
    let text = world(
        "primary-partition",
        45,
        "[workload]\nrate_qps = 4000.0\n[[faults]]\nkind = \"primary-partition\"\nat_s = 10.0\nregion = \"APAC\"\n\
         duration_s = 25.0\n",
    );
    let r = run(&text, 1);
    let rto = row(&r, "RTO primary-partition APAC").expect("a recovery row for the partition");
    assert_eq!(rto.target, "< 10000 ms");
    assert!(rto.pass, "{rto:?}");
    assert_eq!(r.availability, 1.0, "writes failed");
    assert!(r.relayed_writes > 100, "{} writes relayed", r.relayed_writes);
    assert!(r.safe(), "{:?}", r.rows);
}

/// Part 3. Asynchronous replication loses what the standby had not received
/// (the walsender's 10 ms batch): RPO is that window, not the time from the
/// acknowledgement to the promotion (before: 6 510 ms).
#[test]
fn asynchronous_rpo_is_the_window_of_data_lost() {
    let text = world(
        "async",
        30,
        "[workload]\nrate_qps = 4000.0\nwrite_ratio = 0.2\nkeys = 300\nbypass_write_qps = 100.0\n\
         [db]\nreplication = \"async\"\n[[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n",
    );
    // (a session reading back its own lost write is rare: a few reads a
    // run, none in some seeds; counted over four)
    let mut own_lost_reads = 0;
    for seed in [1, 2, 3, 4] {
        let r = run(&text, seed);
        assert!(r.acked_writes_lost > 0, "seed {seed}: the run loses writes");
        assert!(r.rpo_ms > 0.0 && r.rpo_ms < 100.0, "seed {seed}: RPO {} ms", r.rpo_ms);
        let rpo = row(&r, "RPO (window of acknowledged data lost, async)").expect("an RPO row");
        assert!(rpo.pass && !rpo.safety, "{rpo:?}");
        own_lost_reads += r.ryw_lost_writes;
        assert_eq!(r.ryw_violations, 0, "seed {seed}");
        assert!(r.safe(), "seed {seed}: {:?}", r.rows);
    }
    // a session's own lost write, not shown by the new history whatever
    // its LSNs: counted with the loss, not as a read-your-writes bug
    assert!(own_lost_reads > 0, "reads missing a lost own write");
}

/// Part 3. A second primary crash 6 s after the first, while the standby is
/// being promoted, takes the standby down: the controller gives up on it
/// and promotes a replica in another region, with no acknowledged write
/// lost. Before: the second crash hit the dead primary again (its RTO
/// 300 ms), and the standby was promoted.
#[test]
fn back_to_back_primary_crashes_are_exercised() {
    let text = world(
        "back-to-back",
        40,
        "[workload]\nrate_qps = 4000.0\nbypass_write_qps = 50.0\n[[faults]]\nkind = \"primary-crash\"\nat_s = 8.0\n\
         restart_after_s = 20.0\n[[faults]]\nkind = \"primary-crash\"\nat_s = 14.0\nrestart_after_s = 3.0\n",
    );
    let r = run(&text, 1);
    assert_eq!(r.failover_to.len(), 1, "{:?}", r.failover_to);
    assert!(!r.failover_to[0].ends_with("standby"), "promoted {:?}", r.failover_to);
    assert!(r.recoveries[1].rto_ms > 4_000.0, "the second crash disrupted writes: {:?}", r.recoveries[1]);
    assert_eq!(r.acked_writes_lost, 0);
    assert!(r.safe(), "{:?}", r.rows);
    // and a crash of the new primary after the first failover, for longer
    // than the failure detection: a second failover
    let text = text.replace("at_s = 14.0\nrestart_after_s = 3.0", "at_s = 18.0\nrestart_after_s = 10.0");
    let r = run(&text, 1);
    assert_eq!(r.failovers, 2, "{:?}", r.failover_to);
    assert_eq!(r.acked_writes_lost, 0);
    assert!(r.safe(), "{:?}", r.rows);
}

/// Found by the 10 000-seed sweep (seeds 1541, 1696 and 1827 of the short
/// form, 2132 and 3305 of the small worlds): under asynchronous replication
/// the primary crashes and comes back about 4 s later, before its failure
/// is declared. Meanwhile replicas answer reads without the commits the
/// primary had not sent (no node that is up has them), and those reads
/// were judged stale, up to 3.3-3.6 s, against a bound of 2.75 s. No read
/// could have shown them: they are counted apart (and lost, RPO, if a
/// promotion replaces the primary instead). Commits some live node had
/// are still judged, and those the primary brings back are judged from its
/// return (seed 2132 of the short form: replicas still catching up right
/// after it came back were judged 3.9 s stale for them). Before: the small
/// world of seed 3305 failed its staleness row with 3 276 ms, seed 2132
/// with 3 968 ms.
#[test]
fn commits_only_a_crashed_primary_has_are_not_staleness() {
    let base = Scenario::load(&format!("{}/swarm.toml", postai_sim::scenarios_dir().display())).expect("swarm");
    let r = run_scenario(&base.small(3305));
    assert!(r.safe(), "{}", postai_sim::report::table(&r));
    assert!(r.limbo_reads > 0, "the reads that missed them are counted: {}", postai_sim::report::table(&r));
    assert!(r.staleness_ms_max < 2800.0, "{}", r.staleness_ms_max);
    let r = run_scenario(&base.short(2132));
    assert!(r.safe(), "{}", postai_sim::report::table(&r));
    // the same world with synchronous replication: every acknowledged
    // commit is on the standby, so no read misses one only the primary had
    let mut sync = postai_sim::run::world(&base.small(3305));
    sync.db.replication = postai_sim::scenario::Replication::Sync;
    let r = run_scenario(&sync);
    assert!(r.safe(), "{}", postai_sim::report::table(&r));
    assert_eq!(r.limbo_reads, 0);
}

//! Swarm testing (as TigerBeetle's VOPR): topology, workload and fault rates
//! drawn from the seed, so that many seeds explore many worlds.

use postai_core::rng::Rng;

use crate::scenario::{Fault, Scenario};

pub fn draw(base: &Scenario) -> Scenario {
    let mut rng = Rng::new(base.seed ^ 0x5157_4152_4d00);
    let mut sc = base.clone();
    sc.swarm = false;
    sc.sites = 20 + rng.below(281) as usize;
    sc.workload.write_ratio = 0.01 + rng.unit_f64() * 0.14;
    sc.workload.zipf_s = 0.6 + rng.unit_f64() * 0.8;
    sc.workload.keys = 1_000 + rng.below(50_000);
    sc.workload.sessions_per_site = 1 + rng.below(8) as u32;
    sc.workload.bypass_write_qps = if rng.below(2) == 0 { 0.0 } else { rng.unit_f64() * 200.0 };
    sc.db.cdc_duplicate = rng.unit_f64() * 0.2;
    sc.db.cdc_reorder = rng.unit_f64() * 0.2;
    sc.db.cdc_lag_ms = rng.unit_f64() * 500.0;
    sc.network.loss = rng.unit_f64() * 0.01;
    let regions = ["EU", "US", "APAC"];
    let faults_n = 1 + rng.below(4);
    let span = (sc.duration_s as f64 * 0.6).max(1.0);
    let mut faults = Vec::new();
    let mut primary_crashed = false;
    for _ in 0..faults_n {
        let at_s = sc.warmup_s as f64 * 0.5 + rng.unit_f64() * span * 0.8;
        let region = regions[rng.below(3) as usize].to_string();
        let dur = 1.0 + rng.unit_f64() * 10.0;
        let f = match rng.below(6) {
            // one from this stream (so that the worlds drawn before stay); a
            // second one, back to back, from `draw_more`
            0 if !primary_crashed => {
                primary_crashed = true;
                Fault::PrimaryCrash { at_s, restart_after_s: Some(dur * 2.0) }
            }
            1 => Fault::ReplicaCrash { at_s, region, restart_after_s: Some(dur) },
            2 => Fault::RegionalOutage { at_s, region, duration_s: dur },
            3 => Fault::TierLoss { at_s, tier: ["L1", "L2", "L3"][rng.below(3) as usize].into(), region: Some(region) },
            4 => Fault::EdgePartition { at_s, region, duration_s: dur },
            _ => Fault::CdcStall { at_s, duration_s: dur },
        };
        faults.push(f);
    }
    sc.faults = faults;
    draw_more(&mut sc, &mut Rng::new(base.seed ^ 0x5157_4152_4d01));
    draw_stream_faults(&mut sc, &mut Rng::new(base.seed ^ 0x5157_4152_4d03));
    draw_replication_lag(&mut sc, &mut Rng::new(base.seed ^ 0x5157_4152_4d04));
    sc
}

/// From a fourth stream (the worlds drawn before stay): under asynchronous
/// replication, half the runs have their replicas behind by 0.1 to 2 s, so
/// that a crash loses commits the change stream had already carried to the
/// sites (what they hold of those must go at the promotion).
fn draw_replication_lag(sc: &mut Scenario, rng: &mut Rng) {
    if sc.db.replication == crate::scenario::Replication::Async && rng.below(2) == 0 {
        sc.db.wal_send_ms = 100.0 + rng.unit_f64() * 1_900.0;
    }
}

/// The change stream's own failures, from a third stream (the worlds drawn
/// before stay): a pool's slot dropped, a region's sites restarted from
/// their L2 files; one in four runs each.
fn draw_stream_faults(sc: &mut Scenario, rng: &mut Rng) {
    let duration = sc.duration_s as f64;
    let at = |rng: &mut Rng| (sc.warmup_s as f64 * 0.5 + rng.unit_f64() * duration * 0.6).min(duration - 1.0);
    let regions = ["EU", "US", "APAC"];
    if rng.below(4) == 0 {
        let region = regions[rng.below(3) as usize].to_string();
        sc.faults.push(Fault::SlotDrop { at_s: at(rng), region });
    }
    if rng.below(4) == 0 {
        let region = regions[rng.below(3) as usize].to_string();
        sc.faults.push(Fault::EdgeRestart { at_s: at(rng), region });
    }
}

/// Cases drawn on purpose, from a second stream so that the draws above
/// (the worlds the seeds gave before these were added) stay as they were:
/// a crashed primary coming back while its replacement is being promoted
/// (writes bypassing the edge keep coming; issue 13: acknowledged writes
/// were lost there), a second primary crash before the first failover
/// completes (it takes down the node taking over), a pool cut off from the
/// primary, a slow link, asynchronous replication.
fn draw_more(sc: &mut Scenario, rng: &mut Rng) {
    let duration = sc.duration_s as f64;
    let at = |rng: &mut Rng| (sc.warmup_s as f64 * 0.5 + rng.unit_f64() * duration * 0.5).min(duration - 1.0);
    let detect_s = sc.db.heartbeat_timeout_ms as f64 / 1e3;
    let promote_s = sc.db.promote_ms as f64 / 1e3;
    // from the failure's detection to the routes' change (control ticks of 0.5 s)
    let in_promotion = |rng: &mut Rng| detect_s + rng.unit_f64() * (promote_s + 1.0);
    let regions = ["EU", "US", "APAC"];
    if rng.below(5) == 0 {
        sc.db.replication = crate::scenario::Replication::Async;
    }
    let first = sc.faults.iter().position(|f| matches!(f, Fault::PrimaryCrash { .. }));
    if rng.below(3) == 0 {
        let restart = Some(in_promotion(rng));
        match first {
            Some(i) => {
                if let Fault::PrimaryCrash { restart_after_s, .. } = &mut sc.faults[i] {
                    *restart_after_s = restart;
                }
            }
            None => sc.faults.push(Fault::PrimaryCrash { at_s: at(rng), restart_after_s: restart }),
        }
        if sc.workload.bypass_write_qps == 0.0 {
            sc.workload.bypass_write_qps = 20.0 + rng.unit_f64() * 180.0;
        }
    }
    if rng.below(5) == 0 {
        let first_at = match sc.faults.iter().find(|f| matches!(f, Fault::PrimaryCrash { .. })) {
            Some(f) => f.at_s(),
            None => {
                let at_s = at(rng);
                sc.faults.push(Fault::PrimaryCrash { at_s, restart_after_s: Some(in_promotion(rng) + 3.0) });
                at_s
            }
        };
        let at_s = (first_at + rng.unit_f64() * (detect_s + promote_s + 1.0)).min(duration - 1.0);
        sc.faults.push(Fault::PrimaryCrash { at_s, restart_after_s: Some(1.0 + rng.unit_f64() * 10.0) });
    }
    if rng.below(5) == 0 {
        let region = regions[rng.below(3) as usize].to_string();
        sc.faults.push(Fault::PrimaryPartition { at_s: at(rng), region, duration_s: 1.0 + rng.unit_f64() * 19.0 });
    }
    if rng.below(10) == 0 {
        let region = regions[rng.below(3) as usize].to_string();
        let extra_ms = 50.0 + rng.unit_f64() * 450.0;
        sc.faults.push(Fault::SlowLink { at_s: at(rng), region, extra_ms, duration_s: 1.0 + rng.unit_f64() * 9.0 });
    }
}

/// A small world from `sc` (drawn already, if a swarm): 3 to 12 sites with
/// the per-site query and bypass rates they had, at most 5 000 keys and 3
/// sessions per site; faults and network as they were. Drawn from a stream
/// of its own, so the swarm's draws stay as they are.
pub fn small_world(sc: &mut Scenario) {
    let mut rng = Rng::new(sc.seed ^ 0x5157_4152_4d02);
    let sites = 3 + rng.below(10) as usize;
    let share = sites as f64 / sc.sites.max(1) as f64;
    if share < 1.0 {
        sc.workload.rate_qps *= share;
        sc.workload.bypass_write_qps *= share;
        sc.sites = sites;
    }
    sc.workload.keys = sc.workload.keys.min(200 + rng.below(4_801));
    sc.workload.sessions_per_site = sc.workload.sessions_per_site.min(3);
    sc.small = false;
}

/// One line on what a swarm draw chose (the report prints it).
pub fn describe(sc: &Scenario) -> String {
    let w = &sc.workload;
    let faults: Vec<String> = sc
        .faults_sorted()
        .iter()
        .map(|f| match f {
            Fault::PrimaryCrash { at_s, restart_after_s } => match restart_after_s {
                Some(r) => format!("primary-crash at {at_s:.1} s (restart after {r:.1} s)"),
                None => format!("primary-crash at {at_s:.1} s"),
            },
            Fault::RegionalOutage { duration_s, .. }
            | Fault::EdgePartition { duration_s, .. }
            | Fault::PrimaryPartition { duration_s, .. }
            | Fault::SlowLink { duration_s, .. }
            | Fault::CdcStall { duration_s, .. } => format!("{} at {:.1} s for {duration_s:.1} s", f.label(), f.at_s()),
            Fault::ReplicaCrash { restart_after_s: Some(r), .. } => {
                format!("{} at {:.1} s (restart after {r:.1} s)", f.label(), f.at_s())
            }
            f => format!("{} at {:.1} s", f.label(), f.at_s()),
        })
        .collect();
    format!(
        "{} sites, {} replication, writes {:.1} %, {:.0} bypassing writes/s, {} sessions per site, \
         CDC lag {:.0} ms, reorder {:.1} %, duplicates {:.1} %, loss {:.2} %; faults: {}",
        sc.sites,
        match sc.db.replication {
            crate::scenario::Replication::Async => format!("Async (WAL sent after {:.0} ms)", sc.db.wal_send_ms),
            r => format!("{r:?}"),
        },
        w.write_ratio * 100.0,
        w.bypass_write_qps,
        w.sessions_per_site,
        sc.db.cdc_lag_ms,
        sc.db.cdc_reorder * 100.0,
        sc.db.cdc_duplicate * 100.0,
        sc.network.loss * 100.0,
        faults.join(", ")
    )
}

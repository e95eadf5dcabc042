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
    sc
}

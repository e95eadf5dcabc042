//! The warm start (caches as steady traffic would leave them) and what the
//! sites hold at the end.

use postai_core::node::harness;

use super::*;

impl World {
    /// Distinct rows of `items` held in a site's L1 or L2 (the key deps of
    /// its entries that it would serve now: unexpired and valid), mean over
    /// sites.
    pub fn rows_held_per_site(&self) -> f64 {
        let now = self.now();
        // a range near the end of the key space names rows past it
        let keys = self.sc.workload.keys;
        let absent: Vec<u64> =
            (keys..=keys + RANGE_SPAN).map(|k| key_hash(self.items, decimal(k, &mut [0; 20]))).collect();
        let mut rows = Vec::new();
        let mut total = 0usize;
        for s in &self.sites {
            rows.clear();
            let versions = s.node.versions();
            for tier in [TierName::L1, TierName::L2].into_iter().filter_map(|t| s.node.tier(t)) {
                for e in tier.entries().filter(|e| e.expires_at > now && versions.is_valid(e.lsn, &e.deps)) {
                    rows.extend(e.deps.iter().filter_map(|d| match *d {
                        Dep::Key(t, k) if t == self.items && !absent.contains(&k) => Some(k),
                        _ => None,
                    }));
                }
            }
            rows.sort_unstable();
            rows.dedup();
            total += rows.len();
        }
        total as f64 / self.sites.len().max(1) as f64
    }
}

/// Fills every site's tiers as `warm_start_s` seconds of steady reads would
/// have: a key is cached with the probability that at least one of those reads
/// touched it. Hottest keys are filled last, so that L1 holds them.
pub(super) fn warm_start(sc: &Scenario, sites: &mut [Site], cdf: &[f64], rng: &mut Rng) {
    let w = &sc.workload;
    let entry_bytes = sc.tiers.entry_bytes;
    let total = w.point + w.range + w.join;
    let reads_per_site =
        w.rate_qps / sites.len().max(1) as f64 * (1.0 - w.write_ratio) * sc.warm_start_s as f64 * 0.625;
    let mut prob = Vec::with_capacity(cdf.len());
    let mut prev = 0.0;
    for c in cdf {
        prob.push(c - prev);
        prev = *c;
    }
    // the same for every site: computed once
    let ops = [(Op::Range, w.range), (Op::Join, w.join), (Op::Point, w.point)];
    let touched: Vec<Vec<f64>> = ops
        .iter()
        .map(|(_, share)| {
            let n = reads_per_site * share / total;
            prob.iter().map(|p| 1.0 - (1.0 - p).powf(n)).collect()
        })
        .collect();
    for site in sites.iter_mut() {
        for ((op, _), p_touched) in ops.iter().zip(&touched) {
            for key in (0..prob.len() as u64).rev() {
                if rng.unit_f64() >= p_touched[key as usize] {
                    continue;
                }
                let mut bufs = [[0u8; 20]; 2];
                let params = query_params(key, &mut bufs);
                let (stmt, np) = match op {
                    Op::Range => (&site.stmts.range, 2),
                    Op::Join => (&site.stmts.join, 1),
                    _ => (&site.stmts.point, 1),
                };
                let sid = site.sessions[0].id;
                site.node.handle_execute(Instant::ZERO, sid, stmt, &params[..np]);
                // the origin answers as of LSN 0 (the fleet starts there)
                let origin = |_: &_| Ok(harness::read_reply(Val { lsn: Lsn(0) }, entry_bytes, Served::Primary, Lsn(0)));
                harness::settle(&mut site.node, Instant::ZERO, origin);
            }
        }
    }
}

pub(super) fn zipf_cdf(keys: u64, s: f64) -> Vec<f64> {
    let mut cdf: Vec<f64> = Vec::with_capacity(keys as usize);
    let mut acc = 0.0;
    for k in 0..keys {
        acc += 1.0 / ((k + 1) as f64).powf(s);
        cdf.push(acc);
    }
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

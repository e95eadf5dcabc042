//! Human-readable tables of a report.

use std::fmt::Write;

use crate::run::Report;

pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== {} (seed {}, {} sites, {} s simulated, {} queries)",
        r.scenario, r.seed, r.sites, r.simulated_s, r.queries
    );
    if let Some(d) = &r.drawn {
        let _ = writeln!(s, "  drawn: {d}");
    }
    let _ = writeln!(s, "  {:<44} {:>16} {:>22}  result", "metric", "target", "measured");
    for row in &r.rows {
        let verdict = if row.pass { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "  {:<44} {:>16} {:>22}  {verdict}", row.metric, row.target, row.measured);
    }
    let _ = writeln!(
        s,
        "  reads p50/p95/p99 {:.2}/{:.2}/{:.2} ms, writes {:.2}/{:.2}/{:.2} ms",
        r.reads.p50_ms, r.reads.p95_ms, r.reads.p99_ms, r.writes.p50_ms, r.writes.p95_ms, r.writes.p99_ms
    );
    let by_region: Vec<String> = r.reads_by_region.iter().map(|(z, q)| format!("{z} {:.2}", q.p95_ms)).collect();
    let _ = writeln!(s, "  read p95 by region (ms): {}", by_region.join(", "));
    if !r.writes_by_region.is_empty() {
        let by_region: Vec<String> = r.writes_by_region.iter().map(|(z, q)| format!("{z} {:.2}", q.p95_ms)).collect();
        let _ = writeln!(s, "  write p95 by region (ms): {}", by_region.join(", "));
    }
    let by_tier: Vec<String> =
        r.reads_by_tier.iter().map(|(t, q)| format!("{t} {} ({:.2} ms)", q.count, q.p95_ms)).collect();
    let _ = writeln!(s, "  reads by tier (count, p95): {}", by_tier.join(", "));
    let _ = writeln!(
        s,
        "  hit rate {:.2} % (L1 {:.2} %, L2 {:.2} % of L1 misses, L3 {:.2} % of upstream); {:.2} % of reads answered at the site; sites hold {:.2} % of the rows (mean)",
        r.hit_rate * 100.0,
        r.hit_rate_l1 * 100.0,
        r.hit_rate_l2 * 100.0,
        r.hit_rate_l3 * 100.0,
        r.site_share * 100.0,
        r.edge_data_share * 100.0
    );
    for (name, t) in &r.tier_stats {
        let _ = writeln!(
            s,
            "  {name}: {} hits, {} misses, {} invalidated, {} expired, {} evicted, {} entries",
            t.hits, t.misses, t.invalidations, t.expirations, t.evictions, t.entries
        );
    }
    let _ = writeln!(
        s,
        "  stale reads {} (max staleness {:.1} ms), failovers {}{}",
        r.stale_reads,
        r.staleness_ms_max,
        r.failovers,
        if r.failover_to.is_empty() { String::new() } else { format!(" (to {})", r.failover_to.join(", ")) }
    );
    let _ = writeln!(
        s,
        "  sites' change streams after a break: {} continued where they broke off, {} started over; resets from a new slot: {} (each drops the site's cache)",
        r.streams_resumed, r.streams_started_over, r.streams_new_history
    );
    if let Some((pulls, failed, isolates)) = r.worker {
        let _ = writeln!(
            s,
            "  the Workers edge: {pulls} feed pulls by requests ({failed} heard no live keepalive), {isolates} isolates started cold"
        );
    }
    if r.ryw_lost_writes + r.limbo_reads + r.relayed_writes + r.cdc_gaps_skipped + r.cdc_gaps_open as u64 > 0 {
        let _ = writeln!(
            s,
            "  reads missing the session's own write a failover lost {}; reads missing only commits the crashed primary alone had {}; writes relayed around a pool cut off from the primary {}; change-stream gaps given up on {}, open at the end {}",
            r.ryw_lost_writes, r.limbo_reads, r.relayed_writes, r.cdc_gaps_skipped, r.cdc_gaps_open
        );
    }
    for rec in &r.recoveries {
        let _ = writeln!(
            s,
            "  fault {} at {:.1} s: recovered after {:.0} ms ({} requests failed)",
            rec.fault, rec.at_s, rec.rto_ms, rec.failed
        );
    }
    if !r.strategies.is_empty() {
        let _ = writeln!(s, "  {:<10} {:>10} {:>14} {:>18}", "strategy", "hit rate", "stale reads", "max staleness");
        for st in &r.strategies {
            let _ = writeln!(
                s,
                "  {:<10} {:>9.2}% {:>8} ({:.2}%) {:>15.1} ms",
                st.strategy,
                st.hit_rate * 100.0,
                st.stale_reads,
                st.stale_share * 100.0,
                st.staleness_ms_max
            );
        }
    }
    s
}

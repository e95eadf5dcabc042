//! Seed sweeps: one scenario file over a range of seeds, on several threads,
//! each run its own deterministic madsim runtime. What a sweep keeps of each
//! run is a line (its safety rows, the numbers the safety claims rest on);
//! what it prints at the end is every seed that violated safety, with the
//! command that reproduces it, and the distributions over all seeds.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use crate::run::{Report, run_scenario, world};
use crate::scenario::{Fault, Scenario};

/// Which form of a scenario a sweep runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// As the file says.
    Full,
    /// `Scenario::short`: what the tests run (24 simulated seconds).
    Short,
    /// `Scenario::small`: the short form in a small world (3-12 sites).
    Small,
}

impl Form {
    /// `base` in this form at `seed`.
    pub fn of(self, base: &Scenario, seed: u64) -> Scenario {
        match self {
            Form::Full => {
                let mut sc = base.clone();
                sc.seed = seed;
                sc
            }
            Form::Short => base.short(seed),
            Form::Small => base.small(seed),
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Form::Full => "",
            Form::Short => " --short",
            Form::Small => " --small",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Form::Full => "full form",
            Form::Short => "short form",
            Form::Small => "small worlds",
        }
    }
}

/// Runs at most this many to shrink one failing world.
pub const SHRINK_RUNS: usize = 40;

/// The smallest world found that still `fails`: each fault removed while
/// the run still fails without it, then the sites halved (down to one)
/// while it still fails, within `budget` runs. `sc` is a world as it runs
/// ([`world`]: no draw left to do), so the result reproduces by itself.
pub fn shrink(sc: &Scenario, fails: &dyn Fn(&Scenario) -> bool, budget: usize) -> Scenario {
    let mut best = sc.clone();
    let mut runs = 0;
    let mut try_it = |candidate: &Scenario| {
        runs += 1;
        runs <= budget && fails(candidate)
    };
    let mut i = 0;
    while i < best.faults.len() {
        let mut candidate = best.clone();
        candidate.faults.remove(i);
        if try_it(&candidate) {
            best = candidate;
        } else {
            i += 1;
        }
    }
    while best.sites > 1 {
        let mut candidate = best.clone();
        let share = (best.sites / 2) as f64 / best.sites as f64;
        candidate.sites = best.sites / 2;
        candidate.workload.rate_qps *= share;
        candidate.workload.bypass_write_qps *= share;
        if !try_it(&candidate) {
            break;
        }
        best = candidate;
    }
    best
}

/// A world as a scenario file (TOML) that `Scenario::load` reads back.
pub fn to_file(sc: &Scenario) -> Result<String, String> {
    toml::to_string(sc).map_err(|e| format!("{}: {e}", sc.name))
}

/// The kinds of faults a world has, for the summary of a shrunk one.
fn fault_kinds(faults: &[Fault]) -> String {
    let kinds: Vec<String> = faults.iter().map(Fault::label).collect();
    if kinds.is_empty() { "no fault".into() } else { kinds.join(", ") }
}

/// A range of seeds: `A..B` (B excluded) or `A..=B`.
pub fn parse_seeds(text: &str) -> Result<std::ops::Range<u64>, String> {
    let bad = || format!("--seeds {text:?}: expected A..B or A..=B (non-negative integers)");
    let (a, b, inclusive) = match text.split_once("..=") {
        Some((a, b)) => (a, b, true),
        None => {
            let (a, b) = text.split_once("..").ok_or_else(bad)?;
            (a, b, false)
        }
    };
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    let end = if inclusive { b.checked_add(1).ok_or_else(bad)? } else { b };
    if end <= a {
        return Err(format!("--seeds {text:?}: the range is empty"));
    }
    if end - a > SEEDS_MAX {
        return Err(format!("--seeds {text:?}: {} seeds, more than one sweep runs ({SEEDS_MAX})", end - a));
    }
    Ok(a..end)
}

/// Seeds one sweep runs at most (its results are kept per seed).
pub const SEEDS_MAX: u64 = 1_000_000;

/// Threads one sweep runs at most.
pub const JOBS_MAX: usize = 256;

/// What a sweep keeps of one run.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub safe: bool,
    /// Safety rows that failed: "metric = measured (target)".
    pub violations: Vec<String>,
    pub staleness_ms_max: f64,
    pub acked_writes_lost: u64,
    pub rpo_ms: f64,
    pub ryw_violations: u64,
    pub failovers: usize,
    pub availability: f64,
    pub rto_ms_max: f64,
    pub queries: u64,
    /// Wall-clock seconds of this run on its thread.
    pub wall_s: f64,
    /// For a run that violated safety: the smallest world found that still
    /// does (see [`shrink`]).
    #[serde(skip)]
    pub shrunk: Option<Scenario>,
}

impl SeedResult {
    fn of(r: &Report, wall_s: f64) -> SeedResult {
        SeedResult {
            seed: r.seed,
            safe: r.safe(),
            violations: r
                .rows
                .iter()
                .filter(|row| row.safety && !row.pass)
                .map(|row| format!("{} = {} (target {})", row.metric, row.measured, row.target))
                .collect(),
            staleness_ms_max: r.staleness_ms_max,
            acked_writes_lost: r.acked_writes_lost,
            rpo_ms: r.rpo_ms,
            ryw_violations: r.ryw_violations,
            failovers: r.failovers,
            availability: r.availability,
            rto_ms_max: r.recoveries.iter().map(|x| x.rto_ms).fold(0.0, f64::max),
            queries: r.queries,
            wall_s,
            shrunk: None,
        }
    }
}

/// One scenario file over `seeds`, `jobs` at a time (each its own thread),
/// in `form`. A run that violates safety is shrunk (see [`shrink`]) on its
/// thread. `on_done` sees each result as it comes (in completion order);
/// the results are returned in seed order.
pub fn sweep(
    base: &Scenario,
    seeds: std::ops::Range<u64>,
    form: Form,
    jobs: usize,
    on_done: &(dyn Fn(&SeedResult) + Sync),
) -> Vec<SeedResult> {
    let seeds: Vec<u64> = seeds.collect();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<SeedResult>>> = Mutex::new(vec![None; seeds.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, seeds.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { return };
                    let sc = form.of(base, seed);
                    let wall = std::time::Instant::now();
                    let report = run_scenario(&sc);
                    let mut result = SeedResult::of(&report, wall.elapsed().as_secs_f64());
                    drop(report);
                    if !result.safe {
                        let unsafe_run = |s: &Scenario| !run_scenario(s).safe();
                        result.shrunk = Some(shrink(&world(&sc), &unsafe_run, SHRINK_RUNS));
                    }
                    on_done(&result);
                    if let Ok(mut d) = done.lock() {
                        d[i] = Some(result);
                    }
                }
            });
        }
    });
    done.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().flatten().collect()
}

/// The command that reproduces one seed of a sweep.
pub fn reproduce(file: &str, seed: u64, form: Form) -> String {
    format!("cargo run --release -p postai-sim -- {file} --seed {seed}{}", form.flag())
}

/// Where a sweep writes the shrunk world of a failing seed.
pub fn shrunk_path(dir: &str, base: &Scenario, seed: u64) -> String {
    format!("{dir}/{}-{seed}.toml", base.name)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The end of a sweep: every seed that violated safety (with its
/// reproduction) and the distributions over all seeds.
pub fn summary(file: &str, form: Form, results: &[SeedResult], wall_s: f64, jobs: usize) -> String {
    let mut s = String::new();
    let n = results.len();
    let unsafe_: Vec<&SeedResult> = results.iter().filter(|r| !r.safe).collect();
    let seeds = match (results.first(), results.last()) {
        (Some(a), Some(b)) => format!("{}..={}", a.seed, b.seed),
        _ => "none".into(),
    };
    let _ = writeln!(
        s,
        "== sweep of {file} ({}), seeds {seeds}: {n} runs, {} with a safety violation",
        form.name(),
        unsafe_.len()
    );
    for r in &unsafe_ {
        let _ = writeln!(s, "  seed {}: {}", r.seed, r.violations.join("; "));
        let _ = writeln!(s, "    reproduce: {}", reproduce(file, r.seed, form));
        if let Some(w) = &r.shrunk {
            let _ = writeln!(s, "    shrunk: {} sites, {}", w.sites, fault_kinds(&w.faults));
        }
    }
    let mut stale: Vec<f64> = results.iter().map(|r| r.staleness_ms_max).collect();
    stale.sort_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "  max staleness per run: median {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        quantile(&stale, 0.5),
        quantile(&stale, 0.99),
        quantile(&stale, 1.0)
    );
    let lost: u64 = results.iter().map(|r| r.acked_writes_lost).sum();
    let with_loss = results.iter().filter(|r| r.acked_writes_lost > 0).count();
    let failovers: usize = results.iter().map(|r| r.failovers).sum();
    let ryw: u64 = results.iter().map(|r| r.ryw_violations).sum();
    let _ = writeln!(
        s,
        "  acknowledged writes lost: {lost} in {with_loss} runs (asynchronous replication included); \
         read-your-writes violations: {ryw}; failovers: {failovers}"
    );
    let mut avail: Vec<f64> = results.iter().map(|r| r.availability).collect();
    avail.sort_by(f64::total_cmp);
    let mut rto: Vec<f64> = results.iter().map(|r| r.rto_ms_max).collect();
    rto.sort_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "  availability: min {:.4} %, median {:.4} %; longest RTO per run: median {:.0} ms, max {:.0} ms",
        quantile(&avail, 0.0) * 100.0,
        quantile(&avail, 0.5) * 100.0,
        quantile(&rto, 0.5),
        quantile(&rto, 1.0)
    );
    let cpu: f64 = results.iter().map(|r| r.wall_s).sum();
    let queries: u64 = results.iter().map(|r| r.queries).sum();
    let _ = writeln!(
        s,
        "  cost: {:.2} s of one thread per seed ({} simulated queries per seed); {:.1} s wall on {jobs} jobs",
        cpu / n.max(1) as f64,
        queries / n.max(1) as u64,
        wall_s
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three seeds of a tiny world on two threads: results in seed order,
    /// each seed's run the same as run alone, and a summary that names the
    /// range and what a seed costs.
    #[test]
    fn a_sweep_runs_every_seed_in_order() {
        let text = "name = 'tiny'\ndescription = ''\nseed = 1\nduration_s = 4\nwarmup_s = 1\nwarm_start_s = 30\n\
                    sites = 6\n[workload]\nrate_qps = 600.0\nkeys = 500\n";
        let base = Scenario::parse("tiny.toml", text).expect("valid");
        let seen = std::sync::Mutex::new(0);
        let count = |_: &SeedResult| *seen.lock().expect("lock") += 1;
        let results = sweep(&base, 5..8, Form::Full, 2, &count);
        assert_eq!(results.iter().map(|r| r.seed).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(*seen.lock().expect("lock"), 3);
        let mut alone = base.clone();
        alone.seed = 6;
        assert_eq!(results[1].queries, run_scenario(&alone).queries);
        assert!(results.iter().all(|r| r.safe && r.violations.is_empty()));
        let text = summary("tiny.toml", Form::Full, &results, 1.0, 2);
        assert!(text.contains("seeds 5..=7: 3 runs, 0 with a safety violation"), "{text}");
        assert_eq!(reproduce("s.toml", 9, Form::Short), "cargo run --release -p postai-sim -- s.toml --seed 9 --short");
        assert_eq!(reproduce("s.toml", 9, Form::Small), "cargo run --release -p postai-sim -- s.toml --seed 9 --small");
    }

    fn swarm() -> Scenario {
        Scenario::load(&format!("{}/swarm.toml", crate::scenarios_dir().display())).expect("the swarm file")
    }

    /// Small worlds are small, whatever the swarm drew, and keep the draw's
    /// faults and network; the full and short forms are untouched by them.
    #[test]
    fn small_worlds_are_small_and_keep_their_faults() {
        let base = swarm();
        for seed in 0..50 {
            let drawn = world(&base.short(seed));
            let small = world(&base.small(seed));
            assert!((1..=12).contains(&small.sites), "seed {seed}: {} sites", small.sites);
            assert!(small.workload.keys <= 5_000 && small.workload.sessions_per_site <= 3);
            assert!(!small.swarm && !small.small, "nothing left to draw");
            assert_eq!(format!("{:?}", small.faults), format!("{:?}", drawn.faults), "seed {seed}");
            assert_eq!(small.db.cdc_reorder, drawn.db.cdc_reorder);
            let per_site = |s: &Scenario| s.workload.rate_qps / s.sites as f64;
            assert!((per_site(&small) - per_site(&drawn)).abs() < 1e-6 * per_site(&drawn).max(1.0), "seed {seed}");
        }
    }

    /// A shrunk world keeps only the faults the failure needs, and the
    /// fewest sites that still fail; as a file it reads back the same.
    #[test]
    fn failing_worlds_shrink_to_what_fails() {
        let mut sc = world(&swarm().small(3));
        sc.sites = 12;
        sc.faults = vec![
            Fault::CdcStall { at_s: 3.0, duration_s: 1.0 },
            Fault::PrimaryCrash { at_s: 5.0, restart_after_s: None },
            Fault::EdgePartition { at_s: 6.0, region: "EU".into(), duration_s: 2.0 },
        ];
        // "fails" with a primary crash and at least 3 sites
        let fails = |s: &Scenario| s.sites >= 3 && s.faults.iter().any(|f| matches!(f, Fault::PrimaryCrash { .. }));
        let shrunk = shrink(&sc, &fails, SHRINK_RUNS);
        assert_eq!(shrunk.sites, 3);
        assert_eq!(fault_kinds(&shrunk.faults), "primary-crash");
        assert!(shrink(&sc, &fails, 2).faults.len() > 1, "the budget bounds the runs");
        let text = to_file(&shrunk).expect("serializes");
        let back = Scenario::parse("shrunk.toml", &text).expect("reads back");
        assert_eq!(format!("{back:?}"), format!("{shrunk:?}"));
    }

    #[test]
    fn seed_ranges() {
        assert_eq!(parse_seeds("0..10"), Ok(0..10));
        assert_eq!(parse_seeds("5..=7"), Ok(5..8));
        for bad in ["", "7", "..3", "3..", "a..b", "5..5", "9..=3", "-1..4", "0..=18446744073709551614", "0..10000000"]
        {
            assert!(parse_seeds(bad).is_err(), "{bad:?} accepted");
        }
    }
}

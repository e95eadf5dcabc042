//! `cargo run --release -p postai-sim` runs the default scenario suite and
//! prints, per scenario, a table of target vs measured.

use std::process::ExitCode;

use postai_sim::{SUITE, Scenario, report, scenarios_dir, sweep};

const USAGE: &str = "usage: postai-sim [SCENARIO.toml ...] [--seed N | --seeds A..B [--jobs N]] [--short | --small]
                  [--duration S] [--json FILE] [--svg DIR] [--strict] [--shrunk DIR]
  no scenario: the default suite (scenarios/*.toml in suite order)
  --seed N      override every scenario's seed
  --short       run the short form the tests run (60 sites, 24 simulated seconds)
  --small       the short form in a small world (3 to 12 sites, their share of the
                rates, at most 5 000 keys): cheap enough for sweeps of many seeds
  --duration S  run each scenario for S simulated seconds of queries (its warm-up and
                faults as they are)
  --seeds A..B  sweep: each scenario over seeds A to B (B excluded; A..=B includes it),
                one line per seed that violates safety, then a summary with every such
                seed and the command that reproduces it
  --jobs N      sweep on N threads (default 1)
  --shrunk DIR  where a sweep writes, for each seed that violates safety, the smallest
                world found that still does (a scenario file; default target/shrunk)
  --json FILE   write the reports as JSON (a sweep: one summary per seed)
  --svg DIR     write one SVG per scenario (latency CDF per region, map of site read p95)
  --strict      exit 1 when any target is missed (safety violations always exit 1)";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    let mut files = Vec::new();
    let mut seed: Option<u64> = None;
    let mut json: Option<String> = None;
    let mut strict = false;
    let mut svg_dir: Option<String> = None;
    let mut form = sweep::Form::Full;
    let mut shrunk_dir = "target/shrunk".to_string();
    let mut seeds: Option<std::ops::Range<u64>> = None;
    let mut jobs = 1usize;
    let mut duration: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                seed = Some(args.next().ok_or("--seed needs a value")?.parse().map_err(|e| format!("--seed: {e}"))?)
            }
            "--seeds" => seeds = Some(sweep::parse_seeds(&args.next().ok_or("--seeds needs A..B")?)?),
            "--jobs" => {
                jobs = args.next().ok_or("--jobs needs a value")?.parse().map_err(|e| format!("--jobs: {e}"))?;
                if !(1..=sweep::JOBS_MAX).contains(&jobs) {
                    return Err(format!("--jobs must be between 1 and {}", sweep::JOBS_MAX));
                }
            }
            "--duration" => {
                let d = args.next().ok_or("--duration needs a number of seconds")?;
                duration = Some(d.parse().map_err(|e| format!("--duration: {e}"))?);
            }
            "--short" => form = sweep::Form::Short,
            "--small" => form = sweep::Form::Small,
            "--shrunk" => shrunk_dir = args.next().ok_or("--shrunk needs a directory")?,
            "--json" => json = Some(args.next().ok_or("--json needs a file")?),
            "--strict" => strict = true,
            "--svg" => svg_dir = Some(args.next().ok_or("--svg needs a directory")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            f if f.starts_with("--") => return Err(format!("unknown flag {f}")),
            f => files.push(f.to_string()),
        }
    }
    if files.is_empty() {
        let dir = scenarios_dir();
        files = SUITE.iter().map(|n| dir.join(format!("{n}.toml")).to_string_lossy().into_owned()).collect();
    }
    if let Some(range) = seeds {
        if seed.is_some() || svg_dir.is_some() || strict || duration.is_some() {
            return Err("--seeds does not go with --seed, --svg, --strict or --duration".into());
        }
        return run_sweeps(&files, range, form, jobs, json.as_deref(), &shrunk_dir);
    }
    let scenarios = load_all(&files, seed, duration, form)?;
    let (done, threads, suite_secs) = run_all(&scenarios)?;
    let mut reports = Vec::new();
    let mut all_pass = true;
    let mut all_safe = true;
    for ((f, sc), result) in files.iter().zip(&scenarios).zip(done) {
        let (r, secs) = result.ok_or_else(|| format!("{f}: the scenario did not finish"))?;
        if let Some(dir) = &svg_dir {
            write_svg(dir, &r, sc)?;
        }
        print!("{}", report::table(&r));
        println!(
            "  simulator speed: {:.0} simulated queries per wall-second ({} in {:.2} s on one core)",
            r.queries as f64 / secs.max(1e-9),
            r.queries,
            secs
        );
        if !r.passed() {
            println!("  reproduce: {}", sweep::reproduce(f, r.seed, form));
        }
        all_pass &= r.passed();
        all_safe &= r.safe();
        println!();
        reports.push(r);
    }
    let total: u64 = reports.iter().map(|r| r.queries).sum();
    println!(
        "suite wall time {suite_secs:.1} s on {threads} threads ({:.0} simulated queries per wall-second overall)",
        total as f64 / suite_secs.max(1e-9)
    );
    let passed = reports.iter().filter(|r| r.passed()).count();
    println!("suite: {passed} of {} scenarios met every target", reports.len());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    if !all_safe {
        eprintln!("SAFETY VIOLATION: see the FAIL rows above");
        return Ok(ExitCode::from(1));
    }
    Ok(if strict && !all_pass { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The scenario files, with the seed and duration given on the command
/// line, in the form asked for.
fn load_all(
    files: &[String],
    seed: Option<u64>,
    duration: Option<u64>,
    form: sweep::Form,
) -> Result<Vec<Scenario>, String> {
    let mut scenarios = Vec::with_capacity(files.len());
    for f in files {
        let mut sc = Scenario::load(f).map_err(|e| e.to_string())?;
        if let Some(s) = seed {
            sc.seed = s;
        }
        if let Some(d) = duration {
            if d <= sc.warmup_s {
                return Err(format!("{f}: --duration {d} is not past its warm-up ({} s)", sc.warmup_s));
            }
            sc.duration_s = d;
            // (the file's bounds hold for what the command line changed too)
            sc.validate().map_err(|e| format!("{f} with --duration {d}: {e}"))?;
        }
        sc = form.of(&sc, sc.seed);
        scenarios.push(sc);
    }
    Ok(scenarios)
}

/// The report's latency chart as `<dir>/<scenario>.svg`.
fn write_svg(dir: &str, r: &postai_sim::run::Report, sc: &Scenario) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    let path = std::path::Path::new(dir).join(format!("{}.svg", r.scenario));
    std::fs::write(&path, postai_sim::svg::render(r, sc.targets.read_p95_ms))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("  svg: {}", path.display());
    Ok(())
}

/// The scenarios, run on every core (each an independent simulation,
/// deterministic on its own thread): their reports in suite order, each
/// with its wall seconds; the threads used; the suite's wall seconds.
type Done = Vec<Option<(postai_sim::run::Report, f64)>>;

fn run_all(scenarios: &[Scenario]) -> Result<(Done, usize, f64), String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(scenarios.len()).max(1);
    let tty = threads == 1 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<Option<(postai_sim::run::Report, f64)>>> =
        std::sync::Mutex::new((0..scenarios.len()).map(|_| None).collect());
    let suite_wall = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(sc) = scenarios.get(i) else { return };
                    let wall = std::time::Instant::now();
                    let r = postai_sim::run::run_scenario_with_progress(sc, tty);
                    let secs = wall.elapsed().as_secs_f64();
                    if let Ok(mut d) = done.lock() {
                        d[i] = Some((r, secs));
                    }
                }
            });
        }
    });
    let suite_secs = suite_wall.elapsed().as_secs_f64();
    let done = done.into_inner().map_err(|_| "a scenario thread panicked".to_string())?;
    Ok((done, threads, suite_secs))
}

/// `--seeds A..B`: each file over the range; exits 1 when a seed violated safety.
fn run_sweeps(
    files: &[String],
    range: std::ops::Range<u64>,
    form: sweep::Form,
    jobs: usize,
    json: Option<&str>,
    shrunk_dir: &str,
) -> Result<ExitCode, String> {
    let mut all = Vec::new();
    let mut all_safe = true;
    for f in files {
        let base = Scenario::load(f).map_err(|e| e.to_string())?;
        let wall = std::time::Instant::now();
        let report_unsafe = |r: &sweep::SeedResult| {
            if !r.safe {
                println!(
                    "seed {}: {} -- reproduce: {}",
                    r.seed,
                    r.violations.join("; "),
                    sweep::reproduce(f, r.seed, form)
                );
            }
        };
        let results = sweep::sweep(&base, range.clone(), form, jobs, &report_unsafe);
        print!("{}", sweep::summary(f, form, &results, wall.elapsed().as_secs_f64(), jobs));
        for r in &results {
            let Some(world) = &r.shrunk else { continue };
            std::fs::create_dir_all(shrunk_dir).map_err(|e| format!("{shrunk_dir}: {e}"))?;
            let path = sweep::shrunk_path(shrunk_dir, &base, r.seed);
            std::fs::write(&path, sweep::to_file(world)?).map_err(|e| format!("{path}: {e}"))?;
            println!("  seed {}, shrunk: cargo run --release -p postai-sim -- {path}", r.seed);
        }
        all_safe &= results.iter().all(|r| r.safe);
        all.push(serde_json::json!({ "scenario": f, "form": form, "seeds": results }));
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))?;
    }
    if !all_safe {
        eprintln!("SAFETY VIOLATION: see the seeds above");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

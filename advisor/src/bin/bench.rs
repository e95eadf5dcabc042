//! `postai-advise-bench`: the advisor against no advice and a Dexter-style
//! reference, by real execution on copies of one database (README, "The
//! optimization engine").

use std::time::Instant;

use anyhow::Context;
use postai_advisor::bench::{run, schema_sql, workload};
use postai_advisor::db::{exec, rows};
use postai_advisor::{Options, advise, dexter, workload_plans};
use tokio_postgres::Client;

const USAGE: &str = "usage: postai-advise-bench CONNSTRING [--sf F] [--runs N]
  CONNSTRING   a superuser's connection to a server with pg_stat_statements preloaded and HypoPG
               installed (its dbname is where the benchmark's databases are created from)
  --sf F       scale (TPC-H row counts x F; default 0.02)
  --runs N     executions of each statement per measurement (default 30)";

const COPIES: [&str; 4] = ["none", "dexter", "ours", "scratch"];

async fn connect(base: &str, db: &str) -> anyhow::Result<Client> {
    let url = format!("{base} dbname={db}");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.with_context(|| url.clone())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn index_bytes(c: &Client) -> anyhow::Result<f64> {
    let r = rows(
        c,
        "SELECT coalesce(sum(pg_relation_size(indexrelid)), 0) FROM pg_index i JOIN pg_class c \
                     ON c.oid = i.indexrelid WHERE c.relname LIKE 'postai_bench_%'",
    )
    .await?;
    Ok(r.first().and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse().ok()).unwrap_or(0.0))
}

/// The source database with its data, and its copies.
async fn setup(base: &str, admin: &Client, sf: f64) -> anyhow::Result<()> {
    for d in std::iter::once("src").chain(COPIES) {
        exec(admin, &format!("DROP DATABASE IF EXISTS postai_bench_{d}")).await?;
    }
    exec(admin, "CREATE DATABASE postai_bench_src").await?;
    let t = Instant::now();
    {
        let src = connect(base, "postai_bench_src").await?;
        exec(&src, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; CREATE EXTENSION IF NOT EXISTS hypopg").await?;
        exec(&src, &schema_sql(sf)).await?;
    }
    println!("data at scale {sf}: {:.1} s", t.elapsed().as_secs_f64());
    for d in COPIES {
        exec(admin, &format!("CREATE DATABASE postai_bench_{d} TEMPLATE postai_bench_src")).await?;
    }
    Ok(())
}

/// Rounds of `runs` executions of every statement on each client in turn
/// (the machine is shared: its noise falls on all alike); per client and
/// statement, the median of the rounds.
async fn medians(
    clients: &[Client],
    queries: &[postai_advisor::bench::Query],
    runs: u64,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut times = vec![vec![Vec::new(); queries.len()]; clients.len()];
    for round in 0..ROUNDS {
        for (k, c) in clients.iter().enumerate() {
            let ms = run(c, queries, runs, 1_000_000 + round as u64 * runs).await?;
            for (q, m) in ms.into_iter().enumerate() {
                times[k][q].push(m);
            }
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(times.iter().map(|per| per.iter().map(median).collect()).collect())
}

const ROUNDS: usize = 5;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut base, mut sf, mut runs) = (None, 0.02, 30u64);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sf" => sf = args.next().context("--sf needs a number")?.parse()?,
            "--runs" => runs = args.next().context("--runs needs a number")?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with("--") => anyhow::bail!("unknown flag {s}\n{USAGE}"),
            s => base = Some(s.to_string()),
        }
    }
    let base = base.with_context(|| format!("no connection string\n{USAGE}"))?;
    let admin = connect(&base, "postgres").await?;
    setup(&base, &admin, sf).await?;
    // the workload once on the source: what the advisors see
    let src = connect(&base, "postai_bench_src").await?;
    exec(&src, "SELECT pg_stat_statements_reset()").await?;
    let queries = workload();
    run(&src, &queries, runs, 0).await?;
    let opts = Options::default();
    let t = Instant::now();
    let scratch = connect(&base, "postai_bench_scratch").await?;
    let ours = advise(&src, Some(&scratch), &opts).await?;
    let ours_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (w, plans) = workload_plans(&src, &opts).await?;
    let theirs = dexter::suggest(&src, &w, &plans).await?;
    let dexter_s = t.elapsed().as_secs_f64();
    print!("{}", postai_advisor::report::render(&ours));
    let ours_ddl: Vec<String> = ours
        .recommended
        .iter()
        .map(|r| r.choice.candidate.clone())
        .enumerate()
        .map(|(i, c)| c.ddl(Some(&format!("postai_bench_{i}"))))
        .collect();
    let dexter_ddl: Vec<String> =
        theirs.iter().enumerate().map(|(i, c)| c.ddl(Some(&format!("postai_bench_{i}")))).collect();
    println!("dexter-style: {}", if dexter_ddl.is_empty() { "nothing".into() } else { dexter_ddl.join("; ") });
    // each configuration's indexes, built on its copy
    let configs = [
        ("no advice", "none", vec![], 0.0),
        ("dexter-style", "dexter", dexter_ddl, dexter_s),
        ("postai-advise", "ours", ours_ddl, ours_s),
    ];
    let mut clients = Vec::new();
    for (_, db, ddl, _) in &configs {
        let c = connect(&base, &format!("postai_bench_{db}")).await?;
        for d in ddl {
            exec(&c, d).await?;
        }
        exec(&c, "VACUUM ANALYZE").await?;
        run(&c, &queries, 3, 500_000).await?;
        clients.push(c);
    }
    let medians = medians(&clients, &queries, runs).await?;
    let mut table = Vec::new();
    for (k, (name, _, ddl, secs)) in configs.iter().enumerate() {
        let (mut read, mut write) = (0.0, 0.0);
        for (q, m) in queries.iter().zip(&medians[k]) {
            if q.write { write += m } else { read += m }
        }
        let slower = medians[k].iter().zip(&medians[0]).filter(|(m, b)| **m > **b * 1.2 + 1.0).count();
        table.push(format!(
            "| {name} | {} | {:.1} | {read:.0} | {write:.0} | {slower} | {secs:.1} |",
            ddl.len(),
            index_bytes(&clients[k]).await? / 1e6
        ));
    }
    println!("\nper statement, median ms of {ROUNDS} rounds of {runs} executions (none / dexter-style / ours):");
    for (q, query) in queries.iter().enumerate() {
        let cells: Vec<String> = medians.iter().map(|m| format!("{:.1}", m[q])).collect();
        println!("  {}: {}", query.name, cells.join(" / "));
    }
    println!(
        "\n| advice | indexes | their MB | read ms | write ms | statements slower than with no advice | advisor s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in table {
        println!("{row}");
    }
    drop(src);
    drop(scratch);
    drop(clients);
    for d in std::iter::once("src").chain(COPIES) {
        let _ = exec(&admin, &format!("DROP DATABASE IF EXISTS postai_bench_{d} WITH (FORCE)")).await;
    }
    Ok(())
}

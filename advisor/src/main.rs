//! `postai-advise`: index and query advice for a PostgreSQL database.

use anyhow::Context;
use postai_advisor::{Options, advise, report};

const USAGE: &str = "usage: postai-advise CONNSTRING [--scratch CONNSTRING] [--budget-mb N] [--statements N] [--json]
  CONNSTRING         the database to advise (pg_stat_statements installed; HypoPG available)
  --scratch CONN     a copy of it (same schema and data) where recommendations are built
                     and timed for real; without it they are HypoPG's estimates
  --proxy CONN       a POST AI proxy in front of it: what its cache answered per statement
                     (SHOW POSTAI QUERIES), which pg_stat_statements never sees
  --budget-mb N      storage for new indexes (default 1000)
  --statements N     the statements that cost the most time to weigh (default 50)
  --json             the report as JSON";

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection: {e}");
        }
    });
    Ok(client)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut url, mut scratch, mut proxy, mut json, mut opts) = (None, None, None, false, Options::default());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scratch" => scratch = Some(args.next().context("--scratch needs a connection string")?),
            "--proxy" => proxy = Some(args.next().context("--proxy needs a connection string")?),
            "--budget-mb" => {
                opts.budget.bytes = args.next().context("--budget-mb needs a number")?.parse::<f64>()? * 1e6
            }
            "--statements" => opts.statements = args.next().context("--statements needs a number")?.parse()?,
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with("--") => anyhow::bail!("unknown flag {s}\n{USAGE}"),
            s => url = Some(s.to_string()),
        }
    }
    let url = url.with_context(|| format!("no connection string\n{USAGE}"))?;
    let client = connect(&url).await?;
    let scratch = match scratch {
        Some(s) => Some(connect(&s).await?),
        None => None,
    };
    let mut r = advise(&client, scratch.as_ref(), &opts).await?;
    if let Some(p) = proxy {
        let p = connect(&p).await?;
        postai_advisor::proxy::merge(&mut r, postai_advisor::proxy::shapes(&p).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::render(&r));
    }
    Ok(())
}

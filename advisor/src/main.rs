//! `postai-advise`: index and query advice for a PostgreSQL database.

use anyhow::Context;
use postai_advisor::{Options, advise, report};

const USAGE: &str = "usage: postai-advise CONNSTRING [--scratch CONNSTRING] [--budget-mb N] [--statements N] [--json]
  CONNSTRING         the database to advise (pg_stat_statements installed; HypoPG available)
  --scratch CONN     a copy of it (same schema and data) where recommendations are built
                     and timed for real; without it they are HypoPG's estimates
  --proxy CONN       a POST AI proxy in front of it: what its cache answered per statement
                     (SHOW POSTAI QUERIES), which pg_stat_statements never sees
  --apply FILE       build the recommended indexes on the advised database (CREATE INDEX
                     CONCURRENTLY) and keep what was built and the statistics then in FILE
  --measure FILE     no advice: the real change since --apply, per statement, from
                     pg_stat_statements, and a DROP proposed for an index that did not help
  --every MIN        run in the background: advise every MIN minutes, and print (with the
                     time) each recommendation, withdrawal or proposed drop not seen before
  --budget-mb N      storage for new indexes (default 1000)
  --statements N     the statements that cost the most time to weigh (default 50)
  --trust-functions  plan statements that call user functions too: planning may run
                     them (with the advisor's privileges); without it they are not planned
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

/// Advice every `minutes`: the first report whole, then what is new.
async fn watch(
    client: &tokio_postgres::Client,
    scratch: Option<&tokio_postgres::Client>,
    opts: &Options,
    first: postai_advisor::Report,
    minutes: f64,
) -> anyhow::Result<()> {
    print!("{}", report::render(&first));
    let mut seen = postai_advisor::report::headlines(&first);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs_f64(minutes.max(0.01) * 60.0)).await;
        let r = match advise(client, scratch, opts).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("postai-advise: {e} (trying again in {minutes} min)");
                continue;
            }
        };
        let now = postai_advisor::report::headlines(&r);
        for line in postai_advisor::report::new_lines(&seen, &now) {
            println!("{} {line}", unix_time());
        }
        seen = now;
    }
}

fn unix_time() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("[{}]", t.as_secs())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut url, mut scratch, mut proxy, mut json, mut opts) = (None, None, None, false, Options::default());
    let (mut apply, mut measure, mut every) = (None::<String>, None::<String>, None::<f64>);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scratch" => scratch = Some(args.next().context("--scratch needs a connection string")?),
            "--every" => {
                let m: f64 = args.next().context("--every needs a number of minutes")?.parse()?;
                // (at most a year: a Duration of more, or of a NaN, is no time)
                anyhow::ensure!(m > 0.0 && m <= 525_600.0, "--every: minutes between 0 and 525600, not {m}");
                every = Some(m);
            }
            "--apply" => apply = Some(args.next().context("--apply needs a file")?),
            "--measure" => measure = Some(args.next().context("--measure needs a file")?),
            "--proxy" => proxy = Some(args.next().context("--proxy needs a connection string")?),
            "--budget-mb" => {
                let mb: f64 = args.next().context("--budget-mb needs a number")?.parse()?;
                anyhow::ensure!(mb.is_finite() && mb >= 0.0, "--budget-mb: a number of megabytes, not {mb}");
                opts.budget.bytes = mb * 1e6;
            }
            "--statements" => {
                opts.statements = args.next().context("--statements needs a number")?.parse()?;
                anyhow::ensure!(opts.statements > 0, "--statements: at least 1");
            }
            "--trust-functions" => opts.trust_functions = true,
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
    if let Some(path) = measure {
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let applied: postai_advisor::apply::Applied =
            serde_json::from_str(&text).with_context(|| format!("{path}: not a file --apply wrote"))?;
        let m = postai_advisor::apply::measure(&client, &applied).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            print!("{}", report::render_measured(&m));
        }
        return Ok(());
    }
    let scratch = match scratch {
        Some(s) => Some(connect(&s).await?),
        None => None,
    };
    let proxy = match proxy {
        Some(p) => Some(connect(&p).await?),
        None => None,
    };
    let mut r = advise(&client, scratch.as_ref(), &opts).await?;
    if let Some(p) = &proxy {
        postai_advisor::proxy::merge(&mut r, postai_advisor::proxy::shapes(p).await?);
    }
    if let Some(minutes) = every {
        return watch(&client, scratch.as_ref(), &opts, r, minutes).await;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::render(&r));
    }
    if let Some(path) = apply {
        let (applied, error) = postai_advisor::apply::apply(&client, &r).await;
        std::fs::write(&path, serde_json::to_string_pretty(&applied)?).with_context(|| format!("write {path}"))?;
        for b in &applied.built {
            eprintln!("built: {};", b.ddl);
        }
        eprintln!("kept in {path}: run the workload, then postai-advise CONNSTRING --measure {path}");
        if let Some(e) = error {
            anyhow::bail!("stopped applying: {e}");
        }
    }
    Ok(())
}

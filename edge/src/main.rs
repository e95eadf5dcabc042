//! `postai-edge --config edge.toml`: the proxy.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            "-h" | "--help" => {
                println!("usage: postai-edge --config FILE");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (usage: postai-edge --config FILE)"),
        }
    }
    let path = path.context("usage: postai-edge --config FILE")?;
    let config = postai_edge::Config::load(&path)?;
    let threads = config.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // one event loop per thread: this one (accepts, CDC, health checks,
    // metrics, and its share of clients) and threads - 1 more
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the tokio runtime")?;
    rt.block_on(run(config, threads))
}

async fn run(config: postai_edge::Config, threads: usize) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(&config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let proxy = postai_edge::Proxy::new(config)?;
    let loops = postai_edge::EventLoops::start(&proxy, threads.saturating_sub(1)).context("event loop threads")?;
    proxy.spawn_tasks();
    if let Some(addr) = proxy.start_metrics().await.context("metrics_listen")? {
        eprintln!("postai-edge: metrics on http://{addr}/metrics");
    }
    eprintln!("postai-edge: listening on {}, primary {}", proxy.config.listen, proxy.config.upstream);
    tokio::select! {
        r = postai_edge::serve_on(proxy, listener, Some(&loops)) => r.context("accept")?,
        _ = tokio::signal::ctrl_c() => eprintln!("postai-edge: shutting down"),
    }
    Ok(())
}

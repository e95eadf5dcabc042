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
    // session mode: one event loop per thread, this one (accepts, CDC, health
    // checks, metrics, and its share of clients) and threads - 1 more;
    // transaction pooling lends server connections to any client: one
    // work-stealing runtime whose threads share the I/O driver
    let pooled = config.pool_mode() == postai_edge::config::PoolMode::Transaction;
    let rt = if threads == 1 || !pooled {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .context("the tokio runtime")?;
    let loops = if pooled { 0 } else { threads - 1 };
    let result = rt.block_on(run(config, loops));
    // what is left of the sessions ends with the runtime
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Serves until SIGTERM or SIGINT, then shuts down gracefully: the listener
/// closes, sessions finish their transactions (`shutdown_timeout_ms` at
/// most). SIGHUP reloads the configuration file.
async fn run(config: postai_edge::Config, loops: usize) -> anyhow::Result<()> {
    let mut signals = postai_edge::signals::Signals::install().context("signal handlers")?;
    let listener =
        tokio::net::TcpListener::bind(&config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let proxy = postai_edge::Proxy::new(config)?;
    let loops = postai_edge::EventLoops::start(&proxy, loops).context("event loop threads")?;
    proxy.spawn_tasks();
    let reloading = proxy.clone();
    signals.reload_on_hangup(move || reloading.reload());
    if let Some(addr) = proxy.start_metrics().await.context("metrics_listen")? {
        eprintln!("postai-edge: metrics on http://{addr}/metrics");
    }
    eprintln!("postai-edge: listening on {}, primary {}", proxy.config.listen, proxy.config.upstream);
    let signal = tokio::select! {
        r = postai_edge::serve_on(proxy.clone(), listener, Some(&loops)) => {
            r.context("accept")?;
            return Ok(());
        }
        s = signals.terminated() => s,
    };
    // serve_on is dropped: the listener is closed
    let sessions = proxy.metrics.clients.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "postai-edge: {signal}: shutting down; no new clients, {sessions} sessions finish their transactions \
         (up to {:?})",
        proxy.shutdown.timeout()
    );
    match proxy.drain().await {
        0 => eprintln!("postai-edge: every session ended"),
        left => eprintln!("postai-edge: {left} sessions still open after shutdown_timeout_ms: closing them"),
    }
    drop(loops);
    Ok(())
}

//! Test support: a throwaway PostgreSQL cluster (`cluster.rs`, shared with
//! the advisor's tests), and proxies started in the test's process.

pub mod cluster;
#[allow(dead_code)]
pub mod faults;
pub mod raw;

pub use cluster::*;

use std::process::Command;

/// A proxy started in this process from a configuration text (without
/// `listen`): its port, and the runtime that keeps it alive.
#[allow(dead_code)]
pub struct Proxy {
    pub port: u16,
    pub proxy: std::sync::Arc<postai_edge::Proxy>,
    _rt: tokio::runtime::Runtime,
}

#[allow(dead_code)]
pub fn start_proxy(config: &str) -> Proxy {
    start_proxy_on(free_port(), config)
}

/// A proxy listening on `port` (another one's, after it stopped: a restart).
#[allow(dead_code)]
pub fn start_proxy_on(port: u16, config: &str) -> Proxy {
    let text = format!("listen = '127.0.0.1:{port}'\n{config}");
    let config = postai_edge::Config::parse("test.toml", &text).expect("config parses");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // `threads = N`: N - 1 event loops besides this runtime, as postai-edge runs (session mode)
    let session_mode = config.pool_mode() == postai_edge::config::PoolMode::Session;
    let loops = config.threads.filter(|n| *n > 1 && session_mode);
    let proxy = postai_edge::Proxy::new(config).expect("proxy");
    let p = proxy.clone();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await.expect("bind");
        p.spawn_tasks();
        match loops {
            Some(n) => {
                let loops = postai_edge::EventLoops::start(&p, n - 1).expect("event loops");
                tokio::spawn(async move { postai_edge::serve_on(p, listener, Some(&loops)).await });
            }
            None => drop(tokio::spawn(postai_edge::serve(p, listener))),
        }
    });
    Proxy { port, proxy, _rt: rt }
}

impl Proxy {
    /// Runs `f` on the proxy's runtime.
    #[allow(dead_code)]
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self._rt.block_on(f)
    }
}

/// A proxy in front of `pg` with `extra` configuration: its port, and the
/// guard that keeps it running (dropping it stops the proxy).
#[allow(dead_code)]
pub fn start_proxy_with(pg: &Pg, extra: &str) -> (u16, Proxy) {
    let p = start_proxy(&format!("upstream = '{}'\n{extra}", pg.addr()));
    (p.port, p)
}

/// A tokio-postgres client of the server or proxy at `port`, as the
/// superuser, on a task of the current runtime.
#[allow(dead_code)]
pub async fn client(port: u16) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// One value of `SHOW POSTAI STATS` through the proxy at `port`.
#[allow(dead_code)]
pub fn stat(port: u16, name: &str) -> String {
    let out = psql(port, "SHOW POSTAI STATS");
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}|")).map(str::to_string))
        .unwrap_or_else(|| panic!("stat {name} in SHOW POSTAI STATS: {out}"))
}

#[allow(dead_code)]
pub fn stat_n(port: u16, name: &str) -> u64 {
    stat(port, name).parse().unwrap_or_else(|_| panic!("{name} is a number"))
}

/// Waits until `f` holds (CDC and the file writer are asynchronous), at most 10 s.
#[allow(dead_code)]
pub fn eventually(f: impl FnMut() -> bool) -> bool {
    eventually_within(std::time::Duration::from_secs(10), f)
}

/// Waits until `f` holds, at most `limit`.
#[allow(dead_code)]
pub fn eventually_within(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Runs pgbench against `port` with `args`; returns (tps, failed transactions).
#[allow(dead_code)]
pub fn pgbench(port: u16, args: &[&str]) -> (f64, String) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed: {text}");
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    (tps, text)
}

/// The proxy configuration of the `items` table that [`create_items`] makes.
#[allow(dead_code)]
pub const ITEMS_TABLE: &str = "[[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n";

/// `items (id int PRIMARY KEY, v text)` with rows `(g, 'v' || g)` for g in 1..=n.
#[allow(dead_code)]
pub fn create_items(pg: &Pg, n: u32) {
    let sql = format!(
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, {n}) g;"
    );
    let out = psql(pg.port, &sql);
    assert!(!out.contains("ERROR"), "creating items: {out}");
}

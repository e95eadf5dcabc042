//! A throwaway PostgreSQL cluster for tests: initdb in a temporary directory,
//! a free port, run as the `postgres` user when the tests run as root
//! (initdb refuses root). Stopped and removed on drop.

pub mod raw;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir("/usr/lib/postgresql").ok()?.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
    versions.sort();
    versions.pop().filter(|b| b.join("initdb").exists())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

impl Pg {
    pub fn start(name: &str) -> Pg {
        let bin = pg_bin().expect("PostgreSQL server binaries under /usr/lib/postgresql (.ci/run installs them)");
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("postai-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let pg = Pg { dir, port, bin, as_postgres };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown the cluster directory to postgres");
        }
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\nfsync = off\n",
            pg.dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        pg.pg_ctl_start();
        pg
    }

    /// A streaming replica of this cluster (pg_basebackup), named `name` (its
    /// `application_name`); `apply_delay_ms` makes it lag on purpose.
    #[allow(dead_code)]
    pub fn start_replica(&self, name: &str, apply_delay_ms: u64) -> Pg {
        let dir = std::env::temp_dir().join(format!("postai-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let replica = Pg { dir, port, bin: self.bin.clone(), as_postgres: self.as_postgres };
        if self.as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&replica.dir).status();
            assert!(ok.map(|s| s.success()).unwrap_or(false), "chown the replica directory to postgres");
        }
        let data = replica.dir.join("data");
        let primary_port = self.port.to_string();
        replica.run(
            "pg_basebackup",
            &["-h", "127.0.0.1", "-p", &primary_port, "-U", "postgres", "-D", &data.to_string_lossy(), "-X", "stream"],
        );
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nprimary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres application_name={name}'\nrecovery_min_apply_delay = '{apply_delay_ms}ms'\nhot_standby_feedback = on\n",
            replica.dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        std::fs::write(data.join("standby.signal"), "").expect("standby.signal");
        if self.as_postgres {
            let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&replica.dir).status();
        }
        replica.pg_ctl_start();
        replica
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-w", "start"]);
    }

    /// Kills the server (`pg_ctl stop -m immediate`: a crash).
    #[allow(dead_code)]
    pub fn crash(&self) {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"]);
    }

    /// Starts the server again after [`Pg::crash`].
    #[allow(dead_code)]
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes `name` into the data directory, readable by the server only
    /// (what PostgreSQL demands of a private key).
    #[allow(dead_code)]
    pub fn write_private(&self, name: &str, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join("data").join(name);
        std::fs::write(&path, contents).expect("write into the data directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        if self.as_postgres {
            let ok = Command::new("chown").arg("postgres:postgres").arg(&path).status().is_ok_and(|s| s.success());
            assert!(ok, "chown {name} to postgres");
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.command("pg_ctl").args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `sql` with psql against `port` and returns the unaligned output
/// (with `ERROR: ` and psql's message appended when it fails).
pub fn psql(port: u16, sql: &str) -> String {
    let port = port.to_string();
    let out = Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        s.push_str("ERROR: ");
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    s.trim_end().to_string()
}

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

//! What clients and operators can do to a running proxy: unfinished
//! messages share one buffer budget (`buffer_bytes_max`), clients past
//! `max_client_conn` are refused, running out of descriptors pauses accepting
//! instead of ending the process, SIGHUP and `POSTAI RELOAD` reload users
//! without emptying the cache, SIGTERM lets transactions finish, the admin
//! commands answer the extended protocol, and a cancel request reaches the
//! replica that runs the client's read.

mod pg;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pg::{Pg, create_items, eventually, eventually_within, free_port, psql, stat_n};
use postai_edge::protocol::{self, BACKEND_TAGS, Message};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

// ---------------------------------------------------------------- harness

/// A client speaking the protocol by hand.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Raw { s, buf: BytesMut::new() }
    }

    /// Logs in as postgres (no `[[users]]`: no password) and waits for ReadyForQuery.
    fn login(port: u16) -> Raw {
        let mut c = Raw::connect(port);
        c.startup();
        loop {
            let m = c.recv().expect("login messages");
            assert_ne!(m.tag, b'E', "login refused: {}", String::from_utf8_lossy(m.body()));
            if m.tag == b'Z' {
                return c;
            }
        }
    }

    fn startup(&mut self) {
        let params =
            vec![("user".to_string(), "postgres".to_string()), ("database".to_string(), "postgres".to_string())];
        self.s.write_all(&protocol::startup(&params).expect("startup")).expect("startup");
    }

    /// The next backend message; `None` at EOF, on a reset or when the read times out.
    fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = protocol::decode(&mut self.buf, 64 << 20, BACKEND_TAGS).expect("valid backend message") {
                return Some(m);
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                // (a read with a timeout is not restarted after a signal)
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether a message arrives within `wait`.
    fn quiet_for(&mut self, wait: Duration) -> bool {
        self.s.set_read_timeout(Some(wait)).expect("timeout");
        let mut chunk = [0u8; 1];
        let quiet = match self.s.peek(&mut chunk) {
            Ok(_) => false,
            Err(e) => matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        };
        self.s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        quiet && self.buf.is_empty()
    }

    /// Sends `sql` as a simple query; the messages up to ReadyForQuery.
    fn query(&mut self, sql: &str) -> Vec<Message> {
        self.s.write_all(&protocol::query(sql)).expect("query");
        self.until_ready()
    }

    fn until_ready(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = self.recv() {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }
}

/// A field of an ErrorResponse (`C`: SQLSTATE, `M`: message).
fn field(m: &Message, which: u8) -> String {
    assert_eq!(m.tag, b'E', "an ErrorResponse");
    let mut rest = m.body();
    while let Some((&f, tail)) = rest.split_first() {
        if f == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        if f == which {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    String::new()
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    frame(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat())
}

fn bind(portal: &str, statement: &str) -> Vec<u8> {
    frame(b'B', &[portal.as_bytes(), b"\0", statement.as_bytes(), b"\0", &[0, 0, 0, 0, 0, 0]].concat())
}

fn execute(portal: &str) -> Vec<u8> {
    frame(b'E', &[portal.as_bytes(), b"\0", &[0, 0, 0, 0]].concat())
}

/// The text columns of a DataRow.
fn columns(m: &Message) -> Vec<Option<String>> {
    protocol::text_columns(m).expect("a DataRow")
}

/// psql with a password: (success, stdout + stderr).
fn psql_as(port: u16, user: &str, password: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-At", "-w", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", user, "-d", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSFILE")
        .env("PGPASSFILE", "/nonexistent")
        .env("PGPASSWORD", password)
        .output()
        .expect("psql runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim_end().to_string())
}

/// The postai-edge binary in a child process, with its configuration file
/// and its stderr in a directory of their own. Killed on drop if still running.
struct Edge {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Edge {
    /// Starts the binary with `body` (without `listen`); `nofile`: the
    /// descriptor limit it runs under.
    fn start(name: &str, body: &str, nofile: Option<u32>) -> Edge {
        let dir = std::env::temp_dir().join(format!("postai-limits-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let config = dir.join("edge.toml");
        std::fs::write(&config, format!("listen = '127.0.0.1:{port}'\n{body}")).expect("write the config");
        let log = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let bin = env!("CARGO_BIN_EXE_postai-edge");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" --config \"$1\""), bin]).arg(&config);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.arg("--config").arg(&config);
                c
            }
        };
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().expect("postai-edge starts");
        let mut edge = Edge { child, port, dir };
        let listening = eventually(|| {
            assert!(edge.child.try_wait().expect("wait").is_none(), "postai-edge exited: {}", edge.log());
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(listening, "postai-edge listens: {}", edge.log());
        edge
    }

    fn config(&self, body: &str) {
        let text = format!("listen = '127.0.0.1:{}'\n{body}", self.port);
        std::fs::write(self.dir.join("edge.toml"), text).expect("write the config");
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The exit status, if the process ends within `limit`.
    fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

async fn connect(port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 port={port} user=postgres"), NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(conn);
    client
}

// ---------------------------------------------------------------- 1. buffers

/// Clients that send most of large messages and stall: the bytes each has
/// sent (and one read more) are reserved from `buffer_bytes_max` as they
/// arrive; the client whose bytes do not fit is refused (53200) and closed,
/// the others and new clients are served, and a completed message gives its
/// bytes back. A client that only declares a large message holds almost
/// nothing (before, the declared length was reserved at once: four headers
/// of 64 MB held a 256 MB budget).
#[test]
fn unfinished_messages_share_one_buffer_budget() {
    let pg = Pg::start("limits-buffers");
    let (port, _proxy) = pg::start_proxy_with(
        &pg,
        "max_message_bytes = 4194304\nbuffer_bytes_max = 8388608\n[cache]\nenabled = false\n[cdc]\nenabled = false\n",
    );
    const MESSAGE: usize = 3 << 20;
    const PART: usize = 5 << 19;
    // a simple query of 3 MiB: SELECT 1 and a long comment
    let body = |n: usize| {
        let mut b = b"SELECT 1 --".to_vec();
        b.resize(n - 1, b'x');
        b.push(0);
        b
    };
    let start_message = |c: &mut Raw| {
        let mut m = BytesMut::new();
        m.put_u8(b'Q');
        m.put_i32((MESSAGE + 4) as i32);
        m.extend_from_slice(&body(MESSAGE)[..PART]);
        c.s.write_all(&m).expect("the start of a large message");
    };
    // headers alone: nothing much held
    let mut declared = Vec::new();
    for _ in 0..8 {
        let mut c = Raw::login(port);
        let mut m = BytesMut::new();
        m.put_u8(b'Q');
        m.put_i32((MESSAGE + 4) as i32);
        c.s.write_all(&m).expect("a header");
        assert!(c.quiet_for(Duration::from_millis(100)), "a declared message holds one read ahead");
        declared.push(c);
    }
    let mut stalled = Vec::new();
    for i in 0..3 {
        let mut c = Raw::login(port);
        start_message(&mut c);
        if i < 2 {
            // 2 x 2.5 MiB (and the headers' read ahead) fit in 8 MiB
            assert!(c.quiet_for(Duration::from_millis(500)), "client {i} waits for the rest of its message");
            stalled.push(c);
        } else {
            // a third does not
            let m = c.recv().unwrap_or_else(|| panic!("an error for client {i}"));
            assert_eq!(field(&m, b'C'), "53200", "{}", field(&m, b'M'));
            assert!(field(&m, b'M').contains("buffer_bytes_max"), "{}", field(&m, b'M'));
            assert!(c.recv().is_none(), "the refused client is closed");
        }
    }
    drop(declared);
    assert_eq!(psql(pg.port, "SELECT 1"), "1");
    assert_eq!(psql(port, "SELECT 1"), "1", "the proxy serves new clients");

    // a stalled client finishes its message: answered, and its bytes are free again
    let mut first = stalled.remove(0);
    first.s.write_all(&body(MESSAGE)[PART..]).expect("the rest");
    let answer = first.until_ready();
    let row = answer.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(columns(row), vec![Some("1".to_string())]);
    let mut again = Raw::login(port);
    start_message(&mut again);
    assert!(again.quiet_for(Duration::from_millis(500)), "the finished message's bytes were given back");
    // a client that leaves gives its reservation back too
    drop(stalled);
    let mut more = Raw::login(port);
    start_message(&mut more);
    assert!(more.quiet_for(Duration::from_millis(500)), "the departed client's bytes were given back");
    drop((again, more));
    std::thread::sleep(Duration::from_millis(300));

    // complete messages waiting for their Sync are held too: 1 MiB Parses, no Sync
    let mut pipeline = Raw::login(port);
    let mut sent = Vec::new();
    for i in 0..10 {
        let mut sql = b"SELECT 1 --".to_vec();
        sql.resize(1 << 20, b'x');
        sent.extend(parse(&format!("s{i}"), &String::from_utf8_lossy(&sql)));
    }
    pipeline.s.write_all(&sent).expect("ten Parse messages");
    let m = pipeline.recv().expect("an error before the tenth");
    assert_eq!(field(&m, b'C'), "53200", "{}", field(&m, b'M'));
    assert!(field(&m, b'M').contains("waiting for their Sync"), "{}", field(&m, b'M'));
    assert_eq!(psql(port, "SELECT 2"), "2", "the proxy serves new clients");
}

// ---------------------------------------------------------------- 2. connections

/// `max_client_conn = 3`: three idle sockets hold every slot, the next
/// client is refused with 53300 after its startup message; one slot freed,
/// clients are served again.
#[test]
fn clients_past_max_client_conn_are_refused() {
    let pg = Pg::start("limits-conns");
    let (port, proxy) = pg::start_proxy_with(&pg, "max_client_conn = 3\n[cdc]\nenabled = false\n");
    assert_eq!(psql(port, "SELECT 1"), "1");
    let clients = || proxy.proxy.limits.clients.used();
    assert!(eventually(|| clients() == 0), "the first client left: {}", clients());
    let mut idle: Vec<TcpStream> =
        (0..3).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("an idle connection")).collect();
    // the three are counted once accepted (on a loaded machine, not at once)
    assert!(eventually(|| clients() == 3), "three idle clients hold slots: {}", clients());
    let mut c = Raw::connect(port);
    c.startup();
    let m = c.recv().expect("a refusal");
    assert_eq!(field(&m, b'C'), "53300");
    assert!(field(&m, b'M').contains("too many clients"), "{}", field(&m, b'M'));
    assert!(c.recv().is_none(), "closed after the refusal");
    let out = psql(port, "SELECT 1");
    assert!(out.contains("too many clients already"), "{out}");

    drop(idle.pop());
    assert!(eventually(|| psql(port, "SELECT 1") == "1"), "a freed slot serves the next client");
}

/// The process runs out of descriptors (ulimit -n): accept fails with
/// EMFILE, the proxy logs it, backs off and keeps running; once clients
/// leave, it serves again.
#[test]
fn running_out_of_descriptors_pauses_accepting() {
    let pg = Pg::start("limits-emfile");
    let body =
        format!("upstream = '{}'\nthreads = 1\n[cdc]\nenabled = false\n[failover]\nenabled = false\n", pg.addr());
    let mut edge = Edge::start("emfile", &body, Some(40));
    assert_eq!(psql(edge.port, "SELECT 1"), "1");
    let idle: Vec<TcpStream> = (0..80).filter_map(|_| TcpStream::connect(("127.0.0.1", edge.port)).ok()).collect();
    assert!(idle.len() >= 60, "connections queue in the backlog: {}", idle.len());
    assert!(eventually(|| edge.log().contains("Too many open files")), "accept failed: {}", edge.log());
    // a retry every 10 ms doubling to 1 s: about 8 failed accepts in 2 s, one line
    std::thread::sleep(Duration::from_secs(2));
    assert!(edge.child.try_wait().expect("wait").is_none(), "the proxy is still running: {}", edge.log());
    assert!(edge.log().matches("Too many open files").count() <= 2, "logged once per burst: {}", edge.log());
    drop(idle);
    assert!(eventually(|| psql(edge.port, "SELECT 1") == "1"), "serving again: {}", edge.log());
    assert!(edge.exit_within(Duration::from_millis(10)).is_none());
}

// ---------------------------------------------------------------- 3. operations

/// Users added to the file are let in after SIGHUP, removed ones refused;
/// the cache keeps its entries; a file that does not parse leaves the running
/// configuration; `POSTAI RELOAD` does the same and reports settings that
/// need a restart.
#[test]
fn sighup_and_postai_reload_replace_users_and_keep_the_cache() {
    let pg = Pg::start("limits-reload");
    create_items(&pg, 20);
    assert!(!psql(pg.port, "CREATE ROLE bob LOGIN; GRANT SELECT ON items TO bob").contains("ERROR"));
    let verifier = postgres_protocol::password::scram_sha_256(b"pg-secret");
    let base = format!(
        "upstream = '{}'\nthreads = 1\n{}[cdc]\npoll_ms = 50\n[[users]]\nname = 'postgres'\npassword = '{verifier}'\n",
        pg.addr(),
        pg::ITEMS_TABLE
    );
    let bob = "[[users]]\nname = 'bob'\npassword = 'bob-secret'\n";
    let mut edge = Edge::start("reload", &base, None);
    let port = edge.port;
    let stat = |name: &str| -> u64 {
        let (ok, out) = psql_as(port, "postgres", "pg-secret", "SHOW POSTAI STATS");
        assert!(ok, "{out}");
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}|")).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    assert!(eventually(|| stat("filling") > 0), "CDC connected: {}", edge.log());
    let read = || psql_as(port, "postgres", "pg-secret", "SELECT v FROM items WHERE id = 7");
    assert_eq!(read(), (true, "v7".into()));
    assert_eq!(read(), (true, "v7".into()));
    let entries = stat("l1_entries");
    assert!(entries >= 1, "the read is cached");
    let (ok, out) = psql_as(port, "bob", "bob-secret", "SELECT current_user");
    assert!(!ok && out.contains("password authentication failed"), "bob is not a user yet: {out}");

    // bob added, SIGHUP
    edge.config(&format!("{base}{bob}"));
    edge.signal("HUP");
    assert!(
        eventually(|| psql_as(port, "bob", "bob-secret", "SELECT current_user") == (true, "bob".into())),
        "bob logs in after SIGHUP: {}",
        edge.log()
    );
    // (bob's own reads may have added entries)
    assert!(stat("l1_entries") >= entries, "the cache kept its entries");
    let hits = stat("l1_hits");
    assert_eq!(read(), (true, "v7".into()));
    assert_eq!(stat("l1_hits"), hits + 1, "a repeated read is still a hit");

    // a file that does not parse: refused, the running users stay
    edge.config(&format!("{base}{bob}[[users]]\nname = 'broken\n"));
    edge.signal("HUP");
    assert!(eventually(|| edge.log().contains("reload (SIGHUP) refused")), "the refusal is logged: {}", edge.log());
    assert!(edge.log().contains("edge.toml") && edge.log().contains("kept"), "{}", edge.log());
    assert_eq!(psql_as(port, "bob", "bob-secret", "SELECT current_user"), (true, "bob".into()));
    let (ok, out) = psql_as(port, "postgres", "pg-secret", "POSTAI RELOAD");
    assert!(!ok && out.contains("edge.toml") && out.contains("kept"), "{out}");
    assert!(edge.child.try_wait().expect("wait").is_none(), "SIGHUP does not end the process");

    // POSTAI RELOAD: bob removed, a cache size changed (needs a restart, not applied)
    edge.config(&format!("{base}[cache]\nl1_entries = 5\n"));
    let (ok, out) = psql_as(port, "postgres", "pg-secret", "POSTAI RELOAD");
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.starts_with("users|") && l.contains("bob")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("cache.l1_entries|") && l.contains("restart")), "{out}");
    let (ok, out) = psql_as(port, "bob", "bob-secret", "SELECT 1");
    assert!(!ok && out.contains("password authentication failed"), "bob was removed: {out}");
    let hits = stat("l1_hits");
    assert_eq!(read(), (true, "v7".into()));
    assert_eq!(stat("l1_hits"), hits + 1, "the entry cached before the reloads is still served");
}

/// SIGTERM: the listener closes, an idle client is told 57P01 and closed, a
/// client inside a transaction may still COMMIT; then the process exits 0.
#[test]
fn sigterm_lets_open_transactions_finish() {
    let pg = Pg::start("limits-term");
    assert!(!psql(pg.port, "CREATE TABLE t (id int)").contains("ERROR"));
    let body = format!("upstream = '{}'\nshutdown_timeout_ms = 20000\n[cdc]\nenabled = false\n", pg.addr());
    let mut edge = Edge::start("term", &body, None);
    let mut txn = Raw::login(edge.port);
    assert!(!txn.query("BEGIN").iter().any(|m| m.tag == b'E'));
    assert!(!txn.query("INSERT INTO t VALUES (1)").iter().any(|m| m.tag == b'E'));
    let mut idle = Raw::login(edge.port);
    edge.signal("TERM");

    let m = idle.recv().expect("the idle client is told");
    assert_eq!(field(&m, b'C'), "57P01", "{}", field(&m, b'M'));
    assert!(idle.recv().is_none(), "then closed");
    assert!(eventually(|| TcpStream::connect(("127.0.0.1", edge.port)).is_err()), "no new clients");
    assert!(edge.child.try_wait().expect("wait").is_none(), "waiting for the transaction");

    assert!(!txn.query("INSERT INTO t VALUES (2)").iter().any(|m| m.tag == b'E'));
    let commit = txn.query("COMMIT");
    assert!(commit.iter().any(|m| m.tag == b'C') && !commit.iter().any(|m| m.tag == b'E'), "COMMIT succeeds");
    let status = edge.exit_within(Duration::from_secs(5)).expect("the process exits once the client is done");
    assert!(status.success(), "exit 0: {status:?} {}", edge.log());
    assert_eq!(psql(pg.port, "SELECT count(*) FROM t"), "2", "the transaction committed");
}

/// SIGTERM with a transaction that never ends: the process waits
/// `shutdown_timeout_ms`, then exits 0.
#[test]
fn sigterm_waits_at_most_shutdown_timeout() {
    let pg = Pg::start("limits-term-bound");
    let body = format!("upstream = '{}'\nshutdown_timeout_ms = 1500\n[cdc]\nenabled = false\n", pg.addr());
    let mut edge = Edge::start("term-bound", &body, None);
    let mut txn = Raw::login(edge.port);
    assert!(!txn.query("BEGIN").iter().any(|m| m.tag == b'E'));
    let sent = Instant::now();
    edge.signal("TERM");
    let status = edge.exit_within(Duration::from_secs(10)).expect("the process exits");
    assert!(status.success(), "exit 0: {status:?} {}", edge.log());
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(5), "{took:?}");
    assert!(txn.recv().is_none_or(|m| m.tag == b'E'), "the client's connection ends");
}

// ---------------------------------------------------------------- 4. admin, extended

/// `SHOW POSTAI ...` and `POSTAI RELOAD` prepared and executed by drivers:
/// tokio-postgres (prepares every query), psycopg (prepare_threshold=0), and a
/// pipeline that mixes an admin command with a relayed statement.
#[test]
fn admin_commands_answer_the_extended_protocol() {
    let pg = Pg::start("limits-admin");
    let (port, _proxy) = pg::start_proxy_with(&pg, "[cdc]\nenabled = false\n");
    runtime().block_on(async {
        let client = connect(port).await;
        let rows = client.query("SHOW POSTAI STATS", &[]).await.expect("SHOW POSTAI STATS prepared");
        let names: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        assert!(names.iter().any(|n| n == "queries"), "{names:?}");
        let statement = client.prepare("show postai stats;").await.expect("prepare");
        assert_eq!(statement.params().len(), 0);
        assert_eq!(statement.columns().iter().map(|c| c.name()).collect::<Vec<_>>(), ["name", "value"]);
        for _ in 0..7 {
            let rows = client.query(&statement, &[]).await.expect("execute the prepared statement");
            assert!(rows.iter().any(|r| r.get::<_, &str>(0) == "queries"));
        }
        let caches = client.query("SHOW POSTAI CACHES", &[]).await.expect("SHOW POSTAI CACHES");
        assert_eq!(caches.first().map(|r| r.get::<_, String>(0)).as_deref(), Some("l1"));
        let pools = client.query("SHOW POSTAI POOLS", &[]).await.expect("SHOW POSTAI POOLS");
        assert!(pools.is_empty(), "no pooling");
        // this proxy was configured from text: nothing to reload, said clearly
        let e = client.query("POSTAI RELOAD", &[]).await.expect_err("no file to reload");
        assert_eq!(e.code(), Some(&SqlState::CONFIG_FILE_ERROR), "{e:?}");
        // the session goes on, relayed statements too
        let row = client.query_one("SELECT $1::int + 1", &[&41i32]).await.expect("a relayed statement");
        assert_eq!(row.get::<_, i32>(0), 42);
        drop(statement);
        let rows = client.query("SHOW POSTAI STATS", &[]).await.expect("after Close");
        assert!(!rows.is_empty());
    });

    // one pipeline: an admin command between statements that go upstream
    let mut c = Raw::login(port);
    let mut batch = Vec::new();
    batch.extend(parse("", "SELECT 40 + 1"));
    batch.extend(bind("", ""));
    batch.extend(execute(""));
    batch.extend(parse("admin", "SHOW POSTAI STATS"));
    batch.extend(bind("p", "admin"));
    batch.extend(frame(b'D', b"Pp\0"));
    batch.extend(execute("p"));
    batch.extend(parse("", "SELECT 41 + 1"));
    batch.extend(bind("", ""));
    batch.extend(execute(""));
    batch.extend(frame(b'S', b""));
    c.s.write_all(&batch).expect("pipeline");
    let answer = c.until_ready();
    let tags: String = answer.iter().map(|m| m.tag as char).collect();
    assert!(tags.starts_with("12DC12TD") && tags.ends_with("DC12DCZ"), "{tags}");
    let values: Vec<Vec<Option<String>>> = answer.iter().filter(|m| m.tag == b'D').map(columns).collect();
    assert_eq!(values.first(), Some(&vec![Some("41".to_string())]));
    assert_eq!(values.last(), Some(&vec![Some("42".to_string())]));
    assert!(values.iter().any(|v| v.first() == Some(&Some("queries".to_string()))));

    // psycopg prepares at once with prepare_threshold=0
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('host=127.0.0.1 port={port} user=postgres dbname=postgres', prepare_threshold=0) as c:\n\
         \x20   for i in range(7):\n\
         \x20       rows = c.execute('SHOW POSTAI STATS').fetchall()\n\
         \x20       assert any(r[0] == 'queries' for r in rows), rows\n\
         \x20   print('prepared', c.prepare_threshold == 0)\n"
    );
    let out = Command::new("/usr/bin/python3").args(["-c", &script]).output().expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("prepared True"), "psycopg: {text}");
}

// ---------------------------------------------------------------- 5. cancel

/// A read running on a replica connection is cancelled by the client's
/// cancel request (the client holds the primary's key).
#[test]
fn cancel_reaches_the_replica_running_the_read() {
    let primary = Pg::start("limits-cancel");
    create_items(&primary, 10);
    let replica = primary.start_replica("limits-cancel-replica", 0);
    assert!(eventually_within(Duration::from_secs(20), || psql(replica.port, "SELECT count(*) FROM items") == "10"));
    let proxy = pg::start_proxy(&format!(
        "upstream = '{}'\nreplicas = ['{}']\n{}[cdc]\npoll_ms = 50\n",
        primary.addr(),
        replica.addr(),
        pg::ITEMS_TABLE
    ));
    let port = proxy.port;
    assert!(eventually(|| stat_n(port, "filling") > 0), "CDC connected");
    assert!(
        eventually(|| psql(port, "SELECT v FROM items WHERE id = 1") == "v1" && stat_n(port, "replica_reads") > 0),
        "reads go to the replica: {}",
        psql(port, "SHOW POSTAI STATS")
    );
    let before = stat_n(port, "replica_reads");
    runtime().block_on(async {
        let client = connect(port).await;
        let token = client.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let started = Instant::now();
        let sql = "SELECT count(*) FROM generate_series(1, 100000000)";
        let result = tokio::time::timeout(Duration::from_secs(120), client.query(sql, &[])).await.expect("answered");
        let took = started.elapsed();
        canceller.await.expect("cancel task").expect("cancel request sent");
        let e = result.expect_err("the read was cancelled");
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}");
        assert!(took < Duration::from_secs(3), "cancelled at once, not after the whole read: {took:?}");
    });
    assert_eq!(stat_n(port, "replica_reads"), before + 1, "the read ran on the replica");
}

/// An upstream that accepts connections and never answers (a hung server,
/// a black hole behind a load balancer): a client's login through the proxy
/// ends with an error within the proxy's login timeout (30 s) instead of
/// waiting for ever.
#[test]
fn an_upstream_that_never_answers_ends_the_login_with_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let port = free_port();
    let config = format!(
        "listen = '127.0.0.1:{port}'\nupstream = '127.0.0.1:{silent}'\n[cache]\nenabled = false\n[cdc]\nenabled = false\n\
         [failover]\nenabled = false\n"
    );
    let _proxy = pg::start_proxy_on(port, &config.replacen(&format!("listen = '127.0.0.1:{port}'\n"), "", 1));
    let started = Instant::now();
    let mut c = Raw::connect(port);
    c.s.set_read_timeout(Some(Duration::from_secs(45))).expect("timeout");
    c.startup();
    let m = c.recv().unwrap_or_else(|| panic!("an answer to the login, not the end after {:?}", started.elapsed()));
    assert_eq!(m.tag, b'E', "{}", String::from_utf8_lossy(m.body()));
    assert!(field(&m, b'M').contains("no login within"), "{}", field(&m, b'M'));
    assert!(started.elapsed() < Duration::from_secs(40), "{:?}", started.elapsed());
}

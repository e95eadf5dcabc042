//! The proxy with a primary and streaming replicas: cache misses read from a
//! replica that has replayed past the session's floor (read-your-writes
//! against a lagging replica), and failover: the primary crashes under a
//! write load, the synchronous replica is promoted with `pg_promote()`, writes
//! resume, no acknowledged write is lost, sessions on the old primary (own or
//! pooled connections) end, a second proxy's controller converges on the same
//! new primary, and the old primary is fenced when it returns.

mod pg;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg::{Pg, create_items, eventually_within as eventually, psql, stat, stat_n};

/// Starts a proxy; returns its port, the `/metrics` address and its guard.
fn start_proxy(primary: &Pg, replicas: &[&Pg], extra: &str) -> (u16, std::net::SocketAddr, pg::Proxy) {
    let list: Vec<String> = replicas.iter().map(|r| format!("'{}'", r.addr())).collect();
    let text = format!(
        "upstream = '{}'\nreplicas = [{}]\nmetrics_listen = '127.0.0.1:0'\n\
         [[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n{extra}",
        primary.addr(),
        list.join(", ")
    );
    let p = pg::start_proxy(&text);
    let metrics = p.block_on(p.proxy.start_metrics()).expect("metrics listener").expect("metrics_listen is set");
    (p.port, metrics, p)
}

/// Several statements in one psql session, each sent as its own query.
fn psql_session(port: u16, sqls: &[&str]) -> String {
    let port = port.to_string();
    let mut c = Command::new("psql");
    c.args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres"]);
    c.args(["-v", "ON_ERROR_STOP=1"]);
    for s in sqls {
        c.args(["-c", s]);
    }
    let out = c.output().expect("psql runs");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        s.push_str("ERROR: ");
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    s.trim_end().to_string()
}

fn rt_block_on(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// `replica_reads`, from a thread that is inside a runtime.
async fn stat_n_async(port: u16) -> u64 {
    tokio::task::spawn_blocking(move || stat_n(port, "replica_reads")).await.expect("psql")
}

#[test]
fn reads_go_to_fresh_replicas_and_sessions_read_their_writes() {
    let primary = Pg::start("rw-primary");
    create_items(&primary, 100);
    // a replica that applies WAL 4 s late (a loaded machine takes a while
    // between a write and the check that the replica does not have it yet)
    let replica = primary.start_replica("lagging", 4000);
    assert!(eventually(Duration::from_secs(20), || psql(replica.port, "SELECT count(*) FROM items") == "100"));
    // read-your-writes: a session with no write of its own may read the lagging
    // replica (the default, `proxy`, would send it to the primary after any write)
    let config = "[cache]\nconsistency = 'read-your-writes'\n[cdc]\npoll_ms = 50\n";
    let (port, metrics_at, _rt) = start_proxy(&primary, &[&replica], config);
    assert!(eventually(Duration::from_secs(10), || stat_n(port, "filling") > 0), "CDC connected");

    // a read with no floor: a cache miss answered by the replica
    assert!(
        eventually(Duration::from_secs(10), || {
            psql(port, "SELECT v FROM items WHERE id = 1") == "v1" && stat_n(port, "replica_reads") > 0
        }),
        "misses go to the replica once its health is known: {}",
        psql(port, "SHOW POSTAI STATS")
    );

    // read-your-writes: the replica is 4 s behind, the session's read after
    // its write must still see the write (it goes to the primary)
    for id in 10..15 {
        let value = format!("new{id}");
        let out = psql_session(
            port,
            &[
                &format!("SELECT v FROM items WHERE id = {id}"),
                &format!("UPDATE items SET v = '{value}' WHERE id = {id}"),
                &format!("SELECT v FROM items WHERE id = {id}"),
            ],
        );
        assert_eq!(out, format!("v{id}\n{value}"), "read-your-writes through the lagging replica");
        // the replica really is behind
        assert_eq!(psql(replica.port, &format!("SELECT v FROM items WHERE id = {id}")), format!("v{id}"));
    }
    // a session with no write may read the replica; once it has replayed, everyone sees the write
    assert!(eventually(Duration::from_secs(20), || psql(port, "SELECT v FROM items WHERE id = 12") == "new12"));

    // the extended protocol: a named prepared statement, misses answered by
    // the replica (as an unnamed statement there), a write then a read in the
    // same session sees the write
    rt_block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&format!("host=127.0.0.1 port={port} user=postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect through the proxy");
        tokio::spawn(conn);
        let read = client.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        let before = stat_n_async(port).await;
        for id in 20..40 {
            let rows = client.query(&read, &[&id]).await.expect("read");
            let v: &str = rows[0].get(0);
            assert_eq!(v, format!("v{id}"));
        }
        assert!(stat_n_async(port).await >= before + 20, "prepared misses went to the replica");
        let write = client.prepare("UPDATE items SET v = $2 WHERE id = $1").await.expect("prepare");
        for id in 20..25 {
            client.execute(&write, &[&id, &format!("w{id}")]).await.expect("write");
            let rows = client.query(&read, &[&id]).await.expect("read");
            let v: &str = rows[0].get(0);
            assert_eq!(v, format!("w{id}"), "read-your-writes through the extended protocol");
        }
    });

    // settings follow the session to the replica: same query, different search_path
    let out = psql_session(
        port,
        &[
            "CREATE SCHEMA IF NOT EXISTS other",
            "CREATE TABLE IF NOT EXISTS other.items (id int PRIMARY KEY, v text)",
            "INSERT INTO other.items VALUES (1, 'other1') ON CONFLICT DO NOTHING",
        ],
    );
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(Duration::from_secs(10), || psql(replica.port, "SELECT count(*) FROM other.items") == "1"));
    let before = stat_n(port, "replica_reads");
    let out = psql_session(port, &["SET search_path = other", "SELECT v FROM items WHERE id = 1"]);
    assert_eq!(out, "other1", "the replica connection replays the session's SET");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 1"), "v1");
    assert!(stat_n(port, "replica_reads") > before);

    // the same story in /metrics
    let m = metrics(metrics_at);
    assert!(metric(&m, "postai_replica_reads_total") >= 20.0, "{m}");
    assert!(metric(&m, "postai_query_duration_seconds_count{served=\"replica\"}") >= 20.0, "{m}");
    assert!(metric(&m, "postai_invalidation_lag_seconds_count") >= 5.0, "CDC commits measured: {m}");
    assert!(metric(&m, "postai_upstream_connections{role=\"replica\"}") >= 0.0, "{m}");
    let caches = psql(port, "SHOW POSTAI CACHES");
    assert!(caches.starts_with("l1|"), "{caches}");
    assert_eq!(caches.lines().count(), 2, "{caches}");
}

/// `GET /metrics` over a plain socket.
fn metrics(at: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(at).expect("metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample line (`name{labels} value`).
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{sample} in /metrics"))
}

#[test]
fn failover_promotes_the_replica_loses_no_acknowledged_write_and_fences_the_old_primary() {
    let primary = Pg::start("fo-primary");
    let setup = psql(
        primary.port,
        "CREATE TABLE acks (id int PRIMARY KEY); CREATE TABLE items (id int PRIMARY KEY, v text); \
         INSERT INTO items VALUES (1, 'one');",
    );
    assert!(!setup.contains("ERROR"), "{setup}");
    let replica = primary.start_replica("standby", 0);
    // a second replica, behind (never the one promoted): it must follow the new primary
    let second = primary.start_replica("second", 500);
    // synchronous replication: a commit is acknowledged once the standby has it
    let sync = psql_session(
        primary.port,
        &["ALTER SYSTEM SET synchronous_standby_names = 'standby'", "SELECT pg_reload_conf()"],
    );
    assert!(!sync.contains("ERROR"), "{sync}");
    assert!(eventually(Duration::from_secs(20), || {
        psql(primary.port, "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'") == "sync"
    }));
    let (port, metrics_at, _rt) = start_proxy(
        &primary,
        &[&replica, &second],
        "[cdc]\npoll_ms = 50\n[failover]\nhealth_interval_ms = 200\ntimeout_ms = 3000\n",
    );
    assert!(eventually(Duration::from_secs(10), || stat_n(port, "filling") > 0), "CDC connected");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 1"), "one");

    // a writer through the proxy: one connection per write, retrying on error
    let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut failed = 0u32;
            for id in 1.. {
                if stop.load(Ordering::Relaxed) {
                    return failed;
                }
                let out = psql(port, &format!("INSERT INTO acks VALUES ({id})"));
                if out.is_empty() {
                    acked.lock().expect("lock").push(id);
                } else {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            failed
        })
    };
    assert!(eventually(Duration::from_secs(10), || acked.lock().expect("lock").len() >= 20), "writes flow");
    // a second proxy in front of the same cluster, pooling, with its own
    // failover controller (it promotes the node the first one promoted,
    // late: `pg_promote` fails there, its health check sees the promotion)
    let (pooled, _, _pooled_rt) = start_proxy(
        &primary,
        &[&replica, &second],
        "[pool]\nmode = 'transaction'\nsize = 2\n[cache]\nenabled = false\n[cdc]\nenabled = false\n\
         [failover]\nhealth_interval_ms = 200\ntimeout_ms = 2500\n",
    );
    // sessions open across the failover: one on its own connection, one in
    // a transaction on a pooled connection; neither may write to the old
    // primary again (it could come back and acknowledge what the promotion drops)
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let connect = |port: u16| {
        rt.block_on(async move {
            let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
            let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            client
        })
    };
    let (own, in_txn) = (connect(port), connect(pooled));
    rt.block_on(async {
        own.simple_query("SELECT 1").await.expect("before the failover");
        in_txn.simple_query("BEGIN; INSERT INTO acks VALUES (-3)").await.expect("a transaction on a pooled connection");
    });
    let crashed_at = Instant::now();
    primary.crash();
    let before = acked.lock().expect("lock").len();
    assert!(
        eventually(Duration::from_secs(40), || acked.lock().expect("lock").len() >= before + 20),
        "writes resume after the failover: {}",
        psql(port, "SHOW POSTAI STATS")
    );
    let recovered_in = crashed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let failed = writer.join().expect("writer");
    eprintln!("failover: writes resumed {recovered_in:?} after the crash; {failed} writes failed meanwhile");

    assert_eq!(stat_n(port, "failovers"), 1);
    let m = metrics(metrics_at);
    assert_eq!(metric(&m, "postai_failovers_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "postai_epoch"), 2.0, "{m}");
    assert_eq!(stat(port, "primary"), replica.addr());
    assert_eq!(stat_n(port, "epoch"), 2);
    assert_eq!(psql(replica.port, "SELECT pg_is_in_recovery()"), "f", "the replica was promoted");
    assert!(
        // (psql fails until then: a pooled login needs the primary)
        eventually(Duration::from_secs(30), || psql(pooled, "SHOW POSTAI STATS")
            .contains(&format!("primary|{}", replica.addr()))),
        "the second proxy follows the promotion: {}",
        psql(pooled, "SHOW POSTAI STATS")
    );
    let ended = |r: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>| {
        let e = r.expect_err("a session on the old primary may not go on");
        assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN), "{e}");
    };
    ended(rt.block_on(own.simple_query("SELECT 1")));
    ended(rt.block_on(in_txn.simple_query("COMMIT")));
    assert_eq!(psql(pooled, "SELECT count(*) FROM acks WHERE id = -3"), "0", "the transaction never committed");
    assert_eq!(psql(pooled, "INSERT INTO acks VALUES (-4)"), "", "the pooled proxy writes to the new primary");

    // RPO 0: every acknowledged write is on the new primary
    let acked = acked.lock().expect("lock").clone();
    let present: std::collections::HashSet<i32> =
        psql(replica.port, "SELECT id FROM acks").lines().filter_map(|l| l.parse().ok()).collect();
    let lost: Vec<&i32> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // reads through the proxy still work (from the new primary, cache restarted)
    assert!(eventually(Duration::from_secs(10), || psql(port, "SELECT v FROM items WHERE id = 1") == "one"));
    assert_eq!(psql(port, "UPDATE items SET v = 'uno' WHERE id = 1"), "");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 1"), "uno");
    // the other replica was pointed at the new primary: it streams from it
    let follows = "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'";
    assert!(
        eventually(Duration::from_secs(30), || psql(second.port, follows) == replica.port.to_string()),
        "the second replica follows the new primary: {}",
        psql(second.port, "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver")
    );
    assert!(eventually(Duration::from_secs(10), || psql(second.port, "SELECT v FROM items WHERE id = 1") == "uno"));

    // the old primary comes back as a primary of an old epoch: fenced
    primary.restart();
    // (by whichever proxy's health check finds it first: the other finds it
    // read-only, or, checking in the same moment, fences it too: harmless)
    assert!(
        eventually(Duration::from_secs(20), || stat_n(port, "fenced_returns") + stat_n(pooled, "fenced_returns") >= 1),
        "the returning primary is made read-only: {}",
        psql(port, "SHOW POSTAI STATS")
    );
    assert!(eventually(Duration::from_secs(10), || psql(primary.port, "SHOW default_transaction_read_only") == "on"));
    assert_eq!(psql(port, "INSERT INTO acks VALUES (-1)"), "");
    assert_eq!(psql(replica.port, "SELECT count(*) FROM acks WHERE id = -1"), "1");
    assert_eq!(psql(primary.port, "SELECT count(*) FROM acks WHERE id = -1"), "0", "no write reaches the old primary");
    assert!(psql(primary.port, "INSERT INTO acks VALUES (-2)").contains("read-only"), "the old primary refuses writes");
}

/// A restarted proxy continues its slot where the last one left it: its
/// version map knows nothing of the writes before that position. A replica
/// applying WAL 8 s late answers a read that misses such a write; before,
/// that answer was filed and served until the row was written again (the
/// write's change had been applied by the last process, never by this one).
/// Now no answer older than where the stream opened is filed: once the
/// replica has the write, or the primary answers, the read sees it.
#[test]
fn a_restarted_proxy_files_no_replica_answer_older_than_its_stream() {
    let primary = Pg::start("restart-lag");
    create_items(&primary, 20);
    let replica = primary.start_replica("restart-lag-r", 8000);
    assert!(eventually(Duration::from_secs(30), || psql(replica.port, "SELECT count(*) FROM items") == "20"));
    let config = "[cache]\nconsistency = 'read-your-writes'\n[cdc]\npoll_ms = 50\n";
    {
        let (port, _metrics, _p) = start_proxy(&primary, &[&replica], config);
        assert!(eventually(Duration::from_secs(10), || stat_n(port, "filling") > 0), "CDC connected");
        let events = stat_n(port, "cdc_events");
        assert_eq!(psql(port, "UPDATE items SET v = 'new' WHERE id = 5"), "");
        // the stream applied the write: the slot advances past it
        assert!(eventually(Duration::from_secs(5), || stat_n(port, "cdc_events") > events));
        std::thread::sleep(Duration::from_millis(300));
    }
    let (port, _metrics, _p) = start_proxy(&primary, &[&replica], config);
    assert!(eventually(Duration::from_secs(10), || stat_n(port, "filling") > 0), "CDC connected");
    assert_eq!(psql(replica.port, "SELECT v FROM items WHERE id = 5"), "v5", "the replica is still behind");
    // reads until the replica answers one (its health known): what it says
    // may be old, but it must not stay in the cache
    assert!(
        eventually(Duration::from_secs(6), || {
            let _ = psql(port, "SELECT v FROM items WHERE id = 5");
            stat_n(port, "replica_reads") > 0
        }),
        "a read answered by the lagging replica"
    );
    assert!(
        eventually(Duration::from_secs(25), || psql(port, "SELECT v FROM items WHERE id = 5") == "new"),
        "an answer older than the stream's opening was filed: {} ({})",
        psql(port, "SELECT v FROM items WHERE id = 5"),
        psql(port, "SHOW POSTAI STATS")
    );
}

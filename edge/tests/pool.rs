//! Transaction pooling and the regional role: many clients over a few
//! server connections, prepared statements that survive it, session state
//! that pins a client to its connection, cancel requests routed to the server
//! a client runs on, and an edge in front of a regional proxy (L3).

mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually_within as eventually, pgbench, psql, start_proxy, stat, stat_n};

const POOLED: &str =
    "[pool]\nmode = 'transaction'\nsize = 3\nwait_ms = 20000\n[cache]\nenabled = false\n[cdc]\nenabled = false\n";

fn server_connections(pg: &Pg) -> u64 {
    // every client backend but this psql and the proxy's own (health checks,
    // the catalog reader): those are named postai-edge
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
               AND pid <> pg_backend_pid() AND application_name <> 'postai-edge'";
    psql(pg.port, sql).parse().unwrap_or(u64::MAX)
}

#[test]
fn many_clients_share_three_server_connections() {
    let pg = Pg::start("pool");
    pgbench(pg.port, &["-i", "-s", "1", "-q"]);
    let proxy = start_proxy(&format!("upstream = '{}'\n{POOLED}", pg.addr()));
    let port = proxy.port;
    for mode in ["simple", "extended", "prepared"] {
        // 12 clients, 3 server connections; select-only and tpcb-like (transactions)
        for script in [&["-S"][..], &["-b", "tpcb-like"][..]] {
            let mut args = vec!["-n", "-c", "12", "-j", "2", "-t", "60", "-M", mode];
            args.extend_from_slice(script);
            let (tps, text) = pgbench(port, &args);
            assert!(tps > 0.0, "{text}");
            assert!(text.contains("number of failed transactions: 0"), "{mode} {script:?}: {text}");
        }
    }
    assert!(server_connections(&pg) <= 3, "at most the pool size: {}", server_connections(&pg));
    let pools = psql(port, "SHOW POSTAI POOLS");
    let row: Vec<&str> = pools.split('|').collect();
    assert_eq!(row.len(), 7, "one pool: {pools}");
    assert_eq!((row[0], row[1], row[2], row[5]), (pg.addr().as_str(), "postgres", "postgres", "3"), "{pools}");
    assert!(row[6].parse::<u64>().is_ok_and(|n| n >= 1), "statements known: {pools}");
    assert!(stat_n(port, "pool_idle") + stat_n(port, "pool_lent") <= 3);
    // the balance check of tpcb-like: every transaction applied once
    let sums =
        psql(pg.port, "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)");
    assert_eq!(sums, "t");
}

/// A client needs no server connection to connect, nor for the reads the
/// cache answers: with the pool's only connection held by an open
/// transaction, a new client gets in and is answered from the cache; a read
/// the cache cannot answer waits for the connection (and times out with
/// 53300, ending the session), then runs once the transaction ends.
#[test]
fn clients_connect_and_hit_the_cache_without_a_server_connection() {
    let pg = Pg::start("poollazy");
    create_items(&pg, 10);
    let proxy = start_proxy(&format!(
        "upstream = '{}'\n[pool]\nmode = 'transaction'\nsize = 1\nwait_ms = 700\n[cdc]\npoll_ms = 50\n{ITEMS_TABLE}",
        pg.addr()
    ));
    assert!(eventually(Duration::from_secs(10), || stat_n(proxy.port, "filling") > 0), "CDC connected");
    let port = proxy.port;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let connect = || pg::client(port);
        let read = |id: i32| format!("SELECT v FROM items WHERE id = {id}");
        let value = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
            rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
        };
        let a = connect().await;
        for _ in 0..2 {
            assert_eq!(value(a.simple_query(&read(1)).await.expect("read")).as_deref(), Some("v1"));
        }
        // the only server connection, held
        a.batch_execute("BEGIN").await.expect("begin");
        a.batch_execute("SELECT 1").await.expect("in the transaction");
        let hits = stat_n(port, "l1_hits");
        let b = tokio::time::timeout(Duration::from_secs(5), connect()).await.expect("connects without a lease");
        let rows = b.simple_query(&read(1)).await.expect("answered from the cache");
        assert_eq!(value(rows).as_deref(), Some("v1"));
        assert_eq!(stat_n(port, "l1_hits"), hits + 1);
        // (as PgBouncer's query_wait_timeout, the session ends)
        let e = b.simple_query(&read(2)).await.expect_err("no server connection free");
        assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("53300"), "{e}");
        a.batch_execute("COMMIT").await.expect("commit");
        let b = connect().await;
        let rows = b.simple_query(&read(2)).await.expect("the connection is free again");
        assert_eq!(value(rows).as_deref(), Some("v2"));
    });
}

/// A role's settings changed (ALTER ROLE ... SET): pooled connections
/// logged in before are not lent again, so clients get what a new login
/// gets (PgBouncer keeps such connections until server_lifetime).
#[test]
fn a_role_change_retires_pooled_logins() {
    let pg = Pg::start("poolretire");
    let proxy = start_proxy(&format!(
        "upstream = '{}'\n[pool]\nmode = 'transaction'\nsize = 1\nwait_ms = 5000\n[cdc]\npoll_ms = 50\n",
        pg.addr()
    ));
    assert!(eventually(Duration::from_secs(10), || stat_n(proxy.port, "filling") > 0), "CDC connected");
    assert_eq!(psql(proxy.port, "SHOW search_path"), "\"$user\", public");
    let altered = psql(pg.port, "ALTER ROLE postgres SET search_path = s, public");
    assert!(!altered.contains("ERROR"), "{altered}");
    assert!(
        eventually(Duration::from_secs(10), || psql(proxy.port, "SHOW search_path") == "s, public"),
        "a new client still runs on the old login: {}",
        psql(proxy.port, "SHOW search_path")
    );
}

#[test]
fn session_state_pins_a_client_to_its_connection() {
    let pg = Pg::start("poolpin");
    let setup = psql(pg.port, "CREATE SCHEMA s; CREATE TABLE s.t (v text); INSERT INTO s.t VALUES ('in s');");
    assert!(!setup.contains("ERROR"), "{setup}");
    let proxy = start_proxy(&format!("upstream = '{}'\n{POOLED}", pg.addr()));
    let port = proxy.port.to_string();
    // a SET, then other clients come and go, then the query that needs it
    let mut c = std::process::Command::new("psql");
    c.args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres"]);
    c.args(["-c", "SET search_path = s", "-c", "SELECT pg_sleep(0.3)", "-c", "SELECT v FROM t"]);
    let child = c.output().expect("psql");
    for _ in 0..5 {
        assert_eq!(psql(proxy.port, "SELECT 1"), "1");
    }
    assert_eq!(String::from_utf8_lossy(&child.stdout).trim(), "in s", "{}", String::from_utf8_lossy(&child.stderr));
    // a client without state does not inherit it
    assert!(psql(proxy.port, "SELECT v FROM t").contains("does not exist"));
}

#[test]
fn prepared_statements_survive_pooling_and_cancels_reach_the_server() {
    let pg = Pg::start("poolprep");
    let proxy = start_proxy(&format!("upstream = '{}'\n{POOLED}", pg.addr()));
    let port = proxy.port;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let connect = || async {
            let (client, conn) = tokio_postgres::connect(
                &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
                tokio_postgres::NoTls,
            )
            .await
            .expect("connect through the pooled proxy");
            tokio::spawn(conn);
            client
        };
        // 8 clients, 3 server connections: each prepares the same statement
        // and one of its own, and uses them across many transactions
        let mut tasks = Vec::new();
        for i in 0..8i32 {
            let client = connect().await;
            tasks.push(tokio::spawn(async move {
                let shared = client.prepare("SELECT $1::int + 1").await.expect("prepare");
                let own = client.prepare(&format!("SELECT $1::int * {i}")).await.expect("prepare");
                for n in 0..40i32 {
                    let a: i32 = client.query_one(&shared, &[&n]).await.expect("shared").get(0);
                    let b: i32 = client.query_one(&own, &[&n]).await.expect("own").get(0);
                    assert_eq!((a, b), (n + 1, n * i));
                }
                // closing a statement does not close it for the others
                drop(own);
                let a: i32 = client.query_one(&shared, &[&1]).await.expect("shared after close").get(0);
                assert_eq!(a, 2);
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        // a cancel request reaches the server the client's query runs on
        let client = connect().await;
        let token = client.cancel_token();
        let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        let port = pg.port;
        let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'";
        let seen = tokio::task::spawn_blocking(move || pg::eventually(|| psql(port, sleeping) == "1"));
        assert!(seen.await.expect("the wait"), "the query runs on a server connection");
        token.cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
        let r = tokio::time::timeout(Duration::from_secs(10), sleeper).await.expect("cancelled in time").expect("task");
        let e = r.expect_err("the query was cancelled");
        assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    });
    assert!(server_connections(&pg) <= 3);
}

#[test]
fn an_edge_in_front_of_a_regional_proxy() {
    let pg = Pg::start("regional");
    create_items(&pg, 50);
    let tables = ITEMS_TABLE;
    let regional = start_proxy(&format!(
        "upstream = '{}'\nrole = 'regional'\n[pool]\nsize = 4\n[cdc]\nslot = 'regional'\npoll_ms = 50\n{tables}",
        pg.addr()
    ));
    // invalidations through the regional's stream; an answer from its L3 is
    // filed at the LSN the regional vouches for (see tests/regional.rs)
    let edge_config = || {
        format!(
            "upstream = '127.0.0.1:{}'\n[cdc]\nsource = 'regional'\npoll_ms = 50\n[failover]\nenabled = false\n{tables}",
            regional.port
        )
    };
    let edge1 = start_proxy(&edge_config());
    let edge2 = start_proxy(&edge_config());
    for p in [regional.port, edge1.port, edge2.port] {
        assert!(eventually(Duration::from_secs(10), || stat_n(p, "filling") > 0), "CDC of {p}");
    }
    // edge 1 misses, the regional misses and fills its cache (L3)
    assert_eq!(psql(edge1.port, "SELECT v FROM items WHERE id = 7"), "v7");
    assert_eq!(psql(edge1.port, "SELECT v FROM items WHERE id = 7"), "v7");
    assert!(stat_n(edge1.port, "l1_hits") >= 1, "a hit at the edge");
    let regional_hits = stat_n(regional.port, "l1_hits");
    // edge 2 misses, the regional answers from its cache
    assert_eq!(psql(edge2.port, "SELECT v FROM items WHERE id = 7"), "v7");
    assert_eq!(stat_n(regional.port, "l1_hits"), regional_hits + 1, "L3 hit at the regional");
    // a write through edge 1 is read back through edge 1 at once
    assert_eq!(psql(edge1.port, "UPDATE items SET v = 'seven' WHERE id = 7"), "");
    assert_eq!(psql(edge1.port, "SELECT v FROM items WHERE id = 7"), "seven");
    // edge 2 and the regional learn it from CDC
    assert!(eventually(Duration::from_secs(10), || psql(edge2.port, "SELECT v FROM items WHERE id = 7") == "seven"));
    // a write straight on the primary reaches everyone
    psql(pg.port, "UPDATE items SET v = 'SEVEN' WHERE id = 7");
    for p in [edge1.port, edge2.port, regional.port] {
        assert!(eventually(Duration::from_secs(10), || psql(p, "SELECT v FROM items WHERE id = 7") == "SEVEN"), "{p}");
    }
    assert!(stat(regional.port, "pool_idle").parse::<u64>().is_ok());
}

#[test]
fn a_regional_proxy_pools_its_replica_reads_too() {
    let primary = Pg::start("poolrep");
    create_items(&primary, 200);
    let replica = primary.start_replica("poolreplica", 0);
    assert!(eventually(Duration::from_secs(20), || psql(replica.port, "SELECT count(*) FROM items") == "200"));
    let regional = start_proxy(&format!(
        "upstream = '{}'\nreplicas = ['{}']\nrole = 'regional'\n[pool]\nsize = 2\n[cdc]\npoll_ms = 50\n\
         [[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n",
        primary.addr(),
        replica.addr()
    ));
    let port = regional.port;
    assert!(eventually(Duration::from_secs(10), || stat_n(port, "filling") > 0));
    // replica health known: misses go to it
    assert!(eventually(Duration::from_secs(10), || {
        psql(port, "SELECT v FROM items WHERE id = 1") == "v1" && stat_n(port, "replica_reads") > 0
    }));
    // 6 clients, misses of distinct rows: the replica sees at most the pool size
    let readers: Vec<_> = (0..6)
        .map(|c| {
            std::thread::spawn(move || {
                for i in 0..10 {
                    let id = 10 + c * 20 + i;
                    assert_eq!(psql(port, &format!("SELECT v FROM items WHERE id = {id}")), format!("v{id}"));
                }
            })
        })
        .collect();
    for r in readers {
        r.join().expect("reader");
    }
    assert!(stat_n(port, "replica_reads") >= 50, "{}", psql(port, "SHOW POSTAI STATS"));
    assert!(server_connections(&replica) <= 2, "replica connections: {}", server_connections(&replica));
    // a session still reads its writes
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "UPDATE items SET v = 'new' WHERE id = 11", "-c", "SELECT v FROM items WHERE id = 11"])
        .output()
        .expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "new");
}

/// The first CopyData line of a streaming statement (`POSTAI SUBSCRIBE`)
/// after the history it announces (`O <system id>/<timeline>`, checked
/// here), over a raw connection (psql would wait for the stream's end).
fn first_copy_line(port: u16, sql: &str) -> String {
    use postai_edge::protocol::{self, BACKEND_TAGS};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let params = [("user".to_string(), "postgres".to_string()), ("database".to_string(), "postgres".to_string())];
    s.write_all(&protocol::startup(&params).expect("startup")).expect("startup");
    let mut buf = bytes::BytesMut::new();
    let (mut sent, mut announced) = (false, false);
    loop {
        while let Some(m) = protocol::decode(&mut buf, 1 << 20, BACKEND_TAGS).expect("a backend message") {
            match m.tag {
                b'Z' if !sent => {
                    s.write_all(&protocol::query(sql)).expect("query");
                    sent = true;
                }
                b'd' if !announced => {
                    let line = String::from_utf8_lossy(m.body()).into_owned();
                    let timeline = line.strip_prefix("O ").and_then(|o| o.split_once('/')).map(|(_, t)| t.to_string());
                    assert_eq!(timeline.as_deref(), Some("00000001"), "the history first: {line:?}");
                    announced = true;
                }
                b'd' => return String::from_utf8_lossy(m.body()).into_owned(),
                b'E' => panic!("{sql}: an error"),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn edges_subscribe_to_the_regional_cdc_stream() {
    let pg = Pg::start("fanout");
    create_items(&pg, 50);
    let tables = ITEMS_TABLE;
    let regional = start_proxy(&format!(
        "upstream = '{}'\nrole = 'regional'\n[cdc]\nslot = 'region'\npoll_ms = 50\n{tables}",
        pg.addr()
    ));
    let edges: Vec<_> = (0..3)
        .map(|_| {
            start_proxy(&format!(
                "upstream = '127.0.0.1:{}'\n[cdc]\nsource = 'regional'\n[failover]\nenabled = false\n{tables}",
                regional.port
            ))
        })
        .collect();
    for e in &edges {
        assert!(eventually(Duration::from_secs(10), || stat_n(e.port, "filling") > 0), "edge {} subscribed", e.port);
    }
    // one slot for the region, none per edge
    assert_eq!(psql(pg.port, "SELECT string_agg(slot_name, ',') FROM pg_replication_slots"), "region");
    for e in &edges {
        assert_eq!(psql(e.port, "SELECT v FROM items WHERE id = 3"), "v3");
        assert_eq!(psql(e.port, "SELECT v FROM items WHERE id = 3"), "v3");
    }
    // a write straight on the primary: the regional's slot reader relays it to every edge
    psql(pg.port, "UPDATE items SET v = 'three' WHERE id = 3");
    for e in &edges {
        assert!(
            eventually(Duration::from_secs(10), || psql(e.port, "SELECT v FROM items WHERE id = 3") == "three"),
            "edge {} invalidated through the regional stream",
            e.port
        );
    }
    assert!(stat_n(edges[0].port, "l1_hits") >= 1);
    // an edge asked to subscribe to a proxy without a slot of its own refuses clearly
    let out = psql(edges[0].port, "POSTAI SUBSCRIBE");
    assert!(out.contains("needs a proxy reading a slot of its own"), "{out}");
    let out = psql(regional.port, "POSTAI SUBSCRIBE FROM 'yesterday'");
    assert!(out.contains("needs an LSN"), "{out}");
    // only a regional proxy keeps what it streamed: another continues nothing
    let line = first_copy_line(regional.port, "POSTAI SUBSCRIBE FROM 'FFFFFFFF/0'");
    assert!(line.starts_with("C "), "{line:?}");
    let solo = start_proxy(&format!("upstream = '{}'\n[cdc]\nslot = 'solo'\npoll_ms = 50\n{tables}", pg.addr()));
    assert!(eventually(Duration::from_secs(10), || stat_n(solo.port, "filling") > 0));
    assert!(first_copy_line(solo.port, "POSTAI SUBSCRIBE FROM 'FFFFFFFF/0'").starts_with("K "));
    drop(solo);
    psql(pg.port, "SELECT pg_drop_replication_slot('solo')");

    // the regional proxy ends every subscription; a write lands while the edges
    // are away: they subscribe again from where they were, the regional replays
    // what it kept, and what the edges hold stays cached
    for e in &edges {
        for id in [4, 5] {
            psql(e.port, &format!("SELECT v FROM items WHERE id = {id}"));
        }
    }
    regional.proxy.end_subscriptions();
    psql(pg.port, "UPDATE items SET v = 'five' WHERE id = 5");
    for e in &edges {
        assert!(eventually(Duration::from_secs(10), || stat_n(e.port, "cdc_resumed") == 1), "edge {} resumed", e.port);
        assert!(
            eventually(Duration::from_secs(10), || psql(e.port, "SELECT v FROM items WHERE id = 5") == "five"),
            "edge {}: the write made while it was away invalidated",
            e.port
        );
        let hits = stat_n(e.port, "l1_hits");
        assert_eq!(psql(e.port, "SELECT v FROM items WHERE id = 4"), "v4");
        assert_eq!(stat_n(e.port, "l1_hits"), hits + 1, "edge {}: id 4 still cached after the resume", e.port);
    }

    // the regional's slot is dropped: it starts a new one, whose stream
    // cannot vouch for what came before, and its edges drop what they hold
    let drop_slot = "SELECT pg_drop_replication_slot('region')";
    assert!(eventually(Duration::from_secs(10), || psql(pg.port, drop_slot).is_empty()), "slot dropped");
    for e in &edges {
        let missed = || {
            let hits = stat_n(e.port, "l1_hits");
            psql(e.port, "SELECT v FROM items WHERE id = 4");
            stat_n(e.port, "l1_hits") == hits
        };
        assert!(eventually(Duration::from_secs(15), missed), "edge {} dropped its entries", e.port);
    }
}

/// COPY messages outside a COPY (PostgreSQL ignores them) do not lease a
/// server connection: a client that sends one and waits holds nothing.
#[test]
fn copy_messages_outside_a_copy_hold_no_server_connection() {
    let pg = Pg::start("poolcopy");
    let proxy =
        start_proxy(&format!("upstream = '{}'\n[pool]\nmode = 'transaction'\nsize = 1\nwait_ms = 500\n", pg.addr()));
    let mut holders = Vec::new();
    for tag in [b'c', b'd', b'f'] {
        let mut c = pg::raw::Raw::connect(proxy.port, "postgres");
        let body: &[u8] = if tag == b'f' { b"no\0" } else { b"" };
        c.send(&[pg::raw::frame(tag, body)]);
        holders.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        assert_eq!(psql(proxy.port, "SELECT 1"), "1", "the only server connection is free");
    }
    // and the clients that sent them go on
    for c in &mut holders {
        assert_eq!(pg::raw::value(&c.query("SELECT 2")).as_deref(), Some("2"));
    }
}

/// A named statement prepared, bound and closed in one batch under
/// transaction pooling: the Bind goes out under the server connection's
/// name for the statement (the Close, which comes after it, used to make
/// the proxy forget the statement before the batch went out).
#[test]
fn a_statement_closed_in_the_batch_that_uses_it_runs() {
    use pg::raw::*;
    let pg = Pg::start("poolclose");
    create_items(&pg, 5);
    let proxy = start_proxy(&format!("upstream = '{}'\n{POOLED}", pg.addr()));
    let mut c = Raw::connect(proxy.port, "postgres");
    for round in 0..2 {
        c.send(&[
            parse("s1", "SELECT v FROM items WHERE id = 3"),
            bind("s1", &[]),
            execute(),
            frame(b'C', b"Ss1\0"),
            sync(),
        ]);
        let got = c.until_ready();
        assert_eq!(tags(&got), "12DC3Z", "round {round}: {:?}", sqlstate(&got));
    }
}

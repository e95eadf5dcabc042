//! The proxy in front of a real PostgreSQL: psql through it, cache hits,
//! invalidation by a write through the proxy and by a write made directly on
//! the primary (CDC), errors passed through, bad input survived.

mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually, psql, start_proxy_with, stat_n as stat};

fn start_proxy(pg: &Pg) -> (u16, pg::Proxy) {
    start_proxy_with(pg, &format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\nsilence_max_ms = 5000\n"))
}

#[test]
fn caches_invalidates_and_survives_bad_input() {
    let pg = Pg::start("proxy");
    create_items(&pg, 100);
    let (port, _rt) = start_proxy(&pg);
    // the CDC stream must be heard before anything is served from the cache
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");

    // a read through the proxy, twice: the second is a hit
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 7"), "v7");
    let hits = stat(port, "l1_hits");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 7"), "v7");
    assert_eq!(stat(port, "l1_hits"), hits + 1, "second read served from L1");

    // a write through the proxy invalidates at once (read-your-writes)
    assert_eq!(psql(port, "UPDATE items SET v = 'seven' WHERE id = 7"), "");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 7"), "seven");

    // a write made directly on the primary invalidates through CDC
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 8"), "v8");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 8"), "v8");
    psql(pg.port, "UPDATE items SET v = 'eight' WHERE id = 8");
    assert!(eventually(|| psql(port, "SELECT v FROM items WHERE id = 8") == "eight"), "CDC invalidated the entry");

    // volatile functions are never cached
    let a = psql(port, "SELECT clock_timestamp()");
    std::thread::sleep(Duration::from_millis(5));
    assert_ne!(a, psql(port, "SELECT clock_timestamp()"));

    // errors pass through; the proxy goes on
    let err = psql(port, "SELECT * FROM no_such_table");
    assert!(err.contains("no_such_table") && err.contains("does not exist"), "{err}");
    let err = psql(port, "SELEC 1");
    assert!(err.contains("syntax error"), "{err}");

    // transactions are relayed, never cached
    let txn = psql(port, "BEGIN; UPDATE items SET v = 'nine' WHERE id = 9; SELECT v FROM items WHERE id = 9; COMMIT;");
    assert_eq!(txn, "nine");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 9"), "nine");

    // garbage on a socket: that client gets an error, everyone else is served
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"\x00\x00\x00\x08\xde\xad\xbe\xef").expect("write");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse for a bad startup");
    }
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 1"), "v1");
}

/// DDL made directly on the primary reaches the proxy through the event
/// triggers it installs (a logical message in the DDL's transaction) and
/// invalidates; DDL on temporary objects does not; any role's DDL works.
#[test]
fn ddl_made_directly_on_the_primary_invalidates() {
    let pg = Pg::start("ddl");
    create_items(&pg, 10);
    let (port, _rt) = start_proxy(&pg);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert!(eventually(|| psql(pg.port, "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'postai%'") == "2"));
    let hit = |sql: &str| {
        let before = stat(port, "l1_hits");
        let out = psql(port, sql);
        (stat(port, "l1_hits") > before, out)
    };
    assert_eq!(hit("SELECT * FROM items WHERE id = 3"), (false, "3|v3".into()));
    assert_eq!(hit("SELECT * FROM items WHERE id = 3"), (true, "3|v3".into()));
    let out = psql(pg.port, "ALTER TABLE items ADD COLUMN extra int DEFAULT 7");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(|| psql(port, "SELECT * FROM items WHERE id = 3") == "3|v3|7"), "the new column is seen");
    // the DDL's change marks the catalog stale (nothing is cached) until it is read again
    assert!(eventually(|| stat(port, "catalog_stale") == 0), "the catalog is read again");

    // temporary objects: nothing cached can depend on them
    assert_eq!(hit("SELECT v FROM items WHERE id = 4"), (false, "v4".into()));
    let out = psql(
        pg.port,
        "CREATE TEMP TABLE scratch (x int); DROP TABLE scratch; UPDATE items SET v = 'five' WHERE id = 5",
    );
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(|| psql(port, "SELECT v FROM items WHERE id = 5") == "five"), "CDC past the temporary DDL");
    assert_eq!(hit("SELECT v FROM items WHERE id = 4"), (true, "v4".into()), "temporary DDL invalidated nothing");

    // a role that is not a superuser: its DDL works (the trigger's function is SECURITY DEFINER) and invalidates
    let out = psql(pg.port, "CREATE ROLE bob LOGIN; GRANT CREATE ON SCHEMA public TO bob");
    assert!(!out.contains("ERROR"), "{out}");
    let out = psql(pg.port, "SET ROLE bob; CREATE TABLE bobs (x int); DROP TABLE bobs");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(|| !hit("SELECT v FROM items WHERE id = 4").0), "bob's DROP TABLE invalidated the cache");
    drop(_rt);

    // a schema postai that a role which is not a superuser made first: the
    // triggers would run its functions for a superuser's DDL; not installed
    let out = psql(
        pg.port,
        "DROP EVENT TRIGGER postai_ddl; DROP EVENT TRIGGER postai_drop; DROP SCHEMA postai CASCADE; \
         CREATE ROLE mallory LOGIN; GRANT CREATE ON DATABASE postgres TO mallory; SET ROLE mallory; \
         CREATE SCHEMA postai; CREATE FUNCTION postai.note_ddl() RETURNS event_trigger LANGUAGE plpgsql \
         AS $$ BEGIN END $$;",
    );
    assert!(!out.contains("ERROR"), "{out}");
    let (port, _rt) = start_proxy(&pg);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert_eq!(psql(pg.port, "SELECT count(*) FROM pg_event_trigger"), "0", "no trigger runs mallory's code");
    let owner = "SELECT proowner::regrole FROM pg_proc WHERE proname = 'note_ddl'";
    assert_eq!(psql(pg.port, owner), "mallory");
}

fn pgbench(port: u16, args: &[&str]) -> (bool, String) {
    let port = port.to_string();
    let out = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// pgbench through the proxy: initialisation (COPY, multi-statement DDL),
/// then the select-only script in every query mode; the clients are dealt
/// out to three event loops (`threads = 3`).
#[test]
fn pgbench_runs_through_the_proxy_in_every_mode() {
    let pg = Pg::start("pgbench");
    let (port, _rt) = start_proxy_with(&pg, &format!("threads = 3\n{ITEMS_TABLE}[cdc]\npoll_ms = 50\n"));
    let (ok, out) = pgbench(port, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i: {out}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = pgbench(port, &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200", "-n"]);
        assert!(ok, "pgbench -M {mode}: {out}");
        assert!(out.contains("number of transactions actually processed: 800/800"), "pgbench -M {mode}: {out}");
    }
    // the tpcb-like script writes through the proxy, in transactions
    let (ok, out) = pgbench(port, &["-M", "simple", "-c", "4", "-j", "2", "-t", "50", "-n"]);
    assert!(ok && out.contains("200/200"), "pgbench tpcb-like: {out}");
    let total = psql(pg.port, "SELECT sum(abalance) = (SELECT sum(delta) FROM pgbench_history) FROM pgbench_accounts");
    assert_eq!(total, "t", "every write reached the primary");
}

/// Extended protocol (unnamed and named statements) is answered from the cache
/// on repeats, and invalidated by writes like the simple protocol.
#[test]
fn extended_protocol_hits_the_cache() {
    let pg = Pg::start("extended");
    // (before the proxy: DDL it sees leaves nothing cached until the catalog is read again)
    let setup = psql(
        pg.port,
        "CREATE TABLE items (id int PRIMARY KEY, v int); INSERT INTO items SELECT g, g FROM generate_series(1, 10) g;",
    );
    assert!(!setup.contains("ERROR"), "{setup}");
    let (port, _rt) = start_proxy(&pg);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    let script = pg.dir.join("read.sql");
    std::fs::write(
        &script,
        "\\set id 3\nSELECT v FROM items WHERE id = :id \\gset\n\\if :v != 3\n  SELECT 1/0;\n\\endif\n",
    )
    .expect("script");
    let script = script.to_string_lossy().into_owned();
    for mode in ["extended", "prepared"] {
        let before = stat(port, "l1_hits");
        let (ok, out) = pgbench(port, &["-M", mode, "-c", "1", "-t", "100", "-n", "-f", &script]);
        assert!(ok && out.contains("100/100"), "pgbench -M {mode}: {out}");
        let hits = stat(port, "l1_hits") - before;
        assert!(hits >= 98, "pgbench -M {mode}: {hits} hits of 100");
    }
    // a write through the simple protocol; the cached extended answer is invalidated
    psql(port, "UPDATE items SET v = 30 WHERE id = 3");
    let (ok, out) = pgbench(port, &["-M", "prepared", "-c", "1", "-t", "5", "-n", "-f", &script]);
    assert!(!ok || out.contains("failed"), "the script must see v = 30 and fail its check: {out}");
}

/// With `[cache] enabled = false` the proxy relays everything: no hits.
#[test]
fn pass_through_mode_caches_nothing() {
    let pg = Pg::start("pass");
    let (port, _proxy) = start_proxy_with(&pg, "[cache]\nenabled = false\n[cdc]\nenabled = false\n");
    for _ in 0..3 {
        assert_eq!(psql(port, "SELECT 41 + 1"), "42");
    }
    let (ok, out) = pgbench(port, &["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    let (ok, out) = pgbench(port, &["-S", "-M", "prepared", "-c", "2", "-t", "50", "-n"]);
    assert!(ok && out.contains("100/100"), "{out}");
    assert_eq!(stat(port, "l1_hits"), 0);
    assert_eq!(stat(port, "queries"), 0, "the core never saw a query");
}

/// A dead upstream: at login, the client hears which server is unreachable;
/// mid-session, the next query gets a FATAL error naming the cause; the
/// proxy keeps serving and works again once PostgreSQL is back.
#[test]
fn a_dead_upstream_is_a_clear_error() {
    let pg = Pg::start("dead");
    let (port, _proxy) = start_proxy_with(&pg, "[cdc]\nenabled = false\n[failover]\nenabled = false\n");
    assert_eq!(psql(port, "SELECT 1"), "1");
    // a session open when the primary dies
    let mut session = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let stdin = session.stdin.as_mut().expect("stdin");
        stdin.write_all(b"SELECT 'before';\n").expect("write");
        stdin.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(500));
        pg.crash();
        stdin.write_all(b"SELECT 'after';\n").expect("write");
    }
    let out = session.wait_with_output().expect("psql ends");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("before"), "{text}");
    assert!(text.contains("postai-edge") && !text.contains("after\n"), "the session hears why: {text}");
    // a new client: the upstream is named
    let out = psql(port, "SELECT 1");
    assert!(out.contains("127.0.0.1") && out.contains("postai-edge"), "login error names the upstream: {out}");
    // back again
    pg.restart();
    assert!(eventually(|| psql(port, "SELECT 2") == "2"), "serving again");
}

/// Runs `sql` through the proxy as `user` (no password: no `[[users]]`).
fn psql_user(port: u16, user: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", user, "-d", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The proxy's commands are PgBouncer's admin console: `admin_users` and a
/// superuser run all of them, `stats_users` and members of
/// `pg_read_all_stats` the `SHOW` ones, anyone else gets 42501, in the
/// simple protocol and in the extended one.
#[test]
fn proxy_commands_need_privileges() {
    let pg = Pg::start("admin-privileges");
    let roles = "CREATE ROLE bob LOGIN; CREATE ROLE carol LOGIN IN ROLE pg_read_all_stats; \
                 CREATE ROLE dave LOGIN; CREATE ROLE erin LOGIN";
    assert!(!psql(pg.port, roles).contains("ERROR"));
    let (port, _rt) = start_proxy_with(&pg, "admin_users = ['erin']\nstats_users = ['dave']\n");
    let denied = |out: &str| out.contains("permission denied") && !out.contains("l1_hits");
    for sql in ["SHOW POSTAI STATS", "SHOW POSTAI CACHES", "SHOW POSTAI POOLS", "SHOW POSTAI QUERIES", "POSTAI RELOAD"]
    {
        assert!(denied(&psql_user(port, "bob", sql)), "bob: {sql}");
    }
    for user in ["carol", "dave", "erin", "postgres"] {
        let out = psql_user(port, user, "SHOW POSTAI STATS");
        assert!(out.contains("l1_hits|"), "{user}: {out}");
    }
    for user in ["carol", "dave"] {
        assert!(denied(&psql_user(port, user, "POSTAI RELOAD")), "{user} may not reload");
    }
    // a superuser who took a role that is not one is that role (as pg_stat_statements sees it)
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "SET ROLE bob", "-c", "SHOW POSTAI STATS", "-c", "RESET ROLE", "-c", "SHOW POSTAI STATS"])
        .output()
        .expect("psql runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("permission denied") && stdout.contains("l1_hits|"), "{stdout}{stderr}");
    // (this proxy's configuration is no file: allowed, the reload has nothing to read)
    for user in ["erin", "postgres"] {
        let out = psql_user(port, user, "POSTAI RELOAD");
        assert!(out.contains("nothing to reload"), "{user}: {out}");
    }
    // the extended protocol (tokio-postgres prepares every statement)
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for (user, allowed) in [("bob", false), ("carol", true)] {
            let url = format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            let r = client.query("SHOW POSTAI STATS", &[]).await;
            match allowed {
                true => assert!(r.is_ok_and(|rows| !rows.is_empty())),
                false => {
                    let e = r.expect_err("refused");
                    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
                    // the session goes on
                    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("after").get(0);
                    assert_eq!(one, 1);
                }
            }
        }
    });
}

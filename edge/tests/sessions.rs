//! The PostgreSQL session through the proxy, message by message, as drivers
//! send them (pipelines, Flush, failed Parses, unnamed statements run twice,
//! COPY in the extended protocol, LISTEN): what the client gets is what
//! PostgreSQL would send, and nothing of one session's state reaches the
//! cache.

mod pg;

use std::time::Duration;

use pg::raw::*;
use pg::{ITEMS_TABLE, Pg, create_items, eventually_within, psql, start_proxy_with, stat_n};
use postai_edge::protocol::Message;

const READ: &str = "SELECT v FROM items WHERE id = $1";

fn read_extended(c: &mut Raw, id: &str) -> Vec<Message> {
    c.send(&[parse("", READ), bind("", &[id]), describe_portal(), execute(), sync()]);
    c.until_ready()
}

/// Reads row 1 twice: the second read is answered from the cache.
fn read_until_cached(c: &mut Raw, port: u16) {
    assert_eq!(value(&read_extended(c, "1")).as_deref(), Some("v1"));
    let hits = stat_n(port, "l1_hits");
    assert_eq!(value(&read_extended(c, "1")).as_deref(), Some("v1"));
    assert_eq!(stat_n(port, "l1_hits"), hits + 1, "cached");
}

fn proxy(pg: &Pg) -> (u16, pg::Proxy) {
    let (port, p) = start_proxy_with(pg, &format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\n"));
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    (port, p)
}

/// psycopg's pipeline on a connection that is not in autocommit: BEGIN and
/// an UPDATE are sent and flushed, then a read with a Sync. The read runs
/// in the transaction (it sees the update, and ReadyForQuery says 'T'),
/// never from the cache, and what it saw is never filed for others.
#[test]
fn a_read_after_a_flush_runs_in_the_transaction_the_flush_opened() {
    let pg = Pg::start("flush");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    read_until_cached(&mut c, port);
    c.send(&[
        parse("", "BEGIN"),
        bind("", &[]),
        execute(),
        parse("", "UPDATE items SET v = 'ninety-nine' WHERE id = 1"),
        bind("", &[]),
        execute(),
        flush(),
    ]);
    assert_eq!(tags(&c.take(6)), "12C12C");
    let inside = read_extended(&mut c, "1");
    assert_eq!(tags(&inside), "12TDCZ");
    assert_eq!(value(&inside).as_deref(), Some("ninety-nine"), "the transaction's own write");
    assert_eq!(status(&inside), Some(b'T'));
    c.send(&[query("ROLLBACK")]);
    assert_eq!(status(&c.until_ready()), Some(b'I'));
    let mut other = Raw::connect(port, "postgres");
    assert_eq!(value(&read_extended(&mut other, "1")).as_deref(), Some("v1"), "a rolled back write was filed");
    assert_eq!(value(&read_extended(&mut c, "1")).as_deref(), Some("v1"));
    // an error before the Flush: the server skips everything up to Sync
    c.send(&[parse("", "SELEC 1"), flush()]);
    assert_eq!(sqlstate(&c.take(1)).as_deref(), Some("42601"));
    c.send(&[bind("", &["1"]), describe_portal(), execute(), sync()]);
    assert_eq!(tags(&c.until_ready()), "Z", "skipped until Sync");
    assert_eq!(value(&read_extended(&mut c, "1")).as_deref(), Some("v1"), "the session goes on");
}

/// Extended messages sent without a Sync, then a simple Query: both are
/// answered in order, and the Query's answer is filed with nothing of the
/// others (nor is anything filed at all: the server's state was unknown).
#[test]
fn a_query_after_unsynced_messages_files_nothing_of_them() {
    let pg = Pg::start("unsynced");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    c.send(&[
        parse("", "SELECT 'planted' AS v"),
        bind("", &[]),
        describe_portal(),
        execute(),
        query("SELECT v FROM items WHERE id = 2"),
    ]);
    let got = c.until_ready();
    assert_eq!(tags(&got), "12TDCTDCZ");
    let mut other = Raw::connect(port, "postgres");
    for _ in 0..2 {
        other.send(&[query("SELECT v FROM items WHERE id = 2")]);
        let answer = other.until_ready();
        assert_eq!(tags(&answer), "TDCZ");
        assert_eq!(value(&answer).as_deref(), Some("v2"));
    }
}

/// A Parse that fails (the name is taken) leaves the statement as it was:
/// executing it runs the first text, and its answer is not filed under the
/// second text's key.
#[test]
fn a_failed_parse_does_not_rename_the_statement() {
    let pg = Pg::start("badparse");
    create_items(&pg, 10);
    let out = psql(pg.port, "CREATE TABLE other (id int PRIMARY KEY, v text); INSERT INTO other VALUES (1, 'o1')");
    assert!(!out.contains("ERROR"), "{out}");
    let (port, _p) = start_proxy_with(
        &pg,
        &format!(
            "{ITEMS_TABLE}[[tables]]\nname = 'other'\nprimary_key = 'id'\ninteger_key = true\n[cdc]\npoll_ms = 50\n"
        ),
    );
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0));
    let mut c = Raw::connect(port, "postgres");
    c.send(&[parse("s1", READ), sync()]);
    assert_eq!(tags(&c.until_ready()), "1Z");
    c.send(&[parse("s1", "SELECT v FROM other WHERE id = $1"), sync()]);
    let failed = c.until_ready();
    assert_eq!(sqlstate(&failed).as_deref(), Some("42P05"), "{}", tags(&failed));
    c.send(&[bind("s1", &["1"]), describe_portal(), execute(), sync()]);
    assert_eq!(value(&c.until_ready()).as_deref(), Some("v1"), "s1 is still the first text");
    let mut other = Raw::connect(port, "postgres");
    for _ in 0..2 {
        other.send(&[
            parse("", "SELECT v FROM other WHERE id = $1"),
            bind("", &["1"]),
            describe_portal(),
            execute(),
            sync(),
        ]);
        assert_eq!(value(&other.until_ready()).as_deref(), Some("o1"));
    }
    // a Parse skipped after an error in its batch is not known either (the
    // read it names is cached: a hit would answer what the server refuses)
    for _ in 0..2 {
        assert_eq!(value(&read_extended(&mut c, "1")).as_deref(), Some("v1"));
    }
    c.send(&[parse("bad", "SELEC"), parse("s2", READ), sync()]);
    assert_eq!(sqlstate(&c.until_ready()).as_deref(), Some("42601"));
    c.send(&[bind("s2", &["1"]), describe_portal(), execute(), sync()]);
    assert_eq!(sqlstate(&c.until_ready()).as_deref(), Some("26000"), "s2 was never prepared");
}

/// libpq's PQprepare of an unnamed UPDATE, then PQexecPrepared twice: the
/// proxy's own query after each write must not drop the statement.
#[test]
fn an_unnamed_statement_runs_twice() {
    let pg = Pg::start("unnamed");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    c.send(&[parse("", "UPDATE items SET v = $1 WHERE id = 3"), sync()]);
    assert_eq!(tags(&c.until_ready()), "1Z");
    for v in ["a", "b", "c"] {
        c.send(&[bind("", &[v]), execute(), sync()]);
        let got = c.until_ready();
        assert_eq!(tags(&got), "2CZ", "{v}: {:?}", sqlstate(&got));
    }
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 3"), "c");
}

/// COPY FROM STDIN in the extended protocol (libpq's PQexecParams): the
/// client's Sync after CopyDone reaches the server, which answers it; a
/// client that leaves mid-COPY does not leave its server connection busy.
#[test]
fn copy_in_the_extended_protocol_ends_and_a_client_leaving_mid_copy_frees_the_server() {
    let pg = Pg::start("copy");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    c.send(&[parse("", "COPY items FROM STDIN"), bind("", &[]), execute(), sync()]);
    assert_eq!(tags(&c.take(3)), "12G");
    c.send(&[frame(b'd', b"100\tcopied\n"), frame(b'c', b""), sync()]);
    let done = c.until_ready();
    assert_eq!(tags(&done), "CZ");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 100"), "copied");
    // a client that leaves in the middle of a COPY
    let mut gone = Raw::connect(port, "postgres");
    gone.send(&[query("COPY items FROM STDIN")]);
    assert_eq!(tags(&gone.take(1)), "G");
    gone.send(&[frame(b'd', b"101\thalf\n")]);
    drop(gone);
    let copying = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY items%' AND pid <> pg_backend_pid()";
    assert!(
        eventually_within(Duration::from_secs(10), || psql(pg.port, copying) == "0"),
        "the server is still in the COPY of a client that left"
    );
    assert_eq!(psql(port, "SELECT count(*) FROM items WHERE id = 101"), "0");
}

/// COPY FROM STDIN whose Execute comes with a Flush (the client waits for
/// CopyInResponse before it sends a Sync): relayed through the COPY; the
/// Sync after CopyDone gets ReadyForQuery once the write is applied; a
/// COPY that fails before it starts; tokio-postgres' `copy_in`.
#[test]
fn copy_in_after_a_flush_is_relayed() {
    let pg = Pg::start("copynosync");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    c.send(&[parse("c", "COPY items FROM STDIN"), bind("c", &[]), execute(), flush()]);
    assert_eq!(tags(&c.take(3)), "12G");
    c.send(&[frame(b'd', b"200\ttwo hundred\n"), frame(b'c', b""), sync()]);
    assert_eq!(tags(&c.until_ready()), "CZ");
    // a Flush after CopyDone too
    c.send(&[parse("", "COPY items FROM STDIN"), bind("", &[]), execute(), flush()]);
    assert_eq!(tags(&c.take(3)), "12G");
    c.send(&[frame(b'd', b"201\tflushed\n"), frame(b'c', b""), flush()]);
    assert_eq!(tags(&c.take(1)), "C");
    c.send(&[sync()]);
    assert_eq!(tags(&c.until_ready()), "Z");
    // a COPY that fails before it starts: the error, then ReadyForQuery at the Sync
    c.send(&[parse("", "COPY nosuch FROM STDIN"), bind("", &[]), execute()]);
    c.send(&[frame(b'f', b"gave up\0"), sync()]);
    let failed = c.until_ready();
    assert_eq!(sqlstate(&failed).as_deref(), Some("42P01"), "{}", tags(&failed));
    assert_eq!(psql(port, "SELECT v FROM items WHERE id IN (200, 201) ORDER BY id"), "two hundred\nflushed");
    // tokio-postgres
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use futures_util::SinkExt;
        let client = pg::client(port).await;
        let sink = client.copy_in("COPY items FROM STDIN").await.expect("COPY started");
        futures_util::pin_mut!(sink);
        sink.as_mut().send(bytes::Bytes::from_static(b"202\tfrom rust\n")).await.expect("data");
        let n = tokio::time::timeout(Duration::from_secs(10), sink.finish()).await.expect("not stuck").expect("done");
        assert_eq!(n, 1);
        let v: String = client.query_one("SELECT v FROM items WHERE id = 202", &[]).await.expect("read").get(0);
        assert_eq!(v, "from rust");
    });
}

/// LISTEN: a notification that arrives before a read is the session's, not
/// the read's answer: it is relayed to the session and never cached.
#[test]
fn a_notification_is_not_part_of_a_cached_answer() {
    let pg = Pg::start("listen");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    c.send(&[query("LISTEN ch")]);
    c.until_ready();
    psql(pg.port, "NOTIFY ch, 'hello'");
    std::thread::sleep(Duration::from_millis(300));
    c.send(&[query("SELECT v FROM items WHERE id = 4")]);
    let first = c.until_ready();
    assert!(tags(&first).ends_with("TDCZ"), "{}", tags(&first));
    let hits = stat_n(port, "l1_hits");
    for _ in 0..2 {
        c.send(&[query("SELECT v FROM items WHERE id = 4")]);
        assert_eq!(tags(&c.until_ready()), "TDCZ", "a notification replayed from the cache");
    }
    assert!(stat_n(port, "l1_hits") > hits, "the read was cached");
}

/// `POSTAI SUBSCRIBE` streams every row change of every table: only for a
/// role that could read the WAL itself.
#[test]
fn subscribing_needs_a_role_that_could_read_the_wal() {
    let pg = Pg::start("subpriv");
    create_items(&pg, 10);
    let out = psql(pg.port, "CREATE ROLE reader LOGIN; GRANT SELECT ON items TO reader");
    assert!(!out.contains("ERROR"), "{out}");
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "reader");
    c.send(&[query("POSTAI SUBSCRIBE")]);
    let refused = c.until_ready();
    assert_eq!(sqlstate(&refused).as_deref(), Some("42501"), "{}", tags(&refused));
    assert!(refused.iter().all(|m| m.tag != b'H' && m.tag != b'd'), "nothing streamed");
    psql(pg.port, "ALTER ROLE reader REPLICATION");
    let mut c = Raw::connect(port, "reader");
    c.send(&[query("POSTAI SUBSCRIBE")]);
    assert_eq!(c.take(1)[0].tag, b'H', "a role with REPLICATION may");
}

/// The privilege check reads the catalog, not what the session's search
/// path or temporary objects make of it.
#[test]
fn a_temporary_view_does_not_pass_the_subscription_check() {
    let pg = Pg::start("subview");
    create_items(&pg, 10);
    let out = psql(pg.port, "CREATE ROLE mallory LOGIN; CREATE SCHEMA evil AUTHORIZATION mallory");
    assert!(!out.contains("ERROR"), "{out}");
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "mallory");
    let view = "CREATE TEMP VIEW pg_roles AS SELECT current_user::name AS rolname, true AS rolsuper, \
                true AS rolreplication, 'x'::text AS x";
    assert_eq!(sqlstate(&c.query(view)), None);
    let refused = c.query("POSTAI SUBSCRIBE");
    assert_eq!(sqlstate(&refused).as_deref(), Some("42501"), "{}", tags(&refused));
    let op = "CREATE FUNCTION evil.eq(name, name) RETURNS bool LANGUAGE sql AS 'SELECT true'; \
              CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.eq)";
    assert_eq!(sqlstate(&c.query(op)), None);
    assert_eq!(sqlstate(&c.query("SET search_path = evil, pg_catalog")), None);
    let refused = c.query("POSTAI SUBSCRIBE");
    assert_eq!(sqlstate(&refused).as_deref(), Some("42501"), "{}", tags(&refused));
}

/// The proxy's own `pg_current_wal_lsn()` on a session's connection is the
/// catalog's, whatever function the session's search path finds first: a
/// forged position would date every later fill past the writes that change
/// them.
#[test]
fn a_session_cannot_forge_the_primary_s_position() {
    let pg = Pg::start("forge");
    create_items(&pg, 10);
    let out = psql(
        pg.port,
        "CREATE SCHEMA evil; CREATE FUNCTION evil.pg_current_wal_lsn() RETURNS pg_lsn LANGUAGE sql \
         AS $$SELECT 'FFFFFFFF/FFFFFF00'::pg_lsn$$",
    );
    assert!(!out.contains("ERROR"), "{out}");
    let (port, _p) = proxy(&pg);
    let mut c = Raw::connect(port, "postgres");
    assert_eq!(sqlstate(&c.query("SET search_path = evil, public, pg_catalog")), None);
    c.send(&[parse("", "UPDATE items SET v = 'w' WHERE id = 9"), bind("", &[]), execute(), sync()]);
    assert_eq!(tags(&c.until_ready()), "12CZ");
    // another session fills row 5; the row changes on the primary
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 5"), "v5");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 5"), "v5");
    psql(pg.port, "UPDATE items SET v = 'five' WHERE id = 5");
    assert!(
        eventually_within(Duration::from_secs(10), || psql(port, "SELECT v FROM items WHERE id = 5") == "five"),
        "an entry dated by a forged position outlived the write that changed it"
    );
}

/// An error in a batch leaves the statements it prepared before the error:
/// a pooled client's statement is still bound after a unique violation.
#[test]
fn a_statement_outlives_an_error_later_in_its_batch() {
    let pg = Pg::start("stmterr");
    create_items(&pg, 10);
    let (port, _p) =
        start_proxy_with(&pg, &format!("{ITEMS_TABLE}[pool]\nmode = 'transaction'\nsize = 2\n[cdc]\npoll_ms = 50\n"));
    let mut c = Raw::connect(port, "postgres");
    c.send(&[parse("ins", "INSERT INTO items VALUES ($1, 'x')"), bind("ins", &["1"]), execute(), sync()]);
    assert_eq!(sqlstate(&c.until_ready()).as_deref(), Some("23505"));
    for id in ["200", "201"] {
        c.send(&[bind("ins", &[id]), execute(), sync()]);
        let got = c.until_ready();
        assert_eq!(tags(&got), "2CZ", "{id}: {:?}", sqlstate(&got));
    }
}

/// Transaction pooling: clients with different `application_name`s share
/// one server connection; each sees its own, in its login's report and in
/// what the server answers (and so in what is cached for it).
#[test]
fn each_pooled_client_runs_under_its_own_application_name() {
    let pg = Pg::start("appname");
    create_items(&pg, 10);
    let (port, _p) =
        start_proxy_with(&pg, &format!("{ITEMS_TABLE}[pool]\nmode = 'transaction'\nsize = 1\n[cdc]\npoll_ms = 50\n"));
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0));
    for _ in 0..2 {
        for app in ["alpha", "beta", "it's $postai$ odd"] {
            let (mut c, login) =
                Raw::login(port, &[("user", "postgres"), ("database", "postgres"), ("application_name", app)]);
            assert_eq!(reported(&login, "application_name").as_deref(), Some(app), "the login's report");
            for sql in ["SELECT current_setting('application_name')", "SHOW application_name"] {
                assert_eq!(values(&c.query(sql)), [app], "{sql}");
            }
        }
    }
}

/// The proxy's own connections (health checks, the change stream, the
/// catalog) name what they call from the catalog, whatever search_path the
/// database's owner set: a function of the owner's named as a catalog one
/// must not run as the proxy's user.
#[test]
fn a_database_search_path_does_not_reach_the_proxy_s_own_connections() {
    let pg = Pg::start("dbpath");
    create_items(&pg, 10);
    let setup = [
        "CREATE SCHEMA evil",
        "CREATE TABLE evil.calls (who text)",
        "CREATE FUNCTION evil.pg_is_in_recovery() RETURNS bool LANGUAGE sql \
         AS $$INSERT INTO evil.calls VALUES (current_user) RETURNING false$$",
        "CREATE FUNCTION evil.pg_current_wal_lsn() RETURNS pg_lsn LANGUAGE sql \
         AS $$INSERT INTO evil.calls VALUES (current_user) RETURNING 'FFFFFFFF/0'::pg_lsn$$",
        "ALTER DATABASE postgres SET search_path = evil, pg_catalog",
    ];
    for sql in setup {
        let out = psql(pg.port, sql);
        assert!(!out.contains("ERROR"), "{sql}: {out}");
    }
    let (port, _p) = start_proxy_with(
        &pg,
        &format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\n[failover]\nenabled = false\nhealth_interval_ms = 100\n"),
    );
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(psql(pg.port, "SELECT count(*) FROM evil.calls"), "0", "the owner's functions ran");
}

/// An admin statement (answered by the proxy) ahead of a BEGIN in a batch
/// ended by a Flush: the server is in a transaction the last ReadyForQuery
/// did not show. The next read runs in it (not from the cache, with status
/// 'T'), and the pooled connection stays with the client until it ends:
/// another client never gets a connection inside someone's transaction.
#[test]
fn a_transaction_opened_behind_an_admin_statement_and_a_flush_is_seen() {
    let pg = Pg::start("adminflush");
    create_items(&pg, 10);
    let (port, _p) =
        start_proxy_with(&pg, &format!("{ITEMS_TABLE}[pool]\nmode = 'transaction'\nsize = 1\n[cdc]\npoll_ms = 50\n"));
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    let mut c = Raw::connect(port, "postgres");
    read_until_cached(&mut c, port);
    c.send(&[
        parse("admin", "SHOW POSTAI POOLS"),
        bind("admin", &[]),
        execute(),
        parse("", "BEGIN"),
        bind("", &[]),
        execute(),
        flush(),
    ]);
    // the admin answer, then BEGIN's ParseComplete, BindComplete, CommandComplete
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "no CommandComplete for BEGIN");
        let m = c.next().expect("an answer to the flushed batch");
        assert_ne!(m.tag, b'E', "{:?}", sqlstate(std::slice::from_ref(&m)));
        if m.tag == b'C' && m.body().starts_with(b"BEGIN") {
            break;
        }
    }
    let inside = read_extended(&mut c, "1");
    assert_eq!(status(&inside), Some(b'T'), "the read runs in the transaction: {}", tags(&inside));
    assert_eq!(value(&inside).as_deref(), Some("v1"));
    // the only server connection is this client's until its transaction ends
    let mut other = Raw::connect(port, "postgres");
    other.send(&[query("SELECT pg_catalog.txid_current_if_assigned() IS NULL")]);
    c.send(&[query("UPDATE items SET v = 'mine' WHERE id = 2")]);
    assert_eq!(status(&c.until_ready()), Some(b'T'));
    c.send(&[query("ROLLBACK")]);
    assert_eq!(status(&c.until_ready()), Some(b'I'));
    let theirs = other.until_ready();
    assert_eq!(status(&theirs), Some(b'I'), "another client got a connection inside a transaction");
    assert_eq!(value(&theirs).as_deref(), Some("t"));
}

/// SQL-level PREPARE, DEALLOCATE and DISCARD share the namespace of the
/// protocol's named statements: a statement redefined with SQL must not be
/// run by the proxy as the statement it knew (its answer would be filed
/// under the old statement's key and served to everyone who runs it). Also:
/// a statement whose Parse the cache answered (never sent to the server)
/// is there for SQL's EXECUTE and DEALLOCATE.
#[test]
fn a_statement_redefined_with_sql_is_not_the_one_the_proxy_knew() {
    let pg = Pg::start("redefine");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg);
    let mut other = Raw::connect(port, "postgres");
    read_until_cached(&mut other, port);
    let redefine = |first: &str| {
        let mut c = Raw::connect(port, "postgres");
        // answered from the cache (row 1 is cached): the Parse is held back,
        // and SQL sees the statement all the same
        c.send(&[parse("s1", READ), bind("s1", &["1"]), describe_portal(), execute(), sync()]);
        assert_eq!(value(&c.until_ready()).as_deref(), Some("v1"));
        let executed = c.query("EXECUTE s1(3)");
        assert_eq!(value(&executed).as_deref(), Some("v3"), "{}", tags(&executed));
        for sql in [first, "PREPARE s1(int) AS SELECT 'pwned'::text WHERE $1 IS NOT NULL"] {
            let m = c.query(sql);
            assert_eq!(sqlstate(&m), None, "{sql}");
        }
        for id in ["1", "4"] {
            c.send(&[bind("s1", &[id]), describe_portal(), execute(), sync()]);
            assert_eq!(value(&c.until_ready()).as_deref(), Some("pwned"), "{first}: the server's statement ({id})");
        }
    };
    redefine("DEALLOCATE s1");
    redefine("DISCARD ALL");
    redefine("DEALLOCATE ALL");
    // nobody else is served the redefined statement's answer
    for id in ["1", "2", "3", "4"] {
        assert_eq!(value(&read_extended(&mut other, id)).as_deref(), Some(format!("v{id}").as_str()), "row {id}");
    }
}

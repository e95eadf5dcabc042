//! `SHOW POSTAI QUERIES`: each statement shape's calls, what the cache
//! answered and what went upstream, for the optimization engine (which
//! reads `pg_stat_statements` too: it never sees the cache's answers).
//! Only for a superuser or a member of `pg_read_all_stats`.

mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually, eventually_within, psql, start_proxy_with, stat_n};

/// One psql session as `user` through the proxy at `port`: each statement a
/// query of its own, stopping at the first error.
fn session(port: u16, user: &str, statements: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new("psql");
    cmd.args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", user, "-d", "postgres"]);
    cmd.args(["-v", "ON_ERROR_STOP=1"]);
    for st in statements {
        cmd.args(["-c", st]);
    }
    cmd.output().expect("psql")
}

#[test]
fn each_shape_reports_what_the_cache_answered() {
    let pg = Pg::start("queries");
    create_items(&pg, 10);
    let extra = format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\n");
    let (port, p) = start_proxy_with(&pg, &extra);
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    // one miss, then hits (by simple queries: the literal is the shape's $1)
    assert!(eventually(|| {
        psql(port, "SELECT v FROM items WHERE id = 3");
        stat_n(port, "l1_hits") > 0
    }));
    for id in [3, 3, 4] {
        psql(port, &format!("SELECT v FROM items WHERE id = {id}"));
    }
    let out = psql(port, "SHOW POSTAI QUERIES");
    let row = out
        .lines()
        .find(|l| l.to_ascii_lowercase().contains("from items where id = $1"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split('|').collect();
    assert_eq!(cols.len(), 8, "{row}");
    let n = |i: usize| cols[i].parse::<f64>().unwrap_or_else(|_| panic!("{row}"));
    assert_eq!(n(2), n(3) + n(4) + n(5), "calls are what the tiers answered and what went upstream: {row}");
    assert!(n(3) >= 2.0 && n(5) >= 2.0, "hits and the misses of ids 3 and 4: {row}");
    assert!(n(7) > 0.0 && n(7) < 100.0, "{row}");
    // the texts are every session's: not for any role
    let out = psql(pg.port, "CREATE ROLE app LOGIN; GRANT SELECT ON items TO app");
    assert!(!out.contains("ERROR"), "{out}");
    let as_app = || session(port, "app", &["SHOW POSTAI QUERIES"]);
    let denied = as_app();
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("permission denied") && !denied.status.success(), "{err}");
    let out = psql(pg.port, "GRANT pg_read_all_stats TO app");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(
        String::from_utf8_lossy(&as_app().stdout).to_ascii_lowercase().contains("from items where id = $1"),
        "pg_read_all_stats sees them"
    );
    drop(p);
}

/// `POSTAI EXPLAIN`: the core's decisions and PostgreSQL's plan; text
/// that holds more than one statement is explained by the core alone, and
/// nothing of it runs.
#[test]
fn explain_shows_the_cores_decisions_and_the_plan() {
    let pg = Pg::start("explain");
    create_items(&pg, 10);
    let extra = format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\n");
    let (port, p) = start_proxy_with(&pg, &extra);
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    let out = psql(port, "POSTAI EXPLAIN SELECT v FROM items WHERE id = 3");
    for line in ["kind|Read", "reads|items", "read keys|items by key", "cacheable|yes"] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
    assert!(out.lines().any(|l| l.starts_with("plan|") && l.contains("items_pkey")), "{out}");
    let out = psql(port, "POSTAI EXPLAIN SELECT v, random() FROM items");
    assert!(out.contains("cacheable|no: calls volatile function random"), "{out}");
    // two statements: not sent to PostgreSQL, so the DELETE never runs
    for text in [
        "POSTAI EXPLAIN SELECT 1; DELETE FROM items",
        "POSTAI EXPLAIN ANALYZE DELETE FROM items",
        "POSTAI EXPLAIN (ANALYZE) DELETE FROM items",
    ] {
        let out = psql(port, text);
        assert!(out.contains("plan|not asked of PostgreSQL"), "{text}: {out}");
    }
    let out = psql(port, "POSTAI EXPLAIN DELETE FROM items WHERE id = 3");
    assert!(out.lines().any(|l| l.starts_with("plan|Delete on items")), "a plan, not a run: {out}");
    assert_eq!(psql(pg.port, "SELECT count(*) FROM items"), "10", "nothing was deleted");
    // a session reading backslash escapes: its text may hide a second
    // statement from the lexer, so nothing is asked of PostgreSQL
    let off = session(
        port,
        "postgres",
        &["SET standard_conforming_strings = off", "POSTAI EXPLAIN SELECT v FROM items WHERE id = 3"],
    );
    let out = String::from_utf8_lossy(&off.stdout);
    assert!(out.contains("plan|not asked of PostgreSQL (its effects"), "{out}");
    // inside a transaction: the core's rows only, and the transaction stays usable
    let txn = session(
        port,
        "postgres",
        &["BEGIN", "POSTAI EXPLAIN SELECT nope FROM items", "SELECT v FROM items WHERE id = 2", "COMMIT"],
    );
    let out = String::from_utf8_lossy(&txn.stdout);
    assert!(txn.status.success(), "{out}{}", String::from_utf8_lossy(&txn.stderr));
    assert!(out.contains("plan|not asked of PostgreSQL inside a transaction") && out.contains("v2"), "{out}");
    // PostgreSQL's own error for a statement it cannot plan
    let out = psql(port, "POSTAI EXPLAIN SELECT nope FROM items");
    assert!(out.contains("plan|PostgreSQL: column \"nope\" does not exist"), "{out}");
    drop(p);
}

/// With transaction pooling and one server connection, the commands'
/// own queries give it back: a session that ran them holds no lease, and
/// another session's read runs.
#[test]
fn the_commands_give_a_pooled_connection_back() {
    let pg = Pg::start("explainpool");
    create_items(&pg, 10);
    let extra = format!("[pool]\nmode = 'transaction'\nsize = 1\nwait_ms = 2000\n{ITEMS_TABLE}[cdc]\npoll_ms = 50\n");
    let (port, p) = start_proxy_with(&pg, &extra);
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let a = pg::client(port).await;
        for _ in 0..3 {
            a.simple_query("POSTAI EXPLAIN SELECT v FROM items WHERE id = 4").await.expect("explain");
            a.simple_query("SHOW POSTAI QUERIES").await.expect("queries");
        }
        // `a` stays connected; the one server connection must be free
        let b = pg::client(port).await;
        let rows = b.simple_query("SELECT count(*) FROM items").await.expect("a server connection is free");
        assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
        drop(a);
    });
    drop(p);
}

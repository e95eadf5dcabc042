//! Attacks on the advisor by a role of the database it advises: the texts
//! pg_stat_statements keeps are the attacker's, and planning runs user
//! functions. The advisor runs as a superuser here, as an operator would.

#[path = "../../edge/tests/pg/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use cluster::{Pg, psql};
use postai_advisor::{Options, advise};

/// Runs `sql` as mallory (psql, a client of its own that ends after it).
fn as_mallory(port: u16, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "mallory", "-d", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn connect(pg: &Pg) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// The advisory lock mallory's function takes in whatever session runs it:
/// held by a session that is still open (the advisor's) after it ran.
fn lock_held(port: u16) -> String {
    psql(port, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_of_the_database_runs_nothing_as_the_advisor() {
    let pg = Pg::start_with("advise-attacks", "shared_preload_libraries = 'pg_stat_statements'\n");
    let setup = "CREATE EXTENSION pg_stat_statements; CREATE EXTENSION hypopg;
        CREATE TABLE t (a int, b int); INSERT INTO t SELECT g, g FROM generate_series(1, 50000) g; ANALYZE t;
        CREATE ROLE mallory LOGIN; CREATE SCHEMA mallory AUTHORIZATION mallory; GRANT SELECT ON t TO mallory;";
    assert!(!psql(pg.port, setup).contains("ERROR"));
    // 1. planning folds an IMMUTABLE function, which may call a volatile
    // one: its code would run in the advisor's session, as the advisor
    let out = as_mallory(
        pg.port,
        "CREATE FUNCTION mallory.payload() RETURNS int LANGUAGE plpgsql VOLATILE AS
           $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 1; END $$;
         CREATE FUNCTION mallory.folded() RETURNS int LANGUAGE plpgsql IMMUTABLE AS
           $$ BEGIN RETURN mallory.payload(); END $$;",
    );
    assert!(!out.contains("ERROR"), "{out}");
    for _ in 0..3 {
        let out = as_mallory(pg.port, "SELECT count(*) FROM t WHERE a + b > mallory.folded()");
        assert!(!out.contains("ERROR"), "{out}");
    }
    // the same code reached otherwise: a user function named like a
    // built-in, an index expression of a table (the planner folds it), a
    // rewrite rule planned with a write, a text the analysis cannot parse
    let out = as_mallory(
        pg.port,
        "CREATE FUNCTION mallory.now() RETURNS int LANGUAGE plpgsql IMMUTABLE AS
           $$ BEGIN RETURN mallory.payload(); END $$;
         CREATE TABLE mallory.indexed (a int); CREATE INDEX ON mallory.indexed ((a + mallory.folded()));
         CREATE TABLE mallory.ruled (a int); CREATE RULE r AS ON UPDATE TO mallory.ruled DO ALSO SELECT mallory.folded();",
    );
    assert!(!out.contains("ERROR"), "{out}");
    for sql in [
        "SELECT count(*) FROM t WHERE a > mallory.now()",
        "SELECT count(*) FROM mallory.indexed WHERE a = 7",
        "UPDATE mallory.ruled SET a = 1 WHERE a = 2",
        "SELECT count(*) FROM t WHERE a = mallory.folded() AND b BETWEEN SYMMETRIC 1 AND 9",
    ] {
        for _ in 0..3 {
            let out = as_mallory(pg.port, sql);
            assert!(!out.contains("ERROR"), "{sql}: {out}");
        }
    }
    // 2. a PREPARE whose comment makes a naive reading of it two statements
    let out = as_mallory(
        pg.port,
        "PREPARE /*(int) AS SELECT 1; CREATE TABLE public.pwned (); --*/ q AS \
         SELECT count(*) FROM t WHERE b = $1; EXECUTE q(1); EXECUTE q(2); EXECUTE q(3);",
    );
    assert!(!out.contains("ERROR"), "{out}");
    // 3. a parameter number no statement takes, in a comment
    let out = as_mallory(pg.port, "SELECT count(*) FROM t /* $99999999999999 */ WHERE b > 7");
    assert!(!out.contains("ERROR"), "{out}");
    assert_eq!(lock_held(pg.port), "0", "mallory's sessions ended");

    let advisor = connect(&pg).await;
    let r = advise(&advisor, None, &Options::default()).await.expect("advice");
    assert_eq!(lock_held(pg.port), "0", "mallory's function did not run in the advisor's session");
    let folded = r.statements.iter().find(|s| s.query.contains("a + b > mallory.folded()")).expect("captured");
    let why = folded.unplanned.as_deref().unwrap_or_default();
    assert!(why.contains("user code (folded)"), "{why}");
    for (text, reason) in [
        ("mallory.now()", "user code (now)"),
        ("mallory.indexed", "evaluates user code"),
        ("mallory.ruled", "rewrite rule"),
        ("SYMMETRIC", "cannot parse"),
    ] {
        let s = r.statements.iter().find(|s| s.query.contains(text)).unwrap_or_else(|| panic!("{text} captured"));
        let why = s.unplanned.as_deref().unwrap_or_default();
        assert!(why.contains(reason), "{text}: {why}");
    }
    assert_eq!(psql(pg.port, "SELECT count(*) FROM pg_class WHERE relname = 'pwned'"), "0");
    assert_eq!(psql(pg.port, "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'"), "f");
    // the other statements are still advised on
    assert!(r.statements.iter().any(|s| s.query.contains("b > $1") && s.unplanned.is_none()), "{:?}", r.statements);

    // an operator who trusts the database's functions: the guard was what
    // kept them from running (and planning stays read-only and bounded)
    let trusted = Options { trust_functions: true, ..Options::default() };
    advise(&advisor, None, &trusted).await.expect("advice");
    assert_eq!(lock_held(pg.port), "1", "trusted, mallory's function ran in the advisor's session");
}

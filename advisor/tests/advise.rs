//! The advisor against a real PostgreSQL 15 with pg_stat_statements and
//! HypoPG: a workload of an application's statements, then the advice,
//! each recommendation built and timed for real on a scratch copy.

#[path = "../../edge/tests/pg/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use cluster::{Pg, psql};
use postai_advisor::apply::{apply, gained, measure};
use postai_advisor::schema::Thresholds;
use postai_advisor::{Options, advise, report};

/// Runs each statement with psql on the `app` database (each in a
/// transaction of its own), as a client of its own.
fn psql_app(port: &str, statements: &[&str]) {
    let mut cmd = std::process::Command::new("psql");
    cmd.args([
        "-X",
        "-q",
        "-At",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-U",
        "postgres",
        "-d",
        "app",
        "-v",
        "ON_ERROR_STOP=1",
    ]);
    for st in statements {
        cmd.args(["-c", st]);
    }
    let out = cmd.output().expect("psql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn psql_port(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_setting('port')", &[]).await.expect("port").get(0)
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect("count").get(0)
}

async fn connect(pg: &Pg, db: &str) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={} user=postgres dbname={db}", pg.port);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

fn setup(pg: &Pg) {
    let sql = "CREATE EXTENSION pg_stat_statements; CREATE EXTENSION hypopg;
        CREATE TABLE customers (id int PRIMARY KEY, region text NOT NULL);
        INSERT INTO customers SELECT g, (ARRAY['eu','us','apac'])[1 + g % 3] FROM generate_series(1, 20000) g;
        CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
            created_at timestamptz NOT NULL, total numeric NOT NULL, note text);
        INSERT INTO orders (customer_id, status, created_at, total)
            SELECT 1 + (g * 7919) % 20000, (ARRAY['new','paid','shipped','done'])[1 + g % 4],
                   timestamptz '2026-01-01' + g * interval '1 minute', g % 500
            FROM generate_series(1, 200000) g;
        CREATE TABLE events (id serial PRIMARY KEY, kind text NOT NULL, created_at timestamptz NOT NULL, payload text);
        INSERT INTO events (kind, created_at, payload)
            SELECT CASE WHEN (g * 7919) % 200000 >= 199000 THEN 'late' ELSE 'early' END,
                   timestamptz '2026-01-01' + ((g * 7919) % 200000) * interval '1 second', repeat('x', 50)
            FROM generate_series(1, 200000) g;
        ANALYZE events;
        CREATE TABLE visits (id int PRIMARY KEY, user_id int NOT NULL, last_seen timestamptz NOT NULL)
            WITH (fillfactor = 70);
        INSERT INTO visits SELECT g, g % 5000, timestamptz '2026-01-01' + g * interval '1 second'
            FROM generate_series(1, 100000) g;
        ANALYZE visits;
        CREATE TABLE churn (id int PRIMARY KEY, v int NOT NULL) WITH (autovacuum_enabled = false);
        INSERT INTO churn SELECT g, 0 FROM generate_series(1, 20000) g;
        ANALYZE churn;
        CREATE TABLE archive_2020 (id int, payload text);
        INSERT INTO archive_2020 SELECT g, repeat('y', 80) FROM generate_series(1, 60000) g;
        CREATE INDEX orders_id_copy ON orders (id);
        CREATE INDEX orders_note_idx ON orders (note);
        ANALYZE customers; ANALYZE orders;";
    // the application's database, and a scratch copy of it made from it
    assert_eq!(psql(pg.port, "CREATE DATABASE app"), "");
    psql_app(&pg.port.to_string(), &[sql]);
    assert_eq!(psql(pg.port, "CREATE DATABASE scratch TEMPLATE app"), "");
}

/// The statements an application runs (prepared, so pg_stat_statements
/// keeps them with `$n`), after the statistics of the load were reset.
async fn workload(c: &tokio_postgres::Client) {
    c.batch_execute("SELECT pg_stat_statements_reset(); SELECT pg_stat_reset()").await.expect("reset");
    let by_customer = c.prepare("SELECT * FROM orders WHERE customer_id = $1").await.expect("prepare");
    for i in 0..120 {
        c.query(&by_customer, &[&(1 + (i * 37) % 20000)]).await.expect("by customer");
    }
    let recent = c
        .prepare("SELECT id, total FROM orders WHERE status = $1 AND created_at >= $2 ORDER BY created_at LIMIT 10")
        .await
        .expect("prepare");
    let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000);
    for s in ["new", "paid"].iter().cycle().take(40) {
        c.query(&recent, &[s, &at]).await.expect("recent");
    }
    let note = c.prepare("UPDATE orders SET note = $1 WHERE id = $2").await.expect("prepare");
    for i in 0..300 {
        c.execute(&note, &[&format!("n{i}"), &(1 + i * 13)]).await.expect("note");
    }
    // the newest events of a rare kind: an index on the sort column looks
    // cheap to the planner (it takes the matches to be spread evenly) and
    // reads almost all of it, and the rows in its order all over the table,
    // before the first match
    let events =
        c.prepare("SELECT id FROM events WHERE lower(kind) = $1 ORDER BY created_at LIMIT 10").await.expect("prepare");
    for _ in 0..30 {
        c.query(&events, &[&"late"]).await.expect("events");
    }
    // rows rewritten with autovacuum off (on a connection of its own, whose
    // statistics reach the views when it ends)
    let port = psql_port(c).await;
    psql_app(&port, &["UPDATE churn SET v = v + 1", "UPDATE churn SET v = v + 1"]);
    // a column written all day and read now and then: an index on it would
    // cost every update its HOT path
    let seen = c.prepare("UPDATE visits SET last_seen = now() WHERE id = $1").await.expect("prepare");
    for i in 0..3000 {
        c.execute(&seen, &[&(1 + (i * 31) % 100_000)]).await.expect("seen");
    }
    let recent = c.prepare("SELECT count(*) FROM visits WHERE last_seen > $1").await.expect("prepare");
    for _ in 0..3 {
        c.query(&recent, &[&at]).await.expect("recent visits");
    }
    let customer = c.prepare("SELECT region FROM customers WHERE id = $1").await.expect("prepare");
    for i in 0..100 {
        c.query(&customer, &[&(1 + i)]).await.expect("customer");
    }
    // constants pg_stat_statements turns into parameters of unknown type:
    // its normalised form cannot be prepared
    c.batch_execute("SELECT 40 + 2").await.expect("constant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advice_is_verified_on_a_scratch_copy() {
    let pg = Pg::start_with("advise", "shared_preload_libraries = 'pg_stat_statements'\n");
    let hypopg = psql(pg.port, "SELECT count(*) FROM pg_available_extensions WHERE name = 'hypopg'");
    assert_eq!(hypopg, "1", "HypoPG is installed (.ci/run: postgresql-15-hypopg)");
    // without the extensions: a clear error, nothing changed
    let bare = connect(&pg, "postgres").await;
    let e = advise(&bare, None, &Options::default()).await.expect_err("pg_stat_statements is missing");
    assert!(e.to_string().contains("pg_stat_statements is not installed"), "{e}");
    assert_eq!(psql(pg.port, "CREATE EXTENSION pg_stat_statements"), "");
    let e = advise(&bare, None, &Options::default()).await.expect_err("HypoPG is missing");
    assert!(e.to_string().contains("HypoPG is not installed"), "{e}");
    // an empty workload: said, and nothing recommended
    assert_eq!(psql(pg.port, "CREATE EXTENSION hypopg"), "");
    bare.batch_execute("SELECT pg_stat_statements_reset()").await.expect("reset");
    let empty = advise(&bare, None, &Options::default()).await.expect("an empty workload is no error");
    assert!(empty.notes.iter().any(|n| n.contains("no statement")), "{:?}", empty.notes);
    assert!(empty.recommended.is_empty());
    setup(&pg);
    let app = connect(&pg, "app").await;
    workload(&app).await;
    let scratch = connect(&pg, "scratch").await;
    // schema hints at this test's scale (the defaults are for production sizes)
    let schema =
        Thresholds { dead_share: 0.2, dead_rows: 1_000.0, index_factor: 2.0, index_bytes: 100e3, large_bytes: 5e6 };
    let opts = Options { schema, ..Options::default() };
    let r = advise(&app, Some(&scratch), &opts).await.expect("advice");
    let text = report::render(&r);
    println!("{text}");

    // the sequential scan per customer is named, and its index recommended, verified faster
    let by_customer = r.statements.iter().position(|s| s.query.contains("customer_id = $1")).expect("captured");
    assert!(r.statements[by_customer].bottlenecks.iter().any(|b| b.kind == "sequential scan"), "{text}");
    let rec = r.recommended.iter().find(|x| x.choice.candidate.columns == ["customer_id"]).expect(&text);
    let v = rec.verdict.as_ref().expect("verified");
    let t = v.timings.iter().find(|t| t.statement == by_customer).expect("timed");
    assert!(t.after_ms < t.before_ms, "{text}");
    assert!(rec.choice.read_ms_saved > rec.choice.write_ms_cost);
    // the recent-orders query gets an index on what it filters and sorts
    let recent = r.statements.iter().position(|s| s.query.contains("created_at >= $2")).expect("captured");
    assert!(r.recommended.iter().any(|x| x.choice.helps.iter().any(|h| h.0 == recent)), "{text}");
    // nothing on the column the updates change (they stay HOT), nothing the primary key serves
    for x in r.recommended.iter().chain(&r.withdrawn) {
        assert!(!x.choice.candidate.columns.contains(&"note".to_string()), "{text}");
        assert_ne!(x.choice.candidate.columns, ["id"], "{text}");
    }
    // an index the planner (and HypoPG) expects to help, slower for real:
    // withdrawn, with the statement it slowed
    let late = r.statements.iter().position(|s| s.query.contains("lower(kind)")).expect("captured");
    assert!(r.statements[late].bottlenecks.iter().any(|b| b.kind == "non-sargable predicate"), "{text}");
    let w = r.withdrawn.iter().find(|x| x.choice.candidate.table == "events").expect(&text);
    assert_eq!(w.choice.candidate.columns, ["created_at"], "{text}");
    assert!(w.verdict.as_ref().is_some_and(|v| v.slower.contains(&late)), "{text}");
    assert!(!r.recommended.iter().any(|x| x.choice.candidate.table == "events"), "{text}");
    // the index on the column the updates keep writing: declined, and why
    let hot = r.declined.iter().find(|c| c.candidate.columns == ["last_seen"]).expect(&text);
    assert!(hot.breaks_hot && hot.write_ms_cost > hot.read_ms_saved, "{text}");
    assert!(!r.recommended.iter().any(|x| x.choice.candidate.columns == ["last_seen"]), "{text}");
    // the duplicate of the primary key and the unused index are proposed for removal
    let drops: Vec<&str> = r.drops.iter().map(|d| d.index.as_str()).collect();
    assert!(drops.contains(&"public.orders_id_copy") && drops.contains(&"public.orders_note_idx"), "{text}");
    assert!(!drops.iter().any(|d| d.ends_with("_pkey")), "{text}");
    // schema hints, with their numbers
    let hint = |kind: &str, object: &str| r.hints.iter().any(|h| h.kind == kind && h.object == object);
    assert!(hint("table bloat", "public.churn"), "{text}");
    assert!(hint("index bloat", "public.churn_pkey"), "{text}");
    assert!(hint("partitioning", "public.orders"), "read by ranges of created_at: {text}");
    assert!(hint("cold data", "public.archive_2020"), "{text}");
    assert!(!hint("cold data", "public.orders") && !hint("table bloat", "public.orders"), "{text}");
    assert!(!hint("cold data", "public.visits"), "read and written by the workload: {text}");
    // a statement without a plan is reported, not fatal
    assert!(r.statements.iter().any(|s| s.unplanned.is_some()), "{text}");
    // a database whose defaults would change what the advisor's own SQL
    // means (backslash escapes in its quoted names and values; an owner's
    // functions before the catalog's): the advisor's session sets both back
    let defaults = "ALTER DATABASE app SET standard_conforming_strings = off; \
                    ALTER DATABASE app SET search_path = evil, public, pg_catalog";
    assert_eq!(psql(pg.port, defaults), "");
    let later = connect(&pg, "app").await;
    advise(&later, None, &Options::default()).await.expect("advice");
    let setting = |name: &'static str| {
        let later = &later;
        async move { later.query_one(&format!("SHOW {name}"), &[]).await.expect("show").get::<_, String>(0) }
    };
    assert_eq!(setting("standard_conforming_strings").await, "on");
    assert!(setting("search_path").await.starts_with("pg_catalog"), "the catalog first");
    // a role that cannot see the other roles' statements is told so
    assert_eq!(psql(pg.port, "CREATE ROLE viewer LOGIN"), "");
    let url = format!("host=127.0.0.1 port={} user=viewer dbname=app", pg.port);
    let (viewer, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let e = advise(&viewer, None, &Options::default()).await.expect_err("texts hidden");
    assert!(e.to_string().contains("pg_read_all_stats"), "{e}");
    // applied on the advised database, then measured on the workload that runs since
    let (applied, error) = apply(&app, &r).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(applied.built.len(), r.recommended.len());
    let by_customer_sql = app.prepare("SELECT * FROM orders WHERE customer_id = $1").await.expect("prepare");
    for i in 0..30 {
        app.query(&by_customer_sql, &[&(7 + i * 101)]).await.expect("by customer");
    }
    let m = measure(&app, &applied).await.expect("measured");
    let text = report::render_measured(&m);
    let customer_idx = applied.built.iter().find(|b| b.ddl.contains("customer_id")).expect("built").name.clone();
    let customer = m.iter().find(|x| x.index == customer_idx).expect(&text);
    let i = customer.impacts.iter().find(|i| i.calls_since >= 30.0).expect(&text);
    assert!(gained(i) && i.after_ms.is_some_and(|a| a < 1.0), "{text}");
    assert!(customer.drop.is_none(), "{text}");
    let built =
        count(&app, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'postai\\_%' AND tablename = 'orders'").await;
    assert_eq!(built, r.recommended.len() as i64, "built on the advised database (app)");
    let on_scratch = count(&scratch, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'postai%'").await;
    assert_eq!(on_scratch, 0, "the scratch copy keeps no index of the verification");
}

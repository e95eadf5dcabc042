//! Attacks on the cache's first promise: a result served through the proxy
//! is one PostgreSQL could have returned to that session at that moment.
//! Every test runs the same steps through the proxy and directly against
//! PostgreSQL, with two or more sessions and roles, in the simple and the
//! extended protocol, and compares what each step returned (rows as sent,
//! or the error's SQLSTATE); hit counters show the cache took part.
//!
//! Classes (issue 12): session state changed where no SET shows it;
//! volatility from the catalog; writes whose effects the statement does not
//! name (triggers, cascades, views); one key spelled differently; what a
//! function reads and who may read; the change stream read by its grammar
//! and a replaced slot.

mod pg;

use std::time::Duration;

use pg::{Pg, eventually_within, psql};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const SCHEMA: &str = r#"
CREATE ROLE app LOGIN; CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE finance;
GRANT finance TO alice; ALTER ROLE alice BYPASSRLS;
CREATE TABLE tdocs (id int PRIMARY KEY, tenant int NOT NULL, body text);
INSERT INTO tdocs VALUES (1, 1, 't1-a'), (2, 1, 't1-b'), (3, 2, 't2-a');
ALTER TABLE tdocs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON tdocs USING (tenant = current_setting('app.tenant', true)::int);
CREATE FUNCTION set_tenant(t int) RETURNS text LANGUAGE sql VOLATILE AS $$ SELECT set_config('app.tenant', t::text, false) $$;
CREATE PROCEDURE set_tenant_proc(t int) LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('app.tenant', t::text, false); END $$;
CREATE TABLE salaries (id int PRIMARY KEY, amount int); INSERT INTO salaries VALUES (1, 100), (2, 200);
GRANT SELECT ON salaries TO finance;
CREATE TABLE odocs (id int PRIMARY KEY, owner text NOT NULL); INSERT INTO odocs VALUES (1, 'alice'), (2, 'bob');
ALTER TABLE odocs ENABLE ROW LEVEL SECURITY; CREATE POLICY own ON odocs USING (owner = current_user);
CREATE SCHEMA s2; CREATE TABLE public.sp (v text); CREATE TABLE s2.sp (v text);
INSERT INTO public.sp VALUES ('public'); INSERT INTO s2.sp VALUES ('s2');
CREATE SEQUENCE seq;
CREATE FUNCTION clock_wrapper() RETURNS text LANGUAGE sql VOLATILE AS $$ SELECT clock_timestamp()::text $$;
CREATE FUNCTION next_id() RETURNS bigint LANGUAGE sql VOLATILE AS $$ SELECT nextval('seq') $$;
CREATE TABLE prices (id int PRIMARY KEY, v text); INSERT INTO prices VALUES (1, '10');
CREATE FUNCTION price_of(int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT v FROM prices WHERE id = $1 $$;
CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;
CREATE TABLE audit (n serial PRIMARY KEY, item int);
CREATE FUNCTION audit_item() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit (item) VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER items_audit AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_item();
CREATE TABLE parent (id int PRIMARY KEY); INSERT INTO parent VALUES (1), (2);
CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent ON DELETE CASCADE);
INSERT INTO child VALUES (10, 1), (11, 1), (20, 2);
CREATE VIEW items_v AS SELECT id, v FROM items;
CREATE TABLE tricky (note text, id int PRIMARY KEY, v text); INSERT INTO tricky VALUES ('n', 5, 'old'), ('n', 99, 'other');
CREATE TABLE "a: b" (id int PRIMARY KEY, v text); INSERT INTO "a: b" VALUES (1, 'old');
CREATE TABLE udocs (id uuid PRIMARY KEY, v text); INSERT INTO udocs VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'old');
GRANT USAGE ON SCHEMA s2 TO alice;
GRANT SELECT ON ALL TABLES IN SCHEMA public, s2 TO alice, bob;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app;
REVOKE ALL ON salaries FROM app, alice, bob;
"#;

/// A primary with the schema, an optional streaming replica, and a proxy
/// with no `[[tables]]` (keys and everything else come from the catalog).
/// CDC polls every `poll_ms`: slow polls show whether a session's own
/// writes are read back without the stream's help.
struct Fixture {
    pg: Pg,
    _replica: Option<Pg>,
    port: u16,
    rt: pg::Proxy,
}

fn fixture(name: &str, replica: bool, poll_ms: u64) -> Fixture {
    let pg = Pg::start(name);
    let out = psql(pg.port, SCHEMA);
    assert!(!out.contains("ERROR"), "schema: {out}");
    let replica = replica.then(|| {
        let r = pg.start_replica(&format!("{name}-r"), 0);
        assert!(eventually_within(Duration::from_secs(30), || psql(r.port, "SELECT count(*) FROM items") == "100"));
        r
    });
    let replicas = replica.iter().map(|r| format!("'{}'", r.addr())).collect::<Vec<_>>().join(", ");
    // keys configured as a user moving from an older release has them; the
    // catalog gives their types (and every other table's key)
    let tables = "[[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n\
                  [[tables]]\nname = 'tricky'\nprimary_key = 'id'\ninteger_key = true\n\
                  [[tables]]\nname = 'a: b'\nprimary_key = 'id'\n\
                  [[tables]]\nname = 'udocs'\nprimary_key = 'id'\n";
    let config = format!(
        "upstream = '{}'\nreplicas = [{replicas}]\n{tables}[cdc]\npoll_ms = {poll_ms}\nsilence_max_ms = 60000\n",
        pg.addr()
    );
    let rt = pg::start_proxy(&config);
    let port = rt.port;
    assert!(eventually_within(Duration::from_secs(20), || pg::stat_n(port, "filling") > 0), "CDC connected");
    if replica.is_some() {
        // reads go to the replica once its health is known
        assert!(eventually_within(Duration::from_secs(20), || {
            psql(port, "SELECT v FROM items WHERE id = 100") == "v100" && pg::stat_n(port, "replica_reads") > 0
        }));
    }
    Fixture { pg, _replica: replica, port, rt }
}

async fn connect(port: u16, user: &str) -> Client {
    connect_as(port, user, &[]).await
}

async fn connect_as(port: u16, user: &str, options: &[(&str, &str)]) -> Client {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1").port(port).user(user).dbname("postgres");
    for (k, v) in options {
        if *k == "application_name" {
            c.application_name(*v);
        }
    }
    let (client, conn) = c.connect(NoTls).await.unwrap_or_else(|e| panic!("connect {user}@{port}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A value's bytes as the server sent them.
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Protocol {
    Simple,
    Extended,
}

/// What one statement returned: its rows (the last result of a simple
/// query; the bytes of each value, hex, for the extended protocol) or its
/// error's SQLSTATE.
async fn outcome(c: &Client, protocol: Protocol, sql: &str) -> String {
    match protocol {
        Protocol::Simple => match c.simple_query(sql).await {
            Ok(msgs) => {
                let mut rows: Vec<String> = Vec::new();
                for m in msgs {
                    match m {
                        SimpleQueryMessage::RowDescription(_) => rows.clear(),
                        SimpleQueryMessage::Row(r) => rows.push(
                            (0..r.len()).map(|i| r.get(i).unwrap_or("∅").to_string()).collect::<Vec<_>>().join("|"),
                        ),
                        _ => {}
                    }
                }
                rows.join("\n")
            }
            Err(e) => format!("ERROR {}", e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string())),
        },
        Protocol::Extended => match c.query(sql, &[]).await {
            Ok(rows) => rows
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| match r.get::<_, Raw>(i).0 {
                            Some(b) => b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
                            None => "∅".into(),
                        })
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("ERROR {}", e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string())),
        },
    }
}

/// One step of a script: which session, which protocol, which statement.
type Step<'a> = (usize, Protocol, &'a str);

/// Runs `steps` with `users.len()` sessions against `port`; every step's outcome.
async fn run_script(port: u16, users: &[&str], steps: &[Step<'_>]) -> Vec<String> {
    let mut sessions = Vec::new();
    for u in users {
        sessions.push(connect(port, u).await);
    }
    let mut out = Vec::new();
    for (s, protocol, sql) in steps {
        out.push(outcome(&sessions[*s], *protocol, sql).await);
    }
    out
}

/// The script through the proxy and directly: the same outcome at every
/// step, or a list of the steps that differ.
async fn compare(f: &Fixture, users: &[&str], steps: &[Step<'_>]) -> Vec<String> {
    let direct = run_script(f.pg.port, users, steps).await;
    let proxied = run_script(f.port, users, steps).await;
    let mut diffs = Vec::new();
    for (i, ((d, p), (s, protocol, sql))) in direct.iter().zip(&proxied).zip(steps).enumerate() {
        if d != p {
            diffs.push(format!(
                "step {i}, session {s} ({}), {protocol:?} `{sql}`:\n  PostgreSQL: {d:?}\n  proxy:      {p:?}",
                users[*s]
            ));
        }
    }
    diffs
}

fn hits(port: u16) -> u64 {
    pg::stat_n(port, "l1_hits") + pg::stat_n(port, "l2_hits")
}

/// Row-level security keyed on a session variable (the PostgREST/Supabase
/// pattern), the variable set in every way PostgreSQL allows: each tenant's
/// session sees its own rows, never a row cached for another, and never an
/// error PostgreSQL would not raise (a replica connection without the
/// setting). A third session that set nothing sees nothing.
#[test]
fn tenants_set_in_any_way_never_share_rows() {
    let f = fixture("tenants", true, 100);
    let setters: [(&str, &str, &str); 7] = [
        ("SET", "SET app.tenant = '1'", "SET app.tenant = '2'"),
        ("set_config", "SELECT set_config('app.tenant', '1', false)", "SELECT set_config('app.tenant', '2', false)"),
        ("a SQL function", "SELECT set_tenant(1)", "SELECT set_tenant(2)"),
        (
            "DO",
            "DO $$ BEGIN PERFORM set_config('app.tenant', '1', false); END $$",
            "DO $$ BEGIN PERFORM set_config('app.tenant', '2', false); END $$",
        ),
        ("CALL", "CALL set_tenant_proc(1)", "CALL set_tenant_proc(2)"),
        ("a multi-statement string", "SELECT 1; SET app.tenant = '1'", "SELECT 1; SET app.tenant = '2'"),
        (
            "set_config in a WHERE",
            "SELECT 1 WHERE set_config('app.tenant', '1', false) IS NOT NULL",
            "SELECT 1 WHERE set_config('app.tenant', '2', false) IS NOT NULL",
        ),
    ];
    let reads = [
        "SELECT id, tenant, body FROM tdocs ORDER BY id",
        "SELECT body FROM tdocs WHERE id = 3",
        "SELECT current_setting('app.tenant', true)",
        "SELECT count(*) FROM tdocs",
    ];
    let before = hits(f.port);
    let mut failures = Vec::new();
    f.rt.block_on(async {
        for (how, one, two) in setters {
            let mut steps: Vec<Step> = vec![(0, Protocol::Simple, one)];
            for round in 0..2 {
                for read in reads {
                    for p in [Protocol::Simple, Protocol::Extended] {
                        steps.push((0, p, read));
                        if round == 0 {
                            steps.push((1, p, read));
                        }
                        steps.push((2, p, read));
                    }
                }
                if round == 0 {
                    steps.push((1, Protocol::Simple, two));
                }
            }
            for read in reads {
                steps.push((1, Protocol::Simple, read));
                steps.push((1, Protocol::Extended, read));
            }
            let diffs = compare(&f, &["app", "app", "app"], &steps).await;
            failures.extend(diffs.into_iter().map(|d| format!("[{how}] {d}")));
        }
    });
    assert!(failures.is_empty(), "{} steps differ:\n{}", failures.len(), failures.join("\n"));
    assert!(hits(f.port) > before, "the cache answered some of the reads");
}

/// `set_config('role', ...)` and `set_config('session_authorization', ...)`
/// change whose privileges apply: a superuser session that dropped to bob
/// must be refused what bob may not read, though the superuser's rows are
/// cached; and a SET ROLE in a DO block the same.
#[test]
fn privileges_dropped_without_set_role() {
    let f = fixture("droprole", false, 100);
    f.rt.block_on(async {
        for drop in [
            "SELECT set_config('role', 'bob', false)",
            "DO $$ BEGIN EXECUTE 'SET ROLE bob'; END $$",
            "SELECT 1; SET ROLE bob",
        ] {
            let steps: Vec<Step> = vec![
                (0, Protocol::Simple, "SELECT amount FROM salaries WHERE id = 1"),
                (0, Protocol::Extended, "SELECT amount FROM salaries ORDER BY id"),
                (1, Protocol::Simple, "SELECT amount FROM salaries WHERE id = 1"),
                (1, Protocol::Simple, drop),
                (1, Protocol::Simple, "SELECT amount FROM salaries WHERE id = 1"),
                (1, Protocol::Extended, "SELECT amount FROM salaries ORDER BY id"),
                (1, Protocol::Simple, "SELECT current_user"),
                (1, Protocol::Simple, "SELECT id, owner FROM odocs ORDER BY id"),
                (0, Protocol::Simple, "SELECT id, owner FROM odocs ORDER BY id"),
            ];
            let diffs = compare(&f, &["postgres", "postgres"], &steps).await;
            assert!(diffs.is_empty(), "after `{drop}`:\n{}", diffs.join("\n"));
        }
    });
}

/// Functions whose result changes though no data does: never cached, and
/// run where PostgreSQL would run them (a function that calls nextval on a
/// read-only replica fails with 25006; the primary runs it).
#[test]
fn volatility_comes_from_the_catalog() {
    let f = fixture("volatile", true, 100);
    f.rt.block_on(async {
        let c = connect(f.port, "app").await;
        for sql in ["SELECT next_id()", "SELECT nextval('seq')"] {
            let a = outcome(&c, Protocol::Simple, sql).await;
            let b = outcome(&c, Protocol::Extended, sql).await;
            assert!(!a.starts_with("ERROR") && !b.starts_with("ERROR"), "{sql}: {a} / {b}");
            assert_ne!(outcome(&c, Protocol::Simple, sql).await, a, "{sql} cached");
        }
        for sql in [
            "SELECT clock_wrapper()",
            "SELECT 'now'::timestamptz",
            "SELECT timestamp 'NOW'",
            "SELECT CAST('now' AS timestamptz)::text",
            "SELECT now()",
            "SELECT clock_timestamp()",
        ] {
            for p in [Protocol::Simple, Protocol::Extended] {
                let a = outcome(&c, p, sql).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert_ne!(outcome(&c, p, sql).await, a, "{sql} ({p:?}) served twice");
            }
        }
        // a parameter naming the current time
        let stmt = c.prepare_typed("SELECT $1::timestamptz::text", &[Type::TEXT]).await.expect("prepare");
        let a: String = c.query_one(&stmt, &[&"now"]).await.expect("read").get(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b: String = c.query_one(&stmt, &[&"now"]).await.expect("read").get(0);
        assert_ne!(a, b, "a 'now' parameter served from the cache");
        // the backend and snapshot are the session's own, on the primary
        let mut pids = Vec::new();
        for i in 0..3 {
            let name = format!("attack-{i}");
            let s = connect_as(f.port, "app", &[("application_name", &name)]).await;
            let pid = outcome(&s, Protocol::Simple, "SELECT pg_backend_pid()").await;
            let direct =
                psql(f.pg.port, &format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{name}'"));
            assert_eq!(pid, direct, "session {i}'s backend is its own connection to the primary");
            pids.push(pid);
        }
        pids.dedup();
        assert_eq!(pids.len(), 3);
        let snap = outcome(&c, Protocol::Simple, "SELECT pg_current_snapshot()").await;
        psql(f.pg.port, "UPDATE items SET v = 'snap' WHERE id = 90");
        assert_ne!(outcome(&c, Protocol::Simple, "SELECT pg_current_snapshot()").await, snap);
        // a STABLE function that reads another table
        let read = "SELECT price_of(1)";
        assert_eq!(outcome(&c, Protocol::Simple, read).await, "10");
        assert_eq!(outcome(&c, Protocol::Simple, read).await, "10");
        psql(f.pg.port, "UPDATE prices SET v = '11' WHERE id = 1");
        assert_eq!(outcome(&c, Protocol::Simple, read).await, "11", "a direct write to the table it reads");
        assert_eq!(outcome(&c, Protocol::Simple, "UPDATE prices SET v = '12' WHERE id = 1").await, "");
        assert_eq!(outcome(&c, Protocol::Extended, read).await, "3132", "its own write (bytes of '12')");
    });
}

/// A session's writes whose effects reach rows the statement does not name
/// (a trigger's insert into another table, ON DELETE CASCADE, an update
/// through a view, a write read back through a view) are read back at once,
/// with the change stream polled only every 3 s.
#[test]
fn writes_the_statement_does_not_name_are_read_back() {
    let f = fixture("effects", false, 3000);
    f.rt.block_on(async {
        let steps: Vec<Step> = vec![
            (0, Protocol::Simple, "SELECT count(*) FROM audit"),
            (0, Protocol::Extended, "SELECT count(*) FROM audit"),
            (0, Protocol::Simple, "SELECT count(*) FROM audit"),
            (0, Protocol::Simple, "UPDATE items SET v = 'trig' WHERE id = 1"),
            (0, Protocol::Simple, "SELECT count(*) FROM audit"),
            (0, Protocol::Extended, "SELECT count(*) FROM audit"),
            (0, Protocol::Simple, "SELECT id FROM child WHERE parent = 1 ORDER BY id"),
            (0, Protocol::Simple, "SELECT id FROM child WHERE parent = 1 ORDER BY id"),
            (0, Protocol::Extended, "SELECT id FROM child WHERE id = 10"),
            (0, Protocol::Simple, "DELETE FROM parent WHERE id = 1"),
            (0, Protocol::Simple, "SELECT id FROM child WHERE parent = 1 ORDER BY id"),
            (0, Protocol::Extended, "SELECT id FROM child WHERE id = 10"),
            (0, Protocol::Simple, "SELECT v FROM items WHERE id = 2"),
            (0, Protocol::Simple, "SELECT v FROM items WHERE id = 2"),
            (0, Protocol::Simple, "UPDATE items_v SET v = 'via view' WHERE id = 2"),
            (0, Protocol::Simple, "SELECT v FROM items WHERE id = 2"),
            (0, Protocol::Extended, "SELECT v FROM items WHERE id = 2"),
            (0, Protocol::Simple, "SELECT v FROM items_v WHERE id = 3"),
            (0, Protocol::Simple, "SELECT v FROM items_v WHERE id = 3"),
            (0, Protocol::Simple, "UPDATE items SET v = 'base' WHERE id = 3"),
            (0, Protocol::Simple, "SELECT v FROM items_v WHERE id = 3"),
            (0, Protocol::Extended, "SELECT v FROM items_v WHERE id = 3"),
            (0, Protocol::Simple, "SELECT v FROM items_v WHERE id = 4"),
            (0, Protocol::Extended, "UPDATE items SET v = 'ext' WHERE id = 4"),
            (0, Protocol::Simple, "SELECT v FROM items_v WHERE id = 4"),
        ];
        let diffs = against_the_database(&f, "app", &steps).await;
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    });
}

/// Runs `steps` through the proxy in one session of `user`, writes
/// included; after each read, the same read directly is the truth at that
/// moment (the session holds no state a fresh one lacks). The steps that
/// differ.
async fn against_the_database(f: &Fixture, user: &str, steps: &[Step<'_>]) -> Vec<String> {
    let proxied = connect(f.port, user).await;
    let direct = connect(f.pg.port, user).await;
    let mut diffs = Vec::new();
    for (i, (_, protocol, sql)) in steps.iter().enumerate() {
        let got = outcome(&proxied, *protocol, sql).await;
        let write = ["update", "delete", "insert"].iter().any(|w| sql.to_ascii_lowercase().starts_with(w));
        if write {
            assert!(!got.starts_with("ERROR"), "step {i}, `{sql}`: {got}");
            continue;
        }
        let want = outcome(&direct, *protocol, sql).await;
        if got != want {
            diffs.push(format!("step {i}, {protocol:?} `{sql}`:\n  PostgreSQL: {want:?}\n  proxy:      {got:?}"));
        }
    }
    diffs
}

/// Another session's direct write to a table read through a view reaches the
/// view's cached entry within the change stream's delay, not the TTL.
#[test]
fn a_view_follows_its_base_table() {
    let f = fixture("view", false, 100);
    f.rt.block_on(async {
        let c = connect(f.port, "app").await;
        for _ in 0..2 {
            assert_eq!(outcome(&c, Protocol::Simple, "SELECT v FROM items_v WHERE id = 7").await, "v7");
        }
        assert!(hits(f.port) > 0);
        psql(f.pg.port, "UPDATE items SET v = 'moved' WHERE id = 7");
        let fresh = tokio::time::timeout(Duration::from_secs(5), async {
            while outcome(&c, Protocol::Simple, "SELECT v FROM items_v WHERE id = 7").await != "moved" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(fresh.await.is_ok(), "the view's entry still stale 5 s after the write");
    });
}

/// Spellings PostgreSQL reads as one key share invalidation: the session's
/// own write, and a direct write arriving through the change stream.
#[test]
fn one_key_spelled_differently() {
    let f = fixture("spelling", false, 100);
    let spellings = ["70", "070", "' 70'", "'070'", "70.0", "'+70'"];
    f.rt.block_on(async {
        let c = connect(f.port, "app").await;
        let read = |s: &str| format!("SELECT v FROM items WHERE id = {s}");
        let before = hits(f.port);
        for round in 0..3 {
            let value = format!("w{round}");
            for s in spellings {
                for _ in 0..2 {
                    assert_ne!(outcome(&c, Protocol::Simple, &read(s)).await, value, "{s}");
                }
            }
            let stmt = c.prepare_typed("SELECT v FROM items WHERE id = $1", &[Type::INT4]).await.expect("prepare");
            for p in [" 70", "070", "+70"] {
                let _ = c.query(&stmt, &[&pg_text(p)]).await;
            }
            if round < 2 {
                // the session's own write, spelled one way
                let w = format!("UPDATE items SET v = '{value}' WHERE id = {}", spellings[round * 2 + 1]);
                assert_eq!(outcome(&c, Protocol::Simple, &w).await, "", "{w}");
                // (answers are filed once the primary's visible position, probed
                // each poll, has passed the write: until then repeats miss)
                tokio::time::sleep(Duration::from_millis(300)).await;
                for s in spellings {
                    assert_eq!(outcome(&c, Protocol::Simple, &read(s)).await, value, "own write, read as {s}");
                }
                for p in [" 70", "070", "+70"] {
                    let got: String = c.query_one(&stmt, &[&pg_text(p)]).await.expect("read").get(0);
                    assert_eq!(got, value, "own write, read with parameter {p:?}");
                }
            } else {
                psql(f.pg.port, &format!("UPDATE items SET v = '{value}' WHERE id = 70"));
                for s in spellings {
                    let fresh = tokio::time::timeout(Duration::from_secs(5), async {
                        while outcome(&c, Protocol::Simple, &read(s)).await != value {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    assert!(fresh.await.is_ok(), "a direct write, read as {s}: stale after 5 s");
                }
            }
        }
        assert!(hits(f.port) > before + 6, "repeats were answered by the cache");
        // a uuid key in upper case, braces, no hyphens
        for form in ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"] {
            let sql = format!("SELECT v FROM udocs WHERE id = '{form}'");
            let old = outcome(&c, Protocol::Simple, &sql).await;
            outcome(&c, Protocol::Simple, &sql).await;
            let new = format!("{old}+");
            psql(f.pg.port, &format!("UPDATE udocs SET v = '{new}'"));
            let fresh = tokio::time::timeout(Duration::from_secs(5), async {
                while outcome(&c, Protocol::Simple, &sql).await != new {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            assert!(fresh.await.is_ok(), "uuid read as {form}: stale after 5 s");
        }
    });
}

/// A text parameter for an integer key (tokio-postgres would send an INT4
/// in binary; the attack spells it).
fn pg_text(s: &str) -> TextParam<'_> {
    TextParam(s)
}

#[derive(Debug)]
struct TextParam<'a>(&'a str);

impl tokio_postgres::types::ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    fn encode_format(&self, _: &Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }
    tokio_postgres::types::to_sql_checked!();
}

/// Privileges changed on the primary with no DDL event (role membership,
/// role attributes, per-role settings): a session that logs in afterwards is
/// answered as PostgreSQL answers it, not from what was cached before.
#[test]
fn role_changes_made_directly_reach_the_cache() {
    let f = fixture("roles", false, 100);
    f.rt.block_on(async {
        // cached while alice may read salaries, bypasses RLS, reads public.sp
        for _ in 0..2 {
            let alice = connect(f.port, "alice").await;
            assert_eq!(outcome(&alice, Protocol::Simple, "SELECT amount FROM salaries WHERE id = 1").await, "100");
            assert_eq!(
                outcome(&alice, Protocol::Simple, "SELECT id, owner FROM odocs ORDER BY id").await,
                "1|alice\n2|bob"
            );
            assert_eq!(outcome(&alice, Protocol::Simple, "SELECT v FROM sp").await, "public");
        }
        psql(
            f.pg.port,
            "REVOKE finance FROM alice; ALTER ROLE alice NOBYPASSRLS; ALTER ROLE alice SET search_path = s2, public",
        );
        let cases = [
            ("SELECT amount FROM salaries WHERE id = 1", "ERROR 42501"),
            ("SELECT id, owner FROM odocs ORDER BY id", "1|alice"),
            ("SELECT v FROM sp", "s2"),
        ];
        for (sql, want) in cases {
            let fresh = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let alice = connect(f.port, "alice").await;
                    if outcome(&alice, Protocol::Simple, sql).await == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            assert!(fresh.await.is_ok(), "a new alice session after the role change: `{sql}` not {want} after 5 s");
        }
    });
}

/// Direct writes the change stream must report unambiguously: a text column
/// (before the key) whose value spells another key column, a table whose
/// name contains `: `, and a slot dropped and created again around a write.
#[test]
fn the_change_stream_is_read_by_its_grammar() {
    let f = fixture("stream", false, 100);
    f.rt.block_on(async {
        let c = connect(f.port, "app").await;
        let cases = [
            (
                "SELECT v FROM tricky WHERE id = 5",
                "UPDATE tricky SET note = 'x id[integer]:99 y', v = 'new' WHERE id = 5",
                "new",
            ),
            (
                "SELECT v FROM tricky WHERE id = 5",
                "UPDATE tricky SET note = 'x id[integer]:'' y id[integer]:''7', v = 'newer' WHERE id = 5",
                "newer",
            ),
            ("SELECT v FROM \"a: b\" WHERE id = 1", "UPDATE \"a: b\" SET v = 'new' WHERE id = 1", "new"),
            ("SELECT count(*) FROM \"a: b\"", "TRUNCATE tricky, \"a: b\"", "0"),
        ];
        for (read, write, want) in cases {
            outcome(&c, Protocol::Simple, read).await;
            outcome(&c, Protocol::Simple, read).await;
            psql(f.pg.port, write);
            let fresh = tokio::time::timeout(Duration::from_secs(5), async {
                while outcome(&c, Protocol::Simple, read).await != want {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            assert!(fresh.await.is_ok(), "`{read}` after `{write}`: stale after 5 s");
        }
        // the slot dropped and created again around a direct write
        for round in 0..3 {
            let read = format!("SELECT v FROM items WHERE id = {}", 50 + round);
            outcome(&c, Protocol::Simple, &read).await;
            outcome(&c, Protocol::Simple, &read).await;
            let out = psql(
                f.pg.port,
                &format!(
                    "SELECT pg_drop_replication_slot('postai'); UPDATE items SET v = 'lost{round}' WHERE id = {}; \
                     SELECT 1 FROM pg_create_logical_replication_slot('postai', 'test_decoding')",
                    50 + round
                ),
            );
            if out.contains("ERROR") {
                // the reader was peeking at that moment (the slot is active): try the next round
                continue;
            }
            let want = format!("lost{round}");
            let fresh = tokio::time::timeout(Duration::from_secs(8), async {
                while outcome(&c, Protocol::Simple, &read).await != want {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            assert!(fresh.await.is_ok(), "a write around a replaced slot: stale after 8 s (round {round})");
        }
    });
}

/// A read that starts after another session's write was acknowledged by the
/// same proxy: with `postai.consistency=proxy` it never returns the old
/// value, though misses would go to a replica 300 ms behind; with the
/// default (read-your-writes) only the writer is promised its write.
#[test]
fn proxy_consistency_orders_reads_after_any_acknowledged_write() {
    let pg = Pg::start("order");
    assert!(!psql(pg.port, SCHEMA).contains("ERROR"));
    let replica = pg.start_replica("order-r", 300);
    assert!(eventually_within(Duration::from_secs(30), || psql(replica.port, "SELECT count(*) FROM items") == "100"));
    let rt = pg::start_proxy(&format!(
        "upstream = '{}'\nreplicas = ['{}']\n[cdc]\npoll_ms = 1000\nsilence_max_ms = 60000\n",
        pg.addr(),
        replica.addr()
    ));
    let port = rt.port;
    assert!(eventually_within(Duration::from_secs(20), || pg::stat_n(port, "filling") > 0));
    assert!(eventually_within(Duration::from_secs(20), || {
        psql(port, "SELECT v FROM items WHERE id = 100") == "v100" && pg::stat_n(port, "replica_reads") > 0
    }));
    rt.block_on(async {
        let connect_mode = |mode: &'static str| async move {
            let mut c = tokio_postgres::Config::new();
            c.host("127.0.0.1").port(port).user("app").dbname("postgres");
            c.options(format!("-c postai.consistency={mode}"));
            let (client, conn) = c.connect(NoTls).await.expect("connect");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        };
        let writer = connect(port, "app").await;
        let mut stale = [0u32; 2];
        for (m, mode) in ["proxy", "read-your-writes"].into_iter().enumerate() {
            let reader = connect_mode(mode).await;
            for trial in 0..20 {
                let id = 20 + trial + 20 * m;
                let read = format!("SELECT v FROM items WHERE id = {id}");
                // cached before the write
                outcome(&reader, Protocol::Simple, &read).await;
                let value = format!("{mode}-{trial}");
                let w = format!("UPDATE items SET v = '{value}' WHERE id = {id}");
                assert_eq!(outcome(&writer, Protocol::Simple, &w).await, "");
                if outcome(&reader, Protocol::Simple, &read).await != value {
                    stale[m] += 1;
                }
            }
        }
        assert_eq!(stale[0], 0, "proxy consistency: reads after an acknowledged write returned the old value");
        eprintln!("read-your-writes: {} of 20 reads after another session's write were stale (allowed)", stale[1]);
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(port).user("app").dbname("postgres").options("-c postai.consistency=sometimes");
        let e = c.connect(NoTls).await.err().expect("an unknown consistency mode is refused");
        assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
    });
}

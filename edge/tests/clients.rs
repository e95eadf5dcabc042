//! Real client libraries through the proxy: tokio-postgres (simple and
//! extended protocol, binary results), psycopg 3 and node-postgres (scripts
//! under tests/clients/), the exact bytes of every common type direct versus
//! through the proxy (miss and cached hit), and row-level security: roles,
//! `SET ROLE` and `search_path` must never share cached rows.
//!
//! The client libraries are installed by .ci/run: `python3-psycopg` (Debian)
//! and `npm ci` in tests/clients/. A missing one fails its test.

mod pg;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::path::PathBuf;
use std::process::Command;

use bytes::BytesMut;
use pg::raw::{self, bind, describe_portal, execute, parse, sync, tags, values};
use pg::{Pg, eventually, psql, start_proxy_with, stat_n as stat};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, GenericClient, NoTls, SimpleQueryMessage};

// ---------------------------------------------------------------- harness

/// A proxy with key-level invalidation for `items` and `docs`, CDC on; waits
/// until the CDC stream is heard (nothing is served from the cache before).
/// CDC polls every second: slow enough that it cannot hide a read-your-writes
/// bug (the session's own write must invalidate, not the CDC stream later).
fn start_proxy(pg: &Pg) -> (u16, pg::Proxy) {
    let (port, rt) = start_proxy_with(
        pg,
        "[[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n\
         [[tables]]\nname = 'docs'\nprimary_key = 'id'\ninteger_key = true\n\
         [cdc]\npoll_ms = 1000\nsilence_max_ms = 30000\n",
    );
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    (port, rt)
}

/// Runs `sql` directly on the primary as postgres; it must succeed.
fn setup(pg: &Pg, sql: &str) {
    let out = psql(pg.port, sql);
    assert!(!out.contains("ERROR"), "setup failed: {out}");
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;";

async fn connect_config(config: tokio_postgres::Config) -> Client {
    let (client, conn) = config.connect(NoTls).await.unwrap_or_else(|e| panic!("connect {config:?}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("tokio-postgres connection: {e}");
        }
    });
    client
}

fn client_config(port: u16, user: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1").port(port).user(user).dbname("postgres");
    c
}

async fn connect(port: u16, user: &str) -> Client {
    connect_config(client_config(port, user)).await
}

/// Column names and rows of the (last) result of a simple query, text as sent.
type TextResult = (Vec<String>, Vec<Vec<Option<String>>>);

async fn simple(c: &impl GenericClient, sql: &str) -> TextResult {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                names = cols.iter().map(|c| c.name().to_string()).collect();
                rows.clear();
            }
            SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            _ => {}
        }
    }
    (names, rows)
}

/// The rows of a simple query, each row's columns joined with `|` (NULL as `∅`).
async fn simple_lines(c: &impl GenericClient, sql: &str) -> Vec<String> {
    simple(c, sql).await.1.into_iter().map(|r| join_row(&r)).collect()
}

fn join_row(r: &[Option<String>]) -> String {
    r.iter().map(|v| v.as_deref().unwrap_or("∅")).collect::<Vec<_>>().join("|")
}

/// A counter of `SHOW POSTAI STATS`, asked through `c` (simple protocol).
async fn astat(c: &Client, name: &str) -> u64 {
    let (_, rows) = simple(c, "SHOW POSTAI STATS").await;
    rows.iter()
        .find(|r| r.first().and_then(|v| v.as_deref()) == Some(name))
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("stat {name} in SHOW POSTAI STATS: {rows:?}"))
}

/// A parameter sent in text format (tokio-postgres sends binary by default).
#[derive(Debug)]
struct Text<'a>(&'a str);

impl ToSql for Text<'_> {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }
    to_sql_checked!();
}

/// The raw bytes of a value as the server sent them (`None` for NULL).
#[derive(Debug, PartialEq, Eq)]
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Column names and types, and every value's bytes, of binary-format rows.
type BinaryResult = (Vec<(String, u32)>, Vec<Vec<Raw>>);

fn binary_result(stmt: &tokio_postgres::Statement, rows: &[tokio_postgres::Row]) -> BinaryResult {
    let columns = stmt.columns().iter().map(|c| (c.name().to_string(), c.type_().oid())).collect();
    let rows = rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i)).collect()).collect();
    (columns, rows)
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {e:?}"))
}

// ---------------------------------------------------------------- tokio-postgres

/// tokio-postgres through the proxy: simple queries, prepared statements
/// (named; no parameters, text-format parameters) answered from the cache on
/// repeats, unnamed statements, and errors reaching the client with their
/// SQLSTATE and fields intact (also inside a transaction). Writes and
/// transactions: `tokio_postgres_read_your_writes`.
#[test]
fn tokio_postgres_through_the_proxy() {
    let pg = Pg::start("tp");
    setup(&pg, ITEMS);
    let (port, rt) = start_proxy(&pg);
    rt.block_on(async {
        let c = connect(port, "postgres").await;
        let direct = connect(pg.port, "postgres").await;

        // simple protocol: a miss, then a hit
        assert_eq!(simple_lines(&c, "SELECT id, v FROM items WHERE id = 7").await, ["7|v7"]);
        let hits = astat(&c, "l1_hits").await;
        assert_eq!(simple_lines(&c, "SELECT id, v FROM items WHERE id = 7").await, ["7|v7"]);
        assert_eq!(astat(&c, "l1_hits").await, hits + 1, "second simple read served from L1");

        // a named prepared statement without parameters: Bind/Execute/Sync repeated
        let stmt = c.prepare("SELECT id, v FROM items WHERE id = 3").await.expect("prepare");
        let hits = astat(&c, "l1_hits").await;
        for _ in 0..3 {
            let rows = c.query(&stmt, &[]).await.expect("query");
            assert_eq!(rows.len(), 1);
            assert_eq!((rows[0].get::<_, i32>(0), rows[0].get::<_, String>(1)), (3, "v3".to_string()));
        }
        assert!(astat(&c, "l1_hits").await >= hits + 2, "repeats of a prepared statement served from L1");

        // a named prepared statement with text-format parameters
        let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        let hits = astat(&c, "l1_hits").await;
        for _ in 0..3 {
            for (id, v) in [("4", "v4"), ("5", "v5")] {
                let rows = c.query(&stmt, &[&Text(id)]).await.expect("query");
                assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), [v]);
            }
        }
        assert!(astat(&c, "l1_hits").await >= hits + 4, "repeats with the same parameters served from L1");
        // binary parameters: correct answers (caching them: see the test below)
        let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        for id in [6, 6, 60] {
            let rows = c.query(&stmt, &[&id]).await.expect("query");
            assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), [format!("v{id}")]);
        }
        // unnamed statements (Parse/Bind/Describe/Execute/Sync in one go)
        for _ in 0..3 {
            let rows = c.query_typed("SELECT v FROM items WHERE id = $1", &[(&Text("9"), Type::INT4)]).await;
            assert_eq!(rows.expect("query_typed")[0].get::<_, String>(0), "v9");
        }

        // errors: SQLSTATE and every field as the primary sends them
        let errors: [(&str, &str); 4] = [
            ("INSERT INTO items VALUES (1, 'dup')", "23505"),
            ("SELEC 1", "42601"),
            ("SELECT * FROM no_such_table", "42P01"),
            ("SELECT 1 / (id - 1) FROM items WHERE id = 1", "22012"),
        ];
        for (sql, code) in errors {
            let via_simple = c.simple_query(sql).await.expect_err(sql);
            let via_extended = c.execute(sql, &[]).await.expect_err(sql);
            let direct_err = direct.simple_query(sql).await.expect_err(sql);
            assert_eq!(sqlstate(&via_simple), code, "{sql} (simple): {via_simple:?}");
            assert_eq!(sqlstate(&via_extended), code, "{sql} (extended): {via_extended:?}");
            let fields = |e: &tokio_postgres::Error| format!("{:?}", e.as_db_error());
            assert_eq!(fields(&via_simple), fields(&direct_err), "{sql}: error fields through the proxy");
        }
        let dup = c.execute("INSERT INTO items VALUES ($1, 'dup')", &[&2i32]).await.expect_err("dup");
        assert_eq!(dup.code(), Some(&SqlState::UNIQUE_VIOLATION));
        assert_eq!(dup.as_db_error().and_then(|d| d.constraint()), Some("items_pkey"));
        let syntax = c.prepare("SELECT FROM WHERE $1").await.expect_err("syntax");
        assert_eq!(syntax.code(), Some(&SqlState::SYNTAX_ERROR));
        // an error inside a transaction: the transaction is aborted, then rolled back
        {
            let mut c3 = connect(port, "postgres").await;
            let tx = c3.transaction().await.expect("begin");
            let e = tx.execute("INSERT INTO items VALUES (3, 'dup')", &[]).await.expect_err("dup");
            assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION));
            let e = tx.simple_query("SELECT 1").await.expect_err("aborted");
            assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
            tx.rollback().await.expect("rollback");
            assert_eq!(simple_lines(&c3, "SELECT v FROM items WHERE id = 3").await, ["v3"]);
        }
        // the connection is still good after all that
        let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        assert_eq!(c.query_one(&stmt, &[&Text("12")]).await.expect("read").get::<_, String>(0), "v12");
        assert_eq!(simple_lines(&c, "SELECT count(*) FROM items").await, ["100"]);
    });
}

/// Writes through tokio-postgres, each followed by reads of the same session
/// that were cached before (through both protocols): a transaction whose
/// UPDATE goes through the extended protocol (tokio-postgres sends BEGIN and
/// COMMIT as simple queries), one whose UPDATE is a simple query, a rolled
/// back one, and writes outside a transaction through either protocol.
#[test]
fn tokio_postgres_read_your_writes() {
    let pg = Pg::start("tpryw");
    setup(&pg, ITEMS);
    let (port, rt) = start_proxy(&pg);
    rt.block_on(async {
        let mut c = connect(port, "postgres").await;
        let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        let mut failures = Vec::new();
        // reads id through the extended and the simple protocol, twice each (cached)
        async fn read(c: &Client, stmt: &tokio_postgres::Statement, id: i32) -> [String; 2] {
            let text = id.to_string();
            let extended = c.query_one(stmt, &[&Text(&text)]).await.expect("read").get::<_, String>(0);
            let simple = simple_lines(c, &format!("SELECT v FROM items WHERE id = {id}")).await.join(",");
            [extended, simple]
        }
        let mut check = |what: &str, got: [String; 2], want: &str| {
            for (protocol, g) in ["extended", "simple"].iter().zip(got) {
                if g != want {
                    failures.push(format!("{what}, then a {protocol}-protocol read: want {want:?}, got {g:?}"));
                }
            }
        };
        for id in 10..=15 {
            read(&c, &stmt, id).await;
            check("cached", read(&c, &stmt, id).await, &format!("v{id}"));
        }

        let tx = c.transaction().await.expect("begin");
        let n = tx.execute("UPDATE items SET v = $1 WHERE id = $2", &[&"ten", &10i32]).await.expect("update");
        assert_eq!(n, 1);
        let inside = tx.query_one(&stmt, &[&Text("10")]).await.expect("read").get::<_, String>(0);
        check(
            "inside the transaction",
            [inside, simple_lines(&tx, "SELECT v FROM items WHERE id = 10").await.join(",")],
            "ten",
        );
        tx.commit().await.expect("commit");
        check("BEGIN; UPDATE (extended); COMMIT", read(&c, &stmt, 10).await, "ten");

        let tx = c.transaction().await.expect("begin");
        tx.batch_execute("UPDATE items SET v = 'eleven' WHERE id = 11").await.expect("update");
        tx.commit().await.expect("commit");
        check("BEGIN; UPDATE (simple); COMMIT", read(&c, &stmt, 11).await, "eleven");

        let tx = c.transaction().await.expect("begin");
        tx.execute("UPDATE items SET v = 'never' WHERE id = $1", &[&12i32]).await.expect("update");
        tx.rollback().await.expect("rollback");
        check("BEGIN; UPDATE; ROLLBACK", read(&c, &stmt, 12).await, "v12");

        let n = c.execute("UPDATE items SET v = $1 WHERE id = $2", &[&"thirteen", &13i32]).await.expect("update");
        assert_eq!(n, 1);
        check("UPDATE (extended, binary parameters)", read(&c, &stmt, 13).await, "thirteen");

        let n = c.execute("UPDATE items SET v = 'fourteen' WHERE id = $1", &[&Text("14")]).await.expect("update");
        assert_eq!(n, 1);
        check("UPDATE (extended, text parameter)", read(&c, &stmt, 14).await, "fourteen");

        c.batch_execute("UPDATE items SET v = 'fifteen' WHERE id = 15").await.expect("update");
        check("UPDATE (simple)", read(&c, &stmt, 15).await, "fifteen");

        assert!(failures.is_empty(), "stale reads after the session's own writes:\n{}", failures.join("\n"));
    });
}

/// What most tokio-postgres code does: `client.query(&stmt, &[&id])` with an
/// `i32`, which tokio-postgres sends in binary format. The repeats must be
/// served from the cache like text-format parameters are.
#[test]
fn tokio_postgres_binary_parameters_hit_the_cache() {
    let pg = Pg::start("tpbin");
    setup(&pg, ITEMS);
    let (port, rt) = start_proxy(&pg);
    rt.block_on(async {
        let c = connect(port, "postgres").await;
        let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.expect("prepare");
        let hits = astat(&c, "l1_hits").await;
        for _ in 0..3 {
            let row = c.query_one(&stmt, &[&7i32]).await.expect("query");
            assert_eq!(row.get::<_, String>(0), "v7");
        }
        let got = astat(&c, "l1_hits").await - hits;
        assert!(got >= 2, "2 of 3 reads with a binary i32 parameter served from L1; got {got} hits");
        // and a binary parameter is still a key for invalidation
        c.execute("UPDATE items SET v = 'seven' WHERE id = $1", &[&7i32]).await.expect("update");
        assert_eq!(c.query_one(&stmt, &[&7i32]).await.expect("query").get::<_, String>(0), "seven");
    });
}

// ---------------------------------------------------------------- type fidelity

const TYPES: &str = "
CREATE TABLE types (
  id int PRIMARY KEY, c_int2 int2, c_int4 int4, c_int8 int8, c_float4 float4, c_float8 float8,
  c_numeric numeric, c_bool bool, c_text text, c_varchar varchar(40), c_bytea bytea, c_date date,
  c_time time, c_timestamp timestamp, c_timestamptz timestamptz, c_interval interval, c_uuid uuid,
  c_json json, c_jsonb jsonb, c_int4s int4[], c_texts text[], c_inet inet);
INSERT INTO types VALUES
 (1, -32768, 2147483647, 9223372036854775807, 1.5, 1e20, 12345678901234567890.123456789000, true,
  'héllo wörld ☃ \\ tab	end', 'varchar ''quoted''', '\\x00ff10deadbeef', '2024-01-02', '03:04:05.123456',
  '2024-01-02 03:04:05.5', '2024-01-02 03:04:15.5+00', '1 year 2 mons 3 days 04:05:06.789',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"b\": 1,  \"a\": [1, 2.50]}', '{\"b\": 1,  \"a\": [1, 2.50]}',
  '{1,2,NULL,4}', ARRAY['a', NULL, 'with \"quotes\"', 'comma,brace}', '', 'NULL', 'back\\slash'],
  '192.168.0.1/24'),
 (2, 0, -1, -9223372036854775808, 'NaN', 'NaN', 'NaN', false, '', '', '', 'infinity', '24:00:00',
  '-infinity', 'infinity', '-1 day -00:00:00.000001', '00000000-0000-0000-0000-000000000000', 'null', '[]',
  '{}', '{}', '::1'),
 (3, 32767, -2147483648, 0, '-Infinity', '-Infinity', '-0.000000000000000000001', NULL, NULL, NULL, NULL,
  '0001-01-01 BC', '00:00:00', '1999-12-31 23:59:59.999999', '1970-01-01 00:00:00.000001+05:30',
  '178000000 years', NULL, NULL, '{\"deep\": {\"x\": [null, true, \"\\u00e9\"]}}', '{{1,2},{3,4}}',
  '{{\"a\",\"b\"},{NULL,\"\"}}', '2001:db8::1/64'),
 (4, NULL, NULL, NULL, 3.4028235e38, 2.2250738585072014e-308, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL);
";

const TYPES_READ: &str = "SELECT * FROM types ORDER BY id";

/// Every value's exact bytes, direct and through the proxy (the miss, then the
/// cached hit), in text format (simple protocol, psql) and in binary format
/// (extended protocol).
#[test]
fn every_type_is_byte_identical_through_the_proxy() {
    let pg = Pg::start("types");
    setup(&pg, TYPES);
    let (port, rt) = start_proxy(&pg);

    // psql: text format, simple protocol
    let want = psql(pg.port, TYPES_READ);
    assert!(want.contains("12345678901234567890.123456789000") && want.lines().count() == 5, "{want}");
    let hits = stat(port, "l1_hits");
    assert_eq!(psql(port, TYPES_READ), want, "psql through the proxy (miss)");
    assert_eq!(psql(port, TYPES_READ), want, "psql through the proxy (hit)");
    assert_eq!(stat(port, "l1_hits"), hits + 1, "the second psql read was a hit");

    rt.block_on(async {
        let direct = connect(pg.port, "postgres").await;
        let c = connect(port, "postgres").await;

        // text format, simple protocol
        let want = simple(&direct, "SELECT * FROM types ORDER BY id, 1").await;
        assert_eq!(want.1.len(), 5);
        for round in ["miss", "hit"] {
            let hits = astat(&c, "l1_hits").await;
            let got = simple(&c, "SELECT * FROM types ORDER BY id, 1").await;
            assert_eq!(got.0, want.0, "column names ({round})");
            for (i, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
                for (j, name) in want.0.iter().enumerate() {
                    assert_eq!(g[j], w[j], "text value of {name} in row {} ({round})", i + 1);
                }
            }
            assert_eq!(got, want, "text result ({round})");
            let hit = astat(&c, "l1_hits").await > hits;
            assert_eq!(hit, round == "hit", "simple read {round}");
        }

        // binary format, extended protocol (named statement, Bind/Execute/Sync)
        let stmt = direct.prepare(TYPES_READ).await.expect("prepare");
        let want = binary_result(&stmt, &direct.query(&stmt, &[]).await.expect("query"));
        let stmt = c.prepare(TYPES_READ).await.expect("prepare");
        for round in ["miss", "hit"] {
            let hits = astat(&c, "l1_hits").await;
            let got = binary_result(&stmt, &c.query(&stmt, &[]).await.expect("query"));
            assert_eq!(got.0, want.0, "column names and type OIDs ({round})");
            assert_eq!(got.1.len(), want.1.len(), "rows ({round})");
            for (i, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
                for (j, (name, _)) in want.0.iter().enumerate() {
                    assert_eq!(g[j], w[j], "binary value of {name} in row {} ({round})", i + 1);
                }
            }
            let hit = astat(&c, "l1_hits").await > hits;
            assert_eq!(hit, round == "hit", "binary read {round}");
        }

        // binary format with a (text) parameter: one row per id, miss then hit
        let sql = "SELECT * FROM types WHERE id = $1";
        let dstmt = direct.prepare(sql).await.expect("prepare");
        let pstmt = c.prepare(sql).await.expect("prepare");
        for id in ["1", "2", "3", "4", "5"] {
            let want = binary_result(&dstmt, &direct.query(&dstmt, &[&Text(id)]).await.expect("query"));
            for round in ["miss", "hit"] {
                let got = binary_result(&pstmt, &c.query(&pstmt, &[&Text(id)]).await.expect("query"));
                assert_eq!(got, want, "binary row {id} ({round})");
            }
        }
    });

    // text and binary formats through the extended protocol (libpq's
    // PQexecParams via psycopg): the script prints every value's bytes in hex
    let want = run_psycopg(&["types", &pg.port.to_string()]);
    assert!(want.lines().filter(|l| l.starts_with("text ") || l.starts_with("binary ")).count() >= 2 * 5 * 22);
    let hits = stat(port, "l1_hits");
    let got = run_psycopg(&["types", &port.to_string()]);
    assert_eq!(got, want, "libpq text and binary results through the proxy (miss, then hit)");
    assert!(stat(port, "l1_hits") >= hits + 2, "the script's repeats were served from L1");
}

// ---------------------------------------------------------------- psycopg 3

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("clients")
}

/// The Python that has psycopg 3: Debian's (python3-psycopg), else the one on PATH.
fn python_with_psycopg() -> String {
    for python in ["/usr/bin/python3", "python3"] {
        let ok =
            Command::new(python).args(["-c", "import psycopg"]).output().map(|o| o.status.success()).unwrap_or(false);
        if ok {
            return python.to_string();
        }
    }
    panic!(
        "psycopg 3 is not importable by /usr/bin/python3 nor python3: \
         `apt-get install python3-psycopg` (.ci/run installs it)"
    );
}

fn run_psycopg(args: &[&str]) -> String {
    let script = clients_dir().join("psycopg_client.py");
    let out = Command::new(python_with_psycopg()).arg(&script).args(args).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `key=value` lines of a script's output.
fn facts(out: &str) -> BTreeMap<String, String> {
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn assert_facts(out: &str, want: &[(&str, &str)]) {
    let got = facts(out);
    let mut wrong = Vec::new();
    for (k, v) in want {
        match got.get(*k) {
            Some(g) if g == v => {}
            g => wrong.push(format!("{k}: want {v:?}, got {g:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}\nfull output:\n{out}", wrong.join("\n"));
}

/// psycopg 3 (libpq, server-side binding: Parse/Bind/Describe/Execute/Sync)
/// through the proxy: parameterised reads, repeats served from the cache,
/// prepared statements, a transaction, errors with their SQLSTATE.
#[test]
fn psycopg_through_the_proxy() {
    let pg = Pg::start("psycopg");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let out = run_psycopg(&["checks", &port.to_string()]);
    assert_facts(
        &out,
        &[
            ("simple", "v1"),
            ("simple_hits", "2"),
            ("text_param", "v8"),
            ("text_param_hits", "2"),
            ("text_format_param", "v9"),
            ("text_format_param_hits", "2"),
            ("prepared", "v10|v10|v10|v10|v10|v10|v10"),
            ("prepared_hits", "6"),
            ("pipeline", "v20|v21|v22"),
            ("txn_read_before", "v12"),
            ("txn_read_inside", "twelve"),
            ("txn_read_after", "twelve"),
            ("rollback_read", "twelve"),
            ("autocommit_write_read", "thirteen"),
            ("non_autocommit_read", "v14"),
            ("unique_violation", "23505 items_pkey"),
            ("syntax_error_params", "42601"),
            ("syntax_error_simple", "42601"),
            ("undefined_table", "42P01"),
            ("division_by_zero", "22012"),
            ("in_failed_txn", "25P02"),
            ("after_errors", "v15"),
            ("many_rows", "100 5050"),
        ],
    );
}

/// psycopg with its default `%s` placeholder and a Python int: psycopg sends
/// the int in binary format. The repeats must be served from the cache.
#[test]
fn psycopg_int_parameters_hit_the_cache() {
    let pg = Pg::start("psycopgint");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let out = run_psycopg(&["int_param", &port.to_string()]);
    assert_facts(&out, &[("int_param", "v7"), ("int_param_hits", "2")]);
}

// ---------------------------------------------------------------- node-postgres

fn run_node(args: &[&str]) -> String {
    let dir = clients_dir();
    assert!(
        dir.join("node_modules").join("pg").join("package.json").exists(),
        "node-postgres is not installed: run `npm ci` in {} (.ci/run does)",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join("node_client.js"))
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("node runs (.ci/run installs nodejs): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node_client.js {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// node-postgres (`pg`) through the proxy: parameterised queries (text
/// parameters), repeats served from the cache, a named prepared statement
/// (`name:`), a transaction, errors with their SQLSTATE.
#[test]
fn node_postgres_through_the_proxy() {
    let pg = Pg::start("node");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let out = run_node(&["checks", &port.to_string()]);
    assert_facts(
        &out,
        &[
            ("simple", "v1"),
            ("simple_hits", "2"),
            ("param", "v7"),
            ("param_hits", "2"),
            ("named", "v8|v8|v8|v9"),
            ("named_hits", "2"),
            ("txn_read_before", "v12"),
            ("txn_read_inside", "twelve"),
            ("txn_read_after", "twelve"),
            ("rollback_read", "twelve"),
            ("write_read", "thirteen"),
            ("unique_violation", "23505 items_pkey"),
            ("syntax_error_params", "42601"),
            ("syntax_error_simple", "42601"),
            ("undefined_table", "42P01"),
            ("division_by_zero", "22012"),
            ("in_failed_txn", "25P02"),
            ("after_errors", "v15"),
            ("types", "int4:7 text:v7 bool:true numeric:1.50 json:{\"a\":[1,2]} int4[]:[1,null,3]"),
        ],
    );
}

/// A second node-postgres client using the same statement `name:` while the
/// answer is cached: the Parse of its named statement must still be
/// acknowledged (ParseComplete) and the statement must exist upstream.
#[test]
fn node_postgres_named_statement_on_a_second_connection() {
    let pg = Pg::start("nodenamed");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let out = run_node(&["named_second_client", &port.to_string()]);
    assert_facts(
        &out,
        &[
            ("first_client", "v8"),
            ("second_client", "v8"),
            ("second_client_parse_complete", "1"),
            ("second_client_parsed", "true"),
            ("second_client_other_value", "v9"),
        ],
    );
}

// ---------------------------------------------------------------- raw protocol

/// `Parse(name) Bind Describe Execute Sync` answered from the cache (the same
/// batch ran on another connection before): the client must get its
/// ParseComplete, and the named statement must exist for later Binds.
#[test]
fn named_parse_in_a_cached_batch_creates_the_statement() {
    let pg = Pg::start("rawnamed");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let batch = || {
        vec![parse("q", "SELECT v FROM items WHERE id = $1"), bind("q", &["5"]), describe_portal(), execute(), sync()]
    };
    let mut a = raw::Raw::connect(port, "postgres");
    a.send(&batch());
    assert_eq!(tags(&a.until_ready()), "12TDCZ", "first connection (miss)");
    let hits = stat(port, "l1_hits");
    let mut b = raw::Raw::connect(port, "postgres");
    b.send(&batch());
    let got = b.until_ready();
    assert_eq!(stat(port, "l1_hits"), hits + 1, "the second connection's batch is a hit");
    assert_eq!(tags(&got), "12TDCZ", "second connection (hit): ParseComplete first");
    b.send(&[bind("q", &["6"]), describe_portal(), execute(), sync()]);
    let got = b.until_ready();
    assert_eq!(raw::sqlstate(&got), None, "Bind of the statement the second connection parsed");
    assert_eq!(tags(&got), "2TDCZ");
}

/// The smallest form of what node-postgres and tokio-postgres do in a
/// transaction: `BEGIN` and `COMMIT` as simple queries, the UPDATE through the
/// extended protocol. The session's next read must see its write.
#[test]
fn extended_write_committed_by_a_simple_commit_is_read_back() {
    let pg = Pg::start("rawryw");
    setup(&pg, ITEMS);
    let (port, _rt) = start_proxy(&pg);
    let mut c = raw::Raw::connect(port, "postgres");
    assert_eq!(values(&c.query("SELECT v FROM items WHERE id = 10")), ["v10"]);
    assert_eq!(values(&c.query("SELECT v FROM items WHERE id = 10")), ["v10"], "cached");
    assert_eq!(tags(&c.query("BEGIN")), "CZ");
    c.send(&[parse("", "UPDATE items SET v = 'ten' WHERE id = 10"), bind("", &[]), execute(), sync()]);
    assert_eq!(tags(&c.until_ready()), "12CZ");
    assert_eq!(tags(&c.query("COMMIT")), "CZ");
    let got = values(&c.query("SELECT v FROM items WHERE id = 10"));
    assert_eq!(got, ["ten"], "the session reads its committed write");
}

// ---------------------------------------------------------------- row-level security

const DOCS: &str = "
CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN;
CREATE TABLE docs (id int PRIMARY KEY, owner text NOT NULL, body text);
INSERT INTO docs VALUES (1, 'alice', 'a1'), (2, 'bob', 'b2'), (3, 'alice', 'a3'), (4, 'bob', 'b4');
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
ALTER TABLE docs FORCE ROW LEVEL SECURITY;
CREATE POLICY own ON docs USING (owner = current_user);
GRANT SELECT ON docs TO alice, bob;
CREATE SCHEMA s1; CREATE SCHEMA s2;
CREATE TABLE public.t (id int PRIMARY KEY, v text); INSERT INTO public.t VALUES (1, 'zero');
CREATE TABLE s1.t (id int PRIMARY KEY, v text); CREATE TABLE s2.t (id int PRIMARY KEY, v text);
INSERT INTO s1.t VALUES (1, 'one'); INSERT INTO s2.t VALUES (1, 'two');
GRANT USAGE ON SCHEMA s1, s2 TO alice, bob; GRANT SELECT ON public.t, s1.t, s2.t TO alice, bob;
";

const ALL_DOCS: &str = "SELECT id, owner FROM docs ORDER BY id";

fn own_docs(who: &str) -> Vec<String> {
    match who {
        "alice" => vec!["1|alice".into(), "3|alice".into()],
        "bob" => vec!["2|bob".into(), "4|bob".into()],
        _ => vec!["1|alice".into(), "2|bob".into(), "3|alice".into(), "4|bob".into()],
    }
}

fn rls_setup() -> (Pg, u16, pg::Proxy) {
    let pg = Pg::start("rls");
    setup(&pg, DOCS);
    let (port, rt) = start_proxy(&pg);
    (pg, port, rt)
}

/// The rows of `ALL_DOCS` through the extended protocol (named statement).
async fn docs_extended(c: &Client) -> Vec<String> {
    let rows = c.query(ALL_DOCS, &[]).await.expect("docs");
    rows.iter().map(|r| format!("{}|{}", r.get::<_, i32>(0), r.get::<_, String>(1))).collect()
}

/// alice and bob run the same query texts, in alternation, through the
/// simple and the extended protocol: each only ever sees their own rows.
#[test]
fn rls_roles_never_share_cached_rows() {
    let (_pg, port, rt) = rls_setup();
    rt.block_on(async {
        let alice = connect(port, "alice").await;
        let bob = connect(port, "bob").await;
        let admin = connect(port, "postgres").await;
        let point = "SELECT id, owner, body FROM docs WHERE id = $1";
        let astmt = alice.prepare(point).await.expect("prepare");
        let bstmt = bob.prepare(point).await.expect("prepare");
        let hits = astat(&admin, "l1_hits").await;
        for round in 0..3 {
            for (who, c, stmt) in [("alice", &alice, &astmt), ("bob", &bob, &bstmt)] {
                assert_eq!(simple_lines(c, ALL_DOCS).await, own_docs(who), "{who} simple, round {round}");
                assert_eq!(docs_extended(c).await, own_docs(who), "{who} extended, round {round}");
                for id in ["1", "2", "3", "4"] {
                    let rows = c.query(stmt, &[&Text(id)]).await.expect("point read");
                    let got: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
                    let want: Vec<String> = own_docs(who)
                        .iter()
                        .filter(|l| l.split('|').next() == Some(id))
                        .map(|l| l.split('|').nth(1).unwrap_or_default().to_string())
                        .collect();
                    assert_eq!(got, want, "{who} reads id {id}, round {round}");
                }
                let n: i64 = c.query_one("SELECT count(*) FROM docs", &[]).await.expect("count").get(0);
                assert_eq!(n, 2, "{who} counts, round {round}");
            }
            // the superuser bypasses RLS: all four, never a role's cached subset
            assert_eq!(simple_lines(&admin, ALL_DOCS).await, own_docs("postgres"), "postgres, round {round}");
        }
        let got = astat(&admin, "l1_hits").await - hits;
        assert!(got >= 2 * 2 * 7, "the repeats were served from the cache ({got} hits)");
    });
}

/// `SET ROLE` / `RESET ROLE` / `SET SESSION AUTHORIZATION` and `search_path`
/// changed with simple-protocol commands inside one session: the session's
/// reads follow them, and never return rows cached for another context.
#[test]
fn set_role_and_search_path_in_a_session() {
    let (_pg, port, rt) = rls_setup();
    rt.block_on(async {
        let admin = connect(port, "postgres").await;
        let alice = connect(port, "alice").await;
        for round in 0..2 {
            admin.batch_execute("SET ROLE alice").await.expect("set role");
            assert_eq!(simple_lines(&admin, ALL_DOCS).await, own_docs("alice"), "SET ROLE alice, round {round}");
            admin.batch_execute("SET ROLE bob").await.expect("set role");
            assert_eq!(simple_lines(&admin, ALL_DOCS).await, own_docs("bob"), "SET ROLE bob, round {round}");
            assert_eq!(docs_extended(&admin).await, own_docs("bob"), "SET ROLE bob (extended), round {round}");
            admin.batch_execute("RESET ROLE").await.expect("reset role");
            assert_eq!(simple_lines(&admin, ALL_DOCS).await, own_docs("postgres"), "RESET ROLE, round {round}");
            assert_eq!(simple_lines(&alice, ALL_DOCS).await, own_docs("alice"), "alice, round {round}");
        }

        for round in 0..2 {
            admin.batch_execute("SET search_path TO s1").await.expect("set");
            assert_eq!(simple_lines(&admin, "SELECT v FROM t").await, ["one"], "s1, round {round}");
            admin.batch_execute("SET search_path = s2").await.expect("set");
            assert_eq!(simple_lines(&admin, "SELECT v FROM t").await, ["two"], "s2, round {round}");
            assert_eq!(
                admin.query_one("SELECT v FROM t", &[]).await.expect("read").get::<_, String>(0),
                "two",
                "s2 (extended), round {round}"
            );
            admin.batch_execute("SET search_path TO s1, public").await.expect("set");
            assert_eq!(simple_lines(&admin, "SELECT v FROM t").await, ["one"], "s1, public, round {round}");
            admin.batch_execute("RESET search_path").await.expect("reset");
            assert_eq!(simple_lines(&admin, "SELECT v FROM t").await, ["zero"], "RESET search_path, round {round}");
            assert_eq!(simple_lines(&alice, "SELECT v FROM t").await, ["zero"], "alice, round {round}");
        }
    });
}

/// After `SET ROLE x; RESET ROLE` (or `SET SESSION AUTHORIZATION x; RESET
/// SESSION AUTHORIZATION`, or `DISCARD ALL`) the session is its login role
/// again: it must not share the cache of sessions that logged in as `x`.
#[test]
fn role_reset_does_not_share_the_cache_with_that_role() {
    let (_pg, port, rt) = rls_setup();
    rt.block_on(async {
        let alice = connect(port, "alice").await;
        let resets = [
            ("SET ROLE alice", "RESET ROLE"),
            ("SET SESSION AUTHORIZATION alice", "RESET SESSION AUTHORIZATION"),
            ("SET ROLE alice", "DISCARD ALL"),
            ("SET ROLE alice", "SET ROLE NONE"),
        ];
        let mut failures = Vec::new();
        for (i, (set, reset)) in resets.into_iter().enumerate() {
            let admin = connect(port, "postgres").await;
            admin.batch_execute(set).await.expect(set);
            admin.batch_execute(reset).await.expect(reset);
            let mut check = |what: String, got: Vec<String>, who: &str| {
                if got != own_docs(who) {
                    failures.push(format!("{what}: want {:?}, got {got:?}", own_docs(who)));
                }
            };
            // alice's cached answer must not be served to the superuser ...
            let q1 = format!("SELECT id, owner FROM docs WHERE id > -{i} ORDER BY id");
            check("alice".into(), simple_lines(&alice, &q1).await, "alice");
            check("alice again".into(), simple_lines(&alice, &q1).await, "alice");
            check(format!("postgres after {set}; {reset}"), simple_lines(&admin, &q1).await, "postgres");
            // ... nor the superuser's to alice
            let q2 = format!("SELECT id, owner FROM docs WHERE id > -{i} - 100 ORDER BY id");
            check(format!("postgres after {set}; {reset}"), simple_lines(&admin, &q2).await, "postgres");
            check(format!("postgres after {set}; {reset}, again"), simple_lines(&admin, &q2).await, "postgres");
            let what = format!("alice, after postgres ran {set}; {reset} and read");
            check(what, simple_lines(&alice, &q2).await, "alice");
        }
        assert!(failures.is_empty(), "rows of another role:\n{}", failures.join("\n"));
    });
}

/// Session settings changed by other means than a simple-protocol `SET`: the
/// extended protocol (`client.execute("SET ...")`), `set_config()`, the
/// startup packet's `options`, a temporary table shadowing a table. The
/// session's reads must follow them, never another context's cached rows.
#[test]
fn settings_changed_without_a_simple_set_change_the_cache_context() {
    let (_pg, port, rt) = rls_setup();
    rt.block_on(async {
        let mut failures = Vec::new();
        let mut check = |what: &str, got: Vec<String>, want: Vec<String>| {
            if got != want {
                failures.push(format!("{what}: want {want:?}, got {got:?}"));
            }
        };

        // fill the cache for postgres' default context, and for s1
        let other = connect(port, "postgres").await;
        other.batch_execute("SET search_path TO s1").await.expect("set");
        for _ in 0..2 {
            check("s1 via simple SET", simple_lines(&other, "SELECT v FROM t").await, vec!["one".into()]);
        }
        let fresh = connect(port, "postgres").await;
        for _ in 0..2 {
            check("postgres all docs (fresh)", simple_lines(&fresh, ALL_DOCS).await, own_docs("postgres"));
            check("public.t (fresh)", simple_lines(&fresh, "SELECT v FROM t").await, vec!["zero".into()]);
        }

        // SET ROLE through the extended protocol
        let c = connect(port, "postgres").await;
        c.execute("SET ROLE alice", &[]).await.expect("set role");
        check("SET ROLE alice (extended), simple read", simple_lines(&c, ALL_DOCS).await, own_docs("alice"));
        check("SET ROLE alice (extended), extended read", docs_extended(&c).await, own_docs("alice"));
        // what that session read must not be served to other postgres sessions
        let fresh = connect(port, "postgres").await;
        check("another postgres session, extended read", docs_extended(&fresh).await, own_docs("postgres"));
        check("another postgres session, simple read", simple_lines(&fresh, ALL_DOCS).await, own_docs("postgres"));

        // SET search_path through the extended protocol
        let c = connect(port, "postgres").await;
        c.execute("SET search_path TO s2", &[]).await.expect("set");
        let after_extended_set = simple(&c, "SELECT v FROM t").await.1.into_iter().map(|r| join_row(&r)).collect();
        check("SET search_path TO s2 (extended)", after_extended_set, vec!["two".into()]);
        let c2 = connect(port, "postgres").await;
        c2.batch_execute("SET search_path TO s1").await.expect("set");
        c2.execute("SET search_path TO s2", &[]).await.expect("set");
        check(
            "s1 by simple SET, then s2 by extended SET",
            simple_lines(&c2, "SELECT v FROM t").await,
            vec!["two".into()],
        );

        // set_config()
        let c = connect(port, "postgres").await;
        c.batch_execute("SET search_path TO s1").await.expect("set");
        c.simple_query("SELECT set_config('search_path', 's2', false)").await.expect("set_config");
        check("set_config('search_path', 's2')", simple_lines(&c, "SELECT v FROM t").await, vec!["two".into()]);
        let c = connect(port, "postgres").await;
        c.simple_query("SELECT set_config('role', 'bob', false)").await.expect("set_config");
        check("set_config('role', 'bob')", simple_lines(&c, ALL_DOCS).await, own_docs("bob"));

        // options in the startup packet (PGOPTIONS, libpq `options`)
        let mut config = client_config(port, "postgres");
        config.options("-c search_path=s2");
        let c = connect_config(config).await;
        check(
            "options -c search_path=s2, while s1's answer is cached",
            simple_lines(&c, "SELECT v FROM t").await,
            vec!["two".into()],
        );
        let mut config = client_config(port, "postgres");
        config.options("-c role=bob");
        let c = connect_config(config).await;
        check("options -c role=bob", simple_lines(&c, ALL_DOCS).await, own_docs("bob"));

        // a temporary table shadows a table of the same name in this session only
        let c = connect(port, "postgres").await;
        c.batch_execute("SET search_path TO s1").await.expect("set");
        c.batch_execute("CREATE TEMP TABLE t (id int, v text); INSERT INTO t VALUES (1, 'mine')").await.expect("temp");
        check("temp table t shadows s1.t", simple_lines(&c, "SELECT v FROM t").await, vec!["mine".into()]);
        let c = connect(port, "postgres").await;
        c.batch_execute("SET search_path TO s1").await.expect("set");
        check("another session's s1.t", simple_lines(&c, "SELECT v FROM t").await, vec!["one".into()]);

        assert!(failures.is_empty(), "reads that did not follow the session's settings:\n{}", failures.join("\n"));
    });
}

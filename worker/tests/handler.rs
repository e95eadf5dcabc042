//! The Worker's request handling against a real PostgreSQL, on the host:
//! the same `handler::handle` the Worker runs, over a tokio `TcpStream`
//! instead of a `worker::Socket`. The driver-level test through the built
//! Worker in Miniflare is `worker/test/e2e.mjs` (`tests/e2e.rs` runs it).

mod common;

use common::cluster::{free_port, psql};
use common::{Tcp, shop as cluster};
use postai_worker::access::{Access, parse_conn};
use postai_worker::handler::{self, Answer, LSN, SERVED, SESSION};
use serde_json::{Value, json};

fn access(port: u16, user: &str, password: &str, database: &str) -> Access {
    let upstream =
        parse_conn(&format!("postgresql://{user}:{}@127.0.0.1:{port}/{database}", password.replace(' ', "%20")))
            .expect("connection string");
    Access { token: "tok".into(), upstream, feed: None }
}

/// Sends one request as the driver would (token as the password).
async fn send(access: &Access, body: &str, extra: &[(&str, &str)]) -> Answer {
    let conn = format!("postgresql://{}:tok@edge.local/{}", access.upstream.user, access.upstream.database);
    let header = |name: &str| -> Option<String> {
        if name == "neon-connection-string" {
            return Some(conn.clone());
        }
        let fixed = [("neon-array-mode", "true"), ("neon-raw-text-output", "true")];
        extra.iter().chain(fixed.iter()).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    handler::handle(access, None, &Tcp::default(), header, body.as_bytes()).await
}

fn json_of(a: &Answer) -> Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("JSON body ({e}): {}", a.body))
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "current_thread")]
async fn statements_answer_as_neon_does() {
    let pg = cluster();
    let a = access(pg.port, "app", "app pw", "shop");
    let r = send(&a, r#"{"query":"SELECT id, name, price, tags, made FROM items WHERE id = $1","params":["1"]}"#, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = json_of(&r);
    assert_eq!(j["command"], json!("SELECT"));
    assert_eq!(j["rowCount"], json!(1));
    assert_eq!(j["rows"], json!([["1", "one", "1.50", "{a,b}", "2024-01-02"]]));
    let types: Vec<_> = j["fields"].as_array().unwrap().iter().map(|f| f["dataTypeID"].as_u64().unwrap()).collect();
    assert_eq!(types, [23, 25, 1700, 1009, 1082]);
    assert_eq!(j["fields"][2]["dataTypeModifier"], json!((10 << 16) + 2 + 4));
    assert!(j["fields"][0]["tableID"].as_u64().unwrap() > 0);
    assert_eq!(j["fields"][0]["columnID"], json!(1));
    assert_eq!(header(&r, SERVED), Some("primary"));
    let read_at = header(&r, LSN).expect("the LSN the answer reflects").to_string();

    // a write: its row count, and a session token at or past what it wrote
    let w =
        send(&a, r#"{"query":"INSERT INTO items (id, name) VALUES ($1, $2), (4, 'four')","params":[3,"three"]}"#, &[])
            .await;
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(json_of(&w)["command"], json!("INSERT"));
    assert_eq!(json_of(&w)["rowCount"], json!(2));
    let token = header(&w, SESSION).expect("a session token").to_string();
    let lsn = |s: &str| postai_wire::protocol::parse_lsn(s).unwrap();
    assert!(lsn(&token) > lsn(&read_at), "{token} after {read_at}");
    // a token from the client is carried forward, never backwards
    let far = "FF/0";
    let r = send(&a, r#"{"query":"SELECT 1"}"#, &[(SESSION, far)]).await;
    assert_eq!(header(&r, SESSION), Some(far));

    // NULL parameters, arrays, DDL without a row count, an empty query
    let r = send(&a, r#"{"query":"SELECT $1::int IS NULL AS n, $2::text[] AS a","params":[null,["x\"y",null]]}"#, &[])
        .await;
    assert_eq!(json_of(&r)["rows"], json!([["t", "{\"x\\\"y\",NULL}"]]));
    let r = send(&a, r#"{"query":"CREATE TABLE t2 (x int)"}"#, &[]).await;
    assert_eq!((json_of(&r)["command"].clone(), json_of(&r)["rowCount"].clone()), (json!("CREATE"), Value::Null));
    let r = send(&a, r#"{"query":""}"#, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // objects when the client asks for them, typed when it asks for no raw text
    let r = send(&a, r#"{"query":"SELECT 1 AS a, true AS b"}"#, &[("neon-array-mode", "false")]).await;
    assert_eq!(json_of(&r)["rows"], json!([{"a": "1", "b": "t"}]));
}

#[tokio::test(flavor = "current_thread")]
async fn errors_carry_sqlstate_and_transactions_roll_back() {
    let pg = cluster();
    let a = access(pg.port, "app", "app pw", "shop");
    let r = send(&a, r#"{"query":"SELECT * FROM nope"}"#, &[]).await;
    assert_eq!(r.status, 400);
    let e = json_of(&r);
    assert_eq!((e["code"].clone(), e["position"].clone()), (json!("42P01"), json!("15")));
    assert_eq!(e["message"], json!("relation \"nope\" does not exist"));
    // one statement per request, as Neon's proxy (extended protocol)
    let r = send(&a, r#"{"query":"SELECT 1; SELECT 2"}"#, &[]).await;
    assert_eq!(json_of(&r)["code"], json!("42601"));

    let batch = r#"{"queries":[{"query":"INSERT INTO items (id, name) VALUES (10, 'ten')"},
        {"query":"INSERT INTO items (id, name) VALUES ($1, $2)","params":["1","dup"]}]}"#;
    let r = send(&a, batch, &[]).await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!("23505")));
    let r = send(&a, r#"{"query":"SELECT count(*) FROM items WHERE id = 10"}"#, &[]).await;
    assert_eq!(json_of(&r)["rows"], json!([["0"]]), "the batch rolled back");

    let batch = r#"{"queries":[{"query":"INSERT INTO items (id, name) VALUES (11, 'eleven')"},
        {"query":"SELECT current_setting('transaction_isolation') AS i, current_setting('transaction_read_only') AS r"}]}"#;
    let r = send(&a, batch, &[("neon-batch-isolation-level", "RepeatableRead")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = json_of(&r);
    assert_eq!(j["results"][0]["rowCount"], json!(1));
    assert_eq!(j["results"][1]["rows"], json!([["repeatable read", "off"]]));
    let r = send(&a, batch, &[("neon-batch-read-only", "true")]).await;
    assert_eq!(json_of(&r)["code"], json!("25006"), "read-only transaction refuses the insert");
}

#[tokio::test(flavor = "current_thread")]
async fn refused_and_broken_requests_answer_clearly() {
    let pg = cluster();
    let a = access(pg.port, "app", "app pw", "shop");
    let header = |name: &str| match name {
        "neon-connection-string" => Some("postgresql://app:wrong@edge/shop".to_string()),
        _ => None,
    };
    let net = Tcp::default();
    let r = handler::handle(&a, None, &net, header, br#"{"query":"SELECT 1"}"#).await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!("28P01")));
    assert_eq!(
        net.opened.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing reaches the database without the token"
    );
    for (body, code) in [("{nope", "08P01"), (r#"{"params":[]}"#, "08P01"), (r#"{"query":"SELECT 1\u0000"}"#, "22021")]
    {
        let r = send(&a, body, &[]).await;
        assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!(code)), "{body}: {}", r.body);
    }
    let r = send(&a, r#"{"queries":[{"query":"SELECT 1"}]}"#, &[("neon-batch-isolation-level", "Chaos")]).await;
    assert_eq!(json_of(&r)["code"], json!("22023"));

    // the Worker's own login wrong: PostgreSQL's refusal, as is
    let r = send(&access(pg.port, "app", "nope", "shop"), r#"{"query":"SELECT 1"}"#, &[]).await;
    assert_eq!(json_of(&r)["code"], json!("28P01"), "{}", r.body);
    // MD5 logins work too
    let r = send(&access(pg.port, "old", "old pw", "postgres"), r#"{"query":"SELECT current_user"}"#, &[]).await;
    assert_eq!(json_of(&r)["rows"], json!([["old"]]), "{}", r.body);

    // nothing listening: a connection failure (08006)
    let r = send(&access(free_port(), "app", "app pw", "shop"), r#"{"query":"SELECT 1"}"#, &[]).await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!("08006")), "{}", r.body);

    // the server ends the session mid-statement: an error, and the next request is served
    let killer = {
        let port = pg.port;
        std::thread::spawn(move || {
            for _ in 0..100 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let n = psql(
                    port,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'",
                );
                if n == "1" {
                    return;
                }
            }
        })
    };
    let r = send(&a, r#"{"query":"SELECT pg_sleep(30)"}"#, &[]).await;
    killer.join().unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let code = json_of(&r)["code"].as_str().unwrap().to_string();
    assert!(code == "57P01" || code == "08006", "{code}");
    let r = send(&a, r#"{"query":"SELECT 1"}"#, &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// An answer larger than Neon's 10 MB is refused with Neon's status (507),
/// its rows dropped as they come; a request body over the limit is refused
/// before anything runs; the connection's next statement is served.
#[tokio::test(flavor = "current_thread")]
async fn answers_and_requests_over_the_limits_are_refused() {
    let pg = cluster();
    let a = access(pg.port, "app", "app pw", "shop");
    let big = r#"{"query":"SELECT repeat('x', 1000) FROM generate_series(1, 20000)"}"#;
    let r = send(&a, big, &[]).await;
    assert_eq!(r.status, 507, "{}", &r.body[..r.body.len().min(200)]);
    assert!(r.body.contains("too large"), "{}", r.body);
    // PostgreSQL binds up to 65535 parameters (an unsigned count)
    let n = 40_000;
    let refs: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    let many =
        json!({"query": format!("SELECT cardinality(ARRAY[{}]::int[])", refs.join(",")), "params": vec!["1"; n]});
    let r = send(&a, &many.to_string(), &[]).await;
    assert_eq!(
        (r.status, json_of(&r)["rows"][0][0].clone()),
        (200, json!("40000")),
        "{}",
        &r.body[..r.body.len().min(300)]
    );
    // 4 MB of NULLs on the wire would be over 60 MB in the isolate
    let nulls = format!(r#"{{"query":"SELECT {} FROM generate_series(1, 10000)"}}"#, vec!["NULL"; 100].join(","));
    assert_eq!(send(&a, &nulls, &[]).await.status, 507);
    let fits = r#"{"query":"SELECT count(*) FROM (SELECT repeat('x', 1000) FROM generate_series(1, 5000)) s"}"#;
    assert_eq!(send(&a, fits, &[]).await.status, 200);
    let huge = format!(r#"{{"query":"SELECT $1","params":["{}"]}}"#, "y".repeat(postai_worker::handler::REQUEST_MAX));
    let r = send(&a, &huge, &[]).await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!("54000")));
}

/// What the Worker checks before it reads a body: without the token nothing
/// is read (a body of any size costs the isolate nothing), and a declared
/// length over the limit is refused at once.
#[test]
fn the_token_and_a_declared_length_are_checked_before_the_body_is_read() {
    let a = access(5432, "app", "app pw", "shop");
    let headers = |pairs: Vec<(&'static str, String)>| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    };
    let conn = |pw: &str| ("neon-connection-string", format!("postgresql://app:{pw}@edge.local/shop"));
    let code = |r: Result<_, Answer>| r.map(|_| ()).map_err(|e| json_of(&e)["code"].clone());
    let huge = ("content-length", "999999999999".to_string());
    assert_eq!(code(handler::precheck(&a, &headers(vec![conn("wrong"), huge.clone()]))), Err(json!("28P01")));
    assert_eq!(code(handler::precheck(&a, &headers(vec![huge.clone()]))), Err(json!("08P01")));
    assert_eq!(code(handler::precheck(&a, &headers(vec![conn("tok"), huge]))), Err(json!("54000")));
    let fits = ("content-length", "100".to_string());
    assert_eq!(code(handler::precheck(&a, &headers(vec![conn("tok"), fits]))), Ok(()));
    assert_eq!(
        code(handler::precheck(&a, &headers(vec![conn("tok")]))),
        Ok(()),
        "no length declared: read up to the limit"
    );
}

/// A request given up (the client left, the Worker's request ended) must
/// not leave its statement running on PostgreSQL to its end.
#[tokio::test(flavor = "current_thread")]
async fn a_statement_whose_client_left_is_cancelled() {
    let pg = cluster();
    let a = access(pg.port, "app", "app pw", "shop");
    let sleep = r#"{"query":"SELECT pg_sleep(60)"}"#;
    let gone = tokio::time::timeout(std::time::Duration::from_millis(500), send(&a, sleep, &[])).await;
    assert!(gone.is_err(), "the request was given up");
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()";
    let started = std::time::Instant::now();
    while psql(pg.port, running) != "0" {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the statement still runs");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A pooler in front of PostgreSQL that refuses startup parameters it does
/// not know, as PgBouncer does, and forwards everything else. Its port.
fn strict_pooler(pg_port: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = refusals.clone();
    std::thread::spawn(move || {
        for mut client in listener.incoming().flatten() {
            let mut len = [0u8; 4];
            if client.read_exact(&mut len).is_err() {
                continue;
            }
            let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            if client.read_exact(&mut rest).is_err() {
                continue;
            }
            if String::from_utf8_lossy(&rest).contains("client_connection_check_interval") {
                let e = b"SFATAL\0C08P01\0Munsupported startup parameter: client_connection_check_interval\0\0";
                let mut m = vec![b'E'];
                m.extend_from_slice(&((e.len() + 4) as u32).to_be_bytes());
                m.extend_from_slice(e);
                drop(client.write_all(&m));
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", pg_port)) else { continue };
            drop(server.write_all(&len).and_then(|()| server.write_all(&rest)));
            let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { continue };
            std::thread::spawn(move || drop(std::io::copy(&mut s2, &mut c2)));
            std::thread::spawn(move || drop(std::io::copy(&mut client, &mut server)));
        }
    });
    (port, refusals)
}

/// Behind a pooler that refuses startup parameters it does not know (Neon's
/// `-pooler` endpoints are PgBouncer), the Worker logs in again without
/// its own settings.
#[tokio::test(flavor = "current_thread")]
async fn a_pooler_refusing_the_worker_s_settings_is_logged_in_to_without_them() {
    let pg = cluster();
    let (port, refusals) = strict_pooler(pg.port);
    let a = access(port, "app", "app pw", "shop");
    for _ in 0..3 {
        let r = send(&a, r#"{"query":"SELECT 41 + 1 AS n"}"#, &[]).await;
        assert_eq!((r.status, json_of(&r)["rows"][0][0].clone()), (200, json!("42")), "{}", r.body);
    }
    assert_eq!(refusals.load(std::sync::atomic::Ordering::Relaxed), 1, "refused once, remembered");
}

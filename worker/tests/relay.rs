//! The driver's WebSocket mode, on the host: `relay::serve_client` (what
//! the Worker runs over a WebSocket's bytes) over TCP, with tokio-postgres
//! as the client: the login ended by the Worker with the API token, the
//! session relayed to PostgreSQL under the Worker's own login. The Worker
//! itself over a WebSocket with the real driver: `test/e2e.mjs`.

mod common;

use common::{Tcp, shop};
use postai_worker::access::{Access, parse_conn};
use postai_worker::relay::serve_client;
use tokio::net::TcpListener;

/// A listener that serves each client as the Worker serves a WebSocket.
async fn edge(access: Access) -> u16 {
    edge_idle(access, 60_000).await
}

/// [`edge`] with sessions ended after `idle_ms` idle.
async fn edge_idle(access: Access, idle_ms: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let access = access.clone();
            tokio::spawn(async move {
                let _ = serve_client(stream, &access, &Tcp::default(), idle_ms).await;
            });
        }
    });
    port
}

async fn client(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("host=127.0.0.1 port={port} user={user} password='{password}' dbname={db} sslmode=disable");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_log_in_with_the_token_and_run_on_postgresql() {
    let pg = shop();
    let upstream = parse_conn(&format!("postgresql://app:app%20pw@127.0.0.1:{}/shop", pg.port)).expect("url");
    let port = edge(Access { token: "tok".into(), upstream, feed: None }).await;

    let c = client(port, "app", "tok", "shop").await.expect("logged in with the token");
    // the extended protocol (a prepared statement, a typed parameter) and the simple one
    let row = c.query_one("SELECT name, price FROM items WHERE id = $1", &[&1i32]).await.expect("query");
    assert_eq!(row.get::<_, String>(0), "one");
    let rows = c.simple_query("SELECT current_user").await.expect("simple");
    let user = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(user.as_deref(), Some("app"), "PostgreSQL sees the Worker's own login");
    // a transaction, and PostgreSQL's errors as they are
    c.batch_execute("BEGIN; UPDATE items SET name = 'uno' WHERE id = 1").await.expect("begin");
    let e = c.simple_query("SELECT * FROM nope").await.expect_err("no such table");
    assert_eq!(e.code().map(|c| c.code()), Some("42P01"));
    c.batch_execute("ROLLBACK").await.expect("rollback");
    let row = c.query_one("SELECT name FROM items WHERE id = 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, String>(0), "one", "rolled back");

    // the token is the only password; the Worker's own user and database only
    let e = client(port, "app", "app pw", "shop").await.expect_err("the database's password is not the token");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    let e = client(port, "postgres", "tok", "shop").await.expect_err("another role");
    assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{e}");

    // the database gone: a clear error at login, and the edge keeps serving
    let dead = parse_conn("postgresql://app:x@127.0.0.1:1/shop").expect("url");
    let port_dead = edge(Access { token: "tok".into(), upstream: dead, feed: None }).await;
    let e = client(port_dead, "app", "tok", "shop").await.expect_err("unreachable");
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e}");
    let c = client(port, "app", "tok", "shop").await.expect("still serving");
    assert_eq!(c.simple_query("SELECT 1").await.expect("query").len(), 3);
}

/// A client that holds its connection open and idle does not hold a server
/// connection with it: PostgreSQL ends the session, in a transaction or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_ended() {
    let pg = shop();
    let upstream = parse_conn(&format!("postgresql://app:app%20pw@127.0.0.1:{}/shop", pg.port)).expect("url");
    let port = edge_idle(Access { token: "tok".into(), upstream, feed: None }, 300).await;
    for (begin, disabled) in [(false, false), (true, false), (false, true), (true, true)] {
        let c = client(port, "app", "tok", "shop").await.expect("logged in");
        if disabled {
            // the session's own timeouts are the client's to change: the relay's is not
            c.batch_execute("SET idle_session_timeout = 0; SET idle_in_transaction_session_timeout = 0")
                .await
                .expect("set");
        }
        if begin {
            c.batch_execute("BEGIN").await.expect("begin");
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(c.simple_query("SELECT 1").await.is_err(), "idle 1.5 s, in a transaction {begin}, disabled {disabled}");
    }
    // a statement running longer than that is not idle
    let c = client(port, "app", "tok", "shop").await.expect("logged in");
    c.batch_execute("SET idle_session_timeout = 0").await.expect("set");
    let slept = c.simple_query("SELECT pg_sleep(1.5)").await;
    assert!(slept.is_ok(), "a running statement was ended: {slept:?}");
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'";
    assert_eq!(common::cluster::psql(pg.port, count), "0", "no server connection left");
}

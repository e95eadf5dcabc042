//! The Worker's cache against a real regional proxy (`postai-edge` in
//! the regional role, reading a slot of PostgreSQL) and PostgreSQL: the
//! same `handler::handle` the Worker runs, over tokio streams. A miss then a
//! hit; a write through the Worker read back by its session; a write made
//! directly on PostgreSQL reaching the cache through the feed; nothing
//! served from the cache once the feed is silent past its bound; DDL.

mod common;

// the proxy starters; its cluster.rs is common's too (two copies of the module)
#[path = "../../edge/tests/pg/mod.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod pg;

use std::cell::RefCell;
use std::time::{Duration, Instant};

use common::cluster::psql;
use common::{Tcp, shop_sql};
use postai_worker::access::{Access, parse_conn};
use postai_worker::cache::{CacheConfig, Edge};
use postai_worker::handler::{self, Answer, SERVED, SESSION};
use serde_json::{Value, json};

struct World {
    pg: common::cluster::Pg,
    regional: Option<pg::Proxy>,
    access: Access,
    edge: RefCell<Edge>,
}

fn world(config: CacheConfig) -> World {
    let pg = common::shop();
    let regional = pg::start_proxy(&format!(
        "upstream = '{}'\nrole = 'regional'\n[cdc]\nslot = 'worker_region'\ndatabase = 'shop'\npoll_ms = 20\n",
        pg.addr()
    ));
    let upstream = parse_conn(&format!("postgresql://app:app%20pw@127.0.0.1:{}/shop", pg.port)).expect("url");
    let feed = parse_conn(&format!("postgresql://postgres@127.0.0.1:{}/shop", regional.port)).expect("url");
    let access = Access { token: "tok".into(), upstream, feed: Some(feed) };
    World { pg, regional: Some(regional), access, edge: RefCell::new(Edge::new(config)) }
}

impl World {
    /// One request, on a runtime of its own (the regional's runtime must
    /// not be started or dropped inside another).
    fn send(&self, body: &str, extra: &[(&str, &str)]) -> Answer {
        let header = |name: &str| -> Option<String> {
            if name == "neon-connection-string" {
                return Some("postgresql://app:tok@edge.local/shop".into());
            }
            let fixed = [("neon-array-mode", "true"), ("neon-raw-text-output", "true")];
            extra.iter().chain(fixed.iter()).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let net = Tcp::default();
        let answer = rt.block_on(handler::handle(&self.access, Some(&self.edge), &net, header, body.as_bytes()));
        if answer.pull_feed {
            // after the answer, as the Worker's waitUntil runs it
            rt.block_on(handler::pull(&self.edge, &net, &self.access));
        }
        answer
    }

    /// A pull of the feed cancelled after `ms` (a `waitUntil` past its
    /// time): its future dropped.
    fn pull_abandoned(&self, ms: u64) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let net = Tcp::default();
        let pull = handler::pull(&self.edge, &net, &self.access);
        let left = rt.block_on(async { tokio::time::timeout(Duration::from_millis(ms), pull).await });
        assert!(left.is_err(), "the pull ended before it was cancelled");
    }

    /// Item `id`'s name as the Worker answers it, and the tier that answered.
    fn name(&self, id: u32, extra: &[(&str, &str)]) -> (String, String) {
        let body = format!(r#"{{"query":"SELECT name FROM items WHERE id = $1","params":["{id}"]}}"#);
        let a = self.send(&body, extra);
        assert_eq!(a.status, 200, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).expect("json");
        let name = v["rows"][0][0].as_str().unwrap_or("<none>").to_string();
        (name, served(&a))
    }
}

fn served(a: &Answer) -> String {
    a.headers.iter().find(|(k, _)| *k == SERVED).map(|(_, v)| v.clone()).unwrap_or_default()
}

/// Until the regional's stream is open and the cache answers a repeated read.
fn until_cached(w: &World, id: u32) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if w.name(id, &[]).1 == "L1" {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("item {id} was never answered from the cache: {:?}", w.edge.borrow().stats());
}

/// A short silence bound (and pull timeout, the same): for the tests of
/// silence.
fn quick() -> CacheConfig {
    CacheConfig { feed_every: Duration::ZERO, silence: Duration::from_millis(400), ..CacheConfig::default() }
}

/// A silence bound a loaded machine does not reach between two requests
/// (a pull given 400 ms may fail there, and the next read go upstream).
fn steady() -> CacheConfig {
    CacheConfig { silence: Duration::from_secs(5), ..quick() }
}

#[test]
fn reads_are_served_at_the_edge_and_writes_reach_it() {
    let w = world(steady());
    until_cached(&w, 1);
    assert_eq!(w.name(1, &[]), ("one".into(), "L1".into()));
    let misses = w.edge.borrow().stats().upstream;

    // a write through the Worker: its session reads it back at once
    let up = w.send(r#"{"query":"UPDATE items SET name = 'uno' WHERE id = 1"}"#, &[]);
    assert_eq!(up.status, 200, "{}", up.body);
    let token = up.headers.iter().find(|(k, _)| *k == SESSION).map(|(_, v)| v.clone()).expect("token");
    assert_eq!(w.name(1, &[(SESSION, &token)]).0, "uno", "read-your-writes with the token");
    assert!(w.edge.borrow().stats().upstream > misses);

    // a write made directly on PostgreSQL: through the feed, then never the old value again
    until_cached(&w, 2);
    shop_sql(&w.pg, "UPDATE items SET name = 'zwei' WHERE id = 2");
    let started = Instant::now();
    let mut seen_new = false;
    while started.elapsed() < Duration::from_secs(10) {
        let (name, _) = w.name(2, &[]);
        match name.as_str() {
            "zwei" => seen_new = true,
            "two" => assert!(!seen_new, "the old value after the new one"),
            other => panic!("item 2 is {other:?}"),
        }
        if seen_new && w.name(2, &[]).1 == "L1" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_new, "a direct write never reached the Worker");
    assert_eq!(w.name(2, &[]), ("zwei".into(), "L1".into()), "the new value cached again");

    // strong reads go to PostgreSQL; eventual ones may be cached
    assert_eq!(w.name(2, &[("x-postai-consistency", "strong")]).1, "primary");
    assert_eq!(w.name(2, &[("x-postai-consistency", "eventual")]).1, "L1");
    let bad = w.send(r#"{"query":"SELECT 1"}"#, &[("x-postai-consistency", "sometimes")]);
    assert_eq!(bad.status, 400);

    // DDL: the catalog is read again, and no answer of the old shape is served
    let star = r#"{"query":"SELECT * FROM items WHERE id = $1","params":["2"]}"#;
    w.send(star, &[]);
    assert_eq!(served(&w.send(star, &[])), "L1", "the five-column answer is cached");
    shop_sql(&w.pg, "ALTER TABLE items ADD COLUMN extra int DEFAULT 7");
    let started = Instant::now();
    loop {
        let a = w.send(star, &[]);
        let v: Value = serde_json::from_str(&a.body).expect("json");
        if v["fields"].as_array().map(Vec::len) == Some(6) {
            assert_eq!(v["rows"][0][5], json!("7"));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the new column never showed: {}", a.body);
        assert_eq!(served(&a), "L1", "only the cached answer may still be the old shape");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_silent_feed_stops_the_cache_and_postgresql_answers() {
    let mut w = world(quick());
    until_cached(&w, 1);
    // the regional goes away: the feed cannot be pulled
    w.regional = None;
    std::thread::sleep(Duration::from_millis(500));
    shop_sql(&w.pg, "UPDATE items SET name = 'changed' WHERE id = 1");
    for _ in 0..3 {
        assert_eq!(w.name(1, &[]), ("changed".into(), "primary".into()), "nothing from a cache past its bound");
    }
    // a transaction is never cached
    let t = w.send(r#"{"queries":[{"query":"SELECT name FROM items WHERE id = 1"}]}"#, &[]);
    assert_eq!(served(&t), "primary");
    drop(psql(w.pg.port, "SELECT 1"));
}

/// Waits until `sql`'s first value, as the Worker answers it, becomes
/// `want`; after it has, the old value is never answered again.
fn until_value(w: &World, sql: &str, old: &str, want: &str) {
    let body = format!(r#"{{"query":"{sql}"}}"#);
    let started = Instant::now();
    let mut seen = false;
    while started.elapsed() < Duration::from_secs(10) {
        let a = w.send(&body, &[]);
        let v: Value = serde_json::from_str(&a.body).expect("json");
        let got = v["rows"][0][0].as_str().map(str::to_string).unwrap_or_else(|| a.body.clone());
        if got == want {
            seen = true;
        } else {
            assert!(!seen && got == old, "{sql}: {got:?} (old {old:?}, new {want:?}, seen new: {seen})");
        }
        if seen && served(&a) == "L1" {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{sql}: never {want:?}");
}

/// Roles and privileges change without a row changing: a per-role setting
/// (no change event: the roles' digest), a privilege revoked (DDL through
/// the feed). Nothing cached under the old ones is served after.
#[test]
fn changed_roles_and_privileges_drop_what_was_cached() {
    let w = world(steady());
    until_cached(&w, 1);
    let t = "SELECT '2024-01-01 00:00+00'::timestamptz::text AS t";
    w.send(&format!(r#"{{"query":"{t}"}}"#), &[]);
    let cached = w.send(&format!(r#"{{"query":"{t}"}}"#), &[]);
    assert_eq!(served(&cached), "L1", "{}", cached.body);
    shop_sql(&w.pg, "ALTER ROLE app SET timezone = 'Asia/Tokyo'");
    until_value(&w, t, "2024-01-01 00:00:00+00", "2024-01-01 09:00:00+09");

    // a privilege revoked: the cached rows are not served, PostgreSQL refuses
    until_cached(&w, 1);
    shop_sql(&w.pg, "REVOKE SELECT ON items FROM app");
    let started = Instant::now();
    loop {
        let a = w.send(r#"{"query":"SELECT name FROM items WHERE id = $1","params":["1"]}"#, &[]);
        if a.status == 400 {
            let v: Value = serde_json::from_str(&a.body).expect("json");
            assert_eq!(v["code"], json!("42501"), "{}", a.body);
            break;
        }
        assert_eq!(served(&a), "L1", "only the cache may still answer, until the feed says: {}", a.body);
        assert!(started.elapsed() < Duration::from_secs(10), "the revoke never reached the Worker");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3 {
        assert_eq!(w.send(r#"{"query":"SELECT name FROM items WHERE id = $1","params":["1"]}"#, &[]).status, 400);
    }
}

/// A Worker pulls its feed by subscribing anew each time, and a regional
/// opens every subscription with a keepalive even when its own stream has
/// stalled: only a keepalive after the opening shows the stream is live.
/// Here the regional's stream stalls, a row changes, and after the silence
/// bound (plus a pull's timeout) only the new value is served.
#[test]
fn a_stalled_regional_is_silence_though_it_opens_every_subscription() {
    let w = world(quick());
    until_cached(&w, 1);
    let _held = pg::faults::SlotHeld::new(w.pg.port, "shop", "worker_region");
    shop_sql(&w.pg, "UPDATE items SET name = 'stale no more' WHERE id = 1");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        let (name, tier) = w.name(1, &[]);
        if started.elapsed() > Duration::from_millis(1000) {
            assert_eq!((name.as_str(), tier.as_str()), ("stale no more", "primary"), "past the bound");
        } else {
            assert!(name == "stale no more" || tier == "L1", "{name} from {tier}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A regional that accepts connections and never answers. Its port.
fn silent_regional() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    port
}

/// A pull cancelled before it ends (the Worker's `waitUntil` has a time
/// limit): the next requests pull again (before, the isolate counted a pull
/// under way for good, and its cache stayed silent).
#[test]
fn a_pull_abandoned_does_not_stop_the_next() {
    let mut w = world(quick());
    until_cached(&w, 1);
    let live = w
        .access
        .feed
        .replace(parse_conn(&format!("postgresql://postgres@127.0.0.1:{}/shop", silent_regional())).expect("url"));
    // due again
    std::thread::sleep(Duration::from_millis(50));
    w.pull_abandoned(200);
    w.access.feed = live;
    // past the silence bound: only a new pull lets the cache answer again
    std::thread::sleep(Duration::from_millis(600));
    until_cached(&w, 2);
}

/// PostgreSQL writes a commit's WAL record before the commit is visible
/// (with a synchronous standby, until the standby answers): the feed can
/// bring a write's change while a read still sees the old row. An answer
/// read then must not be filed as reflecting the write, or the write's own
/// change (already applied) never removes it. Here the standby never
/// answers until the test lets the commit through.
#[test]
fn a_commit_the_feed_brought_before_it_was_visible_is_not_taken_as_read() {
    let w = world(steady());
    until_cached(&w, 1);
    shop_sql(&w.pg, "ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    shop_sql(&w.pg, "SELECT pg_reload_conf()");
    let port = w.pg.port;
    let writer = std::thread::spawn(move || {
        // waits for a standby that never answers, until the setting is reset
        std::process::Command::new("psql")
            .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "shop"])
            .args(["-c", "UPDATE items SET name = 'hidden' WHERE id = 1"])
            .output()
            .expect("psql runs")
    });
    // the feed brings the change (the cache stops answering the old row)
    // while PostgreSQL still answers it: reads now may fill the cache
    let started = Instant::now();
    let mut read_old = 0;
    while started.elapsed() < Duration::from_secs(20) && read_old < 10 {
        let (name, tier) = w.name(1, &[]);
        assert_eq!(name, "one", "the write is not visible yet");
        if tier == "primary" || read_old > 0 {
            read_old += 1;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(read_old, 10, "the feed never brought the invisible commit");
    shop_sql(&w.pg, "ALTER SYSTEM RESET synchronous_standby_names");
    shop_sql(&w.pg, "SELECT pg_reload_conf()");
    let out = writer.join().expect("writer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // visible now: the next read shows it, wherever it is answered
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..5 {
        assert_eq!(w.name(1, &[]).0, "hidden", "an answer read before the commit was visible was filed past it");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sql.transaction([...])` runs on PostgreSQL outside the node: what it
/// wrote must not be answered from the isolate's cache afterwards, before
/// the feed brings the change (the driver sends no session token).
#[test]
fn a_transaction_s_writes_are_read_back_at_once() {
    let slow = CacheConfig {
        feed_every: Duration::from_secs(60),
        silence: Duration::from_secs(120),
        ..CacheConfig::default()
    };
    let w = world(slow);
    shop_sql(
        &w.pg,
        "CREATE FUNCTION rename_two() RETURNS void LANGUAGE sql AS $$UPDATE items SET name = 'by a function' WHERE id = 2$$",
    );
    until_cached(&w, 1);
    until_cached(&w, 2);
    // a transaction that reads only drops nothing
    let a = w.send(r#"{"queries":[{"query":"SELECT 1","params":[]}]}"#, &[]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(w.name(2, &[]).1, "L1");
    let batch = r#"{"queries":[{"query":"UPDATE items SET name = $1 WHERE id = 1","params":["in a transaction"]},
        {"query":"SELECT 1","params":[]}]}"#;
    let a = w.send(batch, &[]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!a.pull_feed, "no pull in between");
    assert_eq!(w.name(1, &[]), ("in a transaction".into(), "primary".into()));
    // a write the statement does not name (a function's): everything held goes
    let a = w.send(r#"{"queries":[{"query":"SELECT rename_two()","params":[]}]}"#, &[]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(w.name(2, &[]), ("by a function".into(), "primary".into()));
}

/// A pull whose catalog read never gets an answer (PostgreSQL's socket
/// stalled after the feed was collected) ends within its bound, and the
/// isolate pulls again.
#[test]
fn a_pull_whose_catalog_read_stalls_ends_within_its_bound() {
    let mut w = world(quick());
    let live = w.access.upstream.clone();
    let mut stalled = live.clone();
    stalled.port = silent_regional();
    w.access.upstream = stalled;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let net = common::Tcp::default();
    let started = Instant::now();
    // the first pull opens the stream on an unknown past: the catalog is read
    let pull = handler::pull(&w.edge, &net, &w.access);
    let ended = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), pull).await });
    assert!(ended.is_ok(), "the pull never ended");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    w.access.upstream = live;
    until_cached(&w, 1);
}

/// A miss given up mid-way (the client left): the node does not keep its
/// request (at the node's limits every later request would pass the cache).
#[test]
fn a_miss_given_up_is_handed_back_to_the_node() {
    let w = world(steady());
    until_cached(&w, 1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let net = common::Tcp::default();
    let header = |name: &str| -> Option<String> {
        (name == "neon-connection-string").then(|| "postgresql://app:tok@edge.local/shop".to_string())
    };
    let body = br#"{"query":"SELECT name FROM items WHERE id = $1 AND pg_sleep(2) IS NOT NULL","params":["1"]}"#;
    let request = handler::handle(&w.access, Some(&w.edge), &net, header, body);
    let left = rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), request).await });
    assert!(left.is_err(), "the request was given up before its answer");
    assert_eq!(w.edge.borrow().pending(), 0, "the node still holds the request");
}

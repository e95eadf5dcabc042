//! Fresh, not expired: with the change stream on, an entry the stream keeps
//! valid row by row (a point read by primary key, a short integer key
//! range) outlives `ttl_s` (up to `fresh_ttl_s`) and is still invalidated
//! by every change to its rows, made through the proxy or around it; an
//! entry the stream cannot vouch for row by row (a scan of the table) keeps
//! `ttl_s`; `fresh_ttl_s = 0` gives every entry `ttl_s`.

mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually, eventually_within, psql, start_proxy_with, stat_n};

fn proxy(pg: &Pg, fresh_ttl_s: u64) -> (u16, pg::Proxy) {
    let extra = format!("[cache]\nttl_s = 1\nfresh_ttl_s = {fresh_ttl_s}\n{ITEMS_TABLE}[cdc]\npoll_ms = 50\n");
    let (port, p) = start_proxy_with(pg, &extra);
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    (port, p)
}

/// Reads `sql` through the proxy: (answered from L1, the answer).
fn read(port: u16, sql: &str) -> (bool, String) {
    let hits = stat_n(port, "l1_hits");
    let out = psql(port, sql);
    (stat_n(port, "l1_hits") > hits, out)
}

/// A read, then the same read again at once: whether the second was
/// answered from L1 (the first may have filled it; a scan lives 1 s).
fn cached(port: u16, sql: &str) -> bool {
    let _ = psql(port, sql);
    read(port, sql).0
}

const POINT: &str = "SELECT v FROM items WHERE id = 3";
const RANGE: &str = "SELECT id, v FROM items WHERE id BETWEEN 2 AND 4 ORDER BY id";
const SCAN: &str = "SELECT count(*) FROM items WHERE v LIKE 'v%'";

#[test]
fn entries_the_stream_vouches_for_row_by_row_outlive_the_ttl() {
    let pg = Pg::start("fresh");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg, 3600);
    for sql in [POINT, RANGE, SCAN] {
        assert!(eventually(|| cached(port, sql)), "{sql} cached");
    }
    // past the TTL (1 s), the stream heard all along
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(read(port, POINT), (true, "v3".into()), "a point read outlives the TTL");
    assert_eq!(read(port, RANGE), (true, "2|v2\n3|v3\n4|v4".into()), "a short key range outlives the TTL");
    assert!(!read(port, SCAN).0, "a scan keeps the TTL");

    // changes made around the proxy still invalidate them: an update of a
    // row, an insert into the range's gap, a delete
    let out = psql(pg.port, "UPDATE items SET v = 'three' WHERE id = 3; DELETE FROM items WHERE id = 4");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(|| psql(port, POINT) == "three"), "the update reached the point read");
    assert!(eventually(|| psql(port, RANGE) == "2|v2\n3|three"), "the update and delete reached the range");
    let out = psql(pg.port, "INSERT INTO items VALUES (4, 'again')");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(eventually(|| psql(port, RANGE) == "2|v2\n3|three\n4|again"), "the insert reached the range");
    // and through the proxy
    let out = psql(port, "UPDATE items SET v = 'drei' WHERE id = 3");
    assert!(!out.contains("ERROR"), "{out}");
    assert_eq!(psql(port, POINT), "drei", "the proxy's own write");
}

#[test]
fn without_a_fresh_ttl_every_entry_keeps_the_ttl() {
    let pg = Pg::start("nofresh");
    create_items(&pg, 10);
    let (port, _p) = proxy(&pg, 0);
    assert!(eventually(|| cached(port, POINT)), "cached");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(read(port, POINT), (false, "v3".into()), "expired at the TTL");
}

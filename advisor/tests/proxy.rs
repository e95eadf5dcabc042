//! The advisor beside a POST AI proxy: `SHOW POSTAI QUERIES` tells, per
//! statement, what the proxy's cache answered, which pg_stat_statements
//! (what reached PostgreSQL) never sees.

#[path = "../../edge/tests/pg/mod.rs"]
#[allow(dead_code)]
mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually, eventually_within, psql, start_proxy_with, stat_n};
use postai_advisor::proxy::{merge, normalise, shapes};
use postai_advisor::{Options, advise, report};

async fn connect(port: u16) -> tokio_postgres::Client {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

#[test]
fn the_report_says_what_the_proxys_cache_answered() {
    let pg = Pg::start_with("advise-proxy", "shared_preload_libraries = 'pg_stat_statements'\n");
    let out = psql(pg.port, "CREATE EXTENSION pg_stat_statements; CREATE EXTENSION hypopg");
    assert!(!out.contains("ERROR"), "{out}");
    create_items(&pg, 1000);
    let (port, proxy) = start_proxy_with(&pg, &format!("{ITEMS_TABLE}[cdc]\npoll_ms = 50\n"));
    assert!(eventually_within(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    assert!(eventually(|| {
        psql(port, "SELECT v FROM items WHERE id = 3");
        stat_n(port, "l1_hits") > 0
    }));
    for _ in 0..20 {
        assert_eq!(psql(port, "SELECT v FROM items WHERE id = 3"), "v3");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let text = rt.block_on(async {
        let db = connect(pg.port).await;
        let mut r = advise(&db, None, &Options::default()).await.expect("advice");
        merge(&mut r, shapes(&connect(port).await).await.expect("SHOW POSTAI QUERIES"));
        let text = report::render(&r);
        let point = r
            .statements
            .iter()
            .find(|s| normalise(&s.query) == "select v from items where id = $1")
            .unwrap_or_else(|| panic!("{text}"));
        let c = point.cache.as_ref().unwrap_or_else(|| panic!("merged: {text}"));
        assert!(c.calls >= 21.0 && c.l1_hits >= 20.0, "{text}");
        assert!(point.calls < c.calls, "PostgreSQL saw fewer calls than the proxy answered: {text}");
        assert!(c.hit_pct > 80.0, "{text}");
        text
    });
    assert!(text.contains("answered by its cache"), "{text}");
    drop(proxy);
}

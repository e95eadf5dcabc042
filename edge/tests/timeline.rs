//! A failover that loses commits (the promoted replica had stopped
//! receiving WAL): the new primary's timeline reuses the LSNs of the commits
//! the old one lost. Nothing the proxy learned of the old timeline's
//! positions may stamp an answer of the new one.

mod pg;

use std::time::Duration;

use pg::{ITEMS_TABLE, Pg, create_items, eventually_within as eventually, psql, stat_n};

/// A primary with `items` and a replica that has them, then stops
/// receiving WAL (its primary_conninfo emptied).
fn cut_pair(name: &str) -> (Pg, Pg) {
    let primary = Pg::start(&format!("{name}-primary"));
    create_items(&primary, 20);
    let replica = primary.start_replica(&format!("{name}-standby"), 0);
    assert!(eventually(Duration::from_secs(20), || psql(replica.port, "SELECT count(*) FROM items") == "20"));
    let out = psql(replica.port, "ALTER SYSTEM SET primary_conninfo = ''");
    assert!(!out.contains("ERROR"), "{out}");
    psql(replica.port, "SELECT pg_reload_conf()");
    assert!(
        eventually(Duration::from_secs(20), || psql(primary.port, "SELECT count(*) FROM pg_stat_replication") == "0"),
        "the replica stopped streaming"
    );
    (primary, replica)
}

/// Commits the replica never gets, megabytes of WAL ahead of it; row 7 among them.
fn run_ahead(primary: &Pg) {
    let out = psql(
        primary.port,
        "UPDATE items SET v = 'lost' WHERE id = 7; CREATE TABLE junk AS SELECT g, repeat('x', 100) AS pad \
         FROM generate_series(1, 50000) g",
    );
    assert!(!out.contains("ERROR"), "{out}");
}

/// The old primary's position ran far ahead of what the replica had when it
/// is promoted. A read right after the failover is answered by the new
/// primary at a position far below the old one's; a write there then
/// commits at an LSN the old primary had passed. The cached answer must not
/// outlive that write.
#[test]
fn a_lossy_failover_does_not_stamp_new_answers_with_old_positions() {
    let (primary, replica) = cut_pair("tl");
    let proxy = pg::start_proxy(&format!(
        "upstream = '{}'\nreplicas = ['{}']\n[[tables]]\nname = 'items'\nprimary_key = 'id'\ninteger_key = true\n\
         [cdc]\npoll_ms = 50\n[failover]\nhealth_interval_ms = 200\ntimeout_ms = 3000\n",
        primary.addr(),
        replica.addr()
    ));
    let port = proxy.port;
    assert!(eventually(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    // the old primary moves megabytes of WAL ahead: commits the replica never gets
    run_ahead(&primary);
    let old_end = psql(primary.port, "SELECT pg_current_wal_lsn()");
    // the proxy has seen the old primary there (health checks, the stream)
    std::thread::sleep(Duration::from_millis(1500));
    primary.crash();
    // (logins fail until the replica is promoted: they need the primary)
    let failed_over = || psql(port, "SHOW POSTAI STATS").lines().any(|l| l == "failovers|1");
    assert!(eventually(Duration::from_secs(40), failed_over), "the failover");
    assert!(eventually(Duration::from_secs(20), || psql(replica.port, "SELECT pg_is_in_recovery()") == "f"));
    // the change stream of the new primary is read (a new slot), and its
    // first roles check is done (the servers' configuration load times
    // differ: everything cached before is dropped then)
    let events = stat_n(port, "cdc_events");
    assert!(eventually(Duration::from_secs(20), || stat_n(port, "cdc_events") > events + 5), "the new stream");
    std::thread::sleep(Duration::from_millis(2500));
    // the new primary answers from before the lost commits
    assert!(eventually(Duration::from_secs(20), || psql(port, "SELECT v FROM items WHERE id = 7") == "v7"));
    let hits = stat_n(port, "l1_hits");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 7"), "v7");
    eprintln!("read after the failover: {} hits", stat_n(port, "l1_hits") - hits);
    // a write on the new primary, at an LSN the old one had passed
    psql(replica.port, "UPDATE items SET v = 'new' WHERE id = 7");
    let at = psql(replica.port, "SELECT pg_current_wal_lsn()");
    let behind = psql(replica.port, &format!("SELECT pg_current_wal_lsn() < '{old_end}'::pg_lsn"));
    assert_eq!(behind, "t", "the new timeline ({at}) reuses the old one's positions (up to {old_end})");
    assert!(
        eventually(Duration::from_secs(10), || psql(port, "SELECT v FROM items WHERE id = 7") == "new"),
        "the answer read after the failover was kept past a write of the new primary"
    );
}

/// An edge follows a regional proxy's stream. The regional stops; the
/// primary fails after running far ahead of its replica; the replica is
/// promoted and a regional proxy starts again in front of it, on the same
/// address. Its new slot is on the new timeline, whose positions the old
/// one also used: the edge's position must not be continued there (what it
/// cached of the lost commits would stay, and the new timeline's commits up
/// to that position would never reach it).
#[test]
fn a_regional_restarted_after_a_lossy_failover_does_not_continue_an_old_position() {
    let (primary, replica) = cut_pair("tlr");
    let regional_config = |pg: &Pg| {
        format!(
            "upstream = '{}'\nrole = 'regional'\n[pool]\nsize = 4\n[cdc]\nslot = 'regional'\npoll_ms = 50\n\
             [failover]\nenabled = false\n{ITEMS_TABLE}",
            pg.addr()
        )
    };
    let regional_port = pg::free_port();
    let regional = pg::start_proxy_on(regional_port, &regional_config(&primary));
    let edge = pg::start_proxy(&format!(
        "upstream = '127.0.0.1:{regional_port}'\n[cdc]\nsource = 'regional'\npoll_ms = 50\n\
         [failover]\nenabled = false\n{ITEMS_TABLE}"
    ));
    let port = edge.port;
    for p in [regional_port, port] {
        assert!(eventually(Duration::from_secs(20), || stat_n(p, "filling") > 0), "CDC of {p}");
    }
    // commits the replica never gets, far ahead of it; the edge caches one
    run_ahead(&primary);
    assert!(eventually(Duration::from_secs(20), || psql(port, "SELECT v FROM items WHERE id = 7") == "lost"));
    std::thread::sleep(Duration::from_millis(1500));
    let resumed = stat_n(port, "cdc_resumed");
    // the regional stops, the primary fails, the replica is promoted, a
    // regional starts again in front of it
    drop(regional);
    primary.crash();
    assert_eq!(psql(replica.port, "SELECT pg_promote()"), "t");
    let _regional = pg::start_proxy_on(regional_port, &regional_config(&replica));
    // the edge subscribes again, from its old position: not continued
    let events = stat_n(port, "cdc_events");
    assert!(eventually(Duration::from_secs(30), || stat_n(port, "cdc_events") > events + 3), "the edge's stream");
    assert_eq!(stat_n(port, "cdc_resumed"), resumed, "an old timeline's position was continued");
    assert!(eventually(Duration::from_secs(10), || psql(port, "SELECT v FROM items WHERE id = 7") == "v7"));
    psql(replica.port, "UPDATE items SET v = 'new' WHERE id = 7");
    assert!(eventually(Duration::from_secs(10), || psql(port, "SELECT v FROM items WHERE id = 7") == "new"));
}

/// A replica that receives no WAL from the primary's timeline (cut off, or
/// diverged past a promotion) takes no reads, however healthy it answers:
/// what it holds may be a history the primary no longer has, and it falls
/// further behind without bound. A streaming replica still takes them.
#[test]
fn a_replica_off_the_primary_s_timeline_takes_no_reads() {
    let (primary, cut) = cut_pair("tloff");
    let live = primary.start_replica("tloff-live", 0);
    psql(primary.port, "UPDATE items SET v = 'new' WHERE id = 1");
    assert!(eventually(Duration::from_secs(20), || psql(live.port, "SELECT v FROM items WHERE id = 1") == "new"));
    assert_eq!(psql(cut.port, "SELECT v FROM items WHERE id = 1"), "v1", "the cut replica is behind");
    let start = |replica: &Pg| {
        pg::start_proxy(&format!(
            "upstream = '{}'\nreplicas = ['{}']\n{ITEMS_TABLE}[cache]\nconsistency = 'eventual'\n\
             [cdc]\npoll_ms = 50\n[failover]\nhealth_interval_ms = 200\ntimeout_ms = 3000\n",
            primary.addr(),
            replica.addr()
        ))
    };
    let reads = |port: u16| -> Vec<String> {
        assert!(eventually(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
        std::thread::sleep(Duration::from_millis(1000));
        (0..20).map(|_| psql(port, "SELECT v FROM items WHERE id = 1")).collect()
    };
    let off = start(&cut);
    let got = reads(off.port);
    assert!(got.iter().all(|v| v == "new"), "reads answered by the replica cut off: {got:?}");
    assert_eq!(stat_n(off.port, "replica_reads"), 0);
    let on = start(&live);
    let got = reads(on.port);
    assert!(got.iter().all(|v| v == "new"), "{got:?}");
    assert!(stat_n(on.port, "replica_reads") > 0, "the streaming replica takes reads");
}

/// A commit's WAL is written before the commit is visible: here a
/// synchronous standby that never answers holds a commit invisible while
/// its WAL, and its change in the stream, are there. A read in that window
/// gets the old row; it must not be filed past the commit (its change has
/// already been applied), or it outlives the commit once it is visible.
#[test]
fn a_commit_not_yet_visible_does_not_date_a_fill_past_it() {
    let pg = Pg::start("visible");
    create_items(&pg, 10);
    // commits of role `waiter` wait for a standby that never comes; others do not
    let setup = [
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "ALTER SYSTEM SET synchronous_commit = 'local'",
        "SELECT pg_reload_conf()",
        "CREATE ROLE waiter LOGIN",
        "GRANT UPDATE, SELECT ON items TO waiter",
        "ALTER ROLE waiter SET synchronous_commit = 'on'",
    ];
    for sql in setup {
        let out = psql(pg.port, sql);
        assert!(!out.contains("ERROR"), "{sql}: {out}");
    }
    let proxy = pg::start_proxy(&format!(
        "upstream = '{}'\n{ITEMS_TABLE}[cdc]\npoll_ms = 50\n[failover]\nenabled = false\nhealth_interval_ms = 100\n",
        pg.addr()
    ));
    let port = proxy.port;
    assert!(eventually(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    let pg_port = pg.port;
    let writer = std::thread::spawn(move || {
        let out = std::process::Command::new("psql")
            .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &pg_port.to_string(), "-U", "waiter", "-d", "postgres"])
            .args(["-c", "UPDATE items SET v = 'six' WHERE id = 6"])
            .output()
            .expect("psql runs");
        String::from_utf8_lossy(&out.stderr).into_owned()
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";
    assert!(eventually(Duration::from_secs(10), || psql(pg.port, waiting) == "1"), "the commit waits");
    // its change is in the stream, and the proxy has seen the primary past it
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 6"), "v6", "not visible yet");
    assert_eq!(psql(port, "SELECT v FROM items WHERE id = 6"), "v6");
    // the wait ends (cancelled: the commit stands, and becomes visible)
    psql(pg.port, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
    let stderr = writer.join().expect("writer");
    assert!(stderr.contains("synchronous replication"), "{stderr}");
    assert_eq!(psql(pg.port, "SELECT v FROM items WHERE id = 6"), "six", "committed");
    assert!(
        eventually(Duration::from_secs(5), || psql(port, "SELECT v FROM items WHERE id = 6") == "six"),
        "the answer read while the commit was invisible outlived it"
    );
}

/// The primary's host dies with the proxy's connections open: the change
/// stream's reader, waiting on a statement the old primary will never
/// answer, moves to the promoted replica once the failover happens
/// (before, it waited for the kernel to give up, about 15 minutes, and
/// nothing was cached meanwhile).
#[test]
fn the_change_stream_moves_to_the_new_primary_when_the_old_one_goes_silent() {
    let primary = Pg::start("hole-primary");
    create_items(&primary, 20);
    let replica = primary.start_replica("hole-standby", 0);
    assert!(eventually(Duration::from_secs(20), || psql(replica.port, "SELECT count(*) FROM items") == "20"));
    let hole = pg::faults::Relay::new(primary.port);
    let proxy = pg::start_proxy(&format!(
        "upstream = '127.0.0.1:{}'\nreplicas = ['{}']\n{ITEMS_TABLE}[cdc]\npoll_ms = 50\n\
         [failover]\nhealth_interval_ms = 200\ntimeout_ms = 3000\n",
        hole.port,
        replica.addr()
    ));
    let port = proxy.port;
    assert!(eventually(Duration::from_secs(20), || stat_n(port, "filling") > 0), "CDC connected");
    hole.freeze();
    let failed_over = || psql(port, "SHOW POSTAI STATS").lines().any(|l| l == "failovers|1");
    assert!(eventually(Duration::from_secs(40), failed_over), "the failover");
    let events = stat_n(port, "cdc_events");
    assert!(
        eventually(Duration::from_secs(20), || stat_n(port, "cdc_events") > events + 5),
        "the change stream of the new primary is read"
    );
}

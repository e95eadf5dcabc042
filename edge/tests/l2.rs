//! L2 in a local SQLite file: a restarted proxy starts warm (L2 hits for
//! what the last one cached) and never serves an entry that a change made
//! while it was down invalidated; a corrupt, unusable or foreign file is
//! reported and replaced or wiped, never fatal.

mod pg;

use std::path::{Path, PathBuf};

use pg::{
    ITEMS_TABLE, Pg, create_items, eventually, free_port, psql, start_proxy_with, stat as stat_text, stat_n as stat,
};

const ITEMS: &str = ITEMS_TABLE;

/// Starts a proxy in front of `pg` with its L2 file at `l2` and `tables`;
/// returns its port and its guard (dropping it stops the proxy).
fn start_proxy(pg: &Pg, l2: &Path, tables: &str) -> (u16, pg::Proxy) {
    let extra = format!("[cache]\nl2_path = '{}'\n{tables}[cdc]\npoll_ms = 50\nsilence_max_ms = 5000\n", l2.display());
    start_proxy_with(pg, &extra)
}

fn read(port: u16, id: u32) -> String {
    psql(port, &format!("SELECT v FROM items WHERE id = {id}"))
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("postai-l2-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads ids 1..=6 through a fresh proxy, waits until the file has them, stops it.
fn fill_and_stop(pg: &Pg, file: &Path) {
    let (port, rt) = start_proxy(pg, file, ITEMS);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    for id in 1..=6 {
        assert_eq!(read(port, id), format!("v{id}"));
    }
    assert!(eventually(|| stat(port, "l2_file_entries") >= 6), "the file has the six entries");
    drop(rt);
}

#[test]
fn a_restarted_proxy_starts_warm_and_never_serves_stale() {
    let pg = Pg::start("l2");
    create_items(&pg, 20);
    let dir = TempDir::new("restart");
    let file = dir.0.join("l2.sqlite");

    fill_and_stop(&pg, &file);

    // a new proxy on the same file: the same reads are L2 hits
    let (port, rt) = start_proxy(&pg, &file, ITEMS);
    assert_eq!(stat(port, "l2_file_restored"), 6);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    for id in 1..=6 {
        assert_eq!(read(port, id), format!("v{id}"));
    }
    assert_eq!(stat(port, "l2_hits"), 6, "every read answered from the restored L2");
    assert_eq!(read(port, 1), "v1");
    assert_eq!(stat(port, "l1_hits"), 1, "promoted to L1");
    // changed on the primary while the proxy runs: the entry leaves the file
    // before the slot moves past the change (which it then never re-delivers)
    assert_eq!(read(port, 7), "v7");
    assert!(eventually(|| stat(port, "l2_file_entries") >= 7), "written");
    psql(pg.port, "UPDATE items SET v = 'seven' WHERE id = 7");
    let after = psql(pg.port, "SELECT pg_current_wal_lsn()");
    let advanced =
        format!("SELECT confirmed_flush_lsn >= '{after}' FROM pg_replication_slots WHERE slot_name = 'postai'");
    assert!(eventually(|| psql(pg.port, &advanced) == "t"), "the slot moved past the update");
    assert_eq!(stat(port, "l2_file_entries"), 6, "the entry of id 7 was deleted first");
    drop(rt);

    // changed on the primary while the proxy is down
    let up = psql(pg.port, "UPDATE items SET v = 'new' || id WHERE id IN (2, 4)");
    assert!(!up.contains("ERROR"), "{up}");
    let (port, rt) = start_proxy(&pg, &file, ITEMS);
    assert_eq!(stat(port, "l2_file_restored"), 6, "restored before the CDC reader has vouched for them");
    // at once, before the CDC stream is heard: never the old value
    assert_eq!(read(port, 2), "new2");
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert_eq!(read(port, 7), "seven");
    for id in 1..=6 {
        let want = if id == 2 || id == 4 { format!("new{id}") } else { format!("v{id}") };
        assert_eq!(read(port, id), want, "id {id}");
    }
    assert_eq!(stat(port, "l2_hits"), 4, "the untouched rows are hits");
    assert!(eventually(|| stat(port, "l2_file_deleted") >= 2), "the changed rows' entries left the file");
    // a write through the proxy: in the slot too
    assert_eq!(psql(port, "UPDATE items SET v = 'five' WHERE id = 5"), "");
    assert_eq!(read(port, 5), "five");
    assert!(eventually(|| stat(port, "l2_file_entries") >= 6), "refilled");
    drop(rt);

    // and once more: the proxy's own write and the refills come back right
    let (port, rt) = start_proxy(&pg, &file, ITEMS);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    for (id, want) in [(1, "v1"), (2, "new2"), (4, "new4"), (5, "five"), (6, "v6")] {
        assert_eq!(read(port, id), want, "id {id}");
    }
    drop(rt);

    // the slot dropped while the proxy is down: changes may have been lost,
    // so the file is wiped when the reader creates a new slot
    psql(pg.port, "UPDATE items SET v = 'six' WHERE id = 6");
    let dropped = psql(pg.port, "SELECT pg_drop_replication_slot('postai')");
    assert!(!dropped.contains("ERROR"), "{dropped}");
    let (port, rt) = start_proxy(&pg, &file, ITEMS);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert!(stat_text(port, "l2_file_notice").contains("created"), "{}", stat_text(port, "l2_file_notice"));
    for (id, want) in [(1, "v1"), (5, "five"), (6, "six")] {
        assert_eq!(read(port, id), want, "id {id}");
    }
    assert_eq!(stat(port, "l2_hits"), 0, "nothing served from a wiped file");
    drop(rt);
}

/// An edge behind a regional proxy ([cdc] source = "regional") with a file:
/// restarted, it asks its subscription to continue from the file's position;
/// the regional replays what it kept, so the file stays warm and the rows
/// changed meanwhile are not served stale. When the regional cannot vouch
/// (its slot was made anew), the file is wiped.
#[test]
fn an_edge_behind_a_regional_proxy_resumes_from_its_file() {
    let pg = Pg::start("l2-regional");
    create_items(&pg, 20);
    let dir = TempDir::new("regional");
    let file = dir.0.join("edge.sqlite");
    let regional = pg::start_proxy(&format!(
        "upstream = '{}'\nrole = 'regional'\n[cdc]\nslot = 'region'\npoll_ms = 50\n{ITEMS}",
        pg.addr()
    ));
    let edge = || {
        let p = pg::start_proxy(&format!(
            "upstream = '127.0.0.1:{}'\n[cache]\nl2_path = '{}'\n[cdc]\nsource = 'regional'\npoll_ms = 50\n\
             [failover]\nenabled = false\n{ITEMS}",
            regional.port,
            file.display()
        ));
        assert!(eventually(|| stat(p.port, "filling") > 0), "subscribed");
        p
    };
    let e = edge();
    for id in 1..=6 {
        assert_eq!(read(e.port, id), format!("v{id}"));
    }
    assert!(eventually(|| stat(e.port, "l2_file_entries") >= 6), "the file has the six entries");
    drop(e);

    // changed while the edge is down: the regional streams it to nobody, and keeps it
    let up = psql(pg.port, "UPDATE items SET v = 'new' || id WHERE id IN (2, 4)");
    assert!(!up.contains("ERROR"), "{up}");
    let e = edge();
    assert_eq!(stat(e.port, "l2_file_restored"), 6);
    assert_eq!(stat(e.port, "cdc_resumed"), 1, "continued from the file's position");
    for id in 1..=6 {
        let want = if id == 2 || id == 4 { format!("new{id}") } else { format!("v{id}") };
        assert_eq!(read(e.port, id), want, "id {id}");
    }
    assert_eq!(stat(e.port, "l2_hits"), 4, "the untouched rows are hits");
    drop(e);

    // the regional's slot made anew while the edge is down: nothing to resume from
    let drop_slot = "SELECT pg_drop_replication_slot('region')";
    assert!(eventually(|| psql(pg.port, drop_slot).is_empty()), "slot dropped");
    let recreated = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'region'";
    assert!(eventually(|| psql(pg.port, recreated) == "1"), "the regional made a new slot");
    let e = edge();
    assert_eq!(stat(e.port, "cdc_resumed"), 0);
    for id in [1, 3, 5] {
        assert_eq!(read(e.port, id), format!("v{id}"));
    }
    assert_eq!(stat(e.port, "l2_hits"), 0, "nothing served from a wiped file");
}

#[test]
fn bad_files_are_reported_and_foreign_ones_wiped() {
    let pg = Pg::start("l2-bad");
    create_items(&pg, 20);
    let dir = TempDir::new("bad");

    // a corrupt file: moved aside, the proxy starts with an empty L2 and a fresh file
    let file = dir.0.join("corrupt.sqlite");
    std::fs::write(&file, b"this is not a database ".repeat(400)).expect("write garbage");
    let (port, rt) = start_proxy(&pg, &file, ITEMS);
    let notice = stat_text(port, "l2_file_notice");
    assert!(notice.contains("unreadable") && notice.contains(".corrupt"), "{notice}");
    assert!(stat_text(port, "l2_file").ends_with("(ok)"), "{}", stat_text(port, "l2_file"));
    assert_eq!(stat(port, "l2_file_restored"), 0);
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert_eq!(read(port, 1), "v1");
    assert!(eventually(|| stat(port, "l2_file_entries") >= 1), "the fresh file is written");
    drop(rt);
    assert!(dir.0.join("corrupt.sqlite.corrupt").exists());

    // a path that cannot be a file: L2 in memory only, the proxy serves
    let (port, rt) = start_proxy(&pg, &dir.0, ITEMS);
    assert!(stat_text(port, "l2_file").contains("off"), "{}", stat_text(port, "l2_file"));
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert_eq!(read(port, 2), "v2");
    assert_eq!(read(port, 2), "v2");
    assert_eq!(stat(port, "l1_hits"), 1);
    drop(rt);

    // a file written under another configuration (another table list: other
    // table ids) is wiped on open
    let file = dir.0.join("l2.sqlite");
    fill_and_stop(&pg, &file);
    let other = format!("[[tables]]\nname = 'owners'\nprimary_key = 'id'\n{ITEMS}");
    let (port, rt) = start_proxy(&pg, &file, &other);
    assert_eq!(stat(port, "l2_file_restored"), 0);
    let notice = stat_text(port, "l2_file_notice");
    assert!(notice.contains("another configuration") && notice.contains("6 entries wiped"), "{notice}");
    assert!(eventually(|| stat(port, "filling") > 0), "CDC connected");
    assert_eq!(read(port, 3), "v3");
    assert_eq!(stat(port, "l2_hits"), 0);
    drop(rt);
}

//! L2 in a local SQLite file (`[cache] l2_path`), so that a restarted edge
//! starts warm, and never serves a stale entry.
//!
//! What is written: every entry a fill stores in L2 (cache key, encoded
//! value, snapshot LSN, deps, wall-clock expiry), by one writer thread fed
//! through a bounded queue; a fill that finds the queue full is dropped (the
//! file is a cache). The file holds at most the L2 budgets (oldest evicted).
//!
//! # Why a restored entry is never stale
//!
//! **Stability.** A persisted entry must mean the same in the next process.
//! - Cache keys digest the shape fingerprint (a fixed hash of the normalised
//!   text), the session context (role, database, settings), the literals and
//!   the parameters: no process-local ids. A *private* session's context also
//!   digests its session id, which the next process reuses for another client:
//!   such entries are never written ([`EdgeNode::context_is_portable`]).
//! - Deps name tables by `TableId`, and key hashes digest the `TableId`. The
//!   catalog interns the configured `[[tables]]` first, in order, then other
//!   tables as queries first mention them (an order that differs per process).
//!   So only entries whose deps are all on configured tables are written, and
//!   the file records a fingerprint of what fixes those ids and the meaning of
//!   keys and values (this format's version, upstream, slot, invalidation
//!   mode, the `[[tables]]` list in order): a file with another fingerprint
//!   is wiped on open.
//!
//! **Invalidation continuity.** The CDC reader peeks at the slot
//! (`pg_logical_slot_peek_changes`), applies each change in memory, sends the
//! changes here, and only when this thread has deleted the affected rows and
//! recorded the batch's last commit `T` as the file's position `P_file`
//! (one transaction, `synchronous = FULL`), advances the slot to `T`
//! (`pg_replication_slot_advance`). So the slot's confirmed position `P_slot`
//! never runs ahead of `P_file`, and every change after `P_slot` is still in
//! the slot. Invariant: *no row in the file is invalidated by a change at or
//! below `P_file`* (deletion mirrors `VersionMap::is_valid`: a row with
//! snapshot `S` is deleted by a change at `L > S` touching its table, or its
//! key, or everything).
//!
//! Fills and invalidations reach this thread through one FIFO queue, and both
//! are queued under the node's lock: a fill queued after an invalidation was
//! validated (`VersionMap::is_valid` at fill time) after that change was
//! applied in memory, so it is not invalidated by it; a fill queued before is
//! deleted by it. A dropped fill loses nothing but warmth.
//!
//! **Restart.** Entries are restored into L2 at start. They cannot be served
//! before the CDC stream is heard (`cdc_silence_max` is set whenever a file
//! is, `[cdc] enabled` is required): the CDC reader first *adopts* the file,
//! then applies its first peek, which re-delivers every change after
//! `P_slot`, in one hold of the node's lock before the first event opens the
//! cache. A restored entry is therefore checked against every change after
//! `P_slot` (in memory) and every change up to `P_file >= P_slot` (by the
//! invariant). Adoption wipes the file (and the in-memory tiers) when that
//! argument does not hold: the slot was created anew (the changes before it
//! are unknown), the slot stands past `P_file` (someone else consumed
//! changes, or an invalidation was not written), the cluster's
//! `system_identifier` differs from the file's, or the file has rows but no
//! position. Fills are written only after adoption.
//!
//! Behind a regional proxy (`[cdc] source = "regional"`) there is no slot:
//! the subscription asks to continue from `P_file` (`POSTAI SUBSCRIBE FROM`)
//! and the file is adopted on the answer, kept when the regional proxy
//! replays every change after `P_file` (applied in one hold of the node's
//! lock before the cache opens), wiped otherwise. Every applied commit moves
//! `P_file` (nothing upstream waits for it).
//!
//! Writes through the proxy are in the slot too. A write of unknown effect
//! (DDL: not in the slot) through the proxy clears the file; a crash between
//! that statement and the clear being written, and DDL run directly on the
//! primary, are not covered (DDL directly on the primary does not invalidate
//! the in-memory tiers either).
//!
//! A file SQLite cannot read (corrupt) is moved aside to `<path>.corrupt` and
//! replaced by an empty one; a path that cannot be opened at all leaves L2 in
//! memory only. Either is reported (stderr, `SHOW POSTAI STATS`: `l2_file`).
//! A write error stops the file for the rest of the process (and removes
//! it): invalidations are then acknowledged without a file, which is safe,
//! because the slot then moves past `P_file` and the next start wipes.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use postai_core::cache::{Entry, TierName};
use postai_core::hash::Digest128;
use postai_core::invalidation::{Change, ChangeTarget, Dep};
use postai_core::node::{EdgeNode, RequestId, SessionId};
use postai_core::sql::TableId;
use postai_core::{Duration, Instant, Lsn};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::Value;
use crate::config::Config;

mod store;
pub use postai_core::stream::fmt_lsn;
use store::*;

/// Version of what the file's rows mean: bump it when cache keys, deps, key
/// hashes or the encoding of values change (a file of another version is wiped).
pub const FORMAT: u32 = 1;

/// Fills waiting for the writer, at most (count and value bytes): past
/// either, a fill is dropped.
const QUEUE_FILLS_MAX: usize = 4096;
const QUEUE_BYTES_MAX: usize = 64 << 20;

/// One persisted entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: u128,
    pub value: Value,
    pub lsn: Lsn,
    pub deps: Vec<Dep>,
    /// Wall-clock expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// The file's bounds (the L2 tier's).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub entries: usize,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct FileStats {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub restored: AtomicU64,
    pub writes: AtomicU64,
    pub dropped: AtomicU64,
    /// Rows deleted by invalidations, clears and wipes.
    pub deleted: AtomicU64,
    pub evicted: AtomicU64,
    pub errors: AtomicU64,
}

type Ack = oneshot::Sender<Result<(), String>>;

enum Op {
    Fill(Record),
    /// Delete what `changes` invalidate, then record `through` as the file's position.
    Invalidate {
        changes: Vec<Change>,
        through: Lsn,
        ack: Ack,
    },
    /// The CDC reader connected: check the file against the slot.
    Adopt {
        slot: Lsn,
        created: bool,
        system_id: Option<String>,
        ack: oneshot::Sender<Option<String>>,
    },
    Clear(String),
    Barrier(Ack),
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<Op>,
    fills: usize,
    fill_bytes: usize,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    stats: FileStats,
    /// `ok`, or why the file is off; and the last notable event.
    status: Mutex<(String, String)>,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set_status(&self, status: Option<String>, notice: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = status {
            s.0 = st;
        }
        if let Some(n) = notice {
            s.1 = n;
        }
    }
}

/// The persisted L2: a handle on the writer thread.
pub struct L2File {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
    /// Tables with ids below this are the configured ones (stable ids).
    configured_tables: u32,
    /// The file's position when it was opened: where an edge behind a
    /// regional proxy asks its subscription to continue from.
    pub opened_at: Option<Lsn>,
    /// The cluster (and, behind a regional proxy, the history after
    /// [`ORIGIN_MARK`]) the file was written for, when it was opened.
    opened_id: Option<String>,
}

/// Separates the history a subscribed edge's file position is on
/// (`postai_core::stream::Line::Origin`) in the file's cluster id.
pub const ORIGIN_MARK: &str = " origin ";

/// What [`L2File::open`] found.
pub struct Opened {
    pub file: L2File,
    /// Valid rows, oldest first, not expired.
    pub restored: Vec<Record>,
    /// What was wrong or wiped, for the log.
    pub notices: Vec<String>,
}

/// Captured before a request's reply reaches the node (see [`L2File::after_upstream`]).
pub struct BeforeUpstream {
    key: Option<u128>,
    global: Lsn,
}

impl L2File {
    /// Opens (or creates) the file and reads its valid rows. Never fails: a
    /// corrupt file is moved aside and replaced, an unusable path leaves the
    /// file off (everything acknowledged, nothing written).
    pub fn open(path: &Path, fingerprint: &str, budget: Budget, configured_tables: u32, now_ms: u64) -> Opened {
        let mut notices = Vec::new();
        let mut opened = Store::open(path, fingerprint, budget, configured_tables, now_ms);
        if let Err(e) = &opened
            && std::fs::metadata(path).is_ok_and(|m| m.is_file())
        {
            let aside = aside_path(path, ".corrupt");
            let moved = std::fs::rename(path, &aside);
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(aside_path(path, suffix));
            }
            match moved {
                Ok(()) => {
                    notices.push(format!("unreadable ({e}): moved to {}, starting with an empty L2", aside.display()));
                    opened = Store::open(path, fingerprint, budget, configured_tables, now_ms);
                }
                Err(m) => notices.push(format!("unreadable ({e}) and cannot be moved aside ({m})")),
            }
        }
        let (store, restored, status) = match opened {
            Ok((store, restored, mut n)) => {
                notices.append(&mut n);
                (Some(store), restored, "ok".to_string())
            }
            Err(e) => {
                notices.push(format!("cannot be used ({e}): L2 in memory only"));
                (None, Vec::new(), format!("off: {e}"))
            }
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            stats: FileStats::default(),
            status: Mutex::new((status, notices.last().cloned().unwrap_or_default())),
        });
        if let Some(s) = &store {
            shared.stats.entries.store(s.entries, Ordering::Relaxed);
            shared.stats.bytes.store(s.bytes, Ordering::Relaxed);
        }
        let opened_at = store.as_ref().and_then(|s| s.through);
        let opened_id = store.as_ref().and_then(|s| s.meta("system_id").ok().flatten());
        let thread = {
            let shared = shared.clone();
            let path = path.to_path_buf();
            std::thread::Builder::new()
                .name("postai-l2-file".into())
                .spawn(move || Writer { shared, unvouched: store.is_some(), store, path }.run())
                .expect("spawn the L2 file writer thread")
        };
        let path = path.to_path_buf();
        let file = L2File { shared, thread: Some(thread), path, configured_tables, opened_at, opened_id };
        Opened { file, restored, notices }
    }

    /// The history the file's position is on (a subscribed edge's), if known.
    pub fn opened_origin(&self) -> Option<String> {
        let id = self.opened_id.as_deref()?;
        id.split_once(ORIGIN_MARK).map(|(_, o)| o.to_string()).filter(|o| o != "unknown")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &FileStats {
        &self.shared.stats
    }

    /// `ok` or why the file is off; the last notable event.
    pub fn status(&self) -> (String, String) {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues `op`; after the writer stopped, drops it (its answer then
    /// fails, which the callers read as "no file").
    fn push(&self, op: Op) {
        let mut q = self.shared.queue();
        if q.closed {
            return;
        }
        q.ops.push_back(op);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Queues a fill; drops it when the queue is full.
    pub fn fill(&self, record: Record) {
        let mut q = self.shared.queue();
        if q.closed || q.fills >= QUEUE_FILLS_MAX || q.fill_bytes + record.value.len() > QUEUE_BYTES_MAX {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.fills += 1;
        q.fill_bytes += record.value.len();
        q.ops.push_back(Op::Fill(record));
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Deletes what `changes` invalidate and records `through` as the file's
    /// position; the answer comes once that is durable (then the slot may
    /// advance to `through`). Queue it under the node's lock, right after
    /// applying the changes in memory.
    pub fn invalidate(&self, changes: Vec<Change>, through: Lsn) -> oneshot::Receiver<Result<(), String>> {
        let (ack, rx) = oneshot::channel();
        self.push(Op::Invalidate { changes, through, ack });
        rx
    }

    /// The CDC reader connected to a slot at `slot` (`created`: just now), on
    /// the cluster `system_id`. Answers why the file was wiped, if it was
    /// (then the in-memory tiers must be cleared too).
    pub fn adopt(&self, slot: Lsn, created: bool, system_id: Option<String>) -> oneshot::Receiver<Option<String>> {
        let (ack, rx) = oneshot::channel();
        self.push(Op::Adopt { slot, created, system_id, ack });
        rx
    }

    /// Deletes every row (the in-memory tiers were cleared, or everything invalidated).
    pub fn clear(&self, reason: &str) {
        self.push(Op::Clear(reason.to_string()));
    }

    /// Answers once everything queued before is written.
    pub fn barrier(&self) -> oneshot::Receiver<Result<(), String>> {
        let (ack, rx) = oneshot::channel();
        self.push(Op::Barrier(ack));
        rx
    }

    /// Whether every dep is on a configured table (ids stable across
    /// processes). An entry that depends on any table is not persisted: the
    /// file invalidates by table and key.
    pub fn stable_deps(&self, deps: &[Dep]) -> bool {
        deps.iter().all(|d| match *d {
            Dep::Table(t) | Dep::Key(t, _) => t.0 < self.configured_tables,
            Dep::Any => false,
        })
    }

    /// Call with the node locked, before `handle_upstream(req)`.
    pub fn before_upstream(&self, node: &EdgeNode<Value>, req: RequestId) -> BeforeUpstream {
        BeforeUpstream { key: node.pending_fill_key(req), global: node.versions().required_lsn(&[]) }
    }

    /// Call with the node still locked, after `handle_upstream`: queues the
    /// entry the reply filled, when it may outlive the process; clears the
    /// file when the reply invalidated everything (a write of unknown effect).
    pub fn after_upstream(&self, node: &EdgeNode<Value>, session: SessionId, now: Instant, before: BeforeUpstream) {
        if node.versions().required_lsn(&[]) > before.global {
            self.clear("a write of unknown effect through the proxy");
        }
        let Some(key) = before.key else { return };
        if !node.context_is_portable(session) {
            return;
        }
        let Some(e) = node.tier(TierName::L2).and_then(|t| t.peek(key)) else { return };
        if e.expires_at <= now || !node.versions().is_valid(e.lsn, &e.deps) || !self.stable_deps(&e.deps) {
            return;
        }
        let ttl_ms = u64::try_from(e.expires_at.saturating_since(now).as_millis()).unwrap_or(u64::MAX);
        self.fill(Record {
            key,
            value: e.value.clone(),
            lsn: e.lsn,
            deps: e.deps.to_vec(),
            expires_ms: unix_ms().saturating_add(ttl_ms),
        });
    }

    /// `SHOW POSTAI STATS` rows.
    pub fn stats_rows(&self) -> Vec<(String, String)> {
        let s = &self.shared.stats;
        let (status, notice) = self.status();
        let mut rows = vec![("l2_file".to_string(), format!("{} ({status})", self.path.display()))];
        for (name, v) in [
            ("l2_file_entries", &s.entries),
            ("l2_file_bytes", &s.bytes),
            ("l2_file_restored", &s.restored),
            ("l2_file_writes", &s.writes),
            ("l2_file_dropped", &s.dropped),
            ("l2_file_deleted", &s.deleted),
            ("l2_file_evicted", &s.evicted),
            ("l2_file_errors", &s.errors),
        ] {
            rows.push((name.to_string(), v.load(Ordering::Relaxed).to_string()));
        }
        rows.push(("l2_file_notice".to_string(), notice));
        rows
    }
}

impl Drop for L2File {
    /// Writes what is queued, then closes the file.
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fingerprint of what fixes table ids and the meaning of keys and values.
pub fn fingerprint(config: &Config) -> String {
    let mut s = format!(
        "format {FORMAT}; upstream {}; slot {}/{}; invalidation key; tables",
        config.upstream, config.cdc.database, config.cdc.slot
    );
    for t in &config.tables {
        let int = if t.integer_key { " integer" } else { "" };
        s.push_str(&format!(" {}({}{int})", t.name.to_ascii_lowercase(), t.primary_key.to_ascii_lowercase()));
    }
    s
}

/// Opens `[cache] l2_path`, if set, and restores its rows into the node's L2.
pub fn open_for(config: &Config, node: &mut EdgeNode<Value>, now: Instant) -> Option<L2File> {
    let path = config.cache.l2_path.as_deref().filter(|_| config.cache.enabled && config.cdc.enabled)?;
    let l2 = node.tier(TierName::L2)?.config();
    let budget = Budget { entries: l2.entries_max, bytes: l2.bytes_max };
    let tables = u32::try_from(node.analyzer().catalog().len()).unwrap_or(u32::MAX);
    let now_ms = unix_ms();
    let opened = L2File::open(Path::new(path), &fingerprint(config), budget, tables, now_ms);
    for n in &opened.notices {
        eprintln!("postai-edge: L2 file {path}: {n}");
    }
    let mut restored = 0u64;
    for r in opened.restored {
        let entry = Entry {
            size_bytes: u32::try_from(r.value.len()).unwrap_or(u32::MAX),
            value: r.value,
            lsn: r.lsn,
            deps: r.deps.into(),
            expires_at: now + Duration::from_millis(r.expires_ms.saturating_sub(now_ms)),
        };
        restored += u64::from(node.restore_l2(now, r.key, entry));
    }
    opened.file.shared.stats.restored.store(restored, Ordering::Relaxed);
    if restored > 0 {
        eprintln!("postai-edge: L2 file {path}: {restored} entries restored (served once the CDC stream is heard)");
    }
    Some(opened.file)
}

pub fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn aside_path(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The writer thread: owns the connection.
#[cfg(test)]
mod tests {
    use super::*;

    const T: TableId = TableId(0);
    const U: TableId = TableId(1);

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("postai-l2-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("temp dir");
            Dir(d)
        }
        fn file(&self) -> PathBuf {
            self.0.join("l2.sqlite")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const BUDGET: Budget = Budget { entries: 100, bytes: 1 << 20 };
    const NOW: u64 = 1_000_000;

    fn rec(key: u128, lsn: u64, deps: Vec<Dep>) -> Record {
        Record {
            key,
            value: Arc::from(format!("value {key}").into_bytes()),
            lsn: Lsn(lsn),
            deps,
            expires_ms: NOW + 60_000,
        }
    }

    fn open(path: &Path, fp: &str) -> Opened {
        L2File::open(path, fp, BUDGET, 2, NOW)
    }

    fn sync(f: &L2File) {
        f.barrier().blocking_recv().expect("writer answers").expect("written");
    }

    fn keys(o: &Opened) -> Vec<u128> {
        o.restored.iter().map(|r| r.key).collect()
    }

    fn adopt(f: &L2File, slot: u64, created: bool, sys: &str) -> Option<String> {
        f.adopt(Lsn(slot), created, Some(sys.to_string())).blocking_recv().expect("answered")
    }

    #[test]
    fn round_trip_after_adoption_only() {
        let dir = Dir::new("round-trip");
        let o = open(&dir.file(), "a");
        assert!(o.restored.is_empty() && o.notices.is_empty(), "{:?}", o.notices);
        o.file.fill(rec(1, 10, vec![Dep::Key(T, 7)]));
        sync(&o.file);
        assert_eq!(o.file.stats().writes.load(Ordering::Relaxed), 0, "nothing written before adoption");
        assert_eq!(adopt(&o.file, 5, true, "sys"), None, "an empty file has nothing to wipe");
        let r2 = rec(2, 10, vec![Dep::Key(T, 7), Dep::Table(U)]);
        let r3 = rec(3, 11, vec![]);
        o.file.fill(rec(1, 10, vec![Dep::Key(T, 7)]));
        o.file.fill(r2.clone());
        o.file.fill(r3.clone());
        // an older fill never replaces a newer one
        o.file.fill(Record { value: Arc::from(&b"old"[..]), ..rec(3, 9, vec![]) });
        sync(&o.file);
        assert_eq!(o.file.stats().entries.load(Ordering::Relaxed), 3);
        drop(o);
        let o = open(&dir.file(), "a");
        assert_eq!(keys(&o), vec![1, 2, 3]);
        assert_eq!(o.restored[1], r2);
        assert_eq!(o.restored[2], r3);
        // the same slot position: kept
        assert_eq!(adopt(&o.file, 5, false, "sys"), None);
        drop(o);
        assert_eq!(keys(&open(&dir.file(), "a")), vec![1, 2, 3]);
    }

    #[test]
    fn invalidation_mirrors_the_version_map() {
        let dir = Dir::new("invalidate");
        let o = open(&dir.file(), "a");
        adopt(&o.file, 1, false, "sys");
        o.file.fill(rec(1, 10, vec![Dep::Key(T, 7)]));
        o.file.fill(rec(2, 10, vec![Dep::Key(T, 8)]));
        o.file.fill(rec(3, 10, vec![Dep::Table(T)]));
        o.file.fill(rec(4, 30, vec![Dep::Key(T, 7)]));
        o.file.fill(rec(5, 10, vec![Dep::Table(U)]));
        o.file.fill(rec(6, 10, vec![]));
        let change = |lsn, targets| Change { lsn: Lsn(lsn), targets };
        // a key change: that key's entries older than it, and whole-table readers
        let ack = o.file.invalidate(vec![change(20, vec![ChangeTarget::Keys(T, vec![7])])], Lsn(20));
        ack.blocking_recv().expect("answered").expect("durable");
        drop(o);
        let o = open(&dir.file(), "a");
        assert_eq!(keys(&o), vec![2, 4, 5, 6], "key 7 at 10 and the table reader went; key 7 at 30 stays");
        let ack = o.file.invalidate(vec![change(25, vec![ChangeTarget::Table(U)])], Lsn(25));
        ack.blocking_recv().expect("answered").expect("durable");
        drop(o);
        let o = open(&dir.file(), "a");
        assert_eq!(keys(&o), vec![2, 4, 6]);
        let ack = o.file.invalidate(vec![change(26, vec![ChangeTarget::All])], Lsn(26));
        ack.blocking_recv().expect("answered").expect("durable");
        drop(o);
        let o = open(&dir.file(), "a");
        assert_eq!(keys(&o), vec![4], "everything older than 26");
        assert_eq!(adopt(&o.file, 26, false, "sys"), None, "the file's position is 26");
    }

    #[test]
    fn adoption_wipes_what_it_cannot_vouch_for() {
        let dir = Dir::new("adopt");
        let fill = |slot: u64, sys: &str| {
            let o = open(&dir.file(), "a");
            let wiped = adopt(&o.file, slot, false, sys);
            o.file.fill(rec(1, 10, vec![Dep::Key(T, 1)]));
            sync(&o.file);
            wiped
        };
        assert_eq!(fill(5, "sys"), None);
        let reason = fill(9, "sys").expect("the slot moved past the file");
        assert!(reason.contains("past the file's position"), "{reason}");
        assert!(fill(9, "other").expect("another cluster").contains("another database cluster"));
        let o = open(&dir.file(), "a");
        assert!(adopt(&o.file, 9, true, "other").expect("a new slot").contains("created"));
        drop(o);
        assert!(open(&dir.file(), "a").restored.is_empty());
    }

    #[test]
    fn another_configuration_wipes_the_file() {
        let dir = Dir::new("fingerprint");
        let o = open(&dir.file(), "a");
        adopt(&o.file, 1, false, "sys");
        o.file.fill(rec(1, 10, vec![]));
        sync(&o.file);
        drop(o);
        let o = open(&dir.file(), "b");
        assert!(o.restored.is_empty());
        assert!(o.notices[0].contains("another configuration"), "{:?}", o.notices);
        // and the position went with it: an adoption starts afresh
        assert_eq!(adopt(&o.file, 7, false, "sys"), None);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_replaced() {
        let dir = Dir::new("corrupt");
        std::fs::write(dir.file(), vec![0x5a; 8192]).expect("write garbage");
        let o = open(&dir.file(), "a");
        assert!(o.restored.is_empty());
        assert!(o.notices[0].contains("unreadable") && o.notices[0].contains(".corrupt"), "{:?}", o.notices);
        assert_eq!(o.file.status().0, "ok", "a fresh file replaced it");
        assert!(aside_path(&dir.file(), ".corrupt").exists());
        adopt(&o.file, 1, false, "sys");
        o.file.fill(rec(1, 10, vec![]));
        sync(&o.file);
        drop(o);
        assert_eq!(keys(&open(&dir.file(), "a")), vec![1]);
        // a path that is no file at all: off, everything acknowledged
        let o = open(&dir.0, "a");
        assert!(o.file.status().0.starts_with("off"), "{:?}", o.file.status());
        assert_eq!(adopt(&o.file, 1, false, "sys"), None);
        let ack = o.file.invalidate(vec![], Lsn(3)).blocking_recv().expect("answered");
        assert!(ack.is_ok(), "without a file, nothing can be stale");
    }

    #[test]
    fn damaged_rows_expired_rows_and_budgets() {
        let dir = Dir::new("rows");
        let o = L2File::open(&dir.file(), "a", Budget { entries: 3, bytes: 1 << 20 }, 2, NOW);
        adopt(&o.file, 1, false, "sys");
        for k in 1..=5 {
            o.file.fill(rec(k, 10, vec![Dep::Key(T, k as u64)]));
        }
        o.file.fill(Record { expires_ms: NOW + 1, ..rec(6, 10, vec![]) });
        sync(&o.file);
        assert_eq!(o.file.stats().evicted.load(Ordering::Relaxed), 3, "oldest first");
        drop(o);
        {
            let c = Connection::open(dir.file()).expect("open");
            c.execute("UPDATE entries SET value = x'00' WHERE key = ?1", [&4u128.to_le_bytes()[..]]).expect("damage");
            // a dep on a table whose id is not configured
            c.execute(
                "UPDATE entries SET deps = ?1 WHERE key = ?2",
                params![encode_deps(&[Dep::Table(TableId(9))]), &5u128.to_le_bytes()[..]],
            )
            .expect("foreign dep");
        }
        let o = L2File::open(&dir.file(), "a", Budget { entries: 3, bytes: 1 << 20 }, 2, NOW + 10);
        assert!(o.restored.is_empty(), "damaged, unstable and expired rows are dropped: {:?}", keys(&o));
        drop(o);
        // the byte budget
        let o = L2File::open(&dir.file(), "a", Budget { entries: 100, bytes: 20 }, 2, NOW);
        adopt(&o.file, 1, false, "sys");
        for k in 1..=4 {
            o.file.fill(rec(k, 10, vec![]));
        }
        sync(&o.file);
        assert!(o.file.stats().bytes.load(Ordering::Relaxed) <= 20);
        drop(o);
        // "value 3" and "value 4": 14 bytes; a third would make 21
        assert_eq!(keys(&L2File::open(&dir.file(), "a", Budget { entries: 100, bytes: 20 }, 2, NOW)), vec![3, 4]);
    }

    #[test]
    fn deps_encoding_round_trips() {
        let deps = vec![Dep::Table(T), Dep::Key(U, u64::MAX), Dep::Key(TableId(7), 0)];
        assert_eq!(decode_deps(&encode_deps(&deps)), Some(deps));
        assert_eq!(decode_deps(&[1, 2, 3]), None);
        assert_eq!(decode_deps(&[7; 13]), None);
        assert_eq!(fmt_lsn(Lsn(0x1_0000_00ff)), "1/FF");
    }
}

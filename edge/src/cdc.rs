//! Invalidation from the primary's logical decoding stream: a `test_decoding`
//! slot polled over an ordinary connection. Each committed transaction
//! becomes one CDC event (key-level where the table's primary key is known),
//! each poll also a keepalive, so writes that bypass the proxy invalidate too.
//!
//! The slot is peeked (`pg_logical_slot_peek_changes`), the changes applied,
//! and only then advanced (`pg_replication_slot_advance`) to the last commit
//! applied; with an L2 file, once the file reflects them too (`l2.rs`): the
//! slot's position never runs ahead of what the file reflects.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use postai_core::Lsn;
use postai_core::cache::TierName;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget};
use postai_core::sql::Catalog;

use crate::config::CdcSource;
use crate::l2::fmt_lsn;
use crate::protocol::{self, Message};
use crate::proxy::Proxy;

/// WAL past the slot's position with nothing of this database to decode
/// (other databases' writes): past this, a logical message gives the next
/// peek a position to advance the slot to, so that the slot does not hold
/// the primary's WAL forever.
const IDLE_ADVANCE_BYTES: u64 = 16 << 20;
use crate::upstream::error_message;

/// The prefix of the logical messages the DDL event triggers emit.
const DDL_PREFIX: &str = "postai_ddl";

/// Event triggers that emit a transactional logical message for every DDL
/// command (and drop) outside temporary schemas: the message commits with
/// the DDL, so the stream orders it like any write. SECURITY DEFINER: any
/// role's DDL may emit it. The triggers are created last: installing emits
/// nothing (and is skipped when they exist, so a restart does not
/// invalidate a warm L2).
const DDL_TRIGGERS: &str = r#"
CREATE SCHEMA IF NOT EXISTS postai;
CREATE OR REPLACE FUNCTION postai.note_ddl() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() c
             WHERE c.schema_name IS NULL OR c.schema_name NOT LIKE 'pg\_temp%') THEN
    PERFORM pg_logical_emit_message(true, 'postai_ddl', tg_tag);
  END IF;
END $f$;
CREATE OR REPLACE FUNCTION postai.note_drop() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d WHERE NOT d.is_temporary) THEN
    PERFORM pg_logical_emit_message(true, 'postai_ddl', tg_tag);
  END IF;
END $f$;
REVOKE ALL ON FUNCTION postai.note_ddl(), postai.note_drop() FROM PUBLIC;
DO $d$ BEGIN
  -- the triggers run these functions for every role's DDL, superusers' too:
  -- a schema or function someone else owns (made before, kept by IF NOT
  -- EXISTS / OR REPLACE) could be changed to run anything
  IF EXISTS (SELECT 1 FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
             WHERE n.nspname = 'postai' AND NOT r.rolsuper)
     OR EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                JOIN pg_roles r ON r.oid = p.proowner WHERE n.nspname = 'postai' AND NOT r.rolsuper) THEN
    RAISE EXCEPTION 'schema postai, or a function in it, is owned by a role that is not a superuser';
  END IF;
END $d$;
DO $d$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'postai_ddl') THEN
    CREATE EVENT TRIGGER postai_ddl ON ddl_command_end EXECUTE FUNCTION postai.note_ddl();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'postai_drop') THEN
    CREATE EVENT TRIGGER postai_drop ON sql_drop EXECUTE FUNCTION postai.note_drop();
  END IF;
END $d$;
"#;

/// Whether a `test_decoding` line is the message of a DDL event trigger.
fn is_ddl_message(line: &str) -> bool {
    line.strip_prefix("message: transactional: 1 prefix: ")
        .and_then(|rest| rest.split_once(','))
        .is_some_and(|(prefix, _)| prefix == DDL_PREFIX)
}

/// What a `test_decoding` line inside a transaction changed: rows of
/// tables (see [`crate::decoding`]), or everything (DDL).
fn change_targets(line: &str, catalog: &Catalog) -> Option<Vec<ChangeTarget>> {
    if is_ddl_message(line) {
        // what any cached result means may have changed
        return Some(vec![ChangeTarget::All]);
    }
    if line.starts_with("table ") { crate::decoding::change_targets(line, catalog) } else { None }
}

/// One poll's rows as the slot gave them, and the primary's current LSN:
/// what a regional proxy relays to the edges subscribed to it. Or a reset:
/// the reader started a new slot at this LSN (after a failover), and what was
/// committed before it may never be streamed.
#[derive(Debug, Default)]
pub struct Feed {
    pub rows: Vec<(String, String)>,
    pub current: Option<u64>,
    pub reset: Option<Lsn>,
    /// The newest commit among the rows.
    pub max_commit: Option<Lsn>,
}

/// Rows a regional proxy keeps for edges that subscribe again (`POSTAI
/// SUBSCRIBE FROM`): a reconnecting edge misses nothing and keeps its cache.
pub const HISTORY_ROWS: usize = 100_000;

/// The feeds a regional proxy published lately: every commit after `floor`
/// is in them (or still to come).
#[derive(Debug, Default)]
pub struct History {
    feeds: std::collections::VecDeque<Arc<Feed>>,
    rows: usize,
    floor: Option<Lsn>,
    /// The newest commit published.
    newest: Option<Lsn>,
}

impl History {
    /// The feeds with a commit after `from`, when every commit after `from`
    /// is in them or still to come; `None` when some may be gone.
    pub fn since(&self, from: Lsn) -> Option<Vec<Arc<Feed>>> {
        let floor = self.floor?;
        (from >= floor).then(|| self.feeds.iter().filter(|f| f.max_commit.is_some_and(|c| c > from)).cloned().collect())
    }

    /// The reader starts at `position` (the slot's): history is complete from there.
    fn start_at(&mut self, position: Lsn) {
        if self.floor.is_none() {
            self.floor = Some(position);
        }
    }

    fn push(&mut self, feed: Arc<Feed>, keep_rows: usize) {
        self.newest = self.newest.max(feed.max_commit);
        if let Some(start) = feed.reset {
            // a new slot, perhaps on a promoted replica: a position published
            // before (a subscriber's) may be past commits the old primary lost
            // and the new one made anew; none of them is continued
            self.feeds.clear();
            self.rows = 0;
            self.floor = Some(self.newest.map_or(start, |n| start.max(Lsn(n.0 + 1))));
            return;
        }
        if feed.max_commit.is_none() {
            // keepalives only: nothing to replay
            return;
        }
        self.rows += feed.rows.len();
        self.feeds.push_back(feed);
        while self.rows > keep_rows {
            let Some(old) = self.feeds.pop_front() else { break };
            self.rows -= old.rows.len();
            self.floor = self.floor.max(old.max_commit);
        }
    }
}

/// Sends `feed` to the subscribers; a regional proxy also keeps it for
/// those that subscribe again. Under the history's lock, so that a
/// subscriber that snapshots the history and then listens misses nothing.
pub fn publish(proxy: &Proxy, feed: Feed) {
    let feed = Arc::new(feed);
    let mut history = proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner());
    if proxy.config.role == crate::config::Role::Regional {
        history.push(feed.clone(), HISTORY_ROWS);
    }
    let _ = proxy.cdc_feed.send(feed);
}

/// Reads the slot (or subscribes to the regional proxy) forever; reconnects after errors.
pub async fn run(proxy: Arc<Proxy>) {
    let cfg = proxy.config.cdc.clone();
    let mut last = Lsn(0);
    // a subscription that was open: the next one asks to continue after `last`
    let mut subscribed = false;
    // the catalog and roles last seen, and where this reader left the slot
    let mut watch = crate::catalog::Watch::default();
    let mut slot_at: Option<Lsn> = None;
    loop {
        let result = match cfg.source {
            CdcSource::Slot => poll_loop(&proxy, &mut last, &mut watch, &mut slot_at).await,
            CdcSource::Regional => subscribe_loop(&proxy, &mut last, &mut subscribed, &mut watch).await,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                eprintln!("postai-edge: cdc ({}): {e}; retrying", cfg.slot);
                tokio::time::sleep(std::time::Duration::from_millis(cfg.poll_ms.max(100) * 10)).await;
            }
        }
    }
}

/// How often the roles' digest is compared (memberships, attributes and
/// per-role settings change without a change event).
const ROLES_CHECK_MS: u64 = 1000;

async fn poll_loop(
    proxy: &Proxy,
    last: &mut Lsn,
    watch: &mut crate::catalog::Watch,
    slot_at: &mut Option<Lsn>,
) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let addr = cfg.upstream.clone().unwrap_or_else(|| proxy.primary_addr());
    let mut conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    check(conn.simple("SET TimeZone = 'UTC'").await?)?;
    // both triggers, on SECURITY DEFINER functions that superusers own, in a schema a superuser owns
    let installed = "SELECT count(*) FROM pg_event_trigger t JOIN pg_proc p ON p.oid = t.evtfoid \
        JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles pr ON pr.oid = p.proowner \
        JOIN pg_roles nr ON nr.oid = n.nspowner WHERE t.evtname IN ('postai_ddl', 'postai_drop') \
        AND n.nspname = 'postai' AND p.prosecdef AND pr.rolsuper AND nr.rolsuper AND t.evtenabled <> 'D'";
    if cfg.ddl && protocol::first_value(&check(conn.simple(installed).await?)?).as_deref() != Some("2") {
        // (another edge installing them at the same moment may make this fail: they exist then)
        if let Err(e) = check(conn.simple(DDL_TRIGGERS).await?) {
            eprintln!(
                "postai-edge: cdc ({}): cannot install the DDL event triggers ({e}): DDL made directly on \
                 the primary will not invalidate; give [cdc] user superuser, or set [cdc] ddl = false",
                cfg.slot
            );
        }
    }
    watch.check_roles(proxy, &mut conn).await?;
    let mut roles_checked = std::time::Instant::now();
    let exists = conn.simple(&format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}'", cfg.slot)).await?;
    // where the slot re-delivers from: a start event opens the stream there
    let mut start_event: Option<Lsn> = None;
    // the slot's position as this reader moved it
    let mut advanced = Lsn(0);
    // where WAL stood when a logical message was last emitted
    let mut emitted = 0u64;
    if protocol::first_value(&exists).is_none() {
        let created = check(
            conn.simple(&format!(
                "SELECT lsn::text FROM pg_create_logical_replication_slot('{}', 'test_decoding')",
                cfg.slot
            ))
            .await?,
        )?;
        // a new slot (first start, or a promoted primary after failover): the
        // changes before its first LSN were never seen here, so every entry
        // cached from a snapshot older than that is invalid
        let start = protocol::first_value(&created).and_then(|s| protocol::parse_lsn(&s)).map(Lsn);
        if let Some(start) = start {
            // subscribers must drop what they hold too
            publish(proxy, Feed { reset: Some(start), ..Feed::default() });
            // before the event below opens the cache: restored entries may
            // come from another cluster's LSNs, which the event cannot order
            // the catalog once the slot exists (DDL after it comes through
            // the stream), before the stream opens the cache
            let catalog = watch.sync_catalog(proxy, &mut conn).await?;
            adopt_l2(proxy, &mut conn, start, true, catalog).await;
            advanced = start;
            *slot_at = Some(start);
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            let event = CdcEvent { prev_lsn: *last, change: Change { lsn: start, targets: vec![ChangeTarget::All] } };
            node.handle_cdc(proxy.now(), &event);
            *last = (*last).max(start);
        }
    } else {
        let q = format!("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{}'", cfg.slot);
        let confirmed = protocol::first_value(&check(conn.simple(&q).await?)?).and_then(|s| protocol::parse_lsn(&s));
        let confirmed = Lsn(confirmed.unwrap_or(0));
        // moved by someone else since this process left it (dropped and
        // created again, advanced): what happened in between is unknown
        let replaced = slot_at.is_some_and(|at| at != confirmed);
        // DDL after the slot's position comes through the stream again
        let catalog = watch.sync_catalog(proxy, &mut conn).await?;
        adopt_l2(proxy, &mut conn, confirmed, replaced, catalog).await;
        if replaced {
            eprintln!("postai-edge: cdc ({}): the slot was moved by someone else: the cache starts over", cfg.slot);
            publish(proxy, Feed { reset: Some(confirmed.max(*last)), ..Feed::default() });
            let start = confirmed.max(*last);
            let all = CdcEvent { prev_lsn: *last, change: Change { lsn: start, targets: vec![ChangeTarget::All] } };
            proxy.node.lock().unwrap_or_else(|p| p.into_inner()).handle_cdc(proxy.now(), &all);
            *last = start;
        }
        if proxy.config.role == crate::config::Role::Regional {
            // only a regional proxy keeps what it publishes
            proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner()).start_at(confirmed);
        }
        start_event = Some(confirmed);
        advanced = confirmed;
        *slot_at = Some(confirmed);
    }
    let mut pending: Vec<ChangeTarget> = Vec::new();
    loop {
        let lsn_msgs = check(conn.simple("SELECT pg_current_wal_lsn()::text").await?)?;
        let current = protocol::first_value(&lsn_msgs).and_then(|s| protocol::parse_lsn(&s));
        let rows = check(
            conn.simple(&format!(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_changes('{}', NULL, NULL, 'include-timestamp', 'on')",
                cfg.slot
            ))
            .await?,
        )?;
        // the slot is still the one this reader left where it left it: a
        // slot dropped and created again, or moved, has lost changes
        let q = format!("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{}'", cfg.slot);
        let position = protocol::first_value(&check(conn.simple(&q).await?)?).and_then(|s| protocol::parse_lsn(&s));
        match position {
            None => return Err(std::io::Error::other("the slot is gone")),
            Some(p) if Lsn(p) != advanced => {
                return Err(std::io::Error::other(format!(
                    "the slot stands at {}, not where this reader left it ({})",
                    fmt_lsn(Lsn(p)),
                    fmt_lsn(advanced)
                )));
            }
            Some(_) => {}
        }
        let now = proxy.now();
        // the last commit (or non-transactional message) applied: where the slot may advance to
        let mut through: Option<Lsn> = None;
        let (written, ddl) = {
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(start) = start_event.take()
                && start > *last
            {
                // the stream is complete from the slot's position on
                let event = CdcEvent { prev_lsn: *last, change: Change { lsn: start, targets: Vec::new() } };
                node.handle_cdc(now, &event);
                *last = start;
            }
            let mut changes: Vec<Change> = Vec::new();
            let mut feed: Vec<(String, String)> = Vec::new();
            let relay = proxy.cdc_feed.receiver_count() > 0 || proxy.config.role == crate::config::Role::Regional;
            let mut max_commit = None;
            for row in rows.iter().filter(|m| m.tag == b'D') {
                let Some((lsn, data)) = two_columns(row) else { continue };
                if relay {
                    feed.push((lsn.clone(), data.clone()));
                }
                if data.starts_with("message: transactional: 0 ") {
                    // a record every earlier record precedes: its end is a safe position
                    if let Some(lsn) = protocol::parse_lsn(&lsn).map(Lsn) {
                        through = Some(through.map_or(lsn, |t| t.max(lsn)));
                    }
                } else if let Some(commit) = apply_row(proxy, &mut node, now, &lsn, &data, &mut pending, last) {
                    max_commit = max_commit.max(Some(commit.lsn));
                    through = Some(through.map_or(commit.lsn, |t| t.max(commit.lsn)));
                    if !commit.targets.is_empty() {
                        changes.push(commit);
                    }
                }
            }
            // keepalive: nothing committed after `last` that we have not seen
            let keepalive = CdcEvent { prev_lsn: *last, change: Change { lsn: *last, targets: Vec::new() } };
            node.handle_cdc(now, &keepalive);
            // subscribers (edges behind this regional proxy) get the same rows
            proxy.cdc_last.store(last.0, Ordering::Relaxed);
            if relay {
                publish(proxy, Feed { rows: feed, current, reset: None, max_commit });
            }
            let ddl = changes.iter().any(|c| c.targets.contains(&ChangeTarget::All));
            // queued under the node's lock: after every fill validated before these changes
            let written = match (&proxy.l2_file, through) {
                (Some(f), Some(t)) => Some(f.invalidate(changes, t)),
                _ => None,
            };
            (written, ddl)
        };
        // DDL (here or through the proxy) may have changed what relations
        // and functions are; roles change without events
        if ddl || proxy.catalog_stale.load(Ordering::Relaxed) {
            watch.sync_catalog(proxy, &mut conn).await?;
        }
        if roles_checked.elapsed() >= std::time::Duration::from_millis(ROLES_CHECK_MS) {
            watch.check_roles(proxy, &mut conn).await?;
            roles_checked = std::time::Instant::now();
        }
        if let Some(t) = through.filter(|t| *t > advanced) {
            if let Some(written) = written {
                // a writer that is gone wrote nothing more: the slot moving past
                // the file's position makes the next start wipe it
                if let Ok(Err(e)) = written.await {
                    return Err(std::io::Error::other(format!("L2 file: {e}; the slot is not advanced")));
                }
            }
            let advance =
                format!("SELECT end_lsn::text FROM pg_replication_slot_advance('{}', '{}')", cfg.slot, fmt_lsn(t));
            let end =
                protocol::first_value(&check(conn.simple(&advance).await?)?).and_then(|s| protocol::parse_lsn(&s));
            advanced = end.map_or(t, Lsn);
            *slot_at = Some(advanced);
        } else if let Some(c) = current.filter(|c| c.saturating_sub(advanced.0.max(emitted)) > IDLE_ADVANCE_BYTES) {
            let emit = conn.simple("SELECT 1 FROM pg_logical_emit_message(false, 'postai', '')").await?;
            if let Some(e) = emit.iter().find(|m| m.tag == b'E') {
                eprintln!("postai-edge: cdc ({}): cannot advance an idle slot: {}", cfg.slot, error_message(e));
            }
            // once: the next peek sees it, or the WAL moves on by as much again
            emitted = c;
        }
        if let Some(c) = current {
            proxy.lsn_seen.fetch_max(c, Ordering::Relaxed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(cfg.poll_ms)).await;
    }
}

/// An edge behind a regional proxy: `POSTAI SUBSCRIBE` on it streams the rows
/// its slot reader applies (CopyData: `R <lsn>\t<row>`, `K <current lsn>`
/// after each poll, `X <lsn>` when it starts a new slot). What happened
/// before the subscription is unknown here: the first keepalive's LSN opens
/// the stream with an event that invalidates everything older. Subscribing
/// again (`FROM` the last commit applied, or the L2 file's position at
/// start), the regional proxy answers `C` when it kept every row since, and
/// sends them up to a keepalive: they are applied in one hold of the node's
/// lock (a restored entry is never served between two of them), and nothing
/// else is invalidated.
async fn subscribe_loop(
    proxy: &Proxy,
    last: &mut Lsn,
    subscribed: &mut bool,
    watch: &mut crate::catalog::Watch,
) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let addr = proxy.primary_addr();
    let mut conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    // the database's catalog and roles over a second connection (the first streams)
    let mut catalog_conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    watch.check_roles(proxy, &mut catalog_conn).await?;
    let mut roles_checked = std::time::Instant::now();
    // the file is adopted by the first subscription of this process
    let adopting = proxy.l2_file.as_ref().filter(|_| !*subscribed);
    let cluster = match adopting {
        Some(_) => system_identifier(&mut conn).await,
        None => None,
    };
    let from = if *subscribed { Some(*last) } else { adopting.and_then(|f| f.opened_at) };
    let command = match from {
        Some(p) => format!("POSTAI SUBSCRIBE FROM '{}'", fmt_lsn(p)),
        None => "POSTAI SUBSCRIBE".into(),
    };
    conn.send(&protocol::query(&command)).await?;
    let mut opened = false;
    let mut pending: Vec<ChangeTarget> = Vec::new();
    // the rows a resumed stream replays, up to its first keepalive
    let mut replay: Option<Vec<(String, String)>> = None;
    loop {
        let m = conn.recv().await?;
        match m.tag {
            b'H' => {}
            b'E' => return Err(std::io::Error::other(error_message(&m))),
            b'Z' | b'c' => return Err(std::io::Error::other("the regional proxy ended the subscription")),
            b'd' => {
                let line = String::from_utf8_lossy(m.body()).into_owned();
                let start = line.strip_prefix("C ").map(|r| (r, false)).or(line.strip_prefix("K ").map(|r| (r, true)));
                if !opened && start.is_some() {
                    // the catalog once the stream's position is fixed (DDL after it
                    // comes through the stream), before the stream opens the cache
                    let catalog = watch.sync_catalog(proxy, &mut catalog_conn).await?;
                    // the file: kept when the stream continues after its position, else wiped
                    if let (Some(f), Some((at, created))) = (adopting, start)
                        && let Some(at) = protocol::parse_lsn(at)
                    {
                        let system_id = cluster.as_ref().map(|id| format!("{id} catalog {catalog:032x}"));
                        adopt_file(proxy, f, Lsn(at), created, system_id).await;
                    }
                }
                let now = proxy.now();
                let ddl = {
                    let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
                    let mut changes: Vec<Change> = Vec::new();
                    if let Some(rest) = line.strip_prefix("C ") {
                        // the stream continues after this position: what we hold stays
                        let Some(from) = protocol::parse_lsn(rest) else { continue };
                        // every commit up to `from` is reflected (the file's invariant)
                        let opening = CdcEvent { prev_lsn: *last, change: Change { lsn: Lsn(from), targets: vec![] } };
                        node.handle_cdc(now, &opening);
                        *last = (*last).max(Lsn(from));
                        opened = true;
                        *subscribed = true;
                        replay = Some(Vec::new());
                        proxy.metrics.cdc_resumed.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(rest) = line.strip_prefix("X ") {
                        // a new slot on the regional proxy: commits before it may never come
                        let Some(start) = protocol::parse_lsn(rest).map(Lsn) else { continue };
                        let start = start.max(*last);
                        let all = Change { lsn: start, targets: vec![ChangeTarget::All] };
                        node.handle_cdc(now, &CdcEvent { prev_lsn: *last, change: all.clone() });
                        *last = start;
                        changes.push(all);
                    } else if let Some(rest) = line.strip_prefix("K ") {
                        let Some(current) = protocol::parse_lsn(rest) else { continue };
                        for (lsn, data) in replay.take().unwrap_or_default() {
                            let commit = apply_row(proxy, &mut node, now, &lsn, &data, &mut pending, last);
                            changes.extend(commit.filter(|c| !c.targets.is_empty()));
                        }
                        if !opened {
                            // everything cached before is of unknown freshness (the file's too)
                            let start = Lsn(current).max(*last);
                            let all = Change { lsn: start, targets: vec![ChangeTarget::All] };
                            node.handle_cdc(now, &CdcEvent { prev_lsn: *last, change: all.clone() });
                            changes.push(all);
                            *last = start;
                            opened = true;
                            *subscribed = true;
                        }
                        let keepalive =
                            CdcEvent { prev_lsn: *last, change: Change { lsn: *last, targets: Vec::new() } };
                        node.handle_cdc(now, &keepalive);
                        proxy.lsn_seen.fetch_max(current, Ordering::Relaxed);
                    } else if let Some((lsn, data)) = line.strip_prefix("R ").and_then(|r| r.split_once('\t')) {
                        if !opened {
                            continue;
                        }
                        match replay.as_mut() {
                            Some(rows) => rows.push((lsn.to_string(), data.to_string())),
                            None => {
                                let commit = apply_row(proxy, &mut node, now, lsn, data, &mut pending, last);
                                changes.extend(commit.filter(|c| !c.targets.is_empty()));
                            }
                        }
                    }
                    let ddl = changes.iter().any(|c| c.targets.contains(&ChangeTarget::All));
                    // queued under the node's lock, as the slot reader does; the file's
                    // position is where the next start asks the stream to continue from
                    if let Some(f) = &proxy.l2_file
                        && !changes.is_empty()
                    {
                        drop(f.invalidate(changes, *last));
                    }
                    ddl
                };
                if ddl || proxy.catalog_stale.load(Ordering::Relaxed) {
                    watch.sync_catalog(proxy, &mut catalog_conn).await?;
                }
                if roles_checked.elapsed() >= std::time::Duration::from_millis(ROLES_CHECK_MS) {
                    watch.check_roles(proxy, &mut catalog_conn).await?;
                    roles_checked = std::time::Instant::now();
                }
            }
            _ => {}
        }
    }
}

/// One `test_decoding` row applied (the slot reader's and a subscriber's):
/// at a COMMIT, the commit's change (its targets may be empty).
fn apply_row(
    proxy: &Proxy,
    node: &mut postai_core::node::EdgeNode<crate::proxy::Value>,
    now: postai_core::Instant,
    lsn: &str,
    data: &str,
    pending: &mut Vec<ChangeTarget>,
    last: &mut Lsn,
) -> Option<Change> {
    if data.starts_with("BEGIN") {
        pending.clear();
    } else if data.starts_with("COMMIT") {
        if let Some(at) = commit_time(data)
            && let Ok(lag) = std::time::SystemTime::now().duration_since(at)
        {
            proxy.metrics.invalidation_lag.observe(lag);
        }
        let lsn = protocol::parse_lsn(lsn).map(Lsn).unwrap_or(*last);
        let change = Change { lsn, targets: std::mem::take(pending) };
        node.handle_cdc(now, &CdcEvent { prev_lsn: *last, change: change.clone() });
        *last = (*last).max(lsn);
        return Some(change);
    } else if let Some(t) = change_targets(data, node.analyzer().catalog()) {
        pending.extend(t);
    }
    None
}

/// The reader connected to the slot at `slot` (`created`: just now): the L2
/// file checks that it reflects every change up to there; if it cannot, it is
/// wiped, and so are the in-memory tiers (they hold what was restored from it).
async fn adopt_l2(proxy: &Proxy, conn: &mut crate::upstream::Conn, slot: Lsn, created: bool, catalog: u128) {
    let Some(f) = &proxy.l2_file else { return };
    // entries mean the same only under the same catalog (views, functions, keys)
    let system_id = system_identifier(conn).await.map(|id| format!("{id} catalog {catalog:032x}"));
    adopt_file(proxy, f, slot, created, system_id).await;
}

/// The cluster's `system_identifier`, if the server answers it.
async fn system_identifier(conn: &mut crate::upstream::Conn) -> Option<String> {
    match conn.simple("SELECT system_identifier::text FROM pg_control_system()").await {
        Ok(m) if m.iter().all(|m| m.tag != b'E') => protocol::first_value(&m),
        _ => None,
    }
}

/// The file checked against where the stream continues (`created`: it
/// cannot vouch for what came before); wiped, with the in-memory tiers,
/// when it cannot be kept.
async fn adopt_file(proxy: &Proxy, f: &crate::l2::L2File, at: Lsn, created: bool, system_id: Option<String>) {
    // a writer that is gone cannot vouch for what was restored
    let wiped = f.adopt(at, created, system_id).await.unwrap_or_else(|_| Some("the file writer stopped".into()));
    if let Some(reason) = wiped {
        eprintln!("postai-edge: L2 file wiped ({reason}); the in-memory tiers too");
        let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
        node.clear_tier(TierName::L1);
        node.clear_tier(TierName::L2);
    }
}

/// The commit time test_decoding prints with `include-timestamp` (the CDC
/// session's TimeZone is UTC): `COMMIT 754 (at 2026-11-27 03:10:26.123456+00)`.
pub fn commit_time(line: &str) -> Option<std::time::SystemTime> {
    let at = line.split_once("(at ")?.1.strip_suffix(')')?;
    let (date, time) = at.split_once(' ')?;
    let time = time.strip_suffix("+00")?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 || frac.len() > 9 {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    // days from the civil date (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

fn check(msgs: Vec<Message>) -> std::io::Result<Vec<Message>> {
    match msgs.iter().find(|m| m.tag == b'E') {
        Some(e) => Err(std::io::Error::other(error_message(e))),
        None => Ok(msgs),
    }
}

fn two_columns(row: &Message) -> Option<(String, String)> {
    let b = row.body();
    let n = i16::from_be_bytes([*b.first()?, *b.get(1)?]);
    if n != 2 {
        return None;
    }
    let mut at = 2usize;
    let mut out = Vec::with_capacity(2);
    for _ in 0..2 {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            return None;
        }
        let v = b.get(at..at + len as usize)?;
        at += len as usize;
        out.push(String::from_utf8_lossy(v).into_owned());
    }
    let data = out.pop()?;
    let lsn = out.pop()?;
    Some((lsn, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_messages() {
        assert!(is_ddl_message("message: transactional: 1 prefix: postai_ddl, sz: 11 content:ALTER TABLE"));
        assert!(!is_ddl_message("message: transactional: 0 prefix: postai_ddl, sz: 0 content:"));
        assert!(!is_ddl_message("message: transactional: 1 prefix: postai_ddl_x, sz: 0 content:"));
        assert!(!is_ddl_message("message: transactional: 1 prefix: postai, sz: 0 content:"));
        let c = Catalog::new();
        assert_eq!(change_targets("BEGIN 123", &c), None);
        assert_eq!(
            change_targets("message: transactional: 1 prefix: postai_ddl, sz: 6 content:CREATE", &c),
            Some(vec![ChangeTarget::All])
        );
    }

    #[test]
    fn history_answers_resumes_it_can_vouch_for() {
        let feed = |commit: u64, rows: usize| {
            Arc::new(Feed {
                rows: vec![(String::new(), String::new()); rows],
                max_commit: Some(Lsn(commit)),
                ..Feed::default()
            })
        };
        let mut h = History::default();
        assert!(h.since(Lsn(0)).is_none(), "nothing known before the reader starts");
        h.start_at(Lsn(100));
        h.push(feed(110, 2), 4);
        h.push(Arc::new(Feed { current: Some(115), ..Feed::default() }), 4);
        h.push(feed(120, 2), 4);
        assert_eq!(h.since(Lsn(100)).map(|f| f.len()), Some(2));
        assert_eq!(h.since(Lsn(110)).map(|f| f.len()), Some(1));
        assert_eq!(h.since(Lsn(500)).map(|f| f.len()), Some(0), "ahead: nothing to replay, nothing missed");
        assert!(h.since(Lsn(99)).is_none(), "commits before the reader's start are not kept");
        // past 4 rows the oldest feed goes, and with it positions before its commits
        h.push(feed(130, 2), 4);
        assert!(h.since(Lsn(100)).is_none());
        assert_eq!(h.since(Lsn(110)).map(|f| f.len()), Some(2), "the keepalive-only poll was not kept");
        // a new slot (start 125): no position published before it is continued
        h.push(Arc::new(Feed { reset: Some(Lsn(125)), ..Feed::default() }), 4);
        assert!(h.since(Lsn(125)).is_none());
        assert!(h.since(Lsn(130)).is_none(), "published before the reset: maybe a lost timeline");
        assert_eq!(h.since(Lsn(131)).map(|f| f.len()), Some(0));
        // a fresh process's first slot: continued from its start
        let mut fresh = History::default();
        fresh.push(Arc::new(Feed { reset: Some(Lsn(50)), ..Feed::default() }), 4);
        assert_eq!(fresh.since(Lsn(50)).map(|f| f.len()), Some(0));
    }

    #[test]
    fn commit_timestamps() {
        let t = commit_time("COMMIT 754 (at 2026-11-27 03:10:26.5+00)").expect("parses");
        let since = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        assert_eq!(since.as_millis(), 1_795_749_026_500);
        let t = commit_time("COMMIT 1 (at 2000-03-01 00:00:00+00)").expect("parses");
        assert_eq!(t.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs(), 951_868_800);
        for bad in [
            "COMMIT 1",
            "COMMIT 1 (at 2026-13-01 00:00:00+00)",
            "COMMIT 1 (at 2026-11-27 03:10:26+02)",
            "COMMIT (at x y)",
        ] {
            assert_eq!(commit_time(bad), None, "{bad}");
        }
    }
}

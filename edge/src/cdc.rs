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

use std::time::Duration;

use postai_core::Lsn;
use postai_core::cache::TierName;
use postai_core::stream::reader::{Slot, SlotReader, SlotStep};
use postai_core::stream::subscriber::Subscriber;
use postai_core::stream::{self, Line, Record, fmt_lsn, parse_lsn};

use crate::config::CdcSource;
use crate::protocol::{self, Message};
use crate::proxy::Proxy;
use crate::upstream::{Conn, error_message};

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

pub use postai_core::stream::history::{Feed, HISTORY_ROWS, History};

/// Sends `feed` to the subscribers; a regional proxy also keeps it for
/// those that subscribe again. Under the history's lock, so that a
/// subscriber that snapshots the history and then listens misses nothing.
pub fn publish(proxy: &Proxy, feed: Feed) {
    let feed = Arc::new(feed);
    let mut history = proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner());
    if feed.reset.is_some() {
        history.set_origin(feed.origin.clone());
    }
    if proxy.config.role == crate::config::Role::Regional {
        history.push(feed.clone(), HISTORY_ROWS);
    }
    let _ = proxy.cdc_feed.send(feed);
}

/// Reads the slot (or subscribes to the regional proxy) forever; reconnects after errors.
pub async fn run(proxy: Arc<Proxy>) {
    let cfg = proxy.config.cdc.clone();
    // the machines outlive connections: what was applied, where the slot was left
    let mut reader = SlotReader::new();
    let mut subscriber = Subscriber::new();
    // the catalog and roles last seen
    let mut watch = crate::catalog::Watch::default();
    loop {
        let result = match cfg.source {
            CdcSource::Slot => poll_loop(&proxy, &mut reader, &mut watch).await,
            CdcSource::Regional => subscribe_loop(&proxy, &mut subscriber, &mut watch).await,
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

/// Installs the DDL event triggers unless they are there as they must be.
async fn install_triggers(proxy: &Proxy, conn: &mut Conn) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
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
    Ok(())
}

/// The slot's `confirmed_flush_lsn`, `None` when there is no such slot.
async fn slot_position(conn: &mut Conn, slot: &str) -> std::io::Result<Option<Lsn>> {
    let q = format!("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'");
    let msgs = check(conn.simple(&q).await?)?;
    if !msgs.iter().any(|m| m.tag == b'D') {
        return Ok(None);
    }
    // a slot that never confirmed a position stands at its start
    Ok(Some(protocol::first_value(&msgs).and_then(|s| parse_lsn(&s)).unwrap_or_default()))
}

/// Finds the slot, or creates it, and opens the stream: the catalog read,
/// the L2 file adopted, a reset published, then the opening events applied.
async fn open_slot(
    proxy: &Proxy,
    conn: &mut Conn,
    reader: &mut SlotReader,
    watch: &mut crate::catalog::Watch,
) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let slot = match slot_position(conn, &cfg.slot).await? {
        Some(confirmed) => Slot::Existing(confirmed),
        None => {
            let q =
                format!("SELECT lsn::text FROM pg_create_logical_replication_slot('{}', 'test_decoding')", cfg.slot);
            let created = protocol::first_value(&check(conn.simple(&q).await?)?).and_then(|s| parse_lsn(&s));
            Slot::Created(created.ok_or_else(|| std::io::Error::other("the new slot has no position"))?)
        }
    };
    let opening = reader.open(slot);
    if opening.replaced {
        eprintln!("postai-edge: cdc ({}): the slot was moved by someone else: the cache starts over", cfg.slot);
    }
    // the history the slot's positions are on, for subscribers
    let origin = origin(conn).await;
    match opening.reset {
        // subscribers must drop what they hold too, and a regional's history
        // continues no position from before
        Some(start) => publish(proxy, Feed { reset: Some(start), origin, ..Feed::default() }),
        None => proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner()).set_origin(origin),
    }
    // the catalog once the slot exists (DDL after it comes through the
    // stream), before the stream opens the cache
    let catalog = watch.sync_catalog(proxy, conn).await?;
    adopt_l2(proxy, conn, opening.adopt_at, opening.fresh, catalog).await;
    if let Some(from) = opening.history_from.filter(|_| proxy.config.role == crate::config::Role::Regional) {
        // only a regional proxy keeps what it publishes
        proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner()).start_at(from);
    }
    let events = reader.opened();
    let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
    for event in &events {
        node.handle_cdc(proxy.now(), event);
    }
    // what changed before the slot's position reached this process only as
    // what the L2 file holds: nothing older is filed
    node.fills_from(opening.adopt_at);
    Ok(())
}

/// A `test_decoding` row decoded against the node's catalog; a commit's
/// time feeds the invalidation-lag metric.
fn decode_row(proxy: &Proxy, catalog: &postai_core::sql::Catalog, lsn: &str, data: &str) -> Record {
    let record = stream::decode(lsn, data, catalog);
    if matches!(record, Record::Commit(_))
        && let Some(at) = stream::commit_time_us(data)
        && let Ok(lag) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH + Duration::from_micros(at))
    {
        proxy.metrics.invalidation_lag.observe(lag);
    }
    record
}

/// The slot reader's driver: peeks, applies what [`SlotReader`] says, moves
/// the slot as it says.
async fn poll_loop(proxy: &Proxy, reader: &mut SlotReader, watch: &mut crate::catalog::Watch) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let (addr, generation) = {
        let t = proxy.topology();
        (cfg.upstream.clone().unwrap_or_else(|| t.primary_addr()), t.primary_generation())
    };
    let mut conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    check(conn.simple("SET TimeZone = 'UTC'").await?)?;
    install_triggers(proxy, &mut conn).await?;
    watch.check_roles(proxy, &mut conn).await?;
    let mut roles_checked = std::time::Instant::now();
    open_slot(proxy, &mut conn, reader, watch).await?;
    let peek = format!(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_changes('{}', NULL, NULL, 'include-timestamp', 'on')",
        cfg.slot
    );
    loop {
        if cfg.upstream.is_none() && proxy.topology().primary_generation() != generation {
            // a failover: the slot to read is on the new primary
            return Err(std::io::Error::other("the primary changed; reading the new primary's stream"));
        }
        // a primary that died while a statement was in flight never
        // answers it (its packets dropped): the failover ends the wait
        let follows = cfg.upstream.is_none();
        let lsn_sql = "SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text";
        let lsn_msgs = check(until_failover(proxy, generation, follows, conn.simple(lsn_sql)).await?)?;
        let current = protocol::first_value(&lsn_msgs).and_then(|s| parse_lsn(&s)).map(|l| l.0);
        let rows = check(until_failover(proxy, generation, follows, conn.simple(&peek)).await?)?;
        // the slot is still the one this reader left where it left it
        let position = until_failover(proxy, generation, follows, slot_position(&mut conn, &cfg.slot)).await?;
        if let Err(e) = reader.check_position(position) {
            // what was published is still true, but what follows it may never come
            proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner()).break_off();
            return Err(std::io::Error::other(e));
        }
        let rows: Vec<(String, String)> = rows.iter().filter(|m| m.tag == b'D').filter_map(two_columns).collect();
        let relay = proxy.cdc_feed.receiver_count() > 0 || proxy.config.role == crate::config::Role::Regional;
        let (written, ddl) = {
            let now = proxy.now();
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            let batch = {
                let catalog = node.analyzer().catalog();
                reader.handle_records(rows.iter().map(|(lsn, data)| decode_row(proxy, catalog, lsn, data)))
            };
            for event in &batch.events {
                node.handle_cdc(now, event);
            }
            // subscribers (edges behind this regional proxy) get the same rows
            proxy.cdc_last.store(reader.last().0, Ordering::Relaxed);
            if relay {
                publish(proxy, Feed { rows, current, max_commit: batch.max_commit, ..Feed::default() });
            }
            let ddl = batch.ddl();
            if ddl {
                // until the catalog is read again nothing is cached (a view or
                // function may read other relations now)
                node.catalog_changed();
            }
            // queued under the node's lock: after every fill validated before these changes
            let written = match (&proxy.l2_file, batch.through) {
                (Some(f), Some(t)) => Some(f.invalidate(batch.changes, t)),
                _ => None,
            };
            (written, ddl)
        };
        // DDL (here or through the proxy) may have changed what relations
        // and functions are; roles change without events
        if ddl || proxy.catalog_needs_read() {
            watch.sync_catalog(proxy, &mut conn).await?;
        }
        if roles_checked.elapsed() >= Duration::from_millis(ROLES_CHECK_MS) {
            watch.check_roles(proxy, &mut conn).await?;
            roles_checked = std::time::Instant::now();
        }
        match reader.poll_step(current) {
            Some(SlotStep::Advance(t)) => {
                if let Some(written) = written {
                    // a writer that is gone wrote nothing more: the slot moving past
                    // the file's position makes the next start wipe it
                    if let Ok(Err(e)) = written.await {
                        return Err(std::io::Error::other(format!("L2 file: {e}; the slot is not advanced")));
                    }
                }
                let advance =
                    format!("SELECT end_lsn::text FROM pg_replication_slot_advance('{}', '{}')", cfg.slot, fmt_lsn(t));
                let end = protocol::first_value(&check(conn.simple(&advance).await?)?).and_then(|s| parse_lsn(&s));
                reader.handle_advanced(t, end);
            }
            Some(SlotStep::Emit) => {
                let emit = conn.simple("SELECT 1 FROM pg_logical_emit_message(false, 'postai', '')").await?;
                if let Some(e) = emit.iter().find(|m| m.tag == b'E') {
                    eprintln!("postai-edge: cdc ({}): cannot advance an idle slot: {}", cfg.slot, error_message(e));
                }
            }
            None => {}
        }
        if let Some(c) = current {
            proxy.saw_primary_lsn(generation, Lsn(c));
        }
        tokio::time::sleep(Duration::from_millis(cfg.poll_ms)).await;
    }
}

/// `statement`, given up once the topology's primary is no longer the one
/// of `generation` (when the reader `follows` the topology): the reader
/// then reconnects to the new primary instead of waiting on the old one.
async fn until_failover<T>(
    proxy: &Proxy,
    generation: u64,
    follows: bool,
    statement: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    if !follows {
        return statement.await;
    }
    let changed = async {
        while proxy.topology().primary_generation() == generation {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        done = statement => done,
        () = changed => Err(std::io::Error::other("the primary changed while its stream was read")),
    }
}

/// An edge behind a regional proxy: `POSTAI SUBSCRIBE` on it, each line
/// handled by the [`Subscriber`] machine (see `postai_core::stream::subscriber`).
async fn subscribe_loop(proxy: &Proxy, sub: &mut Subscriber, watch: &mut crate::catalog::Watch) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let (addr, generation) = {
        let t = proxy.topology();
        (t.primary_addr(), t.primary_generation())
    };
    let mut conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    // the database's catalog and roles over a second connection (the first streams)
    let mut catalog_conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    watch.check_roles(proxy, &mut catalog_conn).await?;
    let mut roles_checked = std::time::Instant::now();
    // the file is adopted by the first subscription of this process
    let adopting = proxy.l2_file.as_ref().filter(|_| !sub.subscribed());
    let cluster = match adopting {
        Some(_) => system_identifier(&mut conn).await,
        None => None,
    };
    // the file's position, on the history the file says it was written on
    let file = adopting.and_then(|f| Some((f.opened_at?, f.opened_origin())));
    let command = match sub.connect(file) {
        Some(p) => format!("POSTAI SUBSCRIBE FROM '{}'", fmt_lsn(p)),
        None => "POSTAI SUBSCRIBE".into(),
    };
    conn.send(&protocol::query(&command)).await?;
    loop {
        let m = conn.recv().await?;
        match m.tag {
            b'E' => return Err(std::io::Error::other(error_message(&m))),
            b'Z' | b'c' => return Err(std::io::Error::other("the regional proxy ended the subscription")),
            b'd' => {}
            _ => continue,
        }
        let text = String::from_utf8_lossy(m.body());
        let Some(line) = Line::parse(&text) else { continue };
        let opening = sub.opening(&line);
        if let Some((at, created)) = opening {
            // the catalog once the stream's position is fixed (DDL after it
            // comes through the stream), before the stream opens the cache
            let catalog = watch.sync_catalog(proxy, &mut catalog_conn).await?;
            if let Some(f) = adopting {
                // the file: kept when the stream continues after its position
                // on the same history, else wiped
                let system_id = cluster.as_ref().map(|id| {
                    let origin = sub.announced().unwrap_or("unknown");
                    format!("{id} catalog {catalog:032x}{}{origin}", crate::l2::ORIGIN_MARK)
                });
                adopt_file(proxy, f, at, created, system_id).await;
            }
        }
        let (ddl, current, new_history) = {
            let now = proxy.now();
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            let step = {
                let catalog = node.analyzer().catalog();
                sub.handle_line(line, &mut |lsn, data| decode_row(proxy, catalog, lsn, data))
            };
            let apply = |node: &mut postai_core::node::EdgeNode<_>| {
                for event in &step.events {
                    node.handle_cdc(now, event);
                }
            };
            if step.live {
                apply(&mut node);
            } else {
                // what the regional repeats when it opens: not news that its stream is live
                node.unproven(apply);
            }
            if let Some((at, _)) = opening {
                // the stream opened there: nothing older is filed
                node.fills_from(at);
            }
            if step.resumed {
                proxy.metrics.cdc_resumed.fetch_add(1, Ordering::Relaxed);
            }
            let ddl = step.ddl();
            if ddl {
                node.catalog_changed();
            }
            // queued under the node's lock, as the slot reader does; the file's
            // position is where the next start asks the stream to continue from
            if let Some(f) = &proxy.l2_file
                && !step.changes.is_empty()
            {
                drop(f.invalidate(step.changes, sub.last()));
            }
            (ddl, step.current, step.new_history)
        };
        if new_history {
            // a new timeline reuses the positions what is held was filed at:
            // all of it goes, and no answer in flight is filed
            proxy.forget_cache(proxy.now());
        }
        if let Some(current) = current {
            // (not under the node's lock: this takes it)
            proxy.saw_primary_lsn(generation, current);
        }
        if ddl || proxy.catalog_needs_read() {
            watch.sync_catalog(proxy, &mut catalog_conn).await?;
        }
        if roles_checked.elapsed() >= Duration::from_millis(ROLES_CHECK_MS) {
            watch.check_roles(proxy, &mut catalog_conn).await?;
            roles_checked = std::time::Instant::now();
        }
    }
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

/// The history a primary's positions are on: its cluster's
/// `system_identifier` and its timeline (`pg_walfile_name` names the
/// current one at once after a promotion; the checkpoint's lags). `None`
/// when the server does not answer (a subscriber then continues nothing).
async fn origin(conn: &mut crate::upstream::Conn) -> Option<String> {
    let q = "SELECT system_identifier::text || '/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) \
             FROM pg_control_system()";
    match conn.simple(q).await {
        Ok(m) if m.iter().all(|m| m.tag != b'E') => protocol::first_value(&m),
        _ => None,
    }
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

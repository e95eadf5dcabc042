//! The edge node: the composition a driver runs at one site. A client query
//! comes in; the node answers it from L1 or L2, or asks the driver to send it
//! upstream (to the regional pool, which holds L3, or to a database), fills the
//! tiers back from the reply, applies its own writes' invalidations before
//! acknowledging them (read-your-writes), and applies CDC events.
//!
//! Surface: `handle_*` inputs with `now`, `poll_output` outputs.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::cache::{Entry, Lookup, NO_SLOT, Tier, TierConfig, TierConfigError, TierName};
use crate::consistency::{Consistency, entry_meets_floor, read_floor};
use crate::hash::{Digest128, FixedMap, hash_bytes};
use crate::invalidation::{CdcEvent, Change, ChangeTarget, Dep, Deps, VersionMap, VersionMapConfig, key_hash};
use crate::refresh::{RefreshFn, RefreshIndex};
use crate::router::Zone;
use crate::sql::{
    Analyzer, AnalyzerConfig, ArgRef, Catalog, KeyAccess, LexError, NotCacheable, RESULT_NEUTRAL_SETTINGS,
    SessionCommand, Shape, StatementKind, TableId, TxnControl, canonical_literal, canonical_number,
    parse_session_command,
};
use crate::{Duration, Instant, Lsn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Who answered a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Served {
    L1,
    L2,
    L3,
    Replica,
    Primary,
}

impl Served {
    pub fn name(self) -> &'static str {
        match self {
            Served::L1 => "L1",
            Served::L2 => "L2",
            Served::L3 => "L3",
            Served::Replica => "replica",
            Served::Primary => "primary",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub zone: Zone,
    pub l1: TierConfig,
    pub l2: TierConfig,
    pub versions: VersionMapConfig,
    pub analyzer: AnalyzerConfig,
    pub sessions_max: usize,
    pub pending_max: usize,
    /// Tables whose rows must stay in one residency zone.
    pub residency: Vec<(TableId, Zone)>,
    pub invalidation: InvalidationMode,
    /// With a bound, the node serves nothing from L1/L2 while its CDC stream
    /// (events or keepalives) has been silent for longer, nor before the first
    /// event: invalidations it cannot hear about would leave it serving stale
    /// data without limit. `None`: no bound (TTL only).
    pub cdc_silence_max: Option<Duration>,
}

/// How precisely writes invalidate cached entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InvalidationMode {
    /// Entries live until their TTL; writes and CDC invalidate nothing.
    TtlOnly,
    /// Any change to a table invalidates every entry that reads it.
    Table,
    /// Point reads depend on their rows only (table-level where keys are unknown).
    #[default]
    Key,
    /// Key-level, and CDC row images refresh cached point reads in place.
    Refresh,
}

impl InvalidationMode {
    fn key_level(self) -> bool {
        matches!(self, InvalidationMode::Key | InvalidationMode::Refresh)
    }
}

impl NodeConfig {
    /// A site with these tiers, and defaults for the rest: default version map
    /// and analyser, 10 000 sessions and requests in flight, no residency
    /// rules, key-level invalidation, no CDC-silence bound.
    pub fn new(zone: Zone, l1: TierConfig, l2: TierConfig) -> Self {
        NodeConfig {
            zone,
            l1,
            l2,
            versions: VersionMapConfig::default(),
            analyzer: AnalyzerConfig::default(),
            sessions_max: 10_000,
            pending_max: 10_000,
            residency: Vec::new(),
            invalidation: InvalidationMode::Key,
            cdc_silence_max: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeConfigError {
    #[error("L1: {0}")]
    L1(TierConfigError),
    #[error("L2: {0}")]
    L2(TierConfigError),
    #[error("sessions_max and pending_max must be positive")]
    Limits,
}

/// Where an upstream request must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Writes, strong reads, everything inside a transaction, everything unknown.
    Primary,
    /// A read any fresh-enough endpoint may answer (L3 first, if cacheable).
    Read { floor: Option<Lsn> },
}

/// Output of the node, drained with [`EdgeNode::poll_output`].
#[derive(Clone, Debug)]
pub enum NodeOutput<V> {
    /// Answer the client.
    Reply { req: RequestId, session: SessionId, served: Served, value: V },
    /// Send the query upstream, then call [`EdgeNode::handle_upstream`].
    Upstream(UpstreamRequest),
    /// Answer the client with an error.
    Failed { req: RequestId, session: SessionId, error: NodeError },
}

#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub req: RequestId,
    pub session: SessionId,
    pub shape: Arc<Shape>,
    pub route: Route,
    /// Cache key, when the result may be cached upstream (L3).
    pub cache_key: Option<u128>,
    pub deps: Deps,
    /// Residency zone of the data, when the query touches zoned tables.
    pub residency: Option<Zone>,
}

/// What came back from upstream.
#[derive(Clone, Debug)]
pub struct UpstreamReply<V> {
    pub value: V,
    pub size_bytes: u32,
    pub served: Served,
    /// For reads: the result reflects at least every commit up to here.
    pub snapshot_lsn: Lsn,
    /// For writes and COMMIT: an upper bound of the commit's LSN.
    pub commit_lsn: Option<Lsn>,
    /// A per-query TTL shorter than the tiers'.
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("unknown session {0:?}")]
    UnknownSession(SessionId),
    #[error("too many sessions (max {0})")]
    TooManySessions(usize),
    #[error("too many requests in flight (max {0})")]
    TooManyPending(usize),
    #[error("upstream failed: {0}")]
    Upstream(String),
}

#[derive(Clone, Debug)]
struct Session {
    consistency: Consistency,
    /// LSN of the session's last acknowledged write.
    last_write: Lsn,
    /// Every write up to `last_write` was applied to this node's version map.
    writes_local: bool,
    in_txn: bool,
    /// Changes of the open transaction, applied at COMMIT.
    txn_targets: Vec<ChangeTarget>,
    /// Result-affecting settings, sorted: the cache context.
    settings: Vec<(String, String)>,
    context: u64,
    /// The current role (`SET ROLE` changes it; `RESET ROLE` goes back to `login_role`).
    role: String,
    login_role: String,
    database: String,
    id: SessionId,
    /// The session's state changed in a way the context cannot follow: its
    /// entries are its own (the context includes the session id).
    private: bool,
    /// Times the session went private: each time is a fresh context (entries
    /// from an earlier private period may reflect state that is gone).
    private_epoch: u64,
    /// Settings and role before the open transaction's first session command
    /// (restored by ROLLBACK: a SET inside a rolled-back transaction is undone).
    txn_saved: Option<(Vec<(String, String)>, String)>,
    /// A ROLLBACK TO SAVEPOINT after a session command: which SETs survive is unknown.
    txn_uncertain: bool,
}

impl Session {
    fn recompute_context(&mut self) {
        let mut d = Digest128::new();
        d.bytes(self.role.as_bytes());
        d.bytes(self.database.as_bytes());
        for (k, v) in &self.settings {
            d.bytes(k.as_bytes());
            d.bytes(v.as_bytes());
        }
        if self.private {
            d.bytes(b"\0private");
            d.bytes(&self.id.0.to_le_bytes());
            d.bytes(&self.private_epoch.to_le_bytes());
        }
        self.context = d.finish() as u64;
    }

    fn make_private(&mut self) {
        if !self.private {
            self.private = true;
            self.private_epoch += 1;
            self.recompute_context();
        }
    }

    /// A session command ran (successfully) in the session's current state.
    fn command(&mut self, cmd: SessionCommand) {
        let changes = !matches!(cmd, SessionCommand::SetLocal | SessionCommand::NoEffect);
        if changes && self.in_txn && self.txn_saved.is_none() {
            self.txn_saved = Some((self.settings.clone(), self.role.clone()));
        }
        apply_setting(self, cmd);
    }

    /// The transaction ended: committed (`Some(true)`), rolled back
    /// (`Some(false)`) or unknown (`None`).
    fn end_transaction(&mut self, committed: Option<bool>) {
        self.in_txn = false;
        let saved = self.txn_saved.take();
        let uncertain = std::mem::take(&mut self.txn_uncertain);
        if let Some((settings, role)) = saved {
            match committed {
                Some(true) if !uncertain => {}
                Some(false) => {
                    self.settings = settings;
                    self.role = role;
                    self.recompute_context();
                }
                _ => self.make_private(),
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    session: SessionId,
    shape: Arc<Shape>,
    cache_key: Option<u128>,
    deps: Deps,
    targets: Vec<ChangeTarget>,
    started: Instant,
    cache_here: bool,
    session_command: Option<SessionCommand>,
}

/// A statement prepared once (extended protocol): its shape and its literals.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub shape: Arc<Shape>,
    literal_keys: Vec<Option<String>>,
    literal_digest: u128,
    /// For SET/RESET/DISCARD: the command, parsed from the original text.
    session_command: Option<SessionCommand>,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct NodeStats {
    pub queries: u64,
    pub l1_hits: u64,
    pub l2_hits: u64,
    pub upstream: u64,
    /// Cacheable reads no tier could answer (sent upstream).
    pub misses: u64,
    pub uncacheable: u64,
    pub writes: u64,
    pub cdc_events: u64,
    /// Cacheable reads sent upstream because the CDC stream was silent.
    pub cdc_silent_misses: u64,
}

#[derive(Debug)]
pub struct EdgeNode<V> {
    config: NodeConfig,
    analyzer: Analyzer,
    l1: Tier<V>,
    l2: Tier<V>,
    versions: VersionMap,
    sessions: FixedMap<SessionId, Session>,
    pending: FixedMap<RequestId, Pending>,
    outputs: VecDeque<NodeOutput<V>>,
    next_req: u64,
    stats: NodeStats,
    residency: FixedMap<TableId, Zone>,
    refresh: RefreshIndex,
    last_cdc: Option<Instant>,
}

/// Cache-key ingredients of one query.
struct Args<'a> {
    params: &'a [Option<&'a [u8]>],
    literal_keys: &'a [Option<String>],
    literal_digest: u128,
}

impl<V: Clone> EdgeNode<V> {
    pub fn new(config: NodeConfig, catalog: Catalog, cdc_start: Lsn) -> Result<Self, NodeConfigError> {
        if config.sessions_max == 0 || config.pending_max == 0 {
            return Err(NodeConfigError::Limits);
        }
        let l1 = Tier::new(config.l1.clone()).map_err(NodeConfigError::L1)?;
        let l2 = Tier::new(config.l2.clone()).map_err(NodeConfigError::L2)?;
        let residency = config.residency.iter().copied().collect();
        Ok(EdgeNode {
            analyzer: Analyzer::new(config.analyzer.clone(), catalog),
            versions: VersionMap::new(config.versions.clone(), cdc_start),
            l1,
            l2,
            sessions: FixedMap::default(),
            pending: FixedMap::default(),
            outputs: VecDeque::new(),
            next_req: 0,
            stats: NodeStats::default(),
            residency,
            refresh: RefreshIndex::new(config.l2.entries_max.saturating_mul(2)),
            last_cdc: None,
            config,
        })
    }

    pub fn stats(&self) -> NodeStats {
        self.stats
    }
    pub fn tier(&self, name: TierName) -> Option<&Tier<V>> {
        match name {
            TierName::L1 => Some(&self.l1),
            TierName::L2 => Some(&self.l2),
            TierName::L3 => None,
        }
    }
    pub fn versions(&self) -> &VersionMap {
        &self.versions
    }
    pub fn analyzer(&self) -> &Analyzer {
        &self.analyzer
    }
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Loses a site tier (fault injection, or an operator flush).
    pub fn clear_tier(&mut self, name: TierName) {
        match name {
            TierName::L1 => self.l1.clear(),
            TierName::L2 => self.l2.clear(),
            TierName::L3 => {}
        }
    }

    pub fn open_session(
        &mut self,
        id: SessionId,
        role: &str,
        database: &str,
        consistency: Consistency,
    ) -> Result<(), NodeError> {
        if self.sessions.len() >= self.config.sessions_max && !self.sessions.contains_key(&id) {
            return Err(NodeError::TooManySessions(self.config.sessions_max));
        }
        let mut s = Session {
            consistency,
            last_write: Lsn(0),
            writes_local: true,
            in_txn: false,
            txn_targets: Vec::new(),
            settings: Vec::new(),
            context: 0,
            role: role.to_string(),
            login_role: role.to_string(),
            database: database.to_string(),
            id,
            private: false,
            private_epoch: 0,
            txn_saved: None,
            txn_uncertain: false,
        };
        s.recompute_context();
        self.sessions.insert(id, s);
        Ok(())
    }

    pub fn close_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }

    pub fn set_consistency(&mut self, id: SessionId, consistency: Consistency) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.consistency = consistency;
        }
    }

    /// The upstream connection's transaction status (ReadyForQuery) is the
    /// ground truth: a transaction opened or closed by a path the node did not
    /// analyse (the extended protocol relayed as is) is synchronised here.
    /// Ending a transaction applies its pending changes at `lsn`.
    pub fn sync_transaction(&mut self, id: SessionId, in_txn: bool, lsn: Lsn) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if s.in_txn == in_txn {
            return;
        }
        s.in_txn = in_txn;
        if !in_txn {
            // committed or rolled back by a path the node did not see
            s.end_transaction(None);
            let targets = std::mem::take(&mut s.txn_targets);
            if !targets.is_empty() {
                s.last_write = s.last_write.max(lsn);
                self.versions.apply(&Change { lsn, targets });
            }
        }
    }

    /// A setting the session started with (a startup parameter, `-c name=value`
    /// in `options`): as a `SET` outside a transaction.
    pub fn set_session_setting(&mut self, id: SessionId, name: &str, value: &str) {
        if let Some(s) = self.sessions.get_mut(&id) {
            let cmd = SessionCommand::Set { name: name.to_ascii_lowercase(), value: value.to_string() };
            apply_setting(s, cmd);
        }
    }

    /// The session's state changed in a way the node cannot follow: from now
    /// on its cache entries are its own.
    pub fn make_private(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.make_private();
        }
    }

    /// A statement the node did not see ran in the session (the extended
    /// protocol, relayed as is): its effects on the session. `certain`: it ran
    /// outside a transaction; otherwise a session command in it makes the
    /// session private (whether it survives is unknown here).
    pub fn note_relayed(&mut self, id: SessionId, prepared: &Prepared, certain: bool) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if prepared.shape.session_private {
            s.make_private();
        }
        match prepared.session_command.clone() {
            Some(SessionCommand::SetLocal | SessionCommand::NoEffect) | None => {}
            Some(cmd) if certain => apply_setting(s, cmd),
            Some(_) => s.make_private(),
        }
    }

    pub fn in_transaction(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.in_txn)
    }

    /// A floor learned from outside this node (a session token): reads must
    /// reflect at least `lsn`, and this node's map may not have seen those writes.
    pub fn raise_floor(&mut self, id: SessionId, lsn: Lsn) {
        if let Some(s) = self.sessions.get_mut(&id)
            && lsn > s.last_write
        {
            s.last_write = lsn;
            s.writes_local = false;
        }
    }

    /// Prepares a statement (extended protocol Parse): analysed once here, so
    /// that executing it never lexes or parses.
    pub fn prepare(&mut self, sql: &str) -> Result<Prepared, LexError> {
        let (shape, lexed) = self.analyzer.lookup(sql)?;
        let mut d = Digest128::new();
        let mut literal_keys = Vec::with_capacity(lexed.literals.len());
        for lit in &lexed.literals {
            d.bytes(sql.as_bytes().get(lit.span.clone()).unwrap_or(&[]));
            literal_keys.push(canonical_literal(sql, lit));
        }
        let session_command = if shape.kind == StatementKind::Session { parse_session_command(sql) } else { None };
        Ok(Prepared { shape, literal_keys, literal_digest: d.finish(), session_command })
    }

    /// A simple-protocol query. Unlexable text goes to the primary untouched,
    /// which answers with PostgreSQL's own error.
    pub fn handle_simple_query(&mut self, now: Instant, session: SessionId, sql: &str) -> RequestId {
        match self.prepare(sql) {
            Ok(p) => self.handle_execute(now, session, &p, &[]),
            Err(e) => {
                let shape = Arc::new(unlexable_shape(sql, &e));
                let p = Prepared { shape, literal_keys: Vec::new(), literal_digest: 0, session_command: None };
                self.handle_execute(now, session, &p, &[])
            }
        }
    }

    /// Executes a prepared statement with text-format parameters.
    pub fn handle_execute(
        &mut self,
        now: Instant,
        session: SessionId,
        prepared: &Prepared,
        params: &[Option<&[u8]>],
    ) -> RequestId {
        let req = RequestId(self.next_req);
        self.next_req += 1;
        self.stats.queries += 1;
        if prepared.shape.session_private
            && let Some(s) = self.sessions.get_mut(&session)
        {
            s.make_private();
        }
        let Some(sess) = self.sessions.get(&session) else {
            self.outputs.push_back(NodeOutput::Failed { req, session, error: NodeError::UnknownSession(session) });
            return req;
        };
        if self.pending.len() >= self.config.pending_max {
            let error = NodeError::TooManyPending(self.config.pending_max);
            self.outputs.push_back(NodeOutput::Failed { req, session, error });
            return req;
        }
        let shape = prepared.shape.clone();
        let args = Args { params, literal_keys: &prepared.literal_keys, literal_digest: prepared.literal_digest };
        let residency = self.residency_of(&shape);
        let foreign = residency.is_some_and(|z| z != self.config.zone);
        let cacheable = shape.is_cacheable() && !sess.in_txn && sess.consistency != Consistency::Strong;
        if !cacheable {
            self.stats.uncacheable += u64::from(shape.kind == StatementKind::Read);
            let route = if shape.kind == StatementKind::Read
                && !sess.in_txn
                && sess.consistency != Consistency::Strong
                && shape.txn.is_none()
            {
                Route::Read { floor: read_floor(sess.consistency, sess.last_write) }
            } else {
                Route::Primary
            };
            let targets = write_targets(&shape, &args, self.config.invalidation);
            let cmd = prepared.session_command.clone();
            self.forward(now, req, session, shape, route, None, Deps::default(), targets, residency, false, cmd);
            return req;
        }
        let key = cache_key(&shape, sess.context, &args);
        let deps = read_deps(&shape, &args, self.config.invalidation);
        let floor = read_floor(sess.consistency, sess.last_write);
        let cdc_heard = match self.config.cdc_silence_max {
            None => true,
            Some(max) => self.last_cdc.is_some_and(|t| now.saturating_since(t) <= max),
        };
        if !cdc_heard {
            self.stats.cdc_silent_misses += 1;
        }
        if !foreign && cdc_heard {
            // the lookups below read the L1 slot, then the rows' versions:
            // started together, their cache misses overlap
            self.l1.prefetch(key, NO_SLOT);
            for d in &deps {
                if let Dep::Key(t, k) = d {
                    self.versions.prefetch(*t, *k);
                }
            }
            let versions = &self.versions;
            let complete = versions.complete_through();
            let local = sess.writes_local;
            let ok =
                |e: &Entry<V>| versions.is_valid(e.lsn, &e.deps) && entry_meets_floor(e.lsn, floor, complete, local);
            if let Lookup::Hit(e) = self.l1.get(now, key, ok) {
                self.stats.l1_hits += 1;
                let value = e.value.clone();
                self.outputs.push_back(NodeOutput::Reply { req, session, served: Served::L1, value });
                return req;
            }
            let ok =
                |e: &Entry<V>| versions.is_valid(e.lsn, &e.deps) && entry_meets_floor(e.lsn, floor, complete, local);
            if let Lookup::Hit(e) = self.l2.get(now, key, ok) {
                self.stats.l2_hits += 1;
                let entry = e.clone();
                let value = entry.value.clone();
                self.l1.insert(now, key, entry);
                self.outputs.push_back(NodeOutput::Reply { req, session, served: Served::L2, value });
                return req;
            }
        }
        self.stats.misses += 1;
        self.forward(
            now,
            req,
            session,
            shape,
            Route::Read { floor },
            Some(key),
            deps,
            Vec::new(),
            residency,
            !foreign,
            None,
        );
        req
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        now: Instant,
        req: RequestId,
        session: SessionId,
        shape: Arc<Shape>,
        route: Route,
        cache_key: Option<u128>,
        deps: Deps,
        targets: Vec<ChangeTarget>,
        residency: Option<Zone>,
        cache_here: bool,
        session_command: Option<SessionCommand>,
    ) {
        self.stats.upstream += 1;
        let pending = Pending {
            session,
            shape: shape.clone(),
            cache_key,
            deps: deps.clone(),
            targets,
            started: now,
            cache_here,
            session_command,
        };
        self.pending.insert(req, pending);
        self.outputs.push_back(NodeOutput::Upstream(UpstreamRequest {
            req,
            session,
            shape,
            route,
            cache_key,
            deps,
            residency,
        }));
    }

    fn residency_of(&self, shape: &Shape) -> Option<Zone> {
        if self.residency.is_empty() {
            return None;
        }
        shape.reads.iter().chain(shape.writes.iter()).find_map(|t| self.residency.get(t).copied())
    }

    /// The upstream answer to a request from [`NodeOutput::Upstream`].
    pub fn handle_upstream(&mut self, now: Instant, req: RequestId, result: Result<UpstreamReply<V>, String>) {
        let Some(p) = self.pending.remove(&req) else {
            return;
        };
        let session = p.session;
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(s) = self.sessions.get_mut(&session)
                    && p.shape.txn.is_some()
                {
                    // a failed COMMIT or ROLLBACK ends the transaction either way
                    s.end_transaction(Some(false));
                    s.txn_targets.clear();
                }
                self.outputs.push_back(NodeOutput::Failed { req, session, error: NodeError::Upstream(e) });
                return;
            }
        };
        let _ = p.started;
        self.apply_session_effects(&p, &reply);
        if let Some(key) = p.cache_key
            && p.cache_here
            && self.versions.is_valid(reply.snapshot_lsn, &p.deps)
        {
            let expires_at = now + reply.ttl.unwrap_or(Duration::MAX);
            let entry = Entry {
                value: reply.value.clone(),
                lsn: reply.snapshot_lsn,
                deps: p.deps.clone(),
                size_bytes: reply.size_bytes,
                expires_at,
            };
            if self.config.invalidation == InvalidationMode::Refresh
                && p.shape.refreshable
                && let [Dep::Key(t, k)] = &p.deps[..]
            {
                self.refresh.track(*t, *k, key);
            }
            self.l2.insert(now, key, entry.clone());
            self.l1.insert(now, key, entry);
        }
        self.outputs.push_back(NodeOutput::Reply { req, session, served: reply.served, value: reply.value });
    }

    fn apply_session_effects(&mut self, p: &Pending, reply: &UpstreamReply<V>) {
        let Some(s) = self.sessions.get_mut(&p.session) else {
            return;
        };
        let shape = &p.shape;
        let mut apply: Option<Change> = None;
        match shape.txn {
            Some(TxnControl::Begin) => {
                s.in_txn = true;
                s.txn_targets.clear();
                s.txn_saved = None;
                s.txn_uncertain = false;
            }
            Some(TxnControl::Commit) => {
                s.end_transaction(Some(true));
                let targets = std::mem::take(&mut s.txn_targets);
                if !targets.is_empty()
                    && let Some(lsn) = reply.commit_lsn
                {
                    apply = Some(Change { lsn, targets });
                }
            }
            Some(TxnControl::Rollback) => {
                s.end_transaction(Some(false));
                s.txn_targets.clear();
            }
            Some(TxnControl::RollbackTo) => s.txn_uncertain |= s.txn_saved.is_some(),
            _ => {}
        }
        if let Some(cmd) = p.session_command.clone() {
            s.command(cmd);
        }
        if !p.targets.is_empty() {
            if s.in_txn {
                s.txn_targets.extend(p.targets.iter().cloned());
            } else {
                let lsn = reply.commit_lsn.unwrap_or(reply.snapshot_lsn);
                apply = Some(Change { lsn, targets: p.targets.clone() });
            }
        }
        if let Some(change) = apply {
            self.stats.writes += 1;
            s.last_write = s.last_write.max(change.lsn);
            self.versions.apply(&change);
        }
    }

    /// A CDC event from the primary's logical decoding stream.
    pub fn handle_cdc(&mut self, now: Instant, event: &CdcEvent) {
        if self.note_cdc(now, 1) {
            self.versions.apply_cdc(event);
        }
    }

    /// Counts `events` CDC events received at `now`; returns whether the
    /// invalidation mode applies them (every mode but `TtlOnly`).
    fn note_cdc(&mut self, now: Instant, events: usize) -> bool {
        self.stats.cdc_events += events as u64;
        self.last_cdc = Some(self.last_cdc.map_or(now, |t| t.max(now)));
        self.config.invalidation != InvalidationMode::TtlOnly
    }

    /// A CDC event with row images: applied as [`Self::handle_cdc`], then, in
    /// `Refresh` mode, the cached point reads of the changed rows are refreshed
    /// in place. `refresh(table, key, old, lsn)` renders the new result from
    /// the event's row image (`None` leaves the entry to invalidation).
    pub fn handle_cdc_rows(&mut self, now: Instant, event: &CdcEvent, refresh: &mut RefreshFn<'_, V>) {
        self.handle_cdc_batch(now, std::iter::once(event), refresh);
    }

    /// Consecutive CDC events with row images, in stream order: the same
    /// state as [`Self::handle_cdc`] and then the refresh in place of each
    /// event, one at a time (versions and refreshes do not read each other),
    /// applied in phases so that the memory accesses of different rows
    /// overlap (see [`RefreshIndex::apply_batch`]).
    pub fn handle_cdc_batch<'e>(
        &mut self,
        now: Instant,
        events: impl IntoIterator<Item = &'e CdcEvent> + Clone,
        refresh: &mut RefreshFn<'_, V>,
    ) {
        let n = events.clone().into_iter().count();
        if n == 0 || !self.note_cdc(now, n) {
            return;
        }
        // every changed row's lookups first: their cache misses overlap, and
        // the updates then find the rows cached. The refresh index is
        // prefetched after its filter (itself prefetched with the versions)
        // has arrived, so only rows that may have entries cost a miss there.
        let refreshing = self.config.invalidation == InvalidationMode::Refresh;
        let rows = || {
            events.clone().into_iter().flat_map(|e| &e.change.targets).flat_map(|target| {
                let (t, ks): (TableId, &[u64]) = match target {
                    ChangeTarget::Keys(t, ks) => (*t, ks),
                    _ => (TableId(0), &[]),
                };
                ks.iter().map(move |k| (t, *k))
            })
        };
        for (t, k) in rows() {
            self.versions.prefetch(t, k);
            if refreshing {
                self.refresh.prefetch_filter(t, k);
            }
        }
        for event in events.clone() {
            self.versions.apply_cdc(event);
        }
        if refreshing {
            for (t, k) in rows() {
                self.refresh.prefetch(t, k);
            }
        }
        if self.config.invalidation == InvalidationMode::Refresh {
            self.refresh.apply_batch(events, &mut [&mut self.l1, &mut self.l2], refresh);
        }
    }

    /// Entries refreshed in place so far.
    pub fn refreshed(&self) -> u64 {
        self.refresh.refreshed
    }

    /// Restores an L2 entry that an earlier process persisted (a warm start).
    /// Stored only while the version map holds it valid; returns whether it
    /// was. The driver restores only what means the same in this process: keys
    /// of portable contexts ([`Self::context_is_portable`]) and deps on tables
    /// the catalog interns to the same ids. Restored entries are invalidated
    /// (never refreshed in place: the refresh index does not track them).
    pub fn restore_l2(&mut self, now: Instant, key: u128, entry: Entry<V>) -> bool {
        self.versions.is_valid(entry.lsn, &entry.deps) && self.l2.insert(now, key, entry)
    }

    /// Whether the cache keys of `session`'s entries mean the same in another
    /// process: its context digests role, database and settings only, no
    /// process-local state (a private session's context is its own).
    pub fn context_is_portable(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| !s.private)
    }

    /// The cache key a pending request fills L1/L2 under, if it fills them
    /// (a driver that copies fills elsewhere looks the entry up afterwards).
    pub fn pending_fill_key(&self, req: RequestId) -> Option<u128> {
        self.pending.get(&req).filter(|p| p.cache_here).and_then(|p| p.cache_key)
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<NodeOutput<V>> {
        self.outputs.pop_front()
    }

    /// The node has no timers of its own: TTLs are checked on lookup.
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

fn is_role_setting(name: &str) -> bool {
    name == "role" || name == "session authorization"
}

/// SET ROLE if any, else SET SESSION AUTHORIZATION if any, else the login role.
fn current_role(s: &Session) -> String {
    let get = |n: &str| s.settings.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    get("role").or_else(|| get("session authorization")).unwrap_or_else(|| s.login_role.clone())
}

fn apply_setting(s: &mut Session, cmd: SessionCommand) {
    match cmd {
        SessionCommand::Set { name, value } => {
            if RESULT_NEUTRAL_SETTINGS.contains(&name.as_str()) {
                return;
            }
            if name == "session authorization" {
                // also resets the role
                s.settings.retain(|(k, _)| !is_role_setting(k));
            } else {
                s.settings.retain(|(k, _)| *k != name);
            }
            let back = value.eq_ignore_ascii_case("none") || value.eq_ignore_ascii_case("default");
            if !(is_role_setting(&name) && back) {
                s.settings.push((name, value));
                s.settings.sort();
            }
            s.role = current_role(s);
        }
        SessionCommand::Reset { name } => {
            if name == "session authorization" {
                s.settings.retain(|(k, _)| !is_role_setting(k));
            } else {
                s.settings.retain(|(k, _)| *k != name);
            }
            s.role = current_role(s);
        }
        // RESET ALL leaves the role (`role` is not reset by RESET ALL)
        SessionCommand::ResetAll => s.settings.retain(|(k, _)| is_role_setting(k)),
        // DISCARD ALL: SET SESSION AUTHORIZATION DEFAULT, RESET ALL, temporary objects dropped
        SessionCommand::DiscardAll => {
            s.settings.clear();
            s.role = s.login_role.clone();
            s.private = false;
        }
        SessionCommand::SetLocal | SessionCommand::NoEffect => return,
    }
    s.recompute_context();
}

fn unlexable_shape(sql: &str, e: &LexError) -> Shape {
    Shape {
        id: crate::sql::ShapeId(u32::MAX),
        fingerprint: hash_bytes(sql.as_bytes()),
        text: sql.to_string(),
        kind: StatementKind::Other,
        txn: None,
        reads: Vec::new(),
        writes: Vec::new(),
        writes_unknown: false,
        cacheable: Err(NotCacheable::Unparsable(e.to_string())),
        read_keys: Vec::new(),
        refreshable: false,
        write_keys: None,
        literal_count: 0,
        param_count: 0,
        session_private: false,
    }
}

fn arg_value(arg: ArgRef, args: &Args<'_>) -> Option<String> {
    match arg {
        ArgRef::Param(i) => {
            let raw = args.params.get(i as usize).copied().flatten()?;
            let text = std::str::from_utf8(raw).ok()?;
            Some(canonical_number(text))
        }
        ArgRef::Literal(i) => args.literal_keys.get(i as usize).cloned().flatten(),
    }
}

/// Integer key ranges up to this many keys depend on each key; wider ones on the table.
pub const RANGE_KEYS_MAX: i64 = 64;

/// Key hashes of a key access, `None` if any argument is unusable (then the
/// table as a whole is the dependency).
fn key_hashes(access: &KeyAccess, args: &Args<'_>) -> Option<Vec<u64>> {
    if access.range {
        let lo: i64 = arg_value(*access.args.first()?, args)?.parse().ok()?;
        let hi: i64 = arg_value(*access.args.get(1)?, args)?.parse().ok()?;
        if hi < lo {
            return Some(Vec::new());
        }
        if hi - lo >= RANGE_KEYS_MAX {
            return None;
        }
        return Some((lo..=hi).map(|k| key_hash(access.table, k.to_string().as_bytes())).collect());
    }
    access.args.iter().map(|a| arg_value(*a, args).map(|v| key_hash(access.table, v.as_bytes()))).collect()
}

fn read_deps(shape: &Shape, args: &Args<'_>, mode: InvalidationMode) -> Deps {
    if mode == InvalidationMode::TtlOnly {
        return Deps::default();
    }
    // pushed straight into `Deps`: a point read's one dependency needs no
    // allocation (this runs for every read, hits included)
    let mut deps = Deps::default();
    for t in &shape.reads {
        let keyed = if mode.key_level() { shape.read_keys.iter().find(|a| a.table == *t) } else { None };
        match keyed.and_then(|a| key_hashes(a, args)) {
            Some(hashes) => hashes.into_iter().for_each(|h| deps.push(Dep::Key(*t, h))),
            None => deps.push(Dep::Table(*t)),
        }
    }
    deps
}

fn write_targets(shape: &Shape, args: &Args<'_>, mode: InvalidationMode) -> Vec<ChangeTarget> {
    if mode == InvalidationMode::TtlOnly {
        return Vec::new();
    }
    if shape.writes_unknown {
        return vec![ChangeTarget::All];
    }
    if shape.writes.is_empty() {
        return Vec::new();
    }
    if mode.key_level()
        && let Some(access) = &shape.write_keys
        && shape.writes == [access.table]
        && let Some(hashes) = key_hashes(access, args)
    {
        return vec![ChangeTarget::Keys(access.table, hashes)];
    }
    shape.writes.iter().map(|t| ChangeTarget::Table(*t)).collect()
}

/// The cache key: shape fingerprint, session context, parameters, literals.
fn cache_key(shape: &Shape, context: u64, args: &Args<'_>) -> u128 {
    let mut d = Digest128::new();
    d.u64(shape.fingerprint);
    d.u64(context);
    d.u64(args.literal_digest as u64);
    d.u64((args.literal_digest >> 64) as u64);
    d.u64(args.params.len() as u64);
    for p in args.params {
        match p {
            None => d.u64(u64::MAX),
            Some(b) => d.bytes(b),
        }
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Eviction;

    fn node(mode: InvalidationMode) -> (EdgeNode<u64>, TableId) {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let config = NodeConfig {
            sessions_max: 2,
            pending_max: 8,
            invalidation: mode,
            ..NodeConfig::new(Zone::Eu, tier(10), tier(100))
        };
        let mut n = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        (n, items)
    }

    fn read(n: &mut EdgeNode<u64>, p: &Prepared, key: &str, origin: u64) -> (Served, u64) {
        n.handle_execute(Instant::ZERO, SessionId(1), p, &[Some(key.as_bytes())]);
        match n.poll_output() {
            Some(NodeOutput::Reply { served, value, .. }) => (served, value),
            Some(NodeOutput::Upstream(u)) => {
                let reply = UpstreamReply {
                    value: origin,
                    size_bytes: 8,
                    served: Served::Replica,
                    snapshot_lsn: Lsn(origin),
                    commit_lsn: None,
                    ttl: None,
                };
                n.handle_upstream(Instant::ZERO, u.req, Ok(reply));
                match n.poll_output() {
                    Some(NodeOutput::Reply { served, value, .. }) => (served, value),
                    other => panic!("expected a reply, got {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn event(items: TableId, key: &str, prev: u64, lsn: u64) -> CdcEvent {
        CdcEvent {
            prev_lsn: Lsn(prev),
            change: Change {
                lsn: Lsn(lsn),
                targets: vec![ChangeTarget::Keys(items, vec![key_hash(items, key.as_bytes())])],
            },
        }
    }

    #[test]
    fn refresh_keeps_point_reads_hot_and_current() {
        let (mut n, items) = node(InvalidationMode::Refresh);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        assert!(p.shape.refreshable);
        assert_eq!(read(&mut n, &p, "7", 1), (Served::Replica, 1));
        n.handle_cdc_rows(Instant::ZERO, &event(items, "7", 0, 5), &mut |_, _, _, lsn| Some((lsn.0 * 100, 8)));
        assert_eq!(read(&mut n, &p, "7", 99), (Served::L1, 500), "refreshed in place, not invalidated");
        assert_eq!(n.refreshed(), 2, "L1 and L2 entries");
    }

    #[test]
    fn a_cdc_batch_leaves_the_node_as_its_events_one_by_one() {
        for mode in
            [InvalidationMode::Refresh, InvalidationMode::Key, InvalidationMode::Table, InvalidationMode::TtlOnly]
        {
            // 30 rows filled (L1 holds 10 of them), then 40 changes to rows
            // cached and not, a row changed twice, a gap in the stream
            let keys: Vec<String> = (0..30).map(|k| k.to_string()).collect();
            let events: Vec<CdcEvent> = (0..40u64)
                .map(|i| event(TableId(0), &((i * 7) % 45).to_string(), 100 + i - u64::from(i != 20), 101 + i))
                .collect();
            let run = |batched: bool| {
                let (mut n, items) = node(mode);
                assert_eq!(items, TableId(0));
                let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
                for k in &keys {
                    read(&mut n, &p, k, 1);
                }
                let mut refresh = |_: TableId, _: u64, _: &u64, lsn: Lsn| Some((lsn.0 * 10, 8));
                let now = Instant::from_millis(5);
                if batched {
                    n.handle_cdc_batch(now, &events, &mut refresh);
                } else {
                    // what a CDC event with rows means, one at a time
                    for e in &events {
                        n.handle_cdc(now, e);
                        if mode == InvalidationMode::Refresh {
                            n.refresh.apply(e, &mut [&mut n.l1, &mut n.l2], &mut refresh);
                        }
                    }
                }
                let served: Vec<(Served, u64)> = keys.iter().map(|k| read(&mut n, &p, k, 200)).collect();
                (served, n.refreshed(), n.versions.complete_through(), n.stats().cdc_events)
            };
            let (one_by_one, batched) = (run(false), run(true));
            assert_eq!(one_by_one, batched, "{mode:?}");
            if mode == InvalidationMode::Refresh {
                assert!(batched.1 > 0, "some entries refreshed in place");
            }
        }
    }

    #[test]
    fn key_mode_invalidates_instead() {
        let (mut n, items) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "7", 1);
        n.handle_cdc_rows(Instant::ZERO, &event(items, "7", 0, 5), &mut |_, _, _, lsn| Some((lsn.0, 8)));
        assert_eq!(read(&mut n, &p, "7", 6), (Served::Replica, 6));
    }

    /// Runs `sql` in `session`, answering upstream with success; what served it.
    fn run(n: &mut EdgeNode<u64>, session: u64, sql: &str) -> Served {
        n.handle_simple_query(Instant::ZERO, SessionId(session), sql);
        match n.poll_output() {
            Some(NodeOutput::Reply { served, .. }) => served,
            Some(NodeOutput::Upstream(u)) => {
                let reply = UpstreamReply {
                    value: 1,
                    size_bytes: 8,
                    served: Served::Primary,
                    snapshot_lsn: Lsn(1),
                    commit_lsn: Some(Lsn(1)),
                    ttl: None,
                };
                n.handle_upstream(Instant::ZERO, u.req, Ok(reply));
                while n.poll_output().is_some() {}
                Served::Primary
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Whether session 2 is served what session 1 cached (the same context).
    fn shares(n: &mut EdgeNode<u64>, id: u32) -> bool {
        let sql = format!("SELECT v FROM items WHERE id = {id}");
        run(n, 1, &sql);
        run(n, 2, &sql) == Served::L1
    }

    #[test]
    fn session_state_follows_roles_transactions_and_invisible_changes() {
        let (mut n, _) = node(InvalidationMode::Key);
        n.open_session(SessionId(2), "app", "app", Consistency::ReadYourWrites).expect("room");
        assert!(shares(&mut n, 1), "same login, same settings");
        run(&mut n, 2, "SET ROLE alice");
        assert!(!shares(&mut n, 2), "another role");
        run(&mut n, 2, "RESET ROLE");
        assert!(shares(&mut n, 3), "RESET ROLE goes back to the login role");
        for back in ["SET ROLE NONE", "SET SESSION AUTHORIZATION DEFAULT", "DISCARD ALL"] {
            run(&mut n, 2, "SET ROLE alice");
            run(&mut n, 2, back);
            assert!(shares(&mut n, 4), "{back}");
        }
        run(&mut n, 2, "SET ROLE alice");
        run(&mut n, 2, "RESET ALL");
        assert!(!shares(&mut n, 5), "RESET ALL keeps the role");
        run(&mut n, 2, "DISCARD ALL");

        // a SET inside a rolled-back transaction is undone
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "ROLLBACK");
        assert!(shares(&mut n, 6), "rolled back");
        // ... and kept when committed
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "COMMIT");
        assert!(!shares(&mut n, 7), "committed");
        run(&mut n, 2, "RESET search_path");
        assert!(shares(&mut n, 8));
        // a ROLLBACK TO after a SET: unknown, private
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SAVEPOINT a");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "ROLLBACK TO a");
        run(&mut n, 2, "COMMIT");
        assert!(!shares(&mut n, 9), "uncertain: private");
        run(&mut n, 2, "DISCARD ALL");
        assert!(shares(&mut n, 10));

        // changes no SET shows: private until DISCARD ALL
        for invisible in [
            "SELECT set_config('search_path', 'other', false)",
            "CREATE TEMP TABLE items (id int, v text)",
            "CREATE GLOBAL TEMPORARY TABLE items (id int)",
            "SELECT * INTO TEMP t FROM items",
            "SELECT * FROM pg_temp.items",
        ] {
            run(&mut n, 2, "DISCARD ALL");
            run(&mut n, 2, invisible);
            assert!(!shares(&mut n, 11), "{invisible}");
        }
        run(&mut n, 2, "DISCARD ALL");
        assert!(shares(&mut n, 12));

        // startup settings and relayed statements
        n.set_session_setting(SessionId(2), "DateStyle", "SQL, DMY");
        assert!(!shares(&mut n, 13), "a startup setting is in the context");
        n.set_session_setting(SessionId(1), "datestyle", "SQL, DMY");
        assert!(shares(&mut n, 14), "the same startup setting");
        let set = n.prepare("SET search_path = other").expect("lexes");
        n.note_relayed(SessionId(2), &set, true);
        assert!(!shares(&mut n, 15), "an extended-protocol SET");
        n.note_relayed(SessionId(1), &set, true);
        assert!(shares(&mut n, 16));
        n.note_relayed(SessionId(2), &set, false);
        assert!(!shares(&mut n, 17), "a SET of uncertain fate: private");
        let column = n.prepare("SELECT temp FROM weather WHERE temp > 3").expect("lexes");
        assert!(!column.shape.session_private, "a column named temp is not a temporary table");
    }

    #[test]
    fn only_single_row_projections_are_refreshable() {
        let (mut n, _) = node(InvalidationMode::Refresh);
        for (sql, want) in [
            ("SELECT * FROM items WHERE id = $1", true),
            ("SELECT items.v AS value FROM items WHERE items.id = 3", true),
            ("SELECT v FROM items WHERE id = $1 AND v > 2", false),
            ("SELECT v FROM items WHERE id = $1 LIMIT 1", false),
            ("SELECT count(*) FROM items WHERE id = $1", false),
            ("SELECT lower(v) FROM items WHERE id = $1", false),
            ("SELECT v FROM items WHERE id IN ($1, $2)", false),
            ("SELECT i.v FROM items i JOIN owners o ON o.id = i.owner WHERE i.id = $1", false),
        ] {
            let p = n.prepare(sql).expect("lexes");
            assert_eq!(p.shape.refreshable, want, "{sql}");
        }
    }

    #[test]
    fn session_settings_change_the_cache_context() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "1", 1);
        assert_eq!(read(&mut n, &p, "1", 2).0, Served::L1);
        // a result-neutral setting keeps the context
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SET application_name = 'x'");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("SET goes upstream") };
        let ok = UpstreamReply {
            value: 0,
            size_bytes: 0,
            served: Served::Primary,
            snapshot_lsn: Lsn(0),
            commit_lsn: None,
            ttl: None,
        };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok.clone()));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 3).0, Served::L1);
        // search_path changes what `items` means
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SET search_path TO tenant_b");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("SET goes upstream") };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 4).0, Served::Replica, "another search_path, another cache entry");
    }

    #[test]
    fn transactions_are_never_cached_and_writes_apply_at_commit() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "1", 1);
        let ok = |lsn| UpstreamReply {
            value: 0u64,
            size_bytes: 0,
            served: Served::Primary,
            snapshot_lsn: Lsn(lsn),
            commit_lsn: Some(Lsn(lsn)),
            ttl: None,
        };
        for sql in ["BEGIN", "UPDATE items SET v = 2 WHERE id = 1"] {
            n.handle_simple_query(Instant::ZERO, SessionId(1), sql);
            let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("{sql} goes upstream") };
            assert_eq!(u.route, Route::Primary);
            n.handle_upstream(Instant::ZERO, u.req, Ok(ok(1)));
            while n.poll_output().is_some() {}
        }
        n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"1")]);
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("a read in a transaction goes upstream") };
        assert_eq!((u.route, u.cache_key), (Route::Primary, None));
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok(1)));
        while n.poll_output().is_some() {}
        n.handle_simple_query(Instant::ZERO, SessionId(1), "COMMIT");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("COMMIT goes upstream") };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok(9)));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 9), (Served::Replica, 9), "the commit invalidated the row");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let (mut n, _) = node(InvalidationMode::Key);
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SELECT 'unterminated");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("goes to the primary for its error") };
        assert_eq!((u.route, u.cache_key), (Route::Primary, None));
        n.handle_simple_query(Instant::ZERO, SessionId(99), "SELECT 1");
        assert!(matches!(n.poll_output(), Some(NodeOutput::Failed { error: NodeError::UnknownSession(_), .. })));
        n.handle_upstream(Instant::ZERO, RequestId(12345), Err("late".into()));
        assert!(n.poll_output().is_none(), "an unknown request id is ignored");
    }
}

#[cfg(test)]
mod silence_tests {
    use super::*;
    use crate::cache::Eviction;

    #[test]
    fn a_silent_cdc_stream_stops_cache_serving() {
        let mut catalog = Catalog::new();
        catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let config = NodeConfig {
            cdc_silence_max: Some(Duration::from_secs(2)),
            ..NodeConfig::new(Zone::Eu, tier(10), tier(10))
        };
        let mut n: EdgeNode<u64> = EdgeNode::new(config, catalog, Lsn(0)).expect("valid");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let read = |n: &mut EdgeNode<u64>, at: Instant| {
            n.handle_execute(at, SessionId(1), &p, &[Some(b"1")]);
            match n.poll_output() {
                Some(NodeOutput::Reply { served, .. }) => served,
                Some(NodeOutput::Upstream(u)) => {
                    let r = UpstreamReply {
                        value: 1,
                        size_bytes: 8,
                        served: Served::Replica,
                        snapshot_lsn: Lsn(1),
                        commit_lsn: None,
                        ttl: None,
                    };
                    n.handle_upstream(at, u.req, Ok(r));
                    while n.poll_output().is_some() {}
                    Served::Replica
                }
                other => panic!("{other:?}"),
            }
        };
        let t0 = Instant::from_millis(1000);
        assert_eq!(read(&mut n, t0), Served::Replica);
        assert_eq!(read(&mut n, t0), Served::Replica, "nothing is served before the stream is heard");
        let keepalive = CdcEvent { prev_lsn: Lsn(0), change: Change { lsn: Lsn(0), targets: Vec::new() } };
        n.handle_cdc(t0, &keepalive);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(1)), Served::L1);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(3)), Served::Replica, "silent for 3 s: go upstream");
        n.handle_cdc(t0 + Duration::from_secs(3), &keepalive);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(3)), Served::L1);
        assert!(n.stats().cdc_silent_misses >= 3);
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::cache::Eviction;

    #[test]
    fn restored_entries_answer_until_a_change_invalidates_them() {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let mut n: EdgeNode<u64> =
            EdgeNode::new(NodeConfig::new(Zone::Eu, tier(10), tier(10)), catalog, Lsn(0)).expect("valid");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let execute = |n: &mut EdgeNode<u64>| {
            n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"7")]);
            n.poll_output().expect("an output")
        };
        let Some(NodeOutput::Upstream(u)) = Some(execute(&mut n)) else { panic!("a miss") };
        let key = u.cache_key.expect("cacheable");
        assert_eq!(n.pending_fill_key(u.req), Some(key));
        n.handle_upstream(Instant::ZERO, u.req, Err("dropped".into()));
        while n.poll_output().is_some() {}
        assert!(n.context_is_portable(SessionId(1)));
        let entry =
            |value, lsn| Entry { value, lsn: Lsn(lsn), deps: u.deps.clone(), size_bytes: 8, expires_at: Instant::MAX };
        assert!(n.restore_l2(Instant::ZERO, key, entry(1, 10)));
        assert!(matches!(execute(&mut n), NodeOutput::Reply { served: Served::L2, value: 1, .. }));
        n.clear_tier(TierName::L1);
        // a change after the entry's snapshot, re-delivered by the stream
        let change = Change { lsn: Lsn(20), targets: vec![ChangeTarget::Keys(items, vec![key_hash(items, b"7")])] };
        n.handle_cdc(Instant::ZERO, &CdcEvent { prev_lsn: Lsn(0), change });
        assert!(matches!(execute(&mut n), NodeOutput::Upstream(_)));
        assert!(!n.restore_l2(Instant::ZERO, key, entry(1, 15)), "already invalid: refused");
        assert!(n.restore_l2(Instant::ZERO, key, entry(2, 20)));
        n.make_private(SessionId(1));
        assert!(!n.context_is_portable(SessionId(1)), "a private context is this process's own");
    }
}

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
use crate::hash::{Digest128, FixedMap};
use crate::invalidation::{CdcEvent, Change, ChangeTarget, Dep, Deps, VersionMap, VersionMapConfig};
use crate::refresh::{RefreshFn, RefreshIndex};
use crate::router::Zone;
use crate::sql::{
    Analyzer, AnalyzerConfig, Catalog, LexError, LiteralKind, NotCacheable, SessionCommand, Shape, StatementKind,
    TableId, TxnControl, literal_text, mentions_relative_time, parse_session_command,
};
use crate::{Duration, Instant, Lsn};

mod args;
mod cdc;
mod explain;
pub mod harness;
mod process;
mod session;
mod settings;
mod shape_stats;
#[cfg(test)]
mod tests;

pub use args::RANGE_KEYS_MAX;
use args::{Args, cache_key, read_deps, unlexable_shape, write_targets};
use session::Session;
use shape_stats::ShapeStats;
pub use shape_stats::{ShapeCounters, ShapeRow};

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
    /// Nothing is filled before the CDC stream is first heard (a driver
    /// that loads the database's catalog before it opens the stream: no
    /// entry is then analysed by a catalog other than the live one).
    pub fills_wait_for_cdc: bool,
    /// Fresh, not expired ([`Tier::keep_fresh`]): with key-level
    /// invalidation and a CDC-silence bound, an entry the change stream
    /// keeps valid row by row lives this long in L1 and L2 (at least the
    /// tier's TTL); the budget evicts it. `None`: every entry has its
    /// tier's TTL.
    pub fresh_ttl: Option<Duration>,
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
            fills_wait_for_cdc: false,
            fresh_ttl: None,
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
    #[error(transparent)]
    Versions(#[from] crate::invalidation::VersionMapConfigError),
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
    /// Answer the client. `lsn`: what the answer reflects, for the rows it
    /// depends on (every commit up to it): a cached entry's snapshot (a
    /// driver that serves another cache, as a regional proxy does, tells it
    /// along). Not the stream's position, though a valid entry reflects
    /// that too: after a failover that position is of the old timeline,
    /// whose LSNs the new one reuses.
    Reply { req: RequestId, session: SessionId, served: Served, value: V, lsn: Lsn },
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
    /// The text as the client sent it, analysed anew when the catalog
    /// changes (`None` for a simple query, executed at once).
    sql: Option<Arc<str>>,
    literal_keys: Vec<Option<String>>,
    literal_digest: u128,
    /// A string literal names the current time (`'now'`, `'today'`, ...).
    relative_time: bool,
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
    shape_stats: ShapeStats,
    residency: FixedMap<TableId, Zone>,
    refresh: RefreshIndex,
    last_cdc: Option<Instant>,
    /// Bumped when the database's roles change: sessions opened after never
    /// share entries with sessions opened before.
    login_generation: u64,
    /// The newest write this node acknowledged to any session, and the
    /// newest of those whose effects it did not see in full: the floors of
    /// [`Consistency::Proxy`] sessions.
    acknowledged: Lsn,
    acknowledged_stream: Lsn,
    /// Since when the change stream has had a gap (see `check_gap`).
    gap_since: Option<Instant>,
    /// DDL ran through this node and the database's catalog has not been
    /// read since: nothing is cached (functions and views may have changed).
    catalog_stale: bool,
    /// Where the change stream opened in this process: the version map
    /// knows nothing of changes at or below it, so no answer older than it
    /// is filed ([`EdgeNode::fills_from`]).
    fills_from: Lsn,
}

impl<V: Clone> EdgeNode<V> {
    pub fn new(config: NodeConfig, catalog: Catalog, cdc_start: Lsn) -> Result<Self, NodeConfigError> {
        if config.sessions_max == 0 || config.pending_max == 0 {
            return Err(NodeConfigError::Limits);
        }
        let mut l1 = Tier::new(config.l1.clone()).map_err(NodeConfigError::L1)?;
        let mut l2 = Tier::new(config.l2.clone()).map_err(NodeConfigError::L2)?;
        if let Some(ttl) = config.fresh_ttl
            && config.invalidation.key_level()
            && config.cdc_silence_max.is_some()
        {
            l1.keep_fresh(ttl);
            l2.keep_fresh(ttl);
        }
        let residency = config.residency.iter().copied().collect();
        Ok(EdgeNode {
            analyzer: Analyzer::new(config.analyzer.clone(), catalog),
            versions: VersionMap::new(config.versions.clone(), cdc_start)?,
            l1,
            l2,
            sessions: FixedMap::default(),
            pending: FixedMap::default(),
            outputs: VecDeque::new(),
            next_req: 0,
            stats: NodeStats::default(),
            shape_stats: ShapeStats::default(),
            residency,
            refresh: RefreshIndex::new(config.l2.entries_max.saturating_mul(2)),
            last_cdc: None,
            login_generation: 0,
            acknowledged: Lsn(0),
            acknowledged_stream: Lsn(0),
            gap_since: None,
            catalog_stale: false,
            fills_from: Lsn(0),
            config,
        })
    }

    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// What each statement shape asked of this node, most calls first.
    pub fn shape_rows(&self) -> Vec<ShapeRow> {
        self.shape_stats.rows(&self.analyzer)
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
        let s = Session::new(id, role, database, consistency, self.login_generation);
        self.sessions.insert(id, s);
        Ok(())
    }

    /// `prepared` as the current catalog analyses it (re-prepared if the
    /// catalog changed since).
    pub fn current(&mut self, prepared: &mut Prepared) {
        if prepared.shape.generation != self.analyzer.generation()
            && let Some(sql) = prepared.sql.clone()
            && let Ok(p) = self.prepare(&sql)
        {
            *prepared = p;
        }
    }

    /// Prepares a statement (extended protocol Parse): analysed once here, so
    /// that executing it never lexes or parses.
    pub fn prepare(&mut self, sql: &str) -> Result<Prepared, LexError> {
        let mut p = self.prepare_once(sql)?;
        p.sql = Some(Arc::from(sql));
        Ok(p)
    }

    /// [`Self::prepare`] for one execution, now: the text is not kept.
    fn prepare_once(&mut self, sql: &str) -> Result<Prepared, LexError> {
        let (shape, lexed) = self.analyzer.lookup(sql)?;
        let mut d = Digest128::new();
        let mut literal_keys = Vec::with_capacity(lexed.literals.len());
        let mut relative_time = false;
        for lit in &lexed.literals {
            let text = sql.get(lit.span.clone()).unwrap_or("");
            d.bytes(text.as_bytes());
            let value = match lit.kind {
                LiteralKind::String => text.get(1..text.len().saturating_sub(1)).map(|v| v.replace("''", "'")),
                LiteralKind::Number => Some(text.to_string()),
                LiteralKind::Other => None,
            };
            // an escape, Unicode or dollar-quoted string as PostgreSQL reads it
            let read = match &value {
                Some(v) => mentions_relative_time(v.as_bytes()),
                None => mentions_relative_time(literal_text(text).as_bytes()),
            };
            relative_time |= read;
            literal_keys.push(value);
        }
        let session_command = if shape.kind == StatementKind::Session { parse_session_command(sql) } else { None };
        Ok(Prepared { shape, sql: None, literal_keys, literal_digest: d.finish(), relative_time, session_command })
    }

    /// A simple-protocol query. Unlexable text goes to the primary untouched,
    /// which answers with PostgreSQL's own error.
    pub fn handle_simple_query(&mut self, now: Instant, session: SessionId, sql: &str) -> RequestId {
        match self.prepare_once(sql) {
            Ok(p) => self.handle_execute(now, session, &p, &[]),
            Err(e) => {
                let shape = Arc::new(unlexable_shape(sql, &e));
                let p = Prepared {
                    shape,
                    sql: None,
                    literal_keys: Vec::new(),
                    literal_digest: 0,
                    relative_time: false,
                    session_command: None,
                };
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
        if let Some(again) = self.as_seen_now(session, prepared) {
            return self.handle_execute(now, session, &again, params);
        }
        let req = RequestId(self.next_req);
        self.next_req += 1;
        self.stats.queries += 1;
        if let Some(s) = self.sessions.get_mut(&session) {
            // a fresh private context from here on (this statement is never cached)
            if prepared.shape.session_opaque {
                s.make_opaque();
            } else if prepared.shape.session_private {
                s.make_private();
            }
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
        let cacheable = shape.is_cacheable()
            && !self.catalog_stale
            && !sess.in_txn
            && sess.consistency != Consistency::Strong
            && !prepared.relative_time
            && !params.iter().flatten().any(|p| mentions_relative_time(p));
        if !cacheable {
            // on the session's own connection to the primary: what it calls
            // may depend on the backend, write, or need the session's state
            self.stats.uncacheable += u64::from(shape.kind == StatementKind::Read);
            let targets = write_targets(&shape, &args, self.config.invalidation, self.analyzer.catalog());
            let cmd = prepared.session_command.clone();
            let route = Route::Primary;
            self.forward(now, req, session, shape, route, None, Deps::default(), targets, residency, false, cmd);
            return req;
        }
        let context = if shape.reads_settings { sess.context_all } else { sess.context };
        let key = cache_key(&shape, context, &args);
        let deps = read_deps(&shape, &args, self.config.invalidation);
        let floor = read_floor(sess.consistency, sess.last_write, self.acknowledged);
        let stream_floor = match sess.consistency {
            Consistency::Proxy => sess.stream_floor.max(self.acknowledged_stream),
            _ => sess.stream_floor,
        };
        // a session whose state is its own reads on its own connection
        let route = if sess.private { Route::Primary } else { Route::Read { floor } };
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
            let local = complete >= stream_floor;
            let ok =
                |e: &Entry<V>| versions.is_valid(e.lsn, &e.deps) && entry_meets_floor(e.lsn, floor, complete, local);
            if let Lookup::Hit(e) = self.l1.get(now, key, ok) {
                self.stats.l1_hits += 1;
                if let Some(c) = self.shape_stats.of(shape.id) {
                    c.l1_hits += 1;
                }
                let (value, lsn) = (e.value.clone(), e.lsn);
                self.outputs.push_back(NodeOutput::Reply { req, session, served: Served::L1, value, lsn });
                return req;
            }
            let ok =
                |e: &Entry<V>| versions.is_valid(e.lsn, &e.deps) && entry_meets_floor(e.lsn, floor, complete, local);
            if let Lookup::Hit(e) = self.l2.get(now, key, ok) {
                self.stats.l2_hits += 1;
                if let Some(c) = self.shape_stats.of(shape.id) {
                    c.l2_hits += 1;
                }
                let entry = e.clone();
                let (value, lsn) = (entry.value.clone(), entry.lsn);
                self.l1.insert(now, key, entry);
                self.outputs.push_back(NodeOutput::Reply { req, session, served: Served::L2, value, lsn });
                return req;
            }
        }
        self.stats.misses += 1;
        self.forward(now, req, session, shape, route, Some(key), deps, Vec::new(), residency, !foreign, None);
        req
    }

    /// The statement as it must run now when that differs from how it was
    /// prepared: analysed again by the current catalog, or (a session whose
    /// strings take backslash escapes) as anything at all, since its text
    /// may not mean what the lexer read.
    fn as_seen_now(&mut self, session: SessionId, prepared: &Prepared) -> Option<Prepared> {
        if prepared.shape.generation != self.analyzer.generation() {
            // analysed by an older catalog: as the current one sees it
            let mut current = prepared.clone();
            self.current(&mut current);
            if current.shape.generation == self.analyzer.generation() {
                return Some(current);
            }
        }
        if self.sessions.get(&session).is_some_and(|s| s.backslash_strings()) && !prepared.shape.session_opaque {
            let mut shape = (*prepared.shape).clone();
            shape.cacheable = Err(NotCacheable::Unparsable("standard_conforming_strings is off".into()));
            shape.session_opaque = true;
            shape.writes_opaque = true;
            return Some(Prepared { shape: Arc::new(shape), ..prepared.clone() });
        }
        None
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
        if let Some(c) = self.shape_stats.of(shape.id) {
            c.upstream += 1;
        }
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
                if let Some(s) = self.sessions.get_mut(&session) {
                    if p.shape.txn.is_some() {
                        // a failed COMMIT or ROLLBACK ends the transaction either way
                        s.end_transaction(Some(false));
                        s.txn_targets.clear();
                    } else if s.in_txn {
                        // the transaction is aborted: its COMMIT will roll back
                        s.txn_failed = true;
                    }
                }
                self.outputs.push_back(NodeOutput::Failed { req, session, error: NodeError::Upstream(e) });
                return;
            }
        };
        if p.shape.generation == self.analyzer.generation()
            && let Some(c) = self.shape_stats.of(p.shape.id)
        {
            // (no 128-bit division on the reply path)
            let d = now.saturating_since(p.started);
            c.upstream_us += d.as_secs() * 1_000_000 + u64::from(d.subsec_micros());
        }
        self.apply_session_effects(&p, &reply);
        // a shape analysed by an older catalog may have the wrong deps; before
        // the stream is heard the catalog may not be loaded yet
        let fills = p.shape.generation == self.analyzer.generation() && self.files_at(reply.snapshot_lsn);
        if let Some(key) = p.cache_key
            && p.cache_here
            && fills
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
        let (served, value, lsn) = (reply.served, reply.value, reply.snapshot_lsn);
        self.outputs.push_back(NodeOutput::Reply { req, session, served, value, lsn });
    }

    fn apply_session_effects(&mut self, p: &Pending, reply: &UpstreamReply<V>) {
        let Some(s) = self.sessions.get_mut(&p.session) else {
            return;
        };
        let shape = &p.shape;
        let mut apply: Option<Change> = None;
        // the statement (or the transaction it commits) wrote what it does not name
        let mut opaque_at = false;
        match shape.txn {
            // BEGIN inside a transaction is only a warning: the transaction goes on
            Some(TxnControl::Begin) if s.in_txn => {}
            Some(TxnControl::Begin) => {
                s.in_txn = true;
                s.txn_targets.clear();
                s.txn_opaque = false;
                s.txn_saved = None;
                s.txn_uncertain = false;
            }
            Some(TxnControl::Commit) => {
                s.end_transaction(Some(true));
                opaque_at |= std::mem::take(&mut s.txn_opaque);
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
                s.txn_opaque = false;
            }
            Some(TxnControl::RollbackTo) => {
                s.txn_uncertain |= s.txn_saved.is_some();
                // back to a savepoint: the transaction goes on
                s.txn_failed = false;
            }
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
        if shape.writes_opaque {
            if s.in_txn {
                s.txn_opaque = true;
            } else {
                opaque_at = true;
            }
        }
        if let Some(change) = apply {
            self.stats.writes += 1;
            s.last_write = s.last_write.max(change.lsn);
            self.acknowledged = self.acknowledged.max(change.lsn);
            self.versions.apply(&change);
        }
        if opaque_at {
            let lsn = reply.commit_lsn.unwrap_or(reply.snapshot_lsn);
            self.opaque_write(p.session, lsn);
        }
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
}

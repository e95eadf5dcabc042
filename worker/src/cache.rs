//! The Worker's cache, sans IO: the core's [`EdgeNode`] (the same one the
//! native proxy and the simulation run), one per isolate, kept fresh by the
//! change feed of a regional proxy (`POSTAI SUBSCRIBE`, read by the core's
//! [`Subscriber`]).
//!
//! A Worker cannot hold a connection between requests, so the feed is
//! pulled: after answering a request that found the feed older than
//! `feed_every` (in `waitUntil`: no request waits for it), the isolate
//! subscribes `FROM` the last commit applied, collects what the regional
//! kept since up to its first live keepalive, and applies it. The node
//! serves nothing from the cache while the feed has been silent longer
//! than `silence` (`cdc_silence_max`), nor before it was first heard; a
//! regional that cannot continue the position opens a new
//! stream, and everything older is invalidated. An answer from PostgreSQL
//! is filed at the last commit the feed brought, or lower at the position
//! up to which the regional last found every commit visible (`V`): a
//! commit's change arrives from its WAL record, which PostgreSQL writes
//! before the commit is visible (with a synchronous standby, until the
//! standby answers), so a read can still miss a write the feed brought.
//! A session's token is its floor (read-your-writes).

use std::sync::Arc;

use postai_core::cache::{Eviction, TierConfig, TierName};
use postai_core::consistency::Consistency;
use postai_core::node::{EdgeNode, NodeConfig, NodeOutput, RequestId, Served, SessionId, UpstreamReply};
use postai_core::router::Zone;
use postai_core::sql::{Catalog, Shape, TxnControl};
use postai_core::stream::subscriber::Subscriber;
use postai_core::stream::{self, Line, fmt_lsn};
use postai_core::{Duration, Instant, Lsn};
use postai_wire::catalog::LiveCatalog;

use crate::neon::QueryResult;

/// What the cache keeps of an answer.
pub type Value = Arc<QueryResult>;

/// How the cache is sized and how fresh it stays.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// A request that finds the feed older than this pulls it first.
    pub feed_every: Duration,
    /// Nothing is served from the cache while the feed is older than this.
    pub silence: Duration,
    /// The cache's budget (both tiers, in the isolate's 128 MB).
    pub bytes_max: u64,
    pub entries_max: usize,
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            feed_every: Duration::from_millis(1000),
            silence: Duration::from_millis(5000),
            bytes_max: 32 << 20,
            entries_max: 100_000,
            ttl: Duration::from_secs(300),
        }
    }
}

/// A request's start: answered from the cache, or to be run on PostgreSQL.
#[derive(Debug)]
pub enum Start {
    Hit {
        value: Value,
        lsn: Lsn,
    },
    Miss(Pending),
    /// The node cannot take it (text it cannot read, too many requests):
    /// run it on PostgreSQL, nothing filed.
    Pass,
}

/// A request the node sent upstream.
#[derive(Debug)]
pub struct Pending {
    req: RequestId,
    session: SessionId,
    snapshot: Lsn,
    /// It may write: its commit position is the session's new floor.
    pub writes: bool,
}

pub struct Edge {
    node: EdgeNode<Value>,
    sub: Subscriber,
    config: CacheConfig,
    fed: Option<Instant>,
    catalog: Option<u128>,
    /// Every commit up to this position is visible on the primary, as the
    /// feed last reported it (`V`): what an answer read since reflects.
    visible: Lsn,
    next_session: u64,
    /// A pull of the feed is under way (requests of one isolate run
    /// concurrently: one pull at a time).
    pulling: bool,
    /// The roles' digest last read, and when: roles change without
    /// change events (memberships, per-role settings).
    roles: Option<String>,
    roles_checked: Option<Instant>,
}

/// How often a pull also reads the roles' digest (as the native edge does).
pub const ROLES_CHECK: Duration = Duration::from_millis(1000);

impl Edge {
    pub fn new(config: CacheConfig) -> Edge {
        // both tiers are the isolate's memory: a fifth of the budget for L1,
        // the rest for L2 (a hit there is promoted)
        let tier = |share: f64| TierConfig {
            bytes_max: ((config.bytes_max as f64 * share) as u64).max(1),
            entries_max: ((config.entries_max as f64 * share) as usize).clamp(1, 1 << 31),
            ttl: config.ttl.max(Duration::from_millis(1)),
            eviction: Eviction::Sieve,
        };
        let mut nc = NodeConfig::new(Zone::Eu, tier(0.2), tier(0.8));
        nc.cdc_silence_max = Some(config.silence);
        nc.fills_wait_for_cdc = true;
        // a valid config: the tiers are clamped above, the limits positive
        let node = match EdgeNode::new(nc, Catalog::new(), Lsn(0)) {
            Ok(n) => n,
            Err(e) => unreachable!("the Worker's node config is valid: {e}"),
        };
        Edge {
            node,
            sub: Subscriber::without_changes(),
            config,
            fed: None,
            catalog: None,
            visible: Lsn(0),
            next_session: 0,
            pulling: false,
            roles: None,
            roles_checked: None,
        }
    }

    /// Whether the feed is due to be pulled (older than `feed_every`, and
    /// no pull under way).
    pub fn pull_due(&self, now: Instant) -> bool {
        !self.pulling && self.fed.is_none_or(|at| now.saturating_since(at) >= self.config.feed_every)
    }

    /// Whether this caller pulls the feed (it is due); then [`Edge::pulled`]
    /// when done.
    pub fn pull(&mut self, now: Instant) -> bool {
        let pull = self.pull_due(now);
        self.pulling |= pull;
        pull
    }

    /// The pull ended; `caught_up`: at `now`, with the regional.
    pub fn pulled(&mut self, now: Instant, caught_up: bool) {
        self.pulling = false;
        if caught_up {
            self.fed = Some(now);
        }
    }

    /// The request pulling the feed went away before the pull ended.
    pub fn pull_abandoned(&mut self) {
        self.pulling = false;
    }

    /// Whether this feed line opens the stream on a position whose past is
    /// unknown here: the catalog is read before it is applied (DDL after
    /// it comes through the feed).
    pub fn opens_unknown(&self, text: &str) -> bool {
        let first = self.catalog.is_none();
        Line::parse(text).and_then(|l| self.sub.opening(&l)).is_some_and(|(_, unknown)| unknown || first)
    }

    /// The catalog must be read again (DDL came, and the read after it did
    /// not complete): nothing is cached until it is.
    pub fn catalog_stale(&self) -> bool {
        self.node.catalog_is_stale()
    }

    pub fn has_catalog(&self) -> bool {
        self.catalog.is_some()
    }

    /// The database's catalog, read anew: given to the node when it changed
    /// (what was cached under another one is dropped).
    pub fn set_catalog(&mut self, live: &LiveCatalog) {
        let digest = live.digest();
        match self.catalog {
            Some(d) if d == digest => self.node.catalog_current(),
            Some(_) => self.node.update_catalog(|c| live.apply(c)),
            None => self.node.load_catalog(|c| live.apply(c)),
        }
        self.catalog = Some(digest);
    }

    /// How long a pull may take: past the silence bound nothing would be
    /// served anyway.
    pub fn pull_timeout(&self) -> Duration {
        self.config.silence
    }

    /// Whether the roles' digest is due to be read again.
    pub fn roles_due(&self, now: Instant) -> bool {
        self.roles_checked.is_none_or(|at| now.saturating_since(at) >= ROLES_CHECK)
    }

    /// The roles' digest read at `now`, with the primary's position then:
    /// a change drops what was cached under the old privileges and settings.
    pub fn set_roles(&mut self, now: Instant, digest: String, at: Lsn) {
        self.roles_checked = Some(now);
        if self.roles.as_ref().is_some_and(|old| *old != digest) {
            self.node.roles_changed(at);
        }
        self.roles = Some(digest);
    }

    /// The statement that (re)subscribes: from the last commit applied.
    pub fn subscribe_command(&mut self) -> String {
        match self.sub.connect(None) {
            Some(from) => format!("POSTAI SUBSCRIBE FROM '{}'", fmt_lsn(from)),
            None => "POSTAI SUBSCRIBE".into(),
        }
    }

    /// One line of the feed (a CopyData's text); whether it was DDL (the
    /// catalog is read again: nothing is cached until it is).
    pub fn feed_line(&mut self, now: Instant, text: &str) -> bool {
        let Some(line) = Line::parse(text) else { return false };
        let opening = self.sub.opening(&line);
        let step = {
            let catalog = self.node.analyzer().catalog();
            self.sub.handle_line(line, &mut |lsn, data| stream::decode(lsn, data, catalog))
        };
        let apply = |node: &mut EdgeNode<_>| {
            for event in &step.events {
                node.handle_cdc(now, event);
            }
        };
        if step.live {
            apply(&mut self.node);
        } else {
            // what the regional repeats when it opens: not news that its stream is live
            self.node.unproven(apply);
        }
        if let Some((at, _)) = opening {
            self.node.fills_from(at);
        }
        if step.new_history {
            // a new timeline reuses the positions what is held was filed at
            self.visible = Lsn(0);
            self.node.primary_changed();
        }
        if let Some(v) = step.visible {
            self.visible = self.visible.max(v);
        }
        let catalog_stale = step.ddl();
        if catalog_stale {
            // nothing is cached until the catalog is read again
            self.node.catalog_changed();
        }
        catalog_stale
    }

    /// Starts a statement for a client of `role` on `database`; `floor`:
    /// its session token.
    pub fn start(
        &mut self,
        now: Instant,
        who: (&str, &str),
        consistency: Consistency,
        floor: Option<Lsn>,
        sql: &str,
        params: &[Option<String>],
    ) -> Start {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        if self.node.open_session(session, who.0, who.1, consistency).is_err() {
            return Start::Pass;
        }
        if let Some(f) = floor {
            self.node.raise_floor(session, f);
        }
        let Ok(prepared) = self.node.prepare(sql) else {
            self.node.close_session(session);
            return Start::Pass;
        };
        let ps: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref().map(str::as_bytes)).collect();
        // what an answer read now reflects: every commit up to the feed's
        // visible position (a commit's change can arrive before the commit
        // is visible: an answer dated past it would outlive that change;
        // one up to it that arrives later finds the answer reflecting it)
        let snapshot = self.visible;
        self.node.handle_execute(now, session, &prepared, &ps);
        let start = match self.node.poll_output() {
            Some(NodeOutput::Reply { value, lsn, .. }) => Start::Hit { value, lsn },
            Some(NodeOutput::Upstream(u)) => {
                let writes = may_write(&u.shape);
                return Start::Miss(Pending { req: u.req, session, snapshot, writes });
            }
            _ => Start::Pass,
        };
        while self.node.poll_output().is_some() {}
        self.node.close_session(session);
        start
    }

    /// Statements that ran on PostgreSQL outside the node (a transaction,
    /// or a statement the node passed), committed at `after`: what each may
    /// have written is invalidated here as the node does for its own
    /// writes, so that the isolate reads its own writes at once (the feed
    /// brings them too, a pull later). A statement the node cannot analyse
    /// or that may write rows it does not name, or a commit position
    /// unknown, drops everything held.
    pub fn wrote(
        &mut self,
        now: Instant,
        who: (&str, &str),
        statements: &[(&str, &[Option<String>])],
        after: Option<Lsn>,
    ) {
        for (sql, params) in statements {
            match self.node.prepare(sql) {
                Ok(p) if !may_write(&p.shape) => continue,
                // it may have written rows it does not name
                Ok(p) if p.shape.writes_opaque || p.shape.writes_unknown => {}
                Ok(_) if after.is_some() => {
                    self.invalidate_write(now, who, sql, params, after);
                    continue;
                }
                _ => {}
            }
            self.node.clear_tier(TierName::L1);
            self.node.clear_tier(TierName::L2);
            return;
        }
    }

    /// One statement's write invalidated as the node does for its own: its
    /// targets at its commit (everything held, when the node cannot run it).
    fn invalidate_write(
        &mut self,
        now: Instant,
        who: (&str, &str),
        sql: &str,
        params: &[Option<String>],
        after: Option<Lsn>,
    ) {
        match self.start(now, who, Consistency::Strong, None, sql, params) {
            Start::Miss(p) => self.finish(now, p, Ok((Arc::new(QueryResult::default()), after))),
            Start::Hit { .. } | Start::Pass => {
                self.node.clear_tier(TierName::L1);
                self.node.clear_tier(TierName::L2);
            }
        }
    }

    /// PostgreSQL's outcome of a miss: filed (a read at what the feed had
    /// reported when it started), or what it wrote invalidated here.
    pub fn finish(&mut self, now: Instant, p: Pending, outcome: Result<(Value, Option<Lsn>), String>) {
        if p.snapshot == Lsn(0) {
            self.node.skip_fill(p.req);
        }
        let result = outcome.map(|(value, commit_lsn)| {
            let size_bytes = size_of(&value);
            UpstreamReply {
                value,
                size_bytes,
                served: Served::Primary,
                snapshot_lsn: p.snapshot,
                commit_lsn,
                ttl: None,
            }
        });
        self.node.handle_upstream(now, p.req, result);
        while self.node.poll_output().is_some() {}
        self.node.close_session(p.session);
    }

    /// Misses under way (handed to [`Edge::finish`] yet to come).
    pub fn pending(&self) -> usize {
        self.node.pending_len()
    }

    pub fn stats(&self) -> postai_core::node::NodeStats {
        self.node.stats()
    }
}

fn may_write(shape: &Shape) -> bool {
    !shape.writes.is_empty() || shape.writes_unknown || shape.writes_opaque || shape.txn == Some(TxnControl::Commit)
}

/// About what an answer holds in memory.
fn size_of(r: &QueryResult) -> u32 {
    let cells: usize = r.rows.iter().flatten().map(|c| c.as_ref().map_or(8, |s| s.len() + 24)).sum();
    let fields: usize = r.fields.iter().map(|f| f.name.len() + 32).sum();
    u32::try_from(cells + fields + r.tag.len() + 64).unwrap_or(u32::MAX)
}

//! One task per client connection: TLS and authentication end at the proxy
//! (`frontend.rs`), which logs in to the primary on the client's behalf
//! (`upstream::login`) and relays its ParameterStatus; simple queries go
//! through the core (cache hit, or relay and fill); the extended protocol is
//! relayed as is, and the upstream transaction status keeps the core honest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use postai_core::cache::{Eviction, TierConfig, TierName};
use postai_core::consistency::Consistency;
use postai_core::failover::FailoverConfig;
use postai_core::invalidation::VersionMapConfig;
use postai_core::node::{
    EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Prepared, Route, Served, SessionId, UpstreamReply,
};
use postai_core::router::{EndpointId, Zone};
use postai_core::sql::{AnalyzerConfig, Catalog, Shape, StatementKind, TxnControl};
use postai_core::{Duration, Instant, Lsn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::frontend::{self, ClientStream, Opening};
use crate::l2::fmt_lsn;
use crate::metrics::{Metrics, Path};
use crate::pool::{Lease, Pool, PoolError, PoolKey, ServerConn};
use crate::protocol::{self, Message};
use crate::topology::Topology;
use crate::upstream::{self, Conn, error_message};

mod admin;
mod input;

/// A cached result: the encoded backend messages, ReadyForQuery excluded.
pub type Value = Arc<[u8]>;

/// State shared by every connection.
pub struct Proxy {
    pub config: Config,
    pub node: Mutex<EdgeNode<Value>>,
    /// Highest `pg_current_wal_lsn()` seen: a lower bound of any later snapshot.
    pub lsn_seen: AtomicU64,
    /// The database nodes: primary, replicas, failover.
    pub topology: Mutex<Topology>,
    pub metrics: Metrics,
    /// Server connections shared by clients (transaction pooling), if on.
    pub pool: Option<Pool>,
    /// How upstream connections are made (TLS, message limit).
    pub dialer: upstream::Dialer,
    /// What this proxy's slot reader applied, for subscribed edges.
    pub cdc_feed: tokio::sync::broadcast::Sender<Arc<crate::cdc::Feed>>,
    /// What a regional proxy published lately, for edges that subscribe again.
    pub cdc_history: Mutex<crate::cdc::History>,
    /// Bumped to end every open subscription ([`Proxy::end_subscriptions`]).
    subscriptions: tokio::sync::watch::Sender<u64>,
    /// The last commit the slot reader applied.
    pub cdc_last: AtomicU64,
    /// Pooled clients' cancel keys (ours) -> the server they run on.
    pub cancels: Mutex<std::collections::HashMap<(i32, i32), Arc<CancelTarget>>>,
    /// L2 persisted in `[cache] l2_path` (`l2.rs`), if set.
    pub l2_file: Option<crate::l2::L2File>,
    /// DDL ran through this proxy: the CDC reader reloads the database's
    /// catalog on its next poll (also without the DDL event triggers).
    pub catalog_stale: std::sync::atomic::AtomicBool,
    /// Buffered bytes and client connections, bounded (`limits.rs`).
    pub limits: crate::limits::Limits,
    /// What a reload replaces (`reload.rs`): users.
    pub live: crate::reload::Live,
    /// Graceful shutdown (`signals.rs`).
    pub shutdown: crate::signals::Shutdown,
    next_session: AtomicU64,
    start: std::time::Instant,
}

impl Proxy {
    pub fn new(config: Config) -> anyhow::Result<Arc<Proxy>> {
        let mut catalog = Catalog::new();
        for t in &config.tables {
            catalog.set_primary_key(&t.name, &t.primary_key);
            if t.integer_key {
                catalog.set_integer_key(&t.name);
            }
        }
        let c = &config.cache;
        let tier = |entries, bytes| TierConfig {
            bytes_max: bytes,
            entries_max: entries,
            ttl: Duration::from_secs(c.ttl_s),
            eviction: Eviction::Sieve,
        };
        let node_config = NodeConfig {
            zone: Zone::Eu,
            l1: tier(c.l1_entries, c.l1_bytes),
            l2: tier(c.l2_entries, c.l2_bytes),
            versions: VersionMapConfig::default(),
            analyzer: AnalyzerConfig::default(),
            sessions_max: 100_000,
            pending_max: 100_000,
            residency: Vec::new(),
            invalidation: InvalidationMode::Key,
            cdc_silence_max: config.cdc.enabled.then(|| Duration::from_millis(config.cdc.silence_max_ms)),
            // the CDC reader loads the database's catalog before it opens the stream
            fills_wait_for_cdc: config.cdc.enabled,
        };
        let mut node = EdgeNode::new(node_config, catalog, Lsn(0))?;
        // restored entries are served once the CDC reader has vouched for them
        let start = std::time::Instant::now();
        let l2_file = crate::l2::open_for(&config, &mut node, Instant::ZERO);
        let f = &config.failover;
        let failover = f.enabled.then(|| FailoverConfig {
            heartbeat_timeout: Duration::from_millis(f.timeout_ms),
            promote_timeout: Duration::from_millis(f.promote_timeout_ms),
            nodes_max: config.replicas.len() + 2,
        });
        let topology = Topology::new(&config.upstream, &config.replicas, failover, Instant::ZERO);
        let dialer =
            upstream::Dialer { max: config.max_message_bytes, tls: Arc::new(config.upstream_tls.loaded.clone()) };
        let pool = (config.pool_mode() == crate::config::PoolMode::Transaction)
            .then(|| Pool::new(config.pool.size, config.pool.keys_max, dialer.clone()));
        let (limits, live) = (crate::limits::Limits::new(&config), crate::reload::Live::new(&config));
        let shutdown = crate::signals::Shutdown::new(config.shutdown_timeout_ms);
        Ok(Arc::new(Proxy {
            limits,
            live,
            shutdown,
            config,
            node: Mutex::new(node),
            topology: Mutex::new(topology),
            metrics: Metrics::default(),
            pool,
            dialer,
            cancels: Mutex::new(std::collections::HashMap::new()),
            cdc_feed: tokio::sync::broadcast::channel(CDC_FEED_DEPTH).0,
            cdc_history: Mutex::new(crate::cdc::History::default()),
            subscriptions: tokio::sync::watch::channel(0).0,
            cdc_last: AtomicU64::new(0),
            lsn_seen: AtomicU64::new(0),
            l2_file,
            catalog_stale: std::sync::atomic::AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            start,
        }))
    }

    /// The core's clock: nanoseconds since the proxy started.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn node(&self) -> std::sync::MutexGuard<'_, EdgeNode<Value>> {
        // a panic while holding the lock is a bug; keep serving with the state as is
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every open `POSTAI SUBSCRIBE` stream with an error (subscribers
    /// subscribe again, from where they were).
    pub fn end_subscriptions(&self) {
        self.subscriptions.send_modify(|n| *n += 1);
    }

    pub fn topology(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current primary (it changes on failover).
    pub fn primary_addr(&self) -> String {
        self.topology().primary_addr()
    }

    /// A connection of the proxy's own (CDC, health checks) as `user`, with
    /// the password `[[users]]` gives it upstream, if any.
    pub async fn service_login(&self, addr: &str, user: &str, database: &str) -> std::io::Result<Conn> {
        let params = vec![("user".to_string(), user.to_string()), ("database".to_string(), database.to_string())];
        let password = self.upstream_password(user);
        match upstream::login(&self.dialer, addr, &params, password.as_deref()).await {
            Ok(l) => Ok(l.conn),
            Err(upstream::LoginError::Io(e) | upstream::LoginError::Unreachable(_, e)) => Err(e),
            Err(e @ upstream::LoginError::Tls(..)) => {
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    /// DDL ran through this proxy: the CDC reader reads the catalog again on
    /// its next poll, and until then nothing is cached (functions and views
    /// may mean something else now).
    pub fn ddl_ran(&self) {
        self.catalog_stale.store(true, Ordering::Relaxed);
        self.node().catalog_changed();
    }

    /// Drops every cached entry (a failover: the old CDC stream is gone).
    pub fn forget_cache(&self, _now: Instant) {
        let mut n = self.node();
        n.clear_tier(TierName::L1);
        n.clear_tier(TierName::L2);
        if let Some(f) = &self.l2_file {
            f.clear("the in-memory tiers were cleared");
        }
    }

    /// Starts the background tasks: the CDC reader and the health checks.
    pub fn spawn_tasks(self: &Arc<Self>) {
        if self.config.cdc.enabled {
            tokio::spawn(crate::cdc::run(self.clone()));
        } else {
            // the catalog (for what is cached and what pins a pooled
            // client) and the roles, read by a task of their own
            tokio::spawn(crate::catalog::run_without_cdc(self.clone()));
        }
        tokio::spawn(crate::topology::run(self.clone()));
    }

    /// `SHOW POSTAI CACHES`: one row per tier.
    pub fn cache_rows(&self) -> Vec<Vec<String>> {
        let n = self.node();
        [TierName::L1, TierName::L2]
            .iter()
            .filter_map(|t| n.tier(*t).map(|tier| (t, tier.stats())))
            .map(|(t, s)| {
                let mut row = vec![format!("{t:?}").to_lowercase()];
                row.extend(
                    [s.entries, s.bytes, s.hits, s.misses, s.inserts, s.invalidations, s.evictions, s.expirations]
                        .iter()
                        .map(u64::to_string),
                );
                row
            })
            .collect()
    }

    /// Serves `/metrics` on `metrics_listen`, if configured; returns its address.
    pub async fn start_metrics(self: &Arc<Self>) -> std::io::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = self.config.metrics_listen.as_deref() else { return Ok(None) };
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(crate::metrics::serve(self.clone(), listener));
        Ok(Some(local))
    }

    /// `SHOW POSTAI STATS` as (name, value) rows.
    pub fn stats_rows(&self) -> Vec<(String, String)> {
        let n = self.node();
        let s = n.stats();
        let mut rows = vec![
            ("queries".to_string(), s.queries.to_string()),
            ("l1_hits".into(), s.l1_hits.to_string()),
            ("l2_hits".into(), s.l2_hits.to_string()),
            ("upstream".into(), s.upstream.to_string()),
            ("uncacheable".into(), s.uncacheable.to_string()),
            ("writes".into(), s.writes.to_string()),
            ("cdc_events".into(), s.cdc_events.to_string()),
            ("cdc_silent_misses".into(), s.cdc_silent_misses.to_string()),
            ("cdc_resumed".into(), self.metrics.cdc_resumed.load(Ordering::Relaxed).to_string()),
        ];
        for t in [TierName::L1, TierName::L2] {
            if let Some(tier) = n.tier(t) {
                let ts = tier.stats();
                rows.push((format!("{t:?}_entries").to_lowercase(), ts.entries.to_string()));
                rows.push((format!("{t:?}_invalidations").to_lowercase(), ts.invalidations.to_string()));
            }
        }
        drop(n);
        let t = self.topology();
        rows.push(("replica_reads".into(), t.replica_reads.to_string()));
        rows.push(("failovers".into(), t.failovers.to_string()));
        rows.push(("epoch".into(), t.epoch().0.to_string()));
        rows.push(("primary".into(), t.primary_addr()));
        rows.push(("fenced_returns".into(), t.fenced_returns.to_string()));
        if let Some(pool) = &self.pool {
            let (idle, lent) = pool.counts();
            rows.push(("pool_idle".into(), idle.to_string()));
            rows.push(("pool_lent".into(), lent.to_string()));
        }
        drop(t);
        if let Some(f) = &self.l2_file {
            rows.extend(f.stats_rows());
        }
        rows
    }
}

/// Accepts clients until the future is dropped.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) -> std::io::Result<()> {
    serve_on(proxy, listener, None).await
}

/// Accepts clients on `listener`; with `loops`, deals them out in turn to
/// this thread and to the loops' threads. A failed accept (out of
/// descriptors) pauses accepting, never ends it (`limits::accept`).
pub async fn serve_on(proxy: Arc<Proxy>, listener: TcpListener, loops: Option<&EventLoops>) -> std::io::Result<()> {
    let mut turn = 0usize;
    let mut backoff = crate::limits::AcceptBackoff::default();
    loop {
        let socket = crate::limits::accept(&listener, &mut backoff).await;
        let _ = socket.set_nodelay(true);
        let n = loops.map_or(0, |l| l.senders.len());
        turn = (turn + 1) % (n + 1);
        let socket = match loops {
            // turn 0: this thread's
            Some(l) if turn > 0 => {
                let to = &l.senders[turn - 1];
                match socket.into_std() {
                    // a loop that is gone: the client is served here
                    Ok(std) => match to.send(std).map_err(|back| TcpStream::from_std(back.0)) {
                        Ok(()) => continue,
                        Err(Ok(socket)) => socket,
                        Err(Err(e)) => {
                            eprintln!("postai-edge: client socket: {e}");
                            continue;
                        }
                    },
                    Err(e) => {
                        eprintln!("postai-edge: accept: {e}");
                        continue;
                    }
                }
            }
            _ => socket,
        };
        spawn_client(&proxy, socket);
    }
}

fn spawn_client(proxy: &Arc<Proxy>, socket: TcpStream) {
    let p = proxy.clone();
    // a slot of max_client_conn for the connection's whole life
    let Some(slot) = proxy.limits.clients.take(1) else {
        tokio::spawn(crate::limits::refuse_client(p, socket));
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = Client::run(p, socket).await {
            // one client's failure never stops the proxy
            eprintln!("postai-edge: client: {e}");
        }
    });
}

/// Event loops of their own, one thread each (a single-threaded runtime, as
/// PgBouncer's processes or Envoy's workers): a client lives on one thread,
/// so its wakeups never cross threads. On a loaded two-core machine this
/// takes a third fewer context switches per query than a work-stealing
/// runtime of the same size.
///
/// Not for transaction pooling: a pooled server connection is lent to clients
/// of every loop, and its socket would wake the loop that opened it.
/// Dropping the loops closes their clients and waits for the threads (so that
/// what they hold, the L2 file writer among it, is finished).
pub struct EventLoops {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EventLoops {
    /// Starts `n` loops serving the clients [`serve_on`] hands them.
    pub fn start(proxy: &Arc<Proxy>, n: usize) -> std::io::Result<EventLoops> {
        let mut loops = EventLoops { senders: Vec::with_capacity(n), threads: Vec::with_capacity(n) };
        for i in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
            let proxy = proxy.clone();
            // the runtime is made on its thread: never dropped inside another
            let thread = std::thread::Builder::new().name(format!("postai-loop-{}", i + 1)).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    // its clients are served by the accepting thread (the send fails)
                    Err(e) => return eprintln!("postai-edge: event loop {}: {e}", i + 1),
                };
                rt.block_on(async move {
                    while let Some(std) = rx.recv().await {
                        match TcpStream::from_std(std) {
                            Ok(socket) => spawn_client(&proxy, socket),
                            Err(e) => eprintln!("postai-edge: client socket: {e}"),
                        }
                    }
                })
            })?;
            loops.senders.push(tx);
            loops.threads.push(thread);
        }
        Ok(loops)
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Client {
    proxy: Arc<Proxy>,
    rd: ReadHalf<ClientStream>,
    wr: WriteHalf<ClientStream>,
    buf: BytesMut,
    out: BytesMut,
    upstream: Upstream,
    session: SessionId,
    /// Transaction status of the last ReadyForQuery from upstream.
    status: u8,
    /// The extended protocol ran a statement that may write.
    extended_write: bool,
    /// Prepared statements by name, as analysed by the core.
    statements: std::collections::HashMap<String, Prepared>,
    /// Their Parse messages (to prepare them elsewhere).
    parses: std::collections::HashMap<String, Message>,
    /// Their parameter types: declared in Parse, or learned from the
    /// ParameterDescription answering a Describe of the statement.
    param_types: std::collections::HashMap<String, Vec<u32>>,
    /// Statements described in the requests sent, in order, whose
    /// ParameterDescription has not come back yet.
    described: std::collections::VecDeque<String>,
    /// Parses answered without the primary (cache hit, replica), not yet sent to it.
    unsent_parses: Vec<Message>,
    /// Connections to replicas, opened on the first read routed to each.
    replicas: ReplicaConns,
    /// ParseComplete messages the client must not see (for re-sent Parses).
    swallow_parse_complete: u32,
    /// CloseComplete messages the client must not see (injected Closes).
    swallow_close_complete: u32,
    /// Server-side statements prepared by the batch in flight (pooling):
    /// uncertain if it fails.
    batch_server_parses: Vec<String>,
    /// The batch in flight got an ErrorResponse.
    batch_failed: bool,
    /// The current relay has already written part of its answer to the client.
    flushed_mid: bool,
    /// Statements the extended protocol ran since the last request ended
    /// (relayed: the node did not see them), and the transaction status
    /// before the first of them.
    relayed: Vec<Prepared>,
    relayed_from: Option<u8>,
    relayed_overflow: bool,
    /// ParameterStatus the primary sent during the request: what those
    /// parameters are now, whatever set them.
    reported: Vec<(String, String)>,
    /// The request may write: its ReadyForQuery is held back until the node
    /// has applied what it changed, so that no session (this one or
    /// another) starts a read after the acknowledgement that the node
    /// would still answer from before the write.
    hold_ready: bool,
    held_ready: Option<bytes::Bytes>,
    /// Prepared admin commands and their portals (`proxy/admin.rs`).
    admin: admin::AdminState,
    /// The BackendKeyData the client holds (the primary's, or pooled, ours).
    cancel_key: Option<(i32, i32)>,
    /// Waiting for the next request with nothing pending (`proxy/input.rs`).
    between_requests: bool,
    /// The buffer budget held by the extended protocol messages waiting for their Sync.
    batch_held: Option<crate::limits::Held>,
}

/// The client's connection to the primary: its own for the whole session, or
/// (transaction pooling) a pooled one, lent while it needs one.
enum Upstream {
    Dedicated(Conn),
    Pooled {
        lease: Option<Box<Lease>>,
        key: PoolKey,
        password: Option<String>,
        /// Session state lives on the server connection: keep it.
        pinned: bool,
        /// Where a cancel request for this client goes while it holds a lease.
        cancel: Arc<CancelTarget>,
    },
}

/// The server a pooled client's cancel request must reach: (addr, pid, key).
pub type CancelTarget = Mutex<Option<(String, i32, i32)>>;

/// Polls of CDC rows a subscriber may fall behind by before it is cut off
/// (it then subscribes again, and invalidates what it held).
const CDC_FEED_DEPTH: usize = 1024;

/// Statements noted per request at most; beyond, the session goes private.
const RELAYED_MAX: usize = 1024;

struct CacheableExec {
    prepared: Prepared,
    params: Vec<Option<Vec<u8>>>,
    /// The batch's own Parse (the primary must still see it).
    parse: Option<Message>,
    /// The prepared statement the batch binds.
    statement: String,
}

/// A session's replica connections, and what they need to match its primary
/// connection.
#[derive(Default)]
struct ReplicaConns {
    conns: Vec<(EndpointId, Conn)>,
    /// The startup parameters the client logged in with.
    login: Vec<(String, String)>,
    /// The password the proxy logs in upstream with, for this user.
    password: Option<String>,
    /// SET/RESET statements the session ran, replayed on each new connection.
    settings: Vec<bytes::Bytes>,
    /// Session state a replica connection cannot reproduce (a SET inside a
    /// transaction or through the extended protocol): primary only.
    pinned: bool,
}

const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];
const BIND_COMPLETE: [u8; 5] = [b'2', 0, 0, 0, 4];

struct Bind {
    portal: String,
    statement: String,
    /// Per parameter: 0 text, 1 binary (Bind's format codes, expanded).
    param_formats: Vec<i16>,
    params: Vec<Option<Vec<u8>>>,
    result_formats: Vec<u8>,
}

/// Bind: portal, statement, parameter formats, parameters, result formats.
fn parse_bind(m: &Message) -> Option<Bind> {
    let b = m.body();
    let mut at = 0usize;
    let cstr = |at: &mut usize| -> Option<String> {
        let end = b.get(*at..)?.iter().position(|c| *c == 0)?;
        let s = String::from_utf8(b[*at..*at + end].to_vec()).ok()?;
        *at += end + 1;
        Some(s)
    };
    let i16_at = |at: &mut usize| -> Option<i16> {
        let v = i16::from_be_bytes(b.get(*at..*at + 2)?.try_into().ok()?);
        *at += 2;
        Some(v)
    };
    let portal = cstr(&mut at)?;
    let statement = cstr(&mut at)?;
    let nformats = i16_at(&mut at)?;
    let mut formats = Vec::with_capacity(nformats.max(0) as usize);
    for _ in 0..nformats.max(0) {
        formats.push(i16_at(&mut at)?);
    }
    let nparams = i16_at(&mut at)?;
    let param_formats: Vec<i16> = match formats.len() {
        0 => vec![0; nparams.max(0) as usize],
        1 => vec![formats[0]; nparams.max(0) as usize],
        _ => formats,
    };
    let mut params = Vec::with_capacity(nparams.max(0) as usize);
    for _ in 0..nparams.max(0) {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            params.push(None);
        } else {
            params.push(Some(b.get(at..at + len as usize)?.to_vec()));
            at += len as usize;
        }
    }
    let nresults = i16_at(&mut at)?;
    let result_formats = b.get(at..at + 2 * nresults.max(0) as usize)?.to_vec();
    Some(Bind { portal, statement, param_formats, params, result_formats })
}

impl Client {
    async fn run(proxy: Arc<Proxy>, socket: TcpStream) -> anyhow::Result<()> {
        // TLS, the StartupMessage and client authentication end at the proxy
        let accepted = match frontend::open(&proxy.config, &proxy.users(), socket).await? {
            Opening::Login(a) => a,
            // to the primary, or where the map sends the key (pooled, a replica read)
            Opening::Cancel { pid, key } => return crate::cancel::forward(&proxy, pid, key).await,
            Opening::Closed => return Ok(()),
        };
        // the proxy logs in upstream on the client's behalf, with its own password
        let params = accepted.upstream_params();
        let frontend::Accepted { rd, mut wr, buf, user, database, upstream_password, auth_ok, .. } = *accepted;
        let session = SessionId(proxy.next_session.fetch_add(1, Ordering::Relaxed));
        let opened = match &proxy.pool {
            // transaction pooling: a pooled connection's greeting, our own cancel key
            Some(pool) => {
                let key = PoolKey::new(&proxy.primary_addr(), &params);
                let wait = proxy.config.pool.wait_ms;
                pool.acquire(&key, upstream_password.as_deref(), wait).await.map(|lease| {
                    let secret: i32 = rand::random();
                    let pid = i32::try_from(session.0 & 0x7fff_ffff).unwrap_or(i32::MAX);
                    let cancel = Arc::new(Mutex::new(None));
                    proxy.cancels.lock().unwrap_or_else(|p| p.into_inner()).insert((pid, secret), cancel.clone());
                    let greeting = with_backend_key(&lease.server.greeting, pid, secret);
                    lease.release();
                    let password = upstream_password.clone();
                    (Upstream::Pooled { lease: None, key, password, pinned: false, cancel }, greeting, b'I')
                })
            }
            None => upstream::login(&proxy.dialer, &proxy.primary_addr(), &params, upstream_password.as_deref())
                .await
                .map(|l| (Upstream::Dedicated(l.conn), l.greeting, l.status))
                .map_err(PoolError::Login),
        };
        let (upstream, greeting, status) = match opened {
            Ok(o) => o,
            Err(e) => {
                if !matches!(e, PoolError::Login(upstream::LoginError::Refused(_))) {
                    eprintln!("postai-edge: upstream login as {user:?}: {e}");
                }
                wr.write_all(&e.client_error()).await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
        };
        let mut c = Client {
            proxy,
            rd,
            wr,
            buf,
            out: BytesMut::with_capacity(16 << 10),
            upstream,
            session,
            status: b'I',
            extended_write: false,
            statements: std::collections::HashMap::new(),
            parses: std::collections::HashMap::new(),
            param_types: std::collections::HashMap::new(),
            described: std::collections::VecDeque::new(),
            unsent_parses: Vec::new(),
            replicas: ReplicaConns { login: params.clone(), password: upstream_password, ..ReplicaConns::default() },
            swallow_parse_complete: 0,
            swallow_close_complete: 0,
            batch_server_parses: Vec::new(),
            batch_failed: false,
            flushed_mid: false,
            relayed: Vec::new(),
            relayed_from: None,
            relayed_overflow: false,
            reported: Vec::new(),
            hold_ready: false,
            held_ready: None,
            admin: admin::AdminState::default(),
            cancel_key: crate::cancel::key_in(&greeting),
            between_requests: false,
            batch_held: None,
        };
        // startup parameters and `options` (-c name=value) are session settings
        let (settings, opaque) = startup_settings(&params);
        // a session may choose its consistency: `-c postai.consistency=proxy`
        let consistency = match settings.iter().rev().find(|(k, _)| k == "postai.consistency") {
            None => Ok(c.proxy.config.cache.consistency),
            Some((_, v)) => v.parse::<Consistency>(),
        };
        let consistency = match consistency {
            Ok(mode) => mode,
            Err(e) => {
                c.wr.write_all(&protocol::error_response("FATAL", "22023", &format!("postai.consistency: {e}")))
                    .await?;
                return Ok(());
            }
        };
        // the client sees the primary's ParameterStatus and BackendKeyData (cancels go to it)
        c.wr.write_all(&frontend::greeting(&auth_ok, &greeting, status)).await?;
        let opened = c.proxy.node().open_session(session, &user, &database, consistency);
        if let Err(e) = opened {
            c.wr.write_all(&protocol::error_response("FATAL", "53300", &e.to_string())).await?;
            return Ok(());
        }
        {
            let mut n = c.proxy.node();
            // what the server reported at login (standard_conforming_strings,
            // TimeZone, DateStyle, ...): the session's starting state
            let mut rest = BytesMut::from(&greeting[..]);
            while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
                if let Some((name, value)) = parameter_status(&m).filter(|_| m.tag == b'S')
                    && !matches!(name.as_str(), "session_authorization" | "is_superuser")
                {
                    n.set_session_setting(session, &name, &value);
                }
            }
            for (name, value) in &settings {
                n.set_session_setting(session, name, value);
            }
            if opaque {
                n.make_private(session);
            }
        }
        c.proxy.metrics.clients.fetch_add(1, Ordering::Relaxed);
        c.proxy.metrics.clients_total.fetch_add(1, Ordering::Relaxed);
        c.proxy.metrics.upstream_connections.fetch_add(1, Ordering::Relaxed);
        let result = c.serve_queries().await;
        if let Err(e) = &result {
            // a dead upstream, a full pool: the client hears why before the end
            let _ = c.wr.write_all(&protocol::error_response("FATAL", "08006", &format!("postai-edge: {e}"))).await;
        }
        c.proxy.node().close_session(session);
        if let Upstream::Pooled { cancel, .. } = &c.upstream {
            c.proxy.cancels.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, t| !Arc::ptr_eq(t, cancel));
        }
        let m = &c.proxy.metrics;
        m.clients.fetch_sub(1, Ordering::Relaxed);
        m.upstream_connections.fetch_sub(1, Ordering::Relaxed);
        m.replica_connections.fetch_sub(c.replicas.conns.len() as u64, Ordering::Relaxed);
        result
    }

    async fn serve_queries(&mut self) -> anyhow::Result<()> {
        let mut batch: Vec<Message> = Vec::new();
        // client messages: `proxy/input.rs`
        while let Some(m) = self.next_request(batch.is_empty()).await? {
            match m.tag {
                b'Q' => {
                    self.flush_batch(&mut batch).await?;
                    let started = std::time::Instant::now();
                    let path = self.simple_query(&m).await?;
                    self.proxy.metrics.observe(path, started.elapsed());
                    self.settle().await?;
                    self.release_ready().await?;
                }
                b'X' => {
                    match &mut self.upstream {
                        Upstream::Dedicated(up) => {
                            let _ = up.send(&m.raw).await;
                        }
                        // pooled: the server connection stays (given back if clean)
                        Upstream::Pooled { .. } => self.release_idle(),
                    }
                    return Ok(());
                }
                b'S' => {
                    let started = std::time::Instant::now();
                    let path = self.sync(std::mem::take(&mut batch), m).await?;
                    self.proxy.metrics.observe(path, started.elapsed());
                    self.settle().await?;
                    self.release_ready().await?;
                }
                b'H' => {
                    // Flush: the client waits for the responses so far
                    let sent = std::mem::take(&mut batch);
                    if self.admin_batch(&sent, &m).await?.is_some() {
                        continue;
                    }
                    self.send_batch(&sent, Some(&m)).await?;
                    self.relay_responses(&sent).await?;
                }
                b'P' => {
                    if self.admin_parse(&m) {
                        // SHOW POSTAI ...: answered by the proxy (`proxy/admin.rs`)
                        batch.push(m);
                        continue;
                    }
                    if let Some((name, sql)) = parse_message(&m) {
                        let prepared = self.proxy.node().prepare(&sql).ok();
                        if prepared.as_ref().is_some_and(|p| p.shape.kind == StatementKind::Session) {
                            // a SET a replica connection would not see
                            self.replicas.pinned = true;
                        }
                        match prepared {
                            Some(p) => {
                                self.statements.insert(name.clone(), p);
                                self.param_types.insert(name.clone(), parse_param_types(&m).unwrap_or_default());
                                self.parses.insert(name, m.clone());
                            }
                            None => {
                                self.statements.remove(&name);
                                self.param_types.remove(&name);
                                self.parses.remove(&name);
                            }
                        }
                    }
                    batch.push(m);
                }
                b'C' => {
                    // Close of a statement: forget it (a portal close needs nothing)
                    if let Some(name) = m.body().strip_prefix(b"S").and_then(|n| n.strip_suffix(b"\0")) {
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.statements.remove(&name);
                        self.param_types.remove(&name);
                        self.parses.remove(&name);
                    }
                    batch.push(m);
                }
                b'd' | b'c' | b'f' => {
                    self.flush_batch(&mut batch).await?;
                    self.up().await?.send(&m.raw).await?
                }
                _ => batch.push(m),
            }
        }
        Ok(())
    }

    /// Sends a batch (and `tail`, a Sync or Flush) upstream in one write,
    /// first re-sending statements that were answered without the primary
    /// (their ParseComplete is swallowed).
    async fn send_batch(&mut self, batch: &[Message], tail: Option<&Message>) -> anyhow::Result<()> {
        // pooled: lease first, the batch is written for that server connection
        self.up().await?;
        let own_unnamed =
            batch.first().is_some_and(|m| m.tag == b'P' && parse_message(m).is_some_and(|(n, _)| n.is_empty()));
        self.out.clear();
        for parse in std::mem::take(&mut self.unsent_parses) {
            if own_unnamed && parse_message(&parse).is_some_and(|(n, _)| n.is_empty()) {
                continue;
            }
            self.out.extend_from_slice(&parse.raw);
            self.swallow_parse_complete += 1;
        }
        for m in batch {
            match &mut self.upstream {
                Upstream::Pooled { lease: Some(lease), .. } => pooled_message(
                    &mut self.out,
                    m,
                    &mut lease.server,
                    &self.parses,
                    &mut self.swallow_parse_complete,
                    &mut self.swallow_close_complete,
                    &mut self.batch_server_parses,
                ),
                _ => self.out.extend_from_slice(&m.raw),
            }
            if m.tag == b'B' {
                if let Some(p) = bind_statement(m).and_then(|n| self.statements.get_mut(n)) {
                    // as the current catalog sees it (functions redefined since Parse)
                    self.proxy.node().current(p);
                }
                let prepared = bind_statement(m).and_then(|n| self.statements.get(n));
                // a statement that may write: this session's later cached
                // reads must reflect it (the floor is raised once the
                // transaction, if any, is over)
                self.extended_write |= prepared.is_none_or(|p| p.shape.kind != StatementKind::Read);
                // its effects on the session are noted once its fate is known
                if let Some(p) = prepared {
                    self.relayed_from.get_or_insert(self.status);
                    if self.relayed.len() < RELAYED_MAX {
                        self.relayed.push(p.clone());
                    } else {
                        self.relayed_overflow = true;
                    }
                }
            }
            if m.tag == b'D'
                && let Some(name) = m.body().strip_prefix(b"S").and_then(|n| n.strip_suffix(b"\0"))
            {
                self.described.push_back(String::from_utf8_lossy(name).into_owned());
            }
        }
        if let Some(t) = tail {
            self.out.extend_from_slice(&t.raw);
        }
        let out = std::mem::take(&mut self.out);
        self.up().await?.send(&out).await?;
        self.out = out;
        Ok(())
    }

    /// Sends a batch and its Sync, relays the answers up to ReadyForQuery.
    async fn relay_batch(
        &mut self,
        batch: &[Message],
        sync: &Message,
        keep: Option<usize>,
    ) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        self.send_batch(batch, Some(sync)).await?;
        // a batch that may write is acknowledged once `settle` has applied it
        self.hold_ready = self.extended_write;
        self.relay_until_ready(keep).await
    }

    async fn flush_batch(&mut self, batch: &mut Vec<Message>) -> anyhow::Result<()> {
        if !batch.is_empty() {
            let b = std::mem::take(batch);
            self.send_batch(&b, None).await?;
        }
        Ok(())
    }

    /// Relays the responses to `sent` after a Flush: one completion per request
    /// (an error ends them: the primary skips the rest until Sync). Whether
    /// an error ended them.
    async fn relay_responses(&mut self, sent: &[Message]) -> anyhow::Result<bool> {
        for req in sent {
            let done: &[u8] = match req.tag {
                b'P' => b"1",
                b'B' => b"2",
                b'C' => b"3",
                b'D' if req.body().first() == Some(&b'S') => b"Tn",
                b'D' => b"Tn",
                b'E' => b"CsI",
                _ => continue,
            };
            loop {
                let m = self.up().await?.recv().await?;
                if self.swallowed(&m) {
                    continue;
                }
                self.wr.write_all(&m.raw).await?;
                if m.tag == b'E' {
                    return Ok(true);
                }
                if done.contains(&m.tag) {
                    break;
                }
            }
        }
        Ok(false)
    }

    /// Sync: answer a cacheable [Parse] Bind [Describe] Execute batch from the
    /// cache, or send the batch and relay (filling the cache when it may).
    async fn sync(&mut self, batch: Vec<Message>, sync: Message) -> anyhow::Result<Path> {
        if let Some(path) = self.admin_batch(&batch, &sync).await? {
            return Ok(path);
        }
        if self.answer_known_parses(&batch).await? {
            return Ok(Path::Proxy);
        }
        let Some(exec) = self.cacheable_batch(&batch) else {
            return self.relay_batch(&batch, &sync, None).await.map(|_| Path::Primary);
        };
        let (out, snapshot) = self.ask_node(|n, now, session| {
            let params: Vec<Option<&[u8]>> = exec.params.iter().map(|p| p.as_deref()).collect();
            n.handle_execute(now, session, &exec.prepared, &params);
        });
        let path = match out {
            Some(NodeOutput::Reply { value, served, .. }) => {
                let mut out = BytesMut::with_capacity(value.len() + 16);
                if exec.parse.is_some() {
                    out.extend_from_slice(&PARSE_COMPLETE);
                }
                out.extend_from_slice(&BIND_COMPLETE);
                out.extend_from_slice(&value);
                out.extend_from_slice(&protocol::ready_for_query(self.status));
                self.wr.write_all(&out).await?;
                if let Some(p) = exec.parse.filter(|_| !self.pooled()) {
                    // the primary never saw this Parse: re-send it before the
                    // statement is used upstream (pooled: prepared when bound)
                    self.unsent_parses.push(p);
                }
                path_of(served)
            }
            Some(NodeOutput::Upstream(u)) => {
                let keep = u.cache_key.map(|_| self.proxy.config.cache.entry_bytes_max);
                let on_replica = match (u.route, self.replica_request(&batch, &exec.statement, &sync)) {
                    (Route::Read { floor }, Some(request)) if keep.is_some() => {
                        self.read_on_replica(&request, keep, floor, exec.parse.is_none()).await?
                    }
                    _ => None,
                };
                let (kept, error, snapshot, served) = match on_replica {
                    Some((kept, error, replayed)) => {
                        if let Some(p) = exec.parse.filter(|_| !self.pooled()) {
                            self.unsent_parses.push(p);
                        }
                        (kept, error, replayed, Served::Replica)
                    }
                    None => {
                        let (kept, error) = self.relay_batch(&batch, &sync, keep).await?;
                        (kept, error, snapshot, Served::Primary)
                    }
                };
                let result = match error {
                    Some(e) => Err(e),
                    None => {
                        // the cached value: RowDescription, DataRows, CommandComplete
                        let mut value = BytesMut::new();
                        if let Some(k) = kept {
                            let mut k = k;
                            while let Ok(Some(m)) = protocol::decode(&mut k, usize::MAX, protocol::BACKEND_TAGS) {
                                if matches!(m.tag, b'T' | b'D' | b'C') {
                                    value.extend_from_slice(&m.raw);
                                }
                            }
                        }
                        let mut reply = primary_reply(Arc::from(&value[..]), snapshot, None);
                        reply.served = served;
                        Ok(reply)
                    }
                };
                self.finish(u.req, result);
                path_of(served)
            }
            Some(NodeOutput::Failed { .. }) | None => {
                self.relay_batch(&batch, &sync, None).await?;
                Path::Primary
            }
        };
        Ok(path)
    }

    /// A cacheable batch as a replica runs it: the statement as an unnamed
    /// Parse (the replica connection has not prepared it), the Bind re-pointed
    /// at it, the rest as sent, and Sync. `None` without replicas.
    fn replica_request(&self, batch: &[Message], statement: &str, sync: &Message) -> Option<BytesMut> {
        if self.proxy.config.replicas.is_empty() || self.replicas.pinned {
            return None;
        }
        let rest = match batch.first() {
            Some(m) if m.tag == b'P' => &batch[1..],
            _ => batch,
        };
        let parse = batch.first().filter(|m| m.tag == b'P').or_else(|| self.parses.get(statement))?;
        let (bind, tail) = rest.split_first()?;
        let p = parse.body();
        let name_end = p.iter().position(|c| *c == 0)?;
        let b = bind.body();
        let portal_end = b.iter().position(|c| *c == 0)?;
        let stmt_end = portal_end + 1 + b.get(portal_end + 1..)?.iter().position(|c| *c == 0)?;
        let mut out = BytesMut::with_capacity(parse.raw.len() + bind.raw.len() + 64);
        let mut body = Vec::with_capacity(p.len());
        body.push(0);
        body.extend_from_slice(&p[name_end + 1..]);
        frame_into(&mut out, b'P', &body);
        body.clear();
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&b[stmt_end + 1..]);
        frame_into(&mut out, b'B', &body);
        for m in tail {
            out.extend_from_slice(&m.raw);
        }
        out.extend_from_slice(&sync.raw);
        Some(out)
    }

    /// A batch the cache may answer: `[Parse] Bind [Describe portal] Execute`
    /// on the unnamed portal, text parameters, all rows, a cacheable read,
    /// outside a transaction.
    fn cacheable_batch(&self, batch: &[Message]) -> Option<CacheableExec> {
        if self.status != b'I' || !self.proxy.config.cache.enabled {
            return None;
        }
        let (parse, rest) = match batch.first() {
            Some(m) if m.tag == b'P' => (Some(m), &batch[1..]),
            _ => (None, batch),
        };
        let (bind, describe, execute) = match rest {
            [b, e] if b.tag == b'B' && e.tag == b'E' => (b, None, e),
            [b, d, e] if b.tag == b'B' && d.tag == b'D' && e.tag == b'E' => (b, Some(d), e),
            _ => return None,
        };
        let bind = parse_bind(bind)?;
        if !bind.portal.is_empty() || bind.param_formats.len() != bind.params.len() {
            return None;
        }
        if let Some(d) = describe
            && d.body() != b"P\0"
        {
            return None;
        }
        if execute.body() != b"\0\0\0\0\0" {
            return None;
        }
        let parse = match parse.and_then(parse_message) {
            Some((name, _)) if name != bind.statement => return None,
            Some(_) => parse.cloned(),
            None => None,
        };
        let mut prepared = self.statements.get(&bind.statement)?.clone();
        // analysed again if the database's catalog changed since Parse
        self.proxy.node().current(&mut prepared);
        if !prepared.shape.is_cacheable() {
            return None;
        }
        let mut params: Vec<Option<Vec<u8>>> = bind.params;
        if bind.param_formats.iter().any(|f| *f != 0) {
            // binary parameters: as text, when their type is known and simple
            let types = self.param_types.get(&bind.statement)?;
            for (i, p) in params.iter_mut().enumerate() {
                if bind.param_formats[i] != 0
                    && let Some(v) = p.as_mut()
                {
                    *v = binary_param_as_text(*types.get(i)?, v)?;
                }
            }
        }
        // what else changes the bytes of the answer: Describe, result formats
        let mut shape_of_answer = vec![u8::from(describe.is_some())];
        shape_of_answer.extend_from_slice(&bind.result_formats);
        // the parameter types the Parse declared decide the result's types
        // (`SELECT $1` as int4 or as numeric)
        let declared = self.parses.get(&bind.statement).and_then(parse_param_types).unwrap_or_default();
        shape_of_answer.push(0xff);
        declared.iter().for_each(|oid| shape_of_answer.extend_from_slice(&oid.to_be_bytes()));
        params.push(Some(shape_of_answer));
        Some(CacheableExec { prepared, params, parse, statement: bind.statement })
    }

    /// Gives the node one query (`ask`), the upstream transaction status first
    /// (it is the truth about transactions), and returns the node's answer with
    /// the snapshot lower bound taken before it.
    fn ask_node(&self, ask: impl FnOnce(&mut EdgeNode<Value>, Instant, SessionId)) -> (Option<NodeOutput<Value>>, Lsn) {
        let now = self.proxy.now();
        let snapshot = Lsn(self.proxy.lsn_seen.load(Ordering::Relaxed));
        let mut n = self.proxy.node();
        n.sync_transaction(self.session, self.status != b'I', snapshot);
        if self.status == b'E' {
            // an aborted transaction: its COMMIT rolls back
            n.transaction_failed(self.session);
        }
        ask(&mut n, now, self.session);
        (n.poll_output(), snapshot)
    }

    /// Hands the upstream outcome of `req` to the node (fill or invalidate).
    fn finish(&self, req: postai_core::node::RequestId, result: Result<UpstreamReply<Value>, String>) {
        let now = self.proxy.now();
        let mut n = self.proxy.node();
        let l2_file = self.proxy.l2_file.as_ref().map(|f| (f, f.before_upstream(&n, req)));
        n.handle_upstream(now, req, result);
        while n.poll_output().is_some() {}
        if let Some((f, before)) = l2_file {
            // queued under the node's lock, ordered with CDC invalidations
            f.after_upstream(&n, self.session, now, before);
        }
    }

    /// Pooling, between transactions: a batch of Parses of statements some
    /// server connection already prepared without error is answered here
    /// (each is prepared where it is bound). A client blocked on a Parse then
    /// needs no server connection: a synchronous prepare (pgbench -M
    /// prepared) cannot wait behind clients that wait for it.
    async fn answer_known_parses(&mut self, batch: &[Message]) -> anyhow::Result<bool> {
        let (Some(pool), Upstream::Pooled { lease: None, key, .. }) = (&self.proxy.pool, &self.upstream) else {
            return Ok(false);
        };
        if batch.is_empty() || self.status != b'I' || !self.unsent_parses.is_empty() {
            return Ok(false);
        }
        let known = batch.iter().all(|m| {
            m.tag == b'P'
                && m.body()
                    .iter()
                    .position(|c| *c == 0)
                    .is_some_and(|end| end > 0 && pool.knows(key, &crate::pool::server_name(&m.body()[end + 1..])))
        });
        if !known {
            return Ok(false);
        }
        self.out.clear();
        for _ in batch {
            self.out.extend_from_slice(&PARSE_COMPLETE);
        }
        self.out.extend_from_slice(&protocol::ready_for_query(self.status));
        self.wr.write_all(&self.out).await?;
        Ok(true)
    }

    fn pooled(&self) -> bool {
        matches!(self.upstream, Upstream::Pooled { .. })
    }

    /// The server connection, leased from the pool first when pooling.
    async fn up(&mut self) -> anyhow::Result<&mut Conn> {
        if let Upstream::Pooled { lease, key, password, cancel, .. } = &mut self.upstream
            && lease.is_none()
        {
            let pool = self.proxy.pool.as_ref().ok_or_else(|| anyhow::anyhow!("transaction pooling without a pool"))?;
            // after a failover the primary is elsewhere
            key.addr = self.proxy.primary_addr();
            let wait = self.proxy.config.pool.wait_ms;
            let l = Box::new(pool.acquire(key, password.as_deref(), wait).await?);
            if let Some((pid, secret)) = l.server.backend_key {
                *cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some((key.addr.clone(), pid, secret));
            }
            *lease = Some(l);
        }
        match &mut self.upstream {
            Upstream::Dedicated(c) => Ok(c),
            Upstream::Pooled { lease: Some(l), .. } => Ok(&mut l.server.conn),
            Upstream::Pooled { lease: None, .. } => anyhow::bail!("no server connection"),
        }
    }

    /// A message from upstream: whether the client must not see it (the
    /// answer to a Parse or Close the proxy injected). Learns parameter types;
    /// a failed batch leaves the statements it prepared uncertain (pooling).
    fn swallowed(&mut self, m: &Message) -> bool {
        match m.tag {
            b'S' => {
                if let Some((name, value)) = parameter_status(m)
                    && self.reported.len() < RELAYED_MAX
                {
                    self.reported.push((name, value));
                }
            }
            b'1' if self.swallow_parse_complete > 0 => {
                self.swallow_parse_complete -= 1;
                return true;
            }
            b'3' if self.swallow_close_complete > 0 => {
                self.swallow_close_complete -= 1;
                return true;
            }
            b'E' => {
                if let Upstream::Pooled { lease: Some(l), .. } = &mut self.upstream {
                    self.batch_failed = true;
                    for name in self.batch_server_parses.drain(..) {
                        l.server.statements.remove(&name);
                        l.server.uncertain.insert(name);
                    }
                    l.server.unnamed = None;
                }
            }
            b'Z' => {
                // whatever an error skipped never comes
                self.swallow_parse_complete = 0;
                self.swallow_close_complete = 0;
                let parsed = std::mem::take(&mut self.batch_server_parses);
                if !std::mem::take(&mut self.batch_failed)
                    && let (Some(pool), Upstream::Pooled { key, .. }) = (&self.proxy.pool, &self.upstream)
                {
                    pool.learn(key, parsed);
                }
            }
            _ => {}
        }
        self.snoop(m);
        false
    }

    /// Pooling: session state the statement leaves on the server connection
    /// keeps it with this client.
    fn note_session_state(&mut self, shape: &Shape) {
        if let Upstream::Pooled { lease, pinned, .. } = &mut self.upstream {
            let first = shape.text.split([' ', '(']).next().unwrap_or("");
            if matches!(first, "deallocate" | "discard")
                && let Some(l) = lease.as_mut()
            {
                // the server's prepared statements are gone
                l.server.statements.clear();
                l.server.unnamed = None;
            }
            *pinned |= pins_session(shape);
        }
    }

    /// Pooling: gives the server connection back between transactions.
    fn release_idle(&mut self) {
        if self.status != b'I' {
            return;
        }
        if let Upstream::Pooled { lease, pinned: false, cancel, .. } = &mut self.upstream
            && let Some(l) = lease.take()
        {
            l.release();
            *cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// After a request: what the extended protocol ran outside the node's
    /// view is applied to the session (settings, privacy), and a write it
    /// made raises the session's floor once no transaction is open.
    /// Sends a ReadyForQuery held back for a write (see `hold_ready`): the
    /// node has applied the write by now.
    async fn release_ready(&mut self) -> anyhow::Result<()> {
        self.hold_ready = false;
        if let Some(z) = self.held_ready.take() {
            self.wr.write_all(&z).await?;
        }
        Ok(())
    }

    async fn settle(&mut self) -> anyhow::Result<()> {
        if !self.reported.is_empty() {
            let reported = std::mem::take(&mut self.reported);
            let mut n = self.proxy.node();
            for (name, value) in reported {
                // the role comes from the commands that set it (a report of
                // session_authorization alone would forget a SET ROLE)
                if !matches!(name.as_str(), "session_authorization" | "is_superuser") {
                    n.report_parameter(self.session, &name, &value);
                }
            }
        }
        if self.relayed_from.is_some() {
            let certain = self.relayed_from == Some(b'I')
                && self.status == b'I'
                && !self.relayed_overflow
                && self.relayed.iter().all(|p| p.shape.txn.is_none());
            let relayed = std::mem::take(&mut self.relayed);
            for p in &relayed {
                self.note_session_state(&p.shape);
                if p.shape.writes_unknown || p.shape.kind == StatementKind::Ddl {
                    self.proxy.ddl_ran();
                }
            }
            let mut n = self.proxy.node();
            for p in relayed {
                n.note_relayed(self.session, &p, certain);
            }
            if self.relayed_overflow {
                n.make_private(self.session);
            }
            self.relayed_from = None;
            self.relayed_overflow = false;
        }
        if self.extended_write && self.status == b'I' {
            self.extended_write = false;
            self.after_extended_write().await?;
        }
        self.release_idle();
        Ok(())
    }

    /// After the extended protocol ran a write: raise the session's floor to
    /// the primary's current LSN (read-your-writes for cached reads).
    async fn after_extended_write(&mut self) -> anyhow::Result<()> {
        if self.status != b'I' {
            return Ok(());
        }
        if let Some(lsn) = self.current_lsn().await? {
            let mut n = self.proxy.node();
            n.unseen_write(self.session, lsn);
            n.sync_transaction(self.session, false, lsn);
        }
        Ok(())
    }

    async fn current_lsn(&mut self) -> anyhow::Result<Option<Lsn>> {
        let msgs = self.up().await?.simple("SELECT pg_current_wal_lsn()::text").await?;
        let lsn = protocol::first_value(&msgs).and_then(|s| protocol::parse_lsn(&s)).map(Lsn);
        if let Some(l) = lsn {
            self.proxy.lsn_seen.fetch_max(l.0, Ordering::Relaxed);
        }
        Ok(lsn)
    }

    async fn simple_query(&mut self, m: &Message) -> anyhow::Result<Path> {
        let sql = match protocol::query_text(m) {
            Ok(s) => s,
            Err(e) => {
                self.refuse("08P01", &e.to_string()).await?;
                return Ok(Path::Proxy);
            }
        };
        if self.proxy.config.cache.enabled && !protocol::query_is_utf8(m) {
            // text the analyzer cannot read as sent (another client
            // encoding): relayed, never cached, its effects unknown
            self.hold_ready = true;
            self.up().await?.send(&m.raw).await?;
            let (_, error) = self.relay_until_ready(None).await?;
            self.proxy.node().note_opaque(self.session, self.status != b'I');
            if error.is_none()
                && self.status == b'I'
                && let Some(lsn) = self.current_lsn().await?
            {
                self.proxy.node().unseen_write(self.session, lsn);
            }
            return Ok(Path::Primary);
        }
        if let Some(from) = subscribe_command(&sql) {
            match from {
                Ok(from) => self.stream_cdc(from).await?,
                Err(e) => {
                    self.refuse("42601", &e).await?;
                }
            }
            return Ok(Path::Proxy);
        }
        if let Some(rows) = self.admin(&sql) {
            self.wr.write_all(&rows).await?;
            self.wr.write_all(&protocol::ready_for_query(self.status)).await?;
            return Ok(Path::Proxy);
        }
        if !self.proxy.config.cache.enabled {
            if self.pooled() {
                // nothing is cached, but pooling must see session state
                let prepared = self.proxy.node().prepare(&sql).ok();
                if let Some(p) = prepared {
                    self.note_session_state(&p.shape);
                }
            }
            self.up().await?.send(&m.raw).await?;
            self.relay_until_ready(None).await?;
            return Ok(Path::Primary);
        }
        let (out, snapshot) = self.ask_node(|n, now, session| {
            n.handle_simple_query(now, session, &sql);
        });
        let path = match out {
            Some(NodeOutput::Reply { value, served, .. }) => {
                self.out.clear();
                self.out.extend_from_slice(&value);
                self.out.extend_from_slice(&protocol::ready_for_query(self.status));
                self.wr.write_all(&self.out).await?;
                path_of(served)
            }
            Some(NodeOutput::Upstream(u)) => {
                let keep = u.cache_key.map(|_| self.proxy.config.cache.entry_bytes_max);
                // a write is acknowledged once the node has applied it (`finish`)
                self.hold_ready = !u.shape.writes.is_empty()
                    || u.shape.writes_unknown
                    || u.shape.writes_opaque
                    || u.shape.txn == Some(TxnControl::Commit);
                let on_replica = match u.route {
                    Route::Read { floor } if keep.is_some() => self.read_on_replica(&m.raw, keep, floor, false).await?,
                    _ => None,
                };
                let was_idle = self.status == b'I';
                let (kept, error, snapshot, served) = match on_replica {
                    Some((kept, error, replayed)) => (kept, error, replayed, Served::Replica),
                    None => {
                        self.note_session_state(&u.shape);
                        if let Upstream::Pooled { lease: Some(l), .. } = &mut self.upstream {
                            // a simple query ends the unnamed statement
                            l.server.unnamed = None;
                        }
                        self.up().await?.send(&m.raw).await?;
                        let (kept, error) = self.relay_until_ready(keep).await?;
                        (kept, error, snapshot, Served::Primary)
                    }
                };
                let shape = u.shape.clone();
                if shape.kind == StatementKind::Session && error.is_none() {
                    let dropped = self.replicas.setting(m, was_idle && self.status == b'I');
                    self.proxy.metrics.replica_connections.fetch_sub(dropped as u64, Ordering::Relaxed);
                }
                let wrote = !shape.writes.is_empty()
                    || shape.writes_unknown
                    || shape.writes_opaque
                    || shape.txn == Some(TxnControl::Commit);
                if error.is_none() && (shape.writes_unknown || shape.kind == StatementKind::Ddl) {
                    // what relations and functions are may have changed
                    self.proxy.ddl_ran();
                }
                let commit_lsn =
                    if error.is_none() && wrote && self.status == b'I' { self.current_lsn().await? } else { None };
                let result = match error {
                    Some(e) => Err(e),
                    None => {
                        let value: Value = kept.map(|b| Arc::from(&b[..])).unwrap_or_else(|| Arc::from(&[][..]));
                        let mut reply = primary_reply(value, snapshot, commit_lsn);
                        reply.served = served;
                        Ok(reply)
                    }
                };
                self.finish(u.req, result);
                path_of(served)
            }
            Some(NodeOutput::Failed { error, .. }) => {
                self.refuse("53300", &error.to_string()).await?;
                Path::Proxy
            }
            None => Path::Proxy,
        };
        Ok(path)
    }

    /// Learns statements' parameter types from ParameterDescriptions.
    fn snoop(&mut self, m: &Message) {
        match m.tag {
            b't' => {
                if let Some(name) = self.described.pop_front()
                    && let Some(types) = parameter_description(m)
                    && self.statements.contains_key(&name)
                {
                    self.param_types.insert(name, types);
                }
            }
            // an error skips the rest of the batch; ReadyForQuery ends it
            b'E' | b'Z' => self.described.clear(),
            _ => {}
        }
    }

    /// Runs a cacheable read (`request`, ending in Sync) on a replica that has
    /// replayed past `floor`, relaying its answer to the client. `None` when
    /// no replica is fresh enough or the replica failed before the client saw
    /// anything: the caller asks the primary. Otherwise the kept copy, the
    /// first error and the snapshot (the replica's replay LSN before the read).
    async fn read_on_replica(
        &mut self,
        request: &[u8],
        keep: Option<usize>,
        floor: Option<Lsn>,
        swallow_parse: bool,
    ) -> anyhow::Result<Option<(Option<BytesMut>, Option<String>, Lsn)>> {
        if self.status != b'I' || self.replicas.pinned || self.proxy.config.replicas.is_empty() {
            return Ok(None);
        }
        if self.pooled() && !self.replicas.settings.is_empty() {
            // a shared replica connection cannot carry the session's settings
            return Ok(None);
        }
        let started = self.proxy.now();
        let Some(route) = self.proxy.topology().route_read(started, floor) else { return Ok(None) };
        let conn = if let Some(pool) = &self.proxy.pool {
            // pooling: replica connections are shared too
            let key = PoolKey::new(&route.addr, &self.replicas.login);
            let wait = self.proxy.config.pool.wait_ms;
            pool.acquire(&key, self.replicas.password.as_deref(), wait)
                .await
                .map(|l| Upstream::Pooled {
                    lease: Some(Box::new(l)),
                    key,
                    password: None,
                    pinned: true,
                    cancel: Arc::new(Mutex::new(None)),
                })
                .map_err(anyhow::Error::from)
        } else {
            match self.replicas.conns.iter().position(|(id, _)| *id == route.id) {
                Some(i) => Ok(Upstream::Dedicated(self.replicas.conns.swap_remove(i).1)),
                None => self.open_replica(&route.addr).await.map(|c| {
                    self.proxy.metrics.replica_connections.fetch_add(1, Ordering::Relaxed);
                    Upstream::Dedicated(c)
                }),
            }
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("postai-edge: replica {}: {e}", route.addr);
                self.proxy.topology().read_done(self.proxy.now(), route.id, Err(()));
                return Ok(None);
            }
        };
        // the relay below works on `self.up()`: lend it the replica connection
        let saved = std::mem::replace(&mut self.upstream, conn);
        let backend = match &self.upstream {
            Upstream::Dedicated(c) => c.backend_key,
            Upstream::Pooled { lease, .. } => lease.as_ref().and_then(|l| l.server.backend_key),
        };
        // meanwhile the client's cancel requests reach the replica backend
        let _cancel = self.cancel_key.zip(backend).map(|(key, (pid, secret))| {
            crate::cancel::Redirect::new(&self.proxy, key, (route.addr.clone(), pid, secret))
        });
        let saved_swallow = std::mem::replace(&mut self.swallow_parse_complete, u32::from(swallow_parse));
        let result = match self.up().await?.send(request).await {
            Ok(()) => self.relay_until_ready(keep).await,
            Err(e) => Err(e.into()),
        };
        self.swallow_parse_complete = saved_swallow;
        let conn = std::mem::replace(&mut self.upstream, saved);
        let now = self.proxy.now();
        match result {
            Ok((kept, error)) => {
                match conn {
                    Upstream::Dedicated(c) => self.replicas.conns.push((route.id, c)),
                    Upstream::Pooled { lease: Some(l), .. } => l.release(),
                    Upstream::Pooled { lease: None, .. } => {}
                }
                self.proxy.topology().read_done(now, route.id, Ok(now.saturating_since(started)));
                Ok(Some((kept, error, route.replayed)))
            }
            Err(e) => {
                self.proxy.topology().read_done(now, route.id, Err(()));
                if matches!(conn, Upstream::Dedicated(_)) {
                    self.proxy.metrics.replica_connections.fetch_sub(1, Ordering::Relaxed);
                }
                if self.flushed_mid {
                    // the client has part of the answer: nothing to retry
                    return Err(e);
                }
                self.out.clear();
                Ok(None)
            }
        }
    }

    /// Logs in to a replica as the client did and replays the session's settings.
    async fn open_replica(&mut self, addr: &str) -> anyhow::Result<Conn> {
        let login = upstream::login(&self.proxy.dialer, addr, &self.replicas.login, self.replicas.password.as_deref());
        let mut c = login.await?.conn;
        for set in &self.replicas.settings {
            c.send(set).await?;
            loop {
                let m = c.recv().await?;
                if m.tag == b'E' {
                    anyhow::bail!("replaying a setting: {}", error_message(&m));
                }
                if m.tag == b'Z' {
                    break;
                }
            }
        }
        Ok(c)
    }

    /// Relays upstream messages to the client until ReadyForQuery (relaying
    /// COPY data from the client in between). Keeps a copy of the messages,
    /// ReadyForQuery excluded, while they fit in `keep` bytes. Returns the
    /// copy and the first error's message.
    async fn relay_until_ready(&mut self, keep: Option<usize>) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        let mut kept = keep.map(|_| BytesMut::new());
        let mut error = None;
        self.out.clear();
        self.flushed_mid = false;
        loop {
            let m = self.up().await?.recv().await?;
            if self.swallowed(&m) {
                continue;
            }
            self.out.extend_from_slice(&m.raw);
            match m.tag {
                b'Z' => {
                    self.status = protocol::ready_status(&m).unwrap_or(b'I');
                    if self.hold_ready {
                        // sent by `release_ready`, after the node applied the write
                        self.out.truncate(self.out.len() - m.raw.len());
                        self.held_ready = Some(m.raw.clone());
                    }
                    self.wr.write_all(&self.out).await?;
                    self.out.clear();
                    return Ok((kept, error));
                }
                b'E' => {
                    error.get_or_insert_with(|| error_message(&m));
                    kept = None;
                }
                b'G' => {
                    // COPY FROM STDIN: the client's data goes to the primary
                    self.flushed_mid = true;
                    self.wr.write_all(&self.out).await?;
                    self.out.clear();
                    kept = None;
                    while let Some(c) = self.client_message().await? {
                        self.up().await?.send(&c.raw).await?;
                        if matches!(c.tag, b'c' | b'f') {
                            break;
                        }
                    }
                }
                _ => {}
            }
            if let (Some(k), Some(limit)) = (kept.as_mut(), keep)
                && m.tag != b'Z'
            {
                if k.len() + m.raw.len() > limit {
                    kept = None;
                } else {
                    k.extend_from_slice(&m.raw);
                }
            }
            if self.out.len() > 64 << 10 {
                self.flushed_mid = true;
                self.wr.write_all(&self.out).await?;
                self.out.clear();
            }
        }
    }

    /// An ErrorResponse and ReadyForQuery: the statement failed, the session goes on.
    async fn refuse(&mut self, code: &str, message: &str) -> std::io::Result<()> {
        self.wr.write_all(&protocol::error_response("ERROR", code, message)).await?;
        self.wr.write_all(&protocol::ready_for_query(self.status)).await
    }

    /// `POSTAI SUBSCRIBE [FROM 'lsn']` (an edge behind this regional proxy):
    /// CopyOut of every CDC row this proxy's slot reader applies,
    /// `R <lsn>\t<row>`, and `K <lsn>` after each poll; `X <lsn>` when the
    /// reader starts a new slot there (what came before may never be
    /// streamed). The stream opens with `C <lsn>` when it continues after
    /// FROM's position with nothing missing (the rows kept since follow, then
    /// one `K`), else with a `K` (where it starts; the subscriber knows
    /// nothing of before). Ends with an error when the subscriber falls behind, or
    /// when it leaves.
    async fn stream_cdc(&mut self, from: Option<Lsn>) -> anyhow::Result<()> {
        if self.proxy.config.cdc.source != crate::config::CdcSource::Slot || !self.proxy.config.cdc.enabled {
            let e = "postai-edge: POSTAI SUBSCRIBE needs a proxy reading a slot of its own ([cdc] source = \"slot\")";
            self.refuse("55000", e).await?;
            return Ok(());
        }
        // listening and the snapshot under the history's lock: no feed missed or sent twice
        let (mut rx, kept) = {
            let history = self.proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner());
            let regional = self.proxy.config.role == crate::config::Role::Regional;
            (self.proxy.cdc_feed.subscribe(), from.filter(|_| regional).and_then(|f| history.since(f)))
        };
        let mut out = BytesMut::with_capacity(4096);
        frame_into(&mut out, b'H', &[0, 0, 1, 0, 0]);
        match (from, kept) {
            (Some(from), Some(kept)) => {
                // the rows kept since, then one keepalive: the subscriber applies them at once
                frame_into(&mut out, b'd', format!("C {}", fmt_lsn(from)).as_bytes());
                row_lines(&mut out, kept.iter().flat_map(|f| &f.rows));
                let current = kept.iter().filter_map(|f| f.current).max().unwrap_or(0);
                let current = current.max(self.proxy.cdc_last.load(Ordering::Relaxed));
                frame_into(&mut out, b'd', format!("K {}", fmt_lsn(Lsn(current))).as_bytes());
            }
            _ => {
                // where this proxy's stream stands: every commit up to it was
                // published (a position on the slot's timeline, safe to continue from)
                let start = self.proxy.cdc_last.load(Ordering::Relaxed);
                if start == 0 {
                    let e = "postai-edge: the CDC stream of this proxy is not open yet; subscribe again";
                    self.refuse("55000", e).await?;
                    return Ok(());
                }
                frame_into(&mut out, b'd', format!("K {}", fmt_lsn(Lsn(start))).as_bytes());
            }
        }
        self.wr.write_all(&out).await?;
        let mut probe = [0u8; 1];
        let mut ended = self.proxy.subscriptions.subscribe();
        loop {
            let feed = tokio::select! {
                f = rx.recv() => f,
                _ = ended.changed() => {
                    let e = "postai-edge: the regional proxy ended this subscription; subscribe again";
                    self.wr.write_all(&protocol::error_response("ERROR", "57P01", e)).await?;
                    return Ok(());
                }
                // the subscriber sends nothing: a read returns when it leaves
                r = self.rd.read(&mut probe) => {
                    let _ = r;
                    return Ok(());
                }
            };
            let feed = match feed {
                Ok(f) => f,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let e = format!("postai-edge: the subscriber fell {n} polls behind; subscribe again");
                    self.wr.write_all(&protocol::error_response("ERROR", "53400", &e)).await?;
                    return Ok(());
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            };
            out.clear();
            feed_lines(&mut out, &feed, self.proxy.cdc_last.load(Ordering::Relaxed));
            self.wr.write_all(&out).await?;
        }
    }

    /// `SHOW POSTAI STATS|CACHES|POOLS`, `POSTAI RELOAD`: answered by the
    /// proxy (`proxy/admin.rs`; the extended protocol there too).
    fn admin(&self, sql: &str) -> Option<BytesMut> {
        admin::Command::parse(sql).map(|c| c.answer(&self.proxy))
    }
}

impl ReplicaConns {
    /// Settings replayed on a replica connection at most: more pins the session.
    const SETTINGS_MAX: usize = 64;

    /// The session ran a SET/RESET/DISCARD: future replica connections must
    /// replay it, the open ones do not have it.
    /// Returns how many open connections it dropped.
    fn setting(&mut self, query: &Message, outside_transaction: bool) -> usize {
        if !outside_transaction || self.settings.len() >= Self::SETTINGS_MAX {
            self.pinned = true;
            return 0;
        }
        self.settings.push(query.raw.clone());
        let dropped = self.conns.len();
        self.conns.clear();
        dropped
    }
}

fn path_of(served: Served) -> Path {
    match served {
        Served::L1 => Path::L1,
        Served::L2 => Path::L2,
        Served::Replica => Path::Replica,
        _ => Path::Primary,
    }
}

/// Streamed rows as subscription lines (CopyData).
fn row_lines<'a>(out: &mut BytesMut, rows: impl IntoIterator<Item = &'a (String, String)>) {
    for (lsn, row) in rows {
        frame_into(out, b'd', format!("R {lsn}\t{row}").as_bytes());
    }
}

/// One feed as subscription lines.
fn feed_lines(out: &mut BytesMut, feed: &crate::cdc::Feed, last_applied: u64) {
    if let Some(start) = feed.reset {
        frame_into(out, b'd', format!("X {}", fmt_lsn(start)).as_bytes());
        return;
    }
    row_lines(out, &feed.rows);
    let current = feed.current.unwrap_or(0).max(last_applied);
    frame_into(out, b'd', format!("K {}", fmt_lsn(Lsn(current))).as_bytes());
}

/// `POSTAI SUBSCRIBE [FROM 'lsn']`: `None` for another statement; the FROM
/// position, or why the statement is malformed.
fn subscribe_command(sql: &str) -> Option<Result<Option<Lsn>, String>> {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_whitespace().collect();
    if words.len() < 2 || !words[0].eq_ignore_ascii_case("postai") || !words[1].eq_ignore_ascii_case("subscribe") {
        return None;
    }
    Some(match words[2..] {
        [] => Ok(None),
        [from, at] if from.eq_ignore_ascii_case("from") => at
            .strip_prefix('\'')
            .and_then(|a| a.strip_suffix('\''))
            .and_then(protocol::parse_lsn)
            .map(|l| Some(Lsn(l)))
            .ok_or_else(|| format!("postai-edge: POSTAI SUBSCRIBE FROM needs an LSN such as '0/16B3748', not {at}")),
        _ => Err("postai-edge: usage: POSTAI SUBSCRIBE [FROM 'lsn']".to_string()),
    })
}

/// Whether a statement leaves session state on its server connection that
/// another client must not inherit, or this one must find again.
fn pins_session(shape: &Shape) -> bool {
    let text = shape.text.as_str();
    let mut words = text.split([' ', '(']).filter(|w| !w.is_empty());
    let (first, second) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let session_command = match first {
        "set" => !matches!(second, "local" | "transaction" | "constraints"),
        "reset" | "discard" | "deallocate" | "listen" | "prepare" | "declare" | "load" => true,
        _ => false,
    };
    session_command
        || shape.session_private
        || shape.session_opaque
        || ((text.contains("pg_advisory_lock") || text.contains("pg_try_advisory_lock")) && !text.contains("xact"))
}

/// Appends `m` as a pooled server connection must see it: named statements
/// under their server-side names, prepared first where missing; a client's
/// Close of a named statement leaves the shared one alone.
fn pooled_message(
    out: &mut BytesMut,
    m: &Message,
    server: &mut ServerConn,
    parses: &std::collections::HashMap<String, Message>,
    swallow_parse: &mut u32,
    swallow_close: &mut u32,
    parsed: &mut Vec<String>,
) {
    let body = m.body();
    let cstr_end = |from: usize| body.get(from..).and_then(|b| b.iter().position(|c| *c == 0)).map(|e| from + e);
    // the server-side name of a client's statement, prepared there if missing
    let mut ensure = |out: &mut BytesMut, server: &mut ServerConn, name: &[u8]| -> Option<String> {
        let client_name = std::str::from_utf8(name).ok()?;
        let parse = parses.get(client_name)?;
        let p = parse.body();
        let rest = &p[p.iter().position(|c| *c == 0)? + 1..];
        if name.is_empty() {
            if server.unnamed.as_ref() != Some(&parse.raw) {
                out.extend_from_slice(&parse.raw);
                *swallow_parse += 1;
                server.unnamed = Some(parse.raw.clone());
            }
            return Some(String::new());
        }
        let sname = crate::pool::server_name(rest);
        if !server.statements.contains(&sname) || server.uncertain.contains(&sname) {
            if server.uncertain.remove(&sname) {
                frame_into(out, b'C', &[b"S", sname.as_bytes(), b"\0"].concat());
                *swallow_close += 1;
            }
            frame_into(out, b'P', &[sname.as_bytes(), b"\0", rest].concat());
            *swallow_parse += 1;
            server.statements.insert(sname.clone());
            parsed.push(sname.clone());
        }
        Some(sname)
    };
    match m.tag {
        b'P' => {
            let Some(name_end) = cstr_end(0) else { return out.extend_from_slice(&m.raw) };
            let rest = &body[name_end + 1..];
            if name_end == 0 {
                out.extend_from_slice(&m.raw);
                server.unnamed = Some(m.raw.clone());
                return;
            }
            let sname = crate::pool::server_name(rest);
            if server.statements.contains(&sname) && !server.uncertain.contains(&sname) {
                // prepared already: the same text as the unnamed statement
                // gives the client its ParseComplete
                frame_into(out, b'P', &[b"\0", rest].concat());
                server.unnamed = None;
            } else {
                if server.uncertain.remove(&sname) {
                    frame_into(out, b'C', &[b"S", sname.as_bytes(), b"\0"].concat());
                    *swallow_close += 1;
                }
                frame_into(out, b'P', &[sname.as_bytes(), b"\0", rest].concat());
                server.statements.insert(sname.clone());
                parsed.push(sname);
            }
        }
        b'B' => {
            let (Some(portal_end), Some(stmt_end)) = (cstr_end(0), cstr_end(cstr_end(0).unwrap_or(0) + 1)) else {
                return out.extend_from_slice(&m.raw);
            };
            match ensure(out, server, &body[portal_end + 1..stmt_end]) {
                Some(sname) => frame_into(
                    out,
                    b'B',
                    &[&body[..=portal_end], sname.as_bytes(), b"\0", &body[stmt_end + 1..]].concat(),
                ),
                None => out.extend_from_slice(&m.raw),
            }
        }
        b'D' if body.first() == Some(&b'S') => match cstr_end(1).and_then(|e| ensure(out, server, &body[1..e])) {
            Some(sname) => frame_into(out, b'D', &[b"S", sname.as_bytes(), b"\0"].concat()),
            None => out.extend_from_slice(&m.raw),
        },
        // the shared statement stays: a Close of a name nobody uses answers the same
        b'C' if body.first() == Some(&b'S') && body.get(1) != Some(&0) => {
            frame_into(out, b'C', b"Spostai_closed\0");
        }
        _ => out.extend_from_slice(&m.raw),
    }
}

/// A login greeting with its BackendKeyData replaced by `(pid, secret)`.
fn with_backend_key(greeting: &[u8], pid: i32, secret: i32) -> BytesMut {
    let mut out = BytesMut::with_capacity(greeting.len() + 13);
    let mut rest = BytesMut::from(greeting);
    while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
        if m.tag != b'K' {
            out.extend_from_slice(&m.raw);
        }
    }
    let mut k = BytesMut::with_capacity(8);
    k.put_i32(pid);
    k.put_i32(secret);
    frame_into(&mut out, b'K', &k);
    out
}

/// The settings a client's startup parameters make (names lower-case), and
/// whether `options` held something else (the session is then private).
fn startup_settings(params: &[(String, String)]) -> (Vec<(String, String)>, bool) {
    let mut out = Vec::new();
    let mut opaque = false;
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                // space-separated arguments, `\ ` an escaped space
                let mut words: Vec<String> = vec![String::new()];
                let mut chars = v.chars();
                while let Some(ch) = chars.next() {
                    match ch {
                        '\\' => words.last_mut().into_iter().for_each(|w| w.extend(chars.next())),
                        c if c.is_whitespace() => words.push(String::new()),
                        c => words.last_mut().into_iter().for_each(|w| w.push(c)),
                    }
                }
                let mut it = words.into_iter().filter(|w| !w.is_empty());
                while let Some(w) = it.next() {
                    let setting = if w == "-c" {
                        it.next()
                    } else {
                        w.strip_prefix("-c").or_else(|| w.strip_prefix("--")).map(str::to_string)
                    };
                    match setting.as_deref().and_then(|s| s.split_once('=')) {
                        Some((name, value)) => {
                            out.push((name.replace('-', "_").to_ascii_lowercase(), value.to_string()))
                        }
                        None => opaque = true,
                    }
                }
            }
            _ => out.push((k.to_ascii_lowercase(), v.clone())),
        }
    }
    (out, opaque)
}

/// What the primary answered, for the node: the encoded messages it sent.
fn primary_reply(value: Value, snapshot: Lsn, commit_lsn: Option<Lsn>) -> UpstreamReply<Value> {
    let size_bytes = u32::try_from(value.len()).unwrap_or(u32::MAX);
    UpstreamReply { value, size_bytes, served: Served::Primary, snapshot_lsn: snapshot, commit_lsn, ttl: None }
}

/// A ParameterStatus message's name and value.
fn parameter_status(m: &Message) -> Option<(String, String)> {
    let b = m.body();
    let end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(end + 1..)?;
    let vend = rest.iter().position(|c| *c == 0)?;
    Some((String::from_utf8(b[..end].to_vec()).ok()?, String::from_utf8(rest[..vend].to_vec()).ok()?))
}

/// The statement a Bind message binds.
fn bind_statement(m: &Message) -> Option<&str> {
    let b = m.body();
    let portal_end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(portal_end + 1..)?;
    std::str::from_utf8(&rest[..rest.iter().position(|c| *c == 0)?]).ok()
}

/// The parameter type OIDs a Parse declares (0: unspecified).
fn parse_param_types(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let name_end = b.iter().position(|c| *c == 0)?;
    let q = b.get(name_end + 1..)?;
    let at = name_end + 1 + q.iter().position(|c| *c == 0)? + 1;
    let n = i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?);
    (0..n.max(0) as usize)
        .map(|i| Some(u32::from_be_bytes(b.get(at + 2 + 4 * i..at + 6 + 4 * i)?.try_into().ok()?)))
        .collect()
}

/// The type OIDs of a ParameterDescription.
fn parameter_description(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let n = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    (0..n.max(0) as usize).map(|i| Some(u32::from_be_bytes(b.get(2 + 4 * i..6 + 4 * i)?.try_into().ok()?))).collect()
}

/// A binary-format parameter in PostgreSQL's text output form, for the types
/// whose text form is what the CDC stream prints for keys (integers, text,
/// uuid, bool); `None` for the others (the batch is relayed, not cached).
fn binary_param_as_text(oid: u32, v: &[u8]) -> Option<Vec<u8>> {
    const BOOL: u32 = 16;
    const NAME: u32 = 19;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const OID: u32 = 26;
    const VARCHAR: u32 = 1043;
    const UUID: u32 = 2950;
    Some(match oid {
        INT2 => i16::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        INT4 => i32::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        INT8 => i64::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        OID => u32::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        TEXT | VARCHAR | NAME => {
            std::str::from_utf8(v).ok()?;
            v.to_vec()
        }
        BOOL => match v {
            [0] => b"false".to_vec(),
            [1] => b"true".to_vec(),
            _ => return None,
        },
        UUID => {
            let b: [u8; 16] = v.try_into().ok()?;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]).into_bytes()
        }
        _ => return None,
    })
}

/// The statement name and query text of a Parse message.
fn parse_message(m: &Message) -> Option<(String, String)> {
    let body = m.body();
    let name_end = body.iter().position(|b| *b == 0)?;
    let name = String::from_utf8(body[..name_end].to_vec()).ok()?;
    let rest = body.get(name_end + 1..)?;
    let q_end = rest.iter().position(|b| *b == 0)?;
    Some((name, String::from_utf8(rest[..q_end].to_vec()).ok()?))
}

/// RowDescription + DataRows + CommandComplete for a two-column text result.
pub fn text_result(columns: &[&str], rows: &[Vec<String>], tag: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let mut body = BytesMut::new();
    body.put_i16(columns.len() as i16);
    for c in columns {
        body.put_slice(c.as_bytes());
        body.put_u8(0);
        body.put_i32(0); // table oid
        body.put_i16(0); // column
        body.put_i32(25); // text
        body.put_i16(-1);
        body.put_i32(-1);
        body.put_i16(0); // text format
    }
    frame_into(&mut out, b'T', &body);
    for row in rows {
        let mut body = BytesMut::new();
        body.put_i16(row.len() as i16);
        for v in row {
            body.put_i32(v.len() as i32);
            body.put_slice(v.as_bytes());
        }
        frame_into(&mut out, b'D', &body);
    }
    let mut cc = BytesMut::new();
    cc.put_slice(tag.as_bytes());
    cc.put_u8(0);
    frame_into(&mut out, b'C', &cc);
    out
}

fn frame_into(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn subscribe_commands() {
        assert_eq!(subscribe_command("POSTAI SUBSCRIBE"), Some(Ok(None)));
        assert_eq!(subscribe_command(" postai  subscribe ;"), Some(Ok(None)));
        assert_eq!(subscribe_command("POSTAI SUBSCRIBE FROM '0/16B3748'"), Some(Ok(Some(Lsn(0x16B3748)))));
        assert!(matches!(subscribe_command("POSTAI SUBSCRIBE FROM 0/1"), Some(Err(_))));
        assert!(matches!(subscribe_command("POSTAI SUBSCRIBE FROM 'x'"), Some(Err(_))));
        assert!(matches!(subscribe_command("POSTAI SUBSCRIBE ME"), Some(Err(_))));
        assert_eq!(subscribe_command("SELECT 1"), None);
        assert_eq!(subscribe_command("POSTAI"), None);
    }

    #[test]
    fn startup_parameters_become_settings() {
        let (s, opaque) = startup_settings(&p(&[
            ("user", "app"),
            ("database", "db"),
            ("DateStyle", "ISO"),
            ("options", "-c search_path=s2  -crole=bob --extra-float-digits=3 -c x=a\\ b"),
        ]));
        assert!(!opaque);
        assert_eq!(
            s,
            p(&[
                ("datestyle", "ISO"),
                ("search_path", "s2"),
                ("role", "bob"),
                ("extra_float_digits", "3"),
                ("x", "a b")
            ])
        );
        let (_, opaque) = startup_settings(&p(&[("options", "-c")]));
        assert!(opaque, "an option without a setting");
        let (_, opaque) = startup_settings(&p(&[("options", "-f s")]));
        assert!(opaque, "an option that is not a setting");
    }
}

//! One task per client connection: startup and authentication are relayed to
//! the primary as they are (the primary authenticates); simple queries go
//! through the core (cache hit, or relay and fill); the extended protocol is
//! relayed as is, and the upstream transaction status keeps the core honest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use postai_core::cache::{Eviction, TierConfig, TierName};
use postai_core::consistency::Consistency;
use postai_core::invalidation::VersionMapConfig;
use postai_core::node::{
    EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Prepared, Served, SessionId, UpstreamReply,
};
use postai_core::router::Zone;
use postai_core::sql::{AnalyzerConfig, Catalog, StatementKind, TxnControl};
use postai_core::{Duration, Instant, Lsn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::protocol::{self, FRONTEND_TAGS, Message, Startup};
use crate::upstream::{Conn, error_message};

/// A cached result: the encoded backend messages, ReadyForQuery excluded.
pub type Value = Arc<[u8]>;

/// State shared by every connection.
pub struct Proxy {
    pub config: Config,
    pub node: Mutex<EdgeNode<Value>>,
    /// Highest `pg_current_wal_lsn()` seen: a lower bound of any later snapshot.
    pub lsn_seen: AtomicU64,
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
        };
        let node = EdgeNode::new(node_config, catalog, Lsn(0))?;
        Ok(Arc::new(Proxy {
            config,
            node: Mutex::new(node),
            lsn_seen: AtomicU64::new(0),
            next_session: AtomicU64::new(1),
            start: std::time::Instant::now(),
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
        ];
        for t in [TierName::L1, TierName::L2] {
            if let Some(tier) = n.tier(t) {
                let ts = tier.stats();
                rows.push((format!("{t:?}_entries").to_lowercase(), ts.entries.to_string()));
                rows.push((format!("{t:?}_invalidations").to_lowercase(), ts.invalidations.to_string()));
            }
        }
        rows
    }
}

/// Accepts clients until the listener fails.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let p = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = Client::run(p, socket).await {
                // one client's failure never stops the proxy
                eprintln!("postai-edge: client: {e}");
            }
        });
    }
}

struct Client {
    proxy: Arc<Proxy>,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    out: BytesMut,
    up: Conn,
    session: SessionId,
    /// Transaction status of the last ReadyForQuery from upstream.
    status: u8,
    /// The extended protocol ran a statement that may write.
    extended_write: bool,
    /// Prepared statements by name, as analysed by the core.
    statements: std::collections::HashMap<String, Prepared>,
    /// A Parse of the unnamed statement answered from the cache, not yet sent.
    unsent_unnamed_parse: Option<Message>,
    /// ParseComplete messages the client must not see (for re-sent Parses).
    swallow_parse_complete: u32,
}

struct CacheableExec {
    prepared: Prepared,
    params: Vec<Option<Vec<u8>>>,
    parsed_unnamed: Option<Message>,
}

const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];
const BIND_COMPLETE: [u8; 5] = [b'2', 0, 0, 0, 4];

struct Bind {
    portal: String,
    statement: String,
    binary_params: bool,
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
    let mut binary_params = false;
    for _ in 0..nformats.max(0) {
        binary_params |= i16_at(&mut at)? != 0;
    }
    let nparams = i16_at(&mut at)?;
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
    Some(Bind { portal, statement, binary_params, params, result_formats })
}

impl Client {
    async fn run(proxy: Arc<Proxy>, socket: TcpStream) -> anyhow::Result<()> {
        let max = proxy.config.max_message_bytes;
        let (mut rd, mut wr) = socket.into_split();
        let mut buf = BytesMut::with_capacity(8 << 10);
        let params = loop {
            match protocol::decode_startup(&mut buf, max) {
                Ok(Some(Startup::Params(p))) => break p,
                Ok(Some(Startup::Ssl | Startup::GssEnc)) => wr.write_all(b"N").await?,
                Ok(Some(Startup::Cancel { pid, key })) => {
                    let mut c = Conn::connect(&proxy.config.upstream, max).await?;
                    let mut m = BytesMut::with_capacity(16);
                    m.put_i32(16);
                    m.put_i32(protocol::CANCEL_REQUEST);
                    m.put_i32(pid);
                    m.put_i32(key);
                    c.send(&m).await?;
                    return Ok(());
                }
                Ok(None) => {
                    if rd.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                Err(e) => {
                    wr.write_all(&protocol::error_response("FATAL", "08P01", &e.to_string())).await?;
                    return Ok(());
                }
            }
        };
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = param("user").unwrap_or_default();
        let database = param("database").unwrap_or_else(|| user.clone());
        let mut up = match Conn::connect(&proxy.config.upstream, max).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("postai-edge: upstream {} unreachable: {e}", proxy.config.upstream);
                wr.write_all(&protocol::error_response("FATAL", "08006", &msg)).await?;
                return Ok(());
            }
        };
        up.send(&protocol::startup(&params)).await?;
        let session = SessionId(proxy.next_session.fetch_add(1, Ordering::Relaxed));
        let mut c = Client {
            proxy,
            rd,
            wr,
            buf,
            out: BytesMut::with_capacity(16 << 10),
            up,
            session,
            status: b'I',
            extended_write: false,
            statements: std::collections::HashMap::new(),
            unsent_unnamed_parse: None,
            swallow_parse_complete: 0,
        };
        if !c.relay_login().await? {
            return Ok(());
        }
        let opened = c.proxy.node().open_session(session, &user, &database, Consistency::ReadYourWrites);
        if let Err(e) = opened {
            c.wr.write_all(&protocol::error_response("FATAL", "53300", &e.to_string())).await?;
            return Ok(());
        }
        let result = c.serve_queries().await;
        c.proxy.node().close_session(session);
        result
    }

    /// Relays authentication both ways until the primary is ready.
    async fn relay_login(&mut self) -> anyhow::Result<bool> {
        loop {
            let m = self.up.recv().await?;
            self.wr.write_all(&m.raw).await?;
            match m.tag {
                b'Z' => return Ok(true),
                b'E' => return Ok(false),
                b'R' if m.body().get(..4).is_some_and(|c| c != [0, 0, 0, 0] && c != [0, 0, 0, 12]) => {
                    // a password, SASL initial or SASL response from the client
                    if matches!(m.body().get(..4), Some([0, 0, 0, 3 | 5 | 10 | 11])) {
                        let Some(p) = self.client_message().await? else { return Ok(false) };
                        self.up.send(&p.raw).await?;
                    }
                }
                _ => {}
            }
        }
    }

    async fn client_message(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            match protocol::decode(&mut self.buf, self.proxy.config.max_message_bytes, FRONTEND_TAGS) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {
                    if self.rd.read_buf(&mut self.buf).await? == 0 {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    // framing is lost: tell the client and close its connection only
                    self.wr.write_all(&protocol::error_response("FATAL", "08P01", &e.to_string())).await?;
                    return Ok(None);
                }
            }
        }
    }

    async fn serve_queries(&mut self) -> anyhow::Result<()> {
        let mut batch: Vec<Message> = Vec::new();
        while let Some(m) = self.client_message().await? {
            match m.tag {
                b'Q' => {
                    self.flush_batch(&mut batch).await?;
                    self.simple_query(&m).await?
                }
                b'X' => {
                    let _ = self.up.send(&m.raw).await;
                    return Ok(());
                }
                b'S' => {
                    self.sync(std::mem::take(&mut batch), m).await?;
                    if self.extended_write {
                        self.extended_write = false;
                        self.after_extended_write().await?;
                    }
                }
                b'H' => {
                    // Flush: the client waits for the responses so far
                    let sent = std::mem::take(&mut batch);
                    self.send_batch(&sent).await?;
                    self.up.send(&m.raw).await?;
                    self.relay_responses(&sent).await?;
                }
                b'P' => {
                    if let Some((name, sql)) = parse_message(&m) {
                        let prepared = self.proxy.node().prepare(&sql).ok();
                        // a statement that may write: this session's later cached
                        // reads must reflect it
                        self.extended_write |= prepared.as_ref().is_none_or(|p| p.shape.kind != StatementKind::Read);
                        match prepared {
                            Some(p) => {
                                self.statements.insert(name, p);
                            }
                            None => {
                                self.statements.remove(&name);
                            }
                        }
                    }
                    batch.push(m);
                }
                b'd' | b'c' | b'f' => {
                    self.flush_batch(&mut batch).await?;
                    self.up.send(&m.raw).await?
                }
                _ => batch.push(m),
            }
        }
        Ok(())
    }

    /// Sends a batch upstream, first re-sending an unnamed statement that a
    /// cache hit answered without the primary (its ParseComplete is swallowed).
    async fn send_batch(&mut self, batch: &[Message]) -> anyhow::Result<()> {
        if let Some(parse) = self.unsent_unnamed_parse.take() {
            let starts_with_own =
                batch.first().is_some_and(|m| m.tag == b'P' && parse_message(m).is_some_and(|(n, _)| n.is_empty()));
            if !starts_with_own {
                self.up.send(&parse.raw).await?;
                self.swallow_parse_complete += 1;
            }
        }
        self.out.clear();
        for m in batch {
            self.out.extend_from_slice(&m.raw);
        }
        let out = std::mem::take(&mut self.out);
        self.up.send(&out).await?;
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
        self.send_batch(batch).await?;
        self.up.send(&sync.raw).await?;
        self.relay_until_ready(keep).await
    }

    async fn flush_batch(&mut self, batch: &mut Vec<Message>) -> anyhow::Result<()> {
        if !batch.is_empty() {
            let b = std::mem::take(batch);
            self.send_batch(&b).await?;
        }
        Ok(())
    }

    /// Relays the responses to `sent` after a Flush: one completion per request
    /// (an error ends them: the primary skips the rest until Sync).
    async fn relay_responses(&mut self, sent: &[Message]) -> anyhow::Result<()> {
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
                let m = self.up.recv().await?;
                if m.tag == b'1' && self.swallow_parse_complete > 0 {
                    self.swallow_parse_complete -= 1;
                    continue;
                }
                self.wr.write_all(&m.raw).await?;
                if m.tag == b'E' {
                    return Ok(());
                }
                if done.contains(&m.tag) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Sync: answer a cacheable [Parse] Bind [Describe] Execute batch from the
    /// cache, or send the batch and relay (filling the cache when it may).
    async fn sync(&mut self, batch: Vec<Message>, sync: Message) -> anyhow::Result<()> {
        let Some(exec) = self.cacheable_batch(&batch) else {
            return self.relay_batch(&batch, &sync, None).await.map(|_| ());
        };
        let (out, snapshot) = self.ask_node(|n, now, session| {
            let params: Vec<Option<&[u8]>> = exec.params.iter().map(|p| p.as_deref()).collect();
            n.handle_execute(now, session, &exec.prepared, &params);
        });
        match out {
            Some(NodeOutput::Reply { value, .. }) => {
                let mut out = BytesMut::with_capacity(value.len() + 16);
                if exec.parsed_unnamed.is_some() {
                    out.extend_from_slice(&PARSE_COMPLETE);
                }
                out.extend_from_slice(&BIND_COMPLETE);
                out.extend_from_slice(&value);
                out.extend_from_slice(&protocol::ready_for_query(self.status));
                self.wr.write_all(&out).await?;
                if let Some(p) = exec.parsed_unnamed {
                    // the primary never saw this Parse: re-send it before the
                    // unnamed statement is used upstream
                    self.unsent_unnamed_parse = Some(p);
                }
            }
            Some(NodeOutput::Upstream(u)) => {
                let keep = u.cache_key.map(|_| self.proxy.config.cache.entry_bytes_max);
                let (kept, error) = self.relay_batch(&batch, &sync, keep).await?;
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
                        Ok(primary_reply(Arc::from(&value[..]), snapshot, None))
                    }
                };
                self.finish(u.req, result);
            }
            Some(NodeOutput::Failed { .. }) | None => {
                self.relay_batch(&batch, &sync, None).await?;
            }
        }
        Ok(())
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
        if !bind.portal.is_empty() || bind.binary_params {
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
        let parsed_unnamed = match parse.and_then(parse_message) {
            Some((name, _)) if name != bind.statement => return None,
            Some((name, _)) if name.is_empty() => parse.cloned(),
            _ => None,
        };
        let prepared = self.statements.get(&bind.statement)?.clone();
        if !prepared.shape.is_cacheable() {
            return None;
        }
        let mut params: Vec<Option<Vec<u8>>> = bind.params;
        // what else changes the bytes of the answer: Describe, result formats
        let mut shape_of_answer = vec![u8::from(describe.is_some())];
        shape_of_answer.extend_from_slice(&bind.result_formats);
        params.push(Some(shape_of_answer));
        Some(CacheableExec { prepared, params, parsed_unnamed })
    }

    /// Gives the node one query (`ask`), the upstream transaction status first
    /// (it is the truth about transactions), and returns the node's answer with
    /// the snapshot lower bound taken before it.
    fn ask_node(&self, ask: impl FnOnce(&mut EdgeNode<Value>, Instant, SessionId)) -> (Option<NodeOutput<Value>>, Lsn) {
        let now = self.proxy.now();
        let snapshot = Lsn(self.proxy.lsn_seen.load(Ordering::Relaxed));
        let mut n = self.proxy.node();
        n.sync_transaction(self.session, self.status != b'I', snapshot);
        ask(&mut n, now, self.session);
        (n.poll_output(), snapshot)
    }

    /// Hands the upstream outcome of `req` to the node (fill or invalidate).
    fn finish(&self, req: postai_core::node::RequestId, result: Result<UpstreamReply<Value>, String>) {
        let now = self.proxy.now();
        let mut n = self.proxy.node();
        n.handle_upstream(now, req, result);
        while n.poll_output().is_some() {}
    }

    /// After the extended protocol ran a write: raise the session's floor to
    /// the primary's current LSN (read-your-writes for cached reads).
    async fn after_extended_write(&mut self) -> anyhow::Result<()> {
        if self.status != b'I' {
            return Ok(());
        }
        if let Some(lsn) = self.current_lsn().await? {
            let now = self.proxy.now();
            let mut n = self.proxy.node();
            n.raise_floor(self.session, lsn);
            n.sync_transaction(self.session, false, lsn);
            let _ = now;
        }
        Ok(())
    }

    async fn current_lsn(&mut self) -> anyhow::Result<Option<Lsn>> {
        let msgs = self.up.simple("SELECT pg_current_wal_lsn()::text").await?;
        let lsn = protocol::first_value(&msgs).and_then(|s| protocol::parse_lsn(&s)).map(Lsn);
        if let Some(l) = lsn {
            self.proxy.lsn_seen.fetch_max(l.0, Ordering::Relaxed);
        }
        Ok(lsn)
    }

    async fn simple_query(&mut self, m: &Message) -> anyhow::Result<()> {
        let sql = match protocol::query_text(m) {
            Ok(s) => s,
            Err(e) => {
                self.wr.write_all(&protocol::error_response("ERROR", "08P01", &e.to_string())).await?;
                self.wr.write_all(&protocol::ready_for_query(self.status)).await?;
                return Ok(());
            }
        };
        if let Some(rows) = self.admin(&sql) {
            self.wr.write_all(&rows).await?;
            self.wr.write_all(&protocol::ready_for_query(self.status)).await?;
            return Ok(());
        }
        if !self.proxy.config.cache.enabled {
            self.up.send(&m.raw).await?;
            self.relay_until_ready(None).await?;
            return Ok(());
        }
        let (out, snapshot) = self.ask_node(|n, now, session| {
            n.handle_simple_query(now, session, &sql);
        });
        match out {
            Some(NodeOutput::Reply { value, .. }) => {
                self.out.clear();
                self.out.extend_from_slice(&value);
                self.out.extend_from_slice(&protocol::ready_for_query(self.status));
                self.wr.write_all(&self.out).await?;
            }
            Some(NodeOutput::Upstream(u)) => {
                self.up.send(&m.raw).await?;
                let keep = u.cache_key.map(|_| self.proxy.config.cache.entry_bytes_max);
                let (kept, error) = self.relay_until_ready(keep).await?;
                let shape = u.shape.clone();
                let wrote = !shape.writes.is_empty() || shape.writes_unknown || shape.txn == Some(TxnControl::Commit);
                let commit_lsn =
                    if error.is_none() && wrote && self.status == b'I' { self.current_lsn().await? } else { None };
                let result = match error {
                    Some(e) => Err(e),
                    None => {
                        let value: Value = kept.map(|b| Arc::from(&b[..])).unwrap_or_else(|| Arc::from(&[][..]));
                        Ok(primary_reply(value, snapshot, commit_lsn))
                    }
                };
                self.finish(u.req, result);
            }
            Some(NodeOutput::Failed { error, .. }) => {
                self.wr.write_all(&protocol::error_response("ERROR", "53300", &error.to_string())).await?;
                self.wr.write_all(&protocol::ready_for_query(self.status)).await?;
            }
            None => {}
        }
        Ok(())
    }

    /// Relays upstream messages to the client until ReadyForQuery (relaying
    /// COPY data from the client in between). Keeps a copy of the messages,
    /// ReadyForQuery excluded, while they fit in `keep` bytes. Returns the
    /// copy and the first error's message.
    async fn relay_until_ready(&mut self, keep: Option<usize>) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        let mut kept = keep.map(|_| BytesMut::new());
        let mut error = None;
        self.out.clear();
        loop {
            let m = self.up.recv().await?;
            if m.tag == b'1' && self.swallow_parse_complete > 0 {
                self.swallow_parse_complete -= 1;
                continue;
            }
            self.out.extend_from_slice(&m.raw);
            match m.tag {
                b'Z' => {
                    self.status = protocol::ready_status(&m).unwrap_or(b'I');
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
                    self.wr.write_all(&self.out).await?;
                    self.out.clear();
                    kept = None;
                    while let Some(c) = self.client_message().await? {
                        self.up.send(&c.raw).await?;
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
                self.wr.write_all(&self.out).await?;
                self.out.clear();
            }
        }
    }

    /// `SHOW POSTAI STATS`: answered by the proxy.
    fn admin(&self, sql: &str) -> Option<BytesMut> {
        let norm: String =
            sql.trim().trim_end_matches(';').split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
        if norm != "show postai stats" {
            return None;
        }
        let rows = self.proxy.stats_rows();
        Some(text_result(&["name", "value"], &rows, "SHOW"))
    }
}

/// What the primary answered, for the node: the encoded messages it sent.
fn primary_reply(value: Value, snapshot: Lsn, commit_lsn: Option<Lsn>) -> UpstreamReply<Value> {
    let size_bytes = u32::try_from(value.len()).unwrap_or(u32::MAX);
    UpstreamReply { value, size_bytes, served: Served::Primary, snapshot_lsn: snapshot, commit_lsn, ttl: None }
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
pub fn text_result(columns: &[&str], rows: &[(String, String)], tag: &str) -> BytesMut {
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
    for (a, b) in rows {
        let mut body = BytesMut::new();
        body.put_i16(2);
        for v in [a, b] {
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

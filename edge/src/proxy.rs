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
use postai_core::node::{EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Route, Served, SessionId, UpstreamReply};
use postai_core::router::{EndpointId, Zone};
use postai_core::sql::{AnalyzerConfig, Catalog, Shape, StatementKind, TxnControl};
use postai_core::{Duration, Instant, Lsn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::frontend::{self, ClientStream, Opening};
use crate::metrics::{Metrics, Path};
use crate::pool::{Lease, Pool, PoolError, PoolKey};
use crate::protocol::{self, Message};
use crate::topology::Topology;
use crate::upstream::{self, Conn, error_message};
use postai_wire::messages::*;
use postai_wire::pooled::pins_session;
use postai_wire::protocol::frame_into;
use postai_wire::{CacheableExec, Kept, Session};

mod accept;
mod admin;
pub mod cancel;
mod explain;
mod exporter;
mod extended;
mod input;
mod pooled;
mod queries;
mod replica;
mod session;
mod simple;
mod state;
mod stream;
mod wire;

pub use accept::{EventLoops, serve, serve_on};
pub use cancel::CancelTarget;
use replica::*;
pub use state::Proxy;
use stream::*;
pub use wire::text_result;
use wire::*;

pub use crate::Value;

struct Client {
    proxy: Arc<Proxy>,
    rd: ReadHalf<ClientStream>,
    wr: WriteHalf<ClientStream>,
    buf: BytesMut,
    out: BytesMut,
    upstream: Upstream,
    session: SessionId,
    /// The session's protocol state (`postai_wire::session`): prepared
    /// statements, swallowed responses, transaction status, what the
    /// answers reflect.
    wire: Session,
    /// Connections to replicas, opened on the first read routed to each.
    replicas: ReplicaConns,
    /// The current relay has already written part of its answer to the client.
    flushed_mid: bool,
    /// The request may write: its ReadyForQuery is held back until the node
    /// has applied what it changed, so that no session (this one or
    /// another) starts a read after the acknowledgement that the node
    /// would still answer from before the write.
    hold_ready: bool,
    held_ready: Option<bytes::Bytes>,
    /// The topology's primary generation when the session connected to the
    /// primary (its own connection, or the pooled one it holds): past a
    /// failover it must not write there.
    primary_generation: u64,
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
        /// The client's `application_name` (set on each connection it borrows).
        app: String,
        password: Option<String>,
        /// Session state lives on the server connection: keep it.
        pinned: bool,
        /// Where a cancel request for this client goes while it holds a lease.
        cancel: Arc<CancelTarget>,
    },
}

/// Polls of CDC rows a subscriber may fall behind by before it is cut off
/// (it then subscribes again, and invalidates what it held).
/// The `application_name` of the proxy's own connections (health checks,
/// the catalog and change-stream readers, fencing): not its clients'.
pub const SERVICE_APPLICATION_NAME: &str = "postai-edge";

const CDC_FEED_DEPTH: usize = 1024;

impl Client {
    /// Gives the node one query (`ask`), the upstream transaction status first
    /// (it is the truth about transactions), and returns the node's answer.
    fn ask_node(&self, ask: impl FnOnce(&mut EdgeNode<Value>, Instant, SessionId)) -> Option<NodeOutput<Value>> {
        let now = self.proxy.now();
        let mut n = self.proxy.node();
        // under the node's lock: a failover forgets it under the same lock
        let snapshot = Lsn(self.proxy.lsn_seen.load(Ordering::Relaxed));
        n.sync_transaction(self.session, self.wire.status() != b'I', snapshot);
        if self.wire.status() == b'E' {
            // an aborted transaction: its COMMIT rolls back
            n.transaction_failed(self.session);
        }
        ask(&mut n, now, self.session);
        n.poll_output()
    }

    /// After the relay of `req`: what its answer reflects, the node told not
    /// to file it when it cannot be filed whole (`kept` is `None`) or at a
    /// known LSN.
    fn fill_snapshot(&mut self, req: postai_core::node::RequestId, kept: bool) -> Lsn {
        let at = self.wire.answers.at.take();
        if !kept || at.is_none() {
            self.proxy.node().skip_fill(req);
        }
        at.unwrap_or(Lsn(0))
    }

    /// Hands the upstream outcome of `req` to the node (fill or invalidate).
    fn finish(&self, req: postai_core::node::RequestId, result: Result<UpstreamReply<Value>, String>) {
        let now = self.proxy.now();
        let mut n = self.proxy.node();
        if self.proxy.topology().primary_generation() != self.primary_generation {
            // answered by a primary a failover has replaced since this session
            // connected (the check at the request's start raced with it)
            n.skip_fill(req);
        }
        let l2_file = self.proxy.l2_file.as_ref().map(|f| (f, f.before_upstream(&n, req)));
        n.handle_upstream(now, req, result);
        while n.poll_output().is_some() {}
        if let Some((f, before)) = l2_file {
            // queued under the node's lock, ordered with CDC invalidations
            f.after_upstream(&n, self.session, now, before);
        }
    }

    fn pooled(&self) -> bool {
        matches!(self.upstream, Upstream::Pooled { .. })
    }

    /// The session's server connection is to a primary the failover has
    /// fenced since (its own connection, or a pooled one it holds): nothing
    /// may be written or acknowledged there any more.
    fn on_old_primary(&self) -> bool {
        let connected = match &self.upstream {
            Upstream::Dedicated(_) => true,
            Upstream::Pooled { lease, .. } => lease.is_some(),
        };
        connected && self.proxy.topology().primary_generation() != self.primary_generation
    }

    /// The server connection, leased from the pool first when pooling.
    async fn up(&mut self) -> anyhow::Result<&mut Conn> {
        if let Upstream::Pooled { lease, key, app, password, cancel, .. } = &mut self.upstream
            && lease.is_none()
        {
            let pool = self.proxy.pool.as_ref().ok_or_else(|| anyhow::anyhow!("transaction pooling without a pool"))?;
            // after a failover the primary is elsewhere; the generation says
            // which topology lent this connection (see `on_old_primary`)
            (key.addr, self.primary_generation) = {
                let t = self.proxy.topology();
                (t.primary_addr(), t.primary_generation())
            };
            let wait = self.proxy.config.pool.wait_ms;
            let mut l = Box::new(pool.acquire(key, password.as_deref(), wait).await?);
            l.server.run_as(app).await?;
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
    /// session machine decides; the pool learns what a clean batch prepared).
    fn swallowed(&mut self, m: &Message) -> bool {
        let server = match &mut self.upstream {
            Upstream::Pooled { lease: Some(l), .. } => Some(&mut l.server.prepared),
            _ => None,
        };
        let swallow = self.wire.handle_backend(m, server);
        if m.tag == b'Z' {
            let learned = self.wire.take_learned();
            if let (Some(pool), Upstream::Pooled { key, .. }) = (&self.proxy.pool, &self.upstream) {
                pool.learn(key, learned);
            }
        }
        swallow
    }

    /// After a request: what the extended protocol ran outside the node's
    /// view is applied to the session (settings, privacy), and a write it
    /// made raises the session's floor once no transaction is open.
    /// Sends a ReadyForQuery held back for a write (see `hold_ready`): the
    /// node has applied the write by now.
    async fn release_ready(&mut self) -> anyhow::Result<()> {
        self.hold_ready = false;
        if let Some(z) = self.held_ready.take() {
            if self.proxy.topology().primary_generation() != self.primary_generation {
                // the write ran on a primary fenced meanwhile (a pooled
                // connection is given back already, so its lease is not
                // asked): a failover may drop it, so it is not acknowledged
                anyhow::bail!("the primary changed during this request (failover): its outcome is unknown; reconnect");
            }
            self.wr.write_all(&z).await?;
        }
        Ok(())
    }

    async fn settle(&mut self) -> anyhow::Result<()> {
        let settled = self.wire.take_settled();
        if !settled.reported.is_empty() {
            let mut n = self.proxy.node();
            for (name, value) in settled.reported {
                self.admin.note_parameter(&name, &value);
                // the role comes from the commands that set it (a report of
                // session_authorization alone would forget a SET ROLE)
                if !matches!(name.as_str(), "session_authorization" | "is_superuser") {
                    n.report_parameter(self.session, &name, &value);
                }
            }
        }
        if !settled.relayed.is_empty() || settled.overflow {
            for p in &settled.relayed {
                self.note_session_state(&p.shape);
                // (whether it succeeded is not known: forgetting a statement
                // the server still has only makes its Binds private)
                self.note_prepared_changes(&p.shape);
                if p.shape.writes_unknown || p.shape.kind == StatementKind::Ddl {
                    self.proxy.ddl_ran();
                }
            }
            let mut n = self.proxy.node();
            for p in settled.relayed {
                n.note_relayed(self.session, &p, settled.certain);
            }
            if settled.overflow {
                n.make_private(self.session);
            }
        }
        if self.wire.take_extended_write() {
            self.after_extended_write().await?;
        }
        self.release_idle();
        Ok(())
    }

    /// After the extended protocol ran a write: raise the session's floor to
    /// the primary's current LSN (read-your-writes for cached reads).
    async fn after_extended_write(&mut self) -> anyhow::Result<()> {
        if self.wire.status() != b'I' {
            return Ok(());
        }
        let lsn = self.current_lsn().await?;
        // that simple query dropped the client's unnamed statement: it is
        // prepared again before the client's next batch
        if !self.pooled()
            && let Some(p) = self.wire.parse_of("").cloned()
        {
            self.wire.defer_parse(p);
        }
        if let Some(lsn) = lsn {
            let mut n = self.proxy.node();
            n.unseen_write(self.session, lsn);
            n.sync_transaction(self.session, false, lsn);
        }
        Ok(())
    }

    /// A simple query of the proxy's own on the session's connection (it
    /// drops the unnamed statement there: a pooled one is prepared again
    /// when next bound). Every name in it must be schema-qualified: the
    /// session's search_path and temporary objects are the client's.
    async fn own_query(&mut self, sql: &str) -> anyhow::Result<Vec<Message>> {
        let msgs = self.up().await?.simple(sql).await?;
        if let Upstream::Pooled { lease: Some(l), .. } = &mut self.upstream {
            l.server.prepared.unnamed = None;
        }
        Ok(msgs)
    }

    /// [`Self::own_query`] in the extended protocol (Parse, Bind, Execute,
    /// Sync of the unnamed statement): one statement, or PostgreSQL's error.
    async fn own_extended(&mut self, sql: &str) -> anyhow::Result<Vec<Message>> {
        let mut out = BytesMut::with_capacity(sql.len() + 64);
        frame_into(&mut out, b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat());
        frame_into(&mut out, b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
        frame_into(&mut out, b'E', &[0, 0, 0, 0, 0]);
        frame_into(&mut out, b'S', &[]);
        let up = self.up().await?;
        up.send(&out).await?;
        let mut msgs = Vec::new();
        loop {
            let m = up.recv().await?;
            let done = m.tag == b'Z';
            msgs.push(m);
            if done {
                break;
            }
        }
        if let Upstream::Pooled { lease: Some(l), .. } = &mut self.upstream {
            l.server.prepared.unnamed = None;
        }
        Ok(msgs)
    }

    async fn current_lsn(&mut self) -> anyhow::Result<Option<Lsn>> {
        let msgs = self.own_query("SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text").await?;
        let lsn = protocol::first_value(&msgs).and_then(|s| protocol::parse_lsn(&s)).map(Lsn);
        if let Some(l) = lsn {
            self.proxy.saw_primary_lsn(self.primary_generation, l);
        }
        Ok(lsn)
    }

    /// Relays upstream messages to the client until ReadyForQuery (relaying
    /// COPY data from the client in between). Keeps a copy of the answer
    /// while it fits in `keep` bytes ([`Kept`]). Returns the copy and the
    /// first error's message.
    async fn relay_until_ready(&mut self, keep: Option<usize>) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        let mut kept = Kept::new(keep);
        self.out.clear();
        self.flushed_mid = false;
        let tells = self.up().await?.tells_lsn;
        self.wire.answers.start(tells);
        loop {
            let m = self.up().await?.recv().await?;
            if self.swallowed(&m) {
                continue;
            }
            if m.tag == b'Z' {
                let at = self.wire.answers.end();
                self.wire.answers.tell(&mut self.out, at);
            }
            self.out.extend_from_slice(&m.raw);
            kept.handle(&m);
            match m.tag {
                b'Z' => {
                    if self.hold_ready {
                        // sent by `release_ready`, after the node applied the write
                        self.out.truncate(self.out.len() - m.raw.len());
                        self.held_ready = Some(m.raw.clone());
                    }
                    self.wr.write_all(&self.out).await?;
                    self.out.clear();
                    return Ok(kept.finish());
                }
                // COPY FROM STDIN: the client's data goes to the primary
                b'G' => {
                    self.copy_in(false).await?;
                }
                _ => {}
            }
            if self.out.len() > 64 << 10 {
                self.flushed_mid = true;
                self.wr.write_all(&self.out).await?;
                self.out.clear();
            }
        }
    }

    /// COPY FROM STDIN: the client's messages go to the server up to
    /// CopyDone or CopyFail (and, in the extended protocol, the Sync after
    /// it, which the server waits for). `unsynced`: begun by messages sent
    /// without a Sync, it goes on to the Sync or Flush after CopyDone (the
    /// server answers the COPY only then; one before CopyDone it ignores,
    /// as libpq's). The tag of the last message sent.
    async fn copy_in(&mut self, unsynced: bool) -> anyhow::Result<u8> {
        self.flushed_mid = true;
        self.wr.write_all(&self.out).await?;
        self.out.clear();
        let mut done = false;
        loop {
            let Some(c) = self.client_message().await? else {
                // the server would wait for the rest forever
                anyhow::bail!("the client left during COPY FROM STDIN");
            };
            self.up().await?.send(&c.raw).await?;
            done |= matches!(c.tag, b'c' | b'f');
            let ends = match unsynced {
                true => done && matches!(c.tag, b'S' | b'H'),
                false => self.wire.copy_ends(done, c.tag),
            };
            if ends {
                return Ok(c.tag);
            }
        }
    }

    /// An ErrorResponse and ReadyForQuery: the statement failed, the session goes on.
    async fn refuse(&mut self, code: &str, message: &str) -> std::io::Result<()> {
        self.wr.write_all(&protocol::error_response("ERROR", code, message)).await?;
        self.wr.write_all(&protocol::ready_for_query(self.wire.status())).await
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

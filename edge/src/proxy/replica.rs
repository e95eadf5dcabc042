//! Reads on replica connections: the session's replica connections and the
//! settings they replay, a cacheable batch rewritten for a replica, the
//! read itself (cancel requests redirected while it runs).

use super::*;

/// A session's replica connections, and what they need to match its primary
/// connection.
#[derive(Default)]
pub(super) struct ReplicaConns {
    pub(super) conns: Vec<(EndpointId, Conn)>,
    /// The startup parameters the client logged in with.
    pub(super) login: Vec<(String, String)>,
    /// The password the proxy logs in upstream with, for this user.
    pub(super) password: Option<String>,
    /// SET/RESET statements the session ran, replayed on each new connection.
    pub(super) settings: Vec<bytes::Bytes>,
    /// Session state a replica connection cannot reproduce (a SET inside a
    /// transaction or through the extended protocol): primary only.
    pub(super) pinned: bool,
}

impl ReplicaConns {
    /// Settings replayed on a replica connection at most: more pins the session.
    pub(super) const SETTINGS_MAX: usize = 64;

    /// The session ran a SET/RESET/DISCARD: future replica connections must
    /// replay it, the open ones do not have it.
    /// Returns how many open connections it dropped.
    pub(super) fn setting(&mut self, query: &Message, outside_transaction: bool) -> usize {
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

impl Client {
    /// A cacheable batch as a replica runs it: the statement as an unnamed
    /// Parse (the replica connection has not prepared it), the Bind re-pointed
    /// at it, the rest as sent, and Sync. `None` without replicas.
    pub(super) fn replica_request(&self, batch: &[Message], statement: &str, sync: &Message) -> Option<BytesMut> {
        if self.proxy.config.replicas.is_empty() || self.replicas.pinned {
            return None;
        }
        let rest = match batch.first() {
            Some(m) if m.tag == b'P' => &batch[1..],
            _ => batch,
        };
        let parse = batch.first().filter(|m| m.tag == b'P').or_else(|| self.wire.parse_of(statement))?;
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

    /// Runs a cacheable read (`request`, ending in Sync) on a replica that has
    /// replayed past `floor`, relaying its answer to the client. `None` when
    /// no replica is fresh enough or the replica failed before the client saw
    /// anything: the caller asks the primary. Otherwise the kept copy, the
    /// first error (what the answer reflects is in `answers`: the replica's
    /// replay LSN before the read).
    pub(super) async fn read_on_replica(
        &mut self,
        request: &[u8],
        keep: Option<usize>,
        floor: Option<Lsn>,
        swallow_parse: bool,
    ) -> anyhow::Result<Option<(Option<BytesMut>, Option<String>)>> {
        if self.wire.status() != b'I' || self.replicas.pinned || self.proxy.config.replicas.is_empty() {
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
            let app = application_name(&self.replicas.login).to_string();
            let password = self.replicas.password.as_deref();
            let lease = async {
                let mut l = pool.acquire(&key, password, wait).await?;
                l.server.run_as(&app).await?;
                anyhow::Ok(Some(Box::new(l)))
            };
            lease.await.map(|lease| {
                let cancel = Arc::new(Mutex::new(None));
                Upstream::Pooled { lease, key, app, password: None, pinned: true, cancel }
            })
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
        let _cancel = self
            .cancel_key
            .zip(backend)
            .map(|(key, (pid, secret))| cancel::Redirect::new(&self.proxy, key, (route.addr.clone(), pid, secret)));
        let saved_swallow = self.wire.swallow_parses(u32::from(swallow_parse));
        // the answer reflects at least what the replica had replayed before it
        self.wire.answers.floor = Some(route.replayed);
        let result = match self.up().await?.send(request).await {
            Ok(()) => self.relay_until_ready(keep).await,
            Err(e) => Err(e.into()),
        };
        self.wire.swallow_parses(saved_swallow);
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
                Ok(Some((kept, error)))
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
    pub(super) async fn open_replica(&mut self, addr: &str) -> anyhow::Result<Conn> {
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
}

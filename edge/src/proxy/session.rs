//! A client session from its start (TLS, authentication, the upstream
//! login, the session's settings and consistency) through its requests.

use super::*;

impl Client {
    pub(super) async fn run(proxy: Arc<Proxy>, socket: TcpStream) -> anyhow::Result<()> {
        // TLS, the StartupMessage and client authentication end at the proxy
        let accepted = match frontend::open(&proxy.config, &proxy.users(), socket).await? {
            Opening::Login(a) => a,
            // to the primary, or where the map sends the key (pooled, a replica read)
            Opening::Cancel { pid, key } => return cancel::forward(&proxy, pid, key).await,
            Opening::Closed => return Ok(()),
        };
        // the proxy logs in upstream on the client's behalf, with its own password
        let params = accepted.upstream_params();
        let tell = accepted.wants_answer_lsn();
        let frontend::Accepted { rd, mut wr, buf, user, database, upstream_password, auth_ok, .. } = *accepted;
        let session = SessionId(proxy.next_session.fetch_add(1, Ordering::Relaxed));
        // where writes go now, and which generation of the topology said so
        let (primary, primary_generation) = {
            let t = proxy.topology();
            (t.primary_addr(), t.primary_generation())
        };
        let opened = open_upstream(&proxy, session, &primary, &params, upstream_password.as_deref()).await;
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
            out: BytesMut::with_capacity(2 << 10),
            upstream,
            session,
            wire: Session::new(tell),
            replicas: ReplicaConns { login: params.clone(), password: upstream_password, ..ReplicaConns::default() },
            flushed_mid: false,
            primary_generation,
            hold_ready: false,
            held_ready: None,
            admin: admin::AdminState::new(&user),
            cancel_key: cancel::key_in(&greeting),
            between_requests: false,
            batch_held: None,
        };
        c.admin.note_greeting(&greeting);
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
        let mut greeting_out = BytesMut::from(&greeting[..]);
        if tell {
            // a postai proxy downstream: told what each answer reflects
            greeting_out.extend_from_slice(&protocol::parameter_status(protocol::ANSWER_LSN, "on"));
        }
        c.wr.write_all(&frontend::greeting(&auth_ok, &greeting_out, status)).await?;
        let opened = c.proxy.node().open_session(session, &user, &database, consistency);
        if let Err(e) = opened {
            c.wr.write_all(&protocol::error_response("FATAL", "53300", &e.to_string())).await?;
            return Ok(());
        }
        c.starting_state(&greeting, &settings, opaque);
        c.serve_and_close().await
    }

    /// The node's view of the session's starting state: what the server
    /// reported at login (standard_conforming_strings, TimeZone, DateStyle,
    /// ...), then the startup settings; private when `options` held
    /// something else.
    fn starting_state(&self, greeting: &[u8], settings: &[(String, String)], opaque: bool) {
        let mut n = self.proxy.node();
        let mut rest = BytesMut::from(greeting);
        while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
            if let Some((name, value)) = parameter_status(&m).filter(|_| m.tag == b'S')
                && !matches!(name.as_str(), "session_authorization" | "is_superuser")
            {
                n.set_session_setting(self.session, &name, &value);
            }
        }
        for (name, value) in settings {
            n.set_session_setting(self.session, name, value);
        }
        if opaque {
            n.make_private(self.session);
        }
    }

    /// Serves the session's requests, then closes it (a dead upstream or a
    /// full pool is told to the client first), its counters given back.
    async fn serve_and_close(&mut self) -> anyhow::Result<()> {
        self.proxy.metrics.clients.fetch_add(1, Ordering::Relaxed);
        self.proxy.metrics.clients_total.fetch_add(1, Ordering::Relaxed);
        self.proxy.metrics.upstream_connections.fetch_add(1, Ordering::Relaxed);
        let result = self.serve_queries().await;
        if let Err(e) = &result {
            // a dead upstream, a full pool: the client hears why before the end
            // (as PgBouncer's query_wait_timeout: the session ends)
            let code = if e.downcast_ref::<PoolError>().is_some() { "53300" } else { "08006" };
            let _ = self.wr.write_all(&protocol::error_response("FATAL", code, &format!("postai-edge: {e}"))).await;
        }
        self.proxy.node().close_session(self.session);
        if let Upstream::Pooled { cancel, .. } = &self.upstream {
            self.proxy.cancels.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, t| !Arc::ptr_eq(t, cancel));
        }
        let m = &self.proxy.metrics;
        m.clients.fetch_sub(1, Ordering::Relaxed);
        m.upstream_connections.fetch_sub(1, Ordering::Relaxed);
        m.replica_connections.fetch_sub(self.replicas.conns.len() as u64, Ordering::Relaxed);
        result
    }

    pub(super) async fn serve_queries(&mut self) -> anyhow::Result<()> {
        let mut batch: Vec<Message> = Vec::new();
        // client messages: `proxy/input.rs`
        while let Some(m) = self.next_request(batch.is_empty()).await? {
            if matches!(m.tag, b'Q' | b'S' | b'H') && self.on_old_primary() {
                // its connection is to a primary that was fenced: a write there
                // could be acknowledged and then lost with the failover (a
                // pooled connection is dropped, never lent again)
                if let Upstream::Pooled { lease, .. } = &mut self.upstream {
                    drop(lease.take());
                }
                let e = "postai-edge: the primary changed (failover); reconnect";
                self.wr.write_all(&protocol::error_response("FATAL", "57P01", e)).await?;
                return Ok(());
            }
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
                    // (answered without the server: its Parses stand)
                    self.wire.answered_here();
                    self.settle().await?;
                    self.release_ready().await?;
                }
                b'H' => {
                    // Flush: the client waits for the responses so far
                    let sent = std::mem::take(&mut batch);
                    if self.admin_batch(&sent, &m).await?.is_some() {
                        continue;
                    }
                    // (the server's state is unknown until the next ReadyForQuery)
                    self.send_batch(&sent, Some(&m)).await?;
                    self.relay_responses(&sent).await?;
                    if !self.wire.unsynced() {
                        // a COPY FROM STDIN ended with the client's Sync:
                        // its ReadyForQuery waits until the write is applied
                        self.settle().await?;
                        self.release_ready().await?;
                    }
                }
                b'P' => {
                    if self.admin_parse(&m) {
                        // SHOW POSTAI ...: answered by the proxy (`proxy/admin.rs`)
                        batch.push(m);
                        continue;
                    }
                    let node = &self.proxy;
                    let prepared = self.wire.handle_parse(&m, |sql| node.node().prepare(sql).ok());
                    if prepared.is_some_and(|p| p.shape.kind == StatementKind::Session) {
                        // a SET a replica connection would not see
                        self.replicas.pinned = true;
                    }
                    batch.push(m);
                }
                b'C' => {
                    // Close of a statement: forget it (a portal close needs nothing)
                    self.wire.handle_close(&m);
                    batch.push(m);
                }
                // COPY data outside a COPY (the rest of one that failed):
                // PostgreSQL ignores it, and sent it would lease a pooled
                // server connection the client then holds
                b'd' | b'c' | b'f' => {}
                _ => batch.push(m),
            }
        }
        Ok(())
    }
}

/// The session's way upstream: under transaction pooling a pooled
/// connection's greeting with a cancel key of the proxy's (no server
/// connection yet: one is lent at the first request the cache does not
/// answer), else its own login to the primary. The greeting and the
/// transaction status to tell the client.
async fn open_upstream(
    proxy: &Arc<Proxy>,
    session: SessionId,
    primary: &str,
    params: &[(String, String)],
    upstream_password: Option<&str>,
) -> Result<(Upstream, BytesMut, u8), PoolError> {
    let Some(pool) = &proxy.pool else {
        return upstream::login(&proxy.dialer, primary, params, upstream_password)
            .await
            .map(|l| (Upstream::Dedicated(l.conn), l.greeting, l.status))
            .map_err(PoolError::Login);
    };
    let key = PoolKey::new(primary, params);
    let wait = proxy.config.pool.wait_ms;
    // the key's greeting once a login got one
    let g = match pool.greeting(&key) {
        Some(g) => g,
        None => {
            let lease = pool.acquire(&key, upstream_password, wait).await?;
            let g = lease.server.greeting.clone();
            lease.release();
            g
        }
    };
    let secret: i32 = rand::random();
    let pid = i32::try_from(session.0 & 0x7fff_ffff).unwrap_or(i32::MAX);
    let cancel = Arc::new(Mutex::new(None));
    proxy.cancels.lock().unwrap_or_else(|p| p.into_inner()).insert((pid, secret), cancel.clone());
    // the client's own application_name, not the last login's
    let app = application_name(params);
    let greeting = with_backend_key(&g, pid, secret, app);
    let password = upstream_password.map(str::to_string);
    let app = app.to_string();
    Ok((Upstream::Pooled { lease: None, key, app, password, pinned: false, cancel }, greeting, b'I'))
}

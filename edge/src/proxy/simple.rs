//! A simple query: answered by the proxy (admin commands, `POSTAI
//! SUBSCRIBE`), from the cache, by a replica, or relayed to the primary
//! and filed.

use postai_core::node::UpstreamRequest;

use super::*;

/// Whether a simple query may use the client's prepared statements (SQL's
/// EXECUTE, DEALLOCATE, PREPARE, DISCARD, EXPLAIN EXECUTE, or code run
/// from strings): the Parses the cache answered go to the server first.
fn uses_prepared(shape: &Shape) -> bool {
    shape.session_opaque || shape.text.split(' ').any(|w| matches!(w, "execute" | "deallocate" | "prepare" | "discard"))
}

/// Whether a statement of this shape may change what is stored (its
/// acknowledgement waits for the node to apply it).
fn may_write(shape: &Shape) -> bool {
    !shape.writes.is_empty() || shape.writes_unknown || shape.writes_opaque || shape.txn == Some(TxnControl::Commit)
}

impl Client {
    pub(super) async fn simple_query(&mut self, m: &Message) -> anyhow::Result<Path> {
        let sql = match protocol::query_text(m) {
            Ok(s) => s,
            Err(e) => {
                self.refuse("08P01", &e.to_string()).await?;
                return Ok(Path::Proxy);
            }
        };
        if self.proxy.config.cache.enabled && (!protocol::query_is_utf8(m) || self.wire.unsynced()) {
            return self.relay_opaque(m).await;
        }
        if let Some(from) = subscribe_command(&sql) {
            match from {
                Ok(from) => self.stream_cdc(from).await?,
                Err(e) => self.refuse("42601", &e).await?,
            }
            return Ok(Path::Proxy);
        }
        if let Some(query) = super::explain::explain_command(&sql) {
            let query = query.to_string();
            self.postai_explain(&query).await?;
            return Ok(Path::Proxy);
        }
        if super::queries::is_show_queries(&sql) {
            self.show_queries().await?;
            return Ok(Path::Proxy);
        }
        if let Some(rows) = self.admin(&sql).await? {
            self.wr.write_all(&rows).await?;
            self.wr.write_all(&protocol::ready_for_query(self.wire.status())).await?;
            return Ok(Path::Proxy);
        }
        if !self.proxy.config.cache.enabled {
            return self.relay_uncached(m, &sql).await;
        }
        let out = self.ask_node(|n, now, session| {
            n.handle_simple_query(now, session, &sql);
        });
        Ok(match out {
            Some(NodeOutput::Reply { value, served, lsn, .. }) => {
                self.out.clear();
                self.out.extend_from_slice(&value);
                self.wire.answers.tell(&mut self.out, Some(lsn));
                self.out.extend_from_slice(&protocol::ready_for_query(self.wire.status()));
                self.wr.write_all(&self.out).await?;
                path_of(served)
            }
            Some(NodeOutput::Upstream(u)) => self.query_upstream(m, u).await?,
            Some(NodeOutput::Failed { error, .. }) => {
                self.refuse("53300", &error.to_string()).await?;
                Path::Proxy
            }
            None => Path::Proxy,
        })
    }

    /// Text the analyzer cannot read as sent (another client encoding), or
    /// a query after extended-protocol messages not yet synced (the
    /// server's state is unknown): relayed, never cached, its effects
    /// unknown.
    async fn relay_opaque(&mut self, m: &Message) -> anyhow::Result<Path> {
        self.hold_ready = true;
        self.wire.answers.floor = Some(self.proxy.primary_answer_floor());
        // (its text cannot be read: it may use the client's statements)
        self.send_unsent_parses().await?;
        self.up().await?.send(&m.raw).await?;
        let (_, error) = self.relay_until_ready(None).await?;
        self.proxy.node().note_opaque(self.session, self.wire.status() != b'I');
        if error.is_none()
            && self.wire.status() == b'I'
            && let Some(lsn) = self.current_lsn().await?
        {
            self.proxy.node().unseen_write(self.session, lsn);
        }
        Ok(Path::Primary)
    }

    /// Parses the cache answered (held back from the server) are sent before
    /// a simple query, in a round trip of their own: SQL's EXECUTE,
    /// DEALLOCATE and PREPARE see the statements the client prepared.
    async fn send_unsent_parses(&mut self) -> anyhow::Result<()> {
        if !self.wire.has_unsent_parses() || self.pooled() {
            return Ok(());
        }
        let sync = Message { tag: b'S', raw: bytes::Bytes::from_static(&[b'S', 0, 0, 0, 4]) };
        self.send_batch(&[], Some(&sync)).await?;
        loop {
            let m = self.up().await?.recv().await?;
            // their ParseCompletes are swallowed; an error (the server
            // refused one) and the ReadyForQuery are the proxy's, not the
            // client's; what the server tells the client on its own (a
            // notification, a notice, a setting) goes to it
            if self.swallowed(&m) {
                continue;
            }
            match m.tag {
                b'Z' => return Ok(()),
                b'A' | b'N' | b'S' => self.wr.write_all(&m.raw).await?,
                _ => {}
            }
        }
    }

    /// `[cache] enabled = false`: relayed; pooling still sees session state.
    async fn relay_uncached(&mut self, m: &Message, sql: &str) -> anyhow::Result<Path> {
        if self.pooled() {
            let prepared = self.proxy.node().prepare(sql).ok();
            if let Some(p) = prepared {
                self.note_session_state(&p.shape);
            }
        }
        self.wire.answers.floor = Some(self.proxy.primary_answer_floor());
        self.up().await?.send(&m.raw).await?;
        let (_, error) = self.relay_until_ready(None).await?;
        if error.is_none() {
            let prepared = self.proxy.node().prepare(sql).ok();
            if let Some(p) = prepared {
                self.note_prepared_changes(&p.shape);
            }
        }
        Ok(Path::Primary)
    }

    /// What the node sends upstream: a fresh replica's answer for a
    /// cacheable read, else the primary's; the outcome handed back to the
    /// node (filed, or what it wrote invalidated) before a write is
    /// acknowledged.
    async fn query_upstream(&mut self, m: &Message, u: UpstreamRequest) -> anyhow::Result<Path> {
        let keep = u.cache_key.map(|_| self.proxy.config.cache.entry_bytes_max);
        // a write is acknowledged once the node has applied it (`finish`)
        self.hold_ready = may_write(&u.shape);
        let on_replica = match u.route {
            Route::Read { floor } if keep.is_some() => self.read_on_replica(&m.raw, keep, floor, false).await?,
            _ => None,
        };
        let was_idle = self.wire.status() == b'I';
        let (kept, error, served) = match on_replica {
            Some((kept, error)) => (kept, error, Served::Replica),
            None => {
                if uses_prepared(&u.shape) {
                    self.send_unsent_parses().await?;
                }
                self.note_session_state(&u.shape);
                if let Upstream::Pooled { lease: Some(l), .. } = &mut self.upstream {
                    // a simple query ends the unnamed statement
                    l.server.prepared.unnamed = None;
                }
                self.wire.answers.floor = Some(self.proxy.primary_answer_floor());
                self.up().await?.send(&m.raw).await?;
                let (kept, error) = self.relay_until_ready(keep).await?;
                if error.is_none() {
                    self.note_prepared_changes(&u.shape);
                }
                (kept, error, Served::Primary)
            }
        };
        let snapshot = self.fill_snapshot(u.req, kept.is_some());
        let shape = u.shape.clone();
        if shape.kind == StatementKind::Session && error.is_none() {
            let dropped = self.replicas.setting(m, was_idle && self.wire.status() == b'I');
            self.proxy.metrics.replica_connections.fetch_sub(dropped as u64, Ordering::Relaxed);
        }
        if error.is_none() && (shape.writes_unknown || shape.kind == StatementKind::Ddl) {
            // what relations and functions are may have changed
            self.proxy.ddl_ran();
        }
        let commit_lsn = if error.is_none() && may_write(&shape) && self.wire.status() == b'I' {
            self.current_lsn().await?
        } else {
            None
        };
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
        Ok(path_of(served))
    }
}

//! The extended protocol: batches sent upstream, relayed after a Flush, or
//! (a cacheable read) answered from the cache at Sync.

use super::*;

impl Client {
    /// Sends a batch (and `tail`, a Sync or Flush) upstream in one write,
    /// first re-sending statements that were answered without the primary
    /// (their ParseComplete is swallowed).
    pub(super) async fn send_batch(&mut self, batch: &[Message], tail: Option<&Message>) -> anyhow::Result<()> {
        // pooled: lease first, the batch is written for that server connection
        self.up().await?;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let server = match &mut self.upstream {
            Upstream::Pooled { lease: Some(l), .. } => Some(&mut l.server.prepared),
            _ => None,
        };
        let proxy = &self.proxy;
        self.wire.encode_batch(batch, tail, server, |p| proxy.node().current(p), &mut out);
        self.up().await?.send(&out).await?;
        self.out = out;
        Ok(())
    }

    /// Sends a batch and its Sync, relays the answers up to ReadyForQuery.
    pub(super) async fn relay_batch(
        &mut self,
        batch: &[Message],
        sync: &Message,
        keep: Option<usize>,
    ) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        // if the primary answers: its snapshot is at least what was seen before
        self.wire.answers.floor = Some(self.proxy.primary_answer_floor());
        self.send_batch(batch, Some(sync)).await?;
        // a batch that may write is acknowledged once `settle` has applied it
        self.hold_ready = self.wire.may_have_written();
        self.wire.relaying_batch(true);
        let relayed = self.relay_until_ready(keep).await;
        self.wire.relaying_batch(false);
        relayed
    }

    pub(super) async fn flush_batch(&mut self, batch: &mut Vec<Message>) -> anyhow::Result<()> {
        if !batch.is_empty() {
            let b = std::mem::take(batch);
            // (answered along with what follows: the server's state is unknown until then)
            self.send_batch(&b, None).await?;
        }
        Ok(())
    }

    /// Relays the responses to `sent` after a Flush: one completion per request
    /// (an error ends them: the primary skips the rest until Sync). Whether
    /// an error ended them.
    pub(super) async fn relay_responses(&mut self, sent: &[Message]) -> anyhow::Result<bool> {
        for req in sent {
            let Some(done) = postai_wire::session::completions(req) else { continue };
            loop {
                let m = self.up().await?.recv().await?;
                if self.swallowed(&m) {
                    continue;
                }
                self.wr.write_all(&m.raw).await?;
                if m.tag == b'E' {
                    return Ok(true);
                }
                if m.tag == b'G' {
                    // (what `out` holds was sent upstream, not to the client)
                    self.out.clear();
                    if self.copy_in(true).await? == b'S' {
                        // the server answers the COPY and the Sync together;
                        // the caller settles the write before its ReadyForQuery
                        self.hold_ready = self.wire.may_have_written();
                        self.relay_until_ready(None).await?;
                        return Ok(false);
                    }
                    // a Flush: the COPY's CommandComplete comes now
                    continue;
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
    pub(super) async fn sync(&mut self, batch: Vec<Message>, sync: Message) -> anyhow::Result<Path> {
        if let Some(path) = self.admin_batch(&batch, &sync).await? {
            return Ok(path);
        }
        if self.wire.unsynced() {
            // after a Flush the server may be in a transaction, or skipping
            // until this Sync after an error: it answers, nothing is cached
            return self.relay_batch(&batch, &sync, None).await.map(|_| Path::Primary);
        }
        if self.answer_known_parses(&batch).await? {
            return Ok(Path::Proxy);
        }
        let Some(exec) = self.cacheable_batch(&batch) else {
            return self.relay_batch(&batch, &sync, None).await.map(|_| Path::Primary);
        };
        let out = self.ask_node(|n, now, session| {
            let params: Vec<Option<&[u8]>> = exec.params.iter().map(|p| p.as_deref()).collect();
            n.handle_execute(now, session, &exec.prepared, &params);
        });
        let path = match out {
            Some(NodeOutput::Reply { value, served, lsn, .. }) => {
                let mut out = BytesMut::with_capacity(value.len() + 16);
                if exec.parse.is_some() {
                    out.extend_from_slice(&PARSE_COMPLETE);
                }
                out.extend_from_slice(&BIND_COMPLETE);
                out.extend_from_slice(&value);
                self.wire.answers.tell(&mut out, Some(lsn));
                out.extend_from_slice(&protocol::ready_for_query(self.wire.status()));
                self.wr.write_all(&out).await?;
                if let Some(p) = exec.parse.filter(|_| !self.pooled()) {
                    // the primary never saw this Parse: re-send it before the
                    // statement is used upstream (pooled: prepared when bound)
                    self.wire.defer_parse(p);
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
                let (kept, error, served) = match on_replica {
                    Some((kept, error)) => {
                        // (a Parse the replica refused is not the primary's to make)
                        if let Some(p) = exec.parse.filter(|_| !self.pooled() && error.is_none()) {
                            self.wire.defer_parse(p);
                        }
                        (kept, error, Served::Replica)
                    }
                    None => {
                        let (kept, error) = self.relay_batch(&batch, &sync, keep).await?;
                        (kept, error, Served::Primary)
                    }
                };
                let snapshot = self.fill_snapshot(u.req, kept.is_some());
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

    /// A batch the cache may answer ([`Session::cacheable_batch`]), as the
    /// current catalog sees its statement.
    pub(super) fn cacheable_batch(&self, batch: &[Message]) -> Option<CacheableExec> {
        if !self.proxy.config.cache.enabled {
            return None;
        }
        self.wire.cacheable_batch(batch, |p| self.proxy.node().current(p))
    }
}

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
    pub(super) async fn relay_batch(
        &mut self,
        batch: &[Message],
        sync: &Message,
        keep: Option<usize>,
    ) -> anyhow::Result<(Option<BytesMut>, Option<String>)> {
        // if the primary answers: its snapshot is at least what was seen before
        self.answers.floor = Some(self.proxy.primary_answer_floor());
        self.send_batch(batch, Some(sync)).await?;
        // a batch that may write is acknowledged once `settle` has applied it
        self.hold_ready = self.extended_write;
        self.extended_relay = true;
        let relayed = self.relay_until_ready(keep).await;
        self.extended_relay = false;
        relayed
    }

    pub(super) async fn flush_batch(&mut self, batch: &mut Vec<Message>) -> anyhow::Result<()> {
        if !batch.is_empty() {
            let b = std::mem::take(batch);
            self.send_batch(&b, None).await?;
            // answered along with what follows: the server's state is unknown until then
            self.unsynced = true;
        }
        Ok(())
    }

    /// Relays the responses to `sent` after a Flush: one completion per request
    /// (an error ends them: the primary skips the rest until Sync). Whether
    /// an error ended them.
    pub(super) async fn relay_responses(&mut self, sent: &[Message]) -> anyhow::Result<bool> {
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
    pub(super) async fn sync(&mut self, batch: Vec<Message>, sync: Message) -> anyhow::Result<Path> {
        if let Some(path) = self.admin_batch(&batch, &sync).await? {
            return Ok(path);
        }
        if self.unsynced {
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
                self.answers.tell(&mut out, Some(lsn));
                out.extend_from_slice(&protocol::ready_for_query(self.status));
                self.wr.write_all(&out).await?;
                if let Some(p) = exec.parse.filter(|_| !self.pooled()) {
                    // the primary never saw this Parse: re-send it before the
                    // statement is used upstream (pooled: prepared when bound)
                    self.defer_parse(p);
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
                            self.defer_parse(p);
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

    /// A batch the cache may answer: `[Parse] Bind [Describe portal] Execute`
    /// on the unnamed portal, text parameters, all rows, a cacheable read,
    /// outside a transaction.
    pub(super) fn cacheable_batch(&self, batch: &[Message]) -> Option<CacheableExec> {
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
}

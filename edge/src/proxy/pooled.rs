//! Transaction pooling: which statements pin a client to its server
//! connection, named statements on shared server connections, Parses
//! answered without a server.

use super::*;

impl Client {
    /// Pooling, between transactions: a batch of Parses of statements some
    /// server connection already prepared without error is answered here
    /// (each is prepared where it is bound). A client blocked on a Parse then
    /// needs no server connection: a synchronous prepare (pgbench -M
    /// prepared) cannot wait behind clients that wait for it.
    pub(super) async fn answer_known_parses(&mut self, batch: &[Message]) -> anyhow::Result<bool> {
        let (Some(pool), Upstream::Pooled { lease: None, key, .. }) = (&self.proxy.pool, &self.upstream) else {
            return Ok(false);
        };
        if batch.is_empty() || self.wire.status() != b'I' || self.wire.has_unsent_parses() {
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
        self.out.extend_from_slice(&protocol::ready_for_query(self.wire.status()));
        self.wr.write_all(&self.out).await?;
        Ok(true)
    }

    /// Pooling: session state the statement leaves on the server connection
    /// keeps it with this client.
    pub(super) fn note_session_state(&mut self, shape: &Shape) {
        if let Upstream::Pooled { pinned, .. } = &mut self.upstream {
            *pinned |= pins_session(shape);
        }
    }

    /// After a statement ran that changes the server's prepared statements
    /// (SQL's PREPARE, DEALLOCATE, DISCARD ALL, which share the protocol's
    /// namespace): a dedicated session forgets the client's statements it
    /// names; a pooled server connection that lost all of its statements
    /// forgets them (the client's go under names of the proxy's own there,
    /// which SQL does not reach). Called while the connection is held.
    pub(super) fn note_prepared_changes(&mut self, shape: &Shape) {
        let Some(change) = postai_wire::session::prepared_changes(shape) else { return };
        match &mut self.upstream {
            Upstream::Pooled { lease: Some(l), .. } if change == postai_wire::session::PreparedChange::All => {
                l.server.prepared.clear();
            }
            Upstream::Pooled { .. } => {}
            Upstream::Dedicated(_) => self.wire.forget(&change),
        }
    }

    /// Pooling: gives the server connection back between transactions.
    pub(super) fn release_idle(&mut self) {
        if self.wire.status() != b'I' || self.wire.unsynced() {
            return;
        }
        if let Upstream::Pooled { lease, pinned: false, cancel, .. } = &mut self.upstream
            && let Some(l) = lease.take()
        {
            l.release();
            *cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

//! A session's state as the node tracks it between requests: settings,
//! transactions, privacy, floors.

use super::*;

impl<V: Clone> EdgeNode<V> {
    /// The session ended; requests it left in flight (its driver gave up
    /// on them: a dead client, a pool timeout) are forgotten with it.
    pub fn close_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
        self.pending.retain(|_, p| p.session != id);
    }

    pub fn set_consistency(&mut self, id: SessionId, consistency: Consistency) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.consistency = consistency;
        }
    }

    /// The upstream connection's transaction status (ReadyForQuery) is the
    /// ground truth: a transaction opened or closed by a path the node did not
    /// analyse (the extended protocol relayed as is) is synchronised here.
    /// Ending a transaction applies its pending changes at `lsn`.
    pub fn sync_transaction(&mut self, id: SessionId, in_txn: bool, lsn: Lsn) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if s.in_txn == in_txn {
            return;
        }
        s.in_txn = in_txn;
        if !in_txn {
            // committed or rolled back by a path the node did not see
            s.end_transaction(None);
            let targets = std::mem::take(&mut s.txn_targets);
            if !targets.is_empty() {
                s.last_write = s.last_write.max(lsn);
                self.acknowledged = self.acknowledged.max(lsn);
                self.versions.apply(&Change { lsn, targets });
            }
            if std::mem::take(&mut s.txn_opaque) {
                self.opaque_write(id, lsn);
            }
        }
    }

    /// The session wrote, at `lsn`, rows or tables the statement did not
    /// name: its reads must not rely on what this node applied, only on the
    /// change stream having passed `lsn` (or on a replica that has). Without
    /// a change stream, everything older is invalid.
    pub(super) fn opaque_write(&mut self, id: SessionId, lsn: Lsn) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.last_write = s.last_write.max(lsn);
            s.stream_floor = s.stream_floor.max(lsn);
        }
        self.acknowledged = self.acknowledged.max(lsn);
        self.acknowledged_stream = self.acknowledged_stream.max(lsn);
        if self.config.cdc_silence_max.is_none() {
            self.versions.apply(&Change { lsn, targets: vec![ChangeTarget::All] });
        }
    }

    /// A setting the session started with (a startup parameter, `-c name=value`
    /// in `options`): as a `SET` outside a transaction.
    pub fn set_session_setting(&mut self, id: SessionId, name: &str, value: &str) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.startup_setting(name, value);
        }
    }

    /// A parameter PostgreSQL reported (ParameterStatus) after a statement
    /// of the session: what it says now, whatever set it.
    pub fn report_parameter(&mut self, id: SessionId, name: &str, value: &str) {
        if let Some(s) = self.sessions.get_mut(&id)
            && !s.in_txn
        {
            let name = match name.to_ascii_lowercase().as_str() {
                "session_authorization" => "session authorization".to_string(),
                other => other.to_string(),
            };
            s.command(SessionCommand::Set { name, value: value.to_string() });
        }
    }

    /// The upstream reported the session's transaction as failed
    /// (ReadyForQuery 'E'): its COMMIT rolls back.
    pub fn transaction_failed(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id)
            && s.in_txn
        {
            s.txn_failed = true;
        }
    }

    /// A statement the node could not read ran in the session (text in
    /// another encoding): its effects on the session and on data are
    /// unknown. Private for good; its writes are followed by
    /// [`Self::unseen_write`].
    /// `in_txn`: it left a transaction open, whose commit is then such a write.
    pub fn note_opaque(&mut self, id: SessionId, in_txn: bool) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.make_opaque();
            if in_txn {
                s.in_txn = true;
                s.txn_opaque = true;
            }
        }
    }

    /// The session's state changed in a way the node cannot follow: from now
    /// on its cache entries are its own.
    pub fn make_private(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.make_private();
        }
    }

    /// A statement the node did not see ran in the session (the extended
    /// protocol, relayed as is): its effects on the session. `certain`: it ran
    /// outside a transaction; otherwise a session command in it makes the
    /// session private (whether it survives is unknown here).
    pub fn note_relayed(&mut self, id: SessionId, prepared: &Prepared, certain: bool) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        if prepared.shape.session_opaque || s.backslash_strings() {
            s.make_opaque();
        } else if prepared.shape.session_private {
            s.make_private();
        }
        match prepared.session_command.clone() {
            Some(SessionCommand::SetLocal { .. } | SessionCommand::NoEffect) | None => {}
            Some(cmd) if certain => session::apply_setting(s, cmd),
            Some(_) => s.make_private(),
        }
    }

    pub fn in_transaction(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.in_txn)
    }

    /// A floor learned from outside this node (a session token): reads must
    /// reflect at least `lsn`, and this node's map may not have seen those writes.
    pub fn raise_floor(&mut self, id: SessionId, lsn: Lsn) {
        if let Some(s) = self.sessions.get_mut(&id)
            && lsn > s.last_write
        {
            s.last_write = lsn;
            s.stream_floor = s.stream_floor.max(lsn);
        }
    }

    /// The session wrote, at `lsn`, through a path this node did not analyse
    /// (the extended protocol, relayed as is): as [`Self::raise_floor`], and
    /// a write this node acknowledged (the floor of [`Consistency::Proxy`]).
    pub fn unseen_write(&mut self, id: SessionId, lsn: Lsn) {
        self.raise_floor(id, lsn);
        self.acknowledged = self.acknowledged.max(lsn);
        self.acknowledged_stream = self.acknowledged_stream.max(lsn);
    }
}

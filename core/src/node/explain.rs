//! What the node decides about a statement, in words (`POSTAI EXPLAIN`):
//! its kind, the tables and keys it reads and writes, whether its result
//! may be cached and why not, how long an entry would live, what it does
//! to the session, and where it would be answered for this session now.

use super::*;

impl<V: Clone> EdgeNode<V> {
    /// (name, value) rows describing how `sql` would be handled for `session`.
    pub fn explain(&mut self, session: SessionId, sql: &str) -> Vec<(String, String)> {
        let p = match self.prepare_once(sql) {
            Ok(p) => p,
            Err(e) => return vec![("error".into(), format!("the text cannot be read: {e}"))],
        };
        let s = p.shape.clone();
        let catalog = self.analyzer.catalog();
        let names = |ts: &[TableId]| ts.iter().map(|t| catalog.name(*t).to_string()).collect::<Vec<_>>().join(", ");
        let mut rows = vec![
            ("query".to_string(), s.text.clone()),
            ("fingerprint".to_string(), format!("{:016x}", s.fingerprint)),
            ("kind".to_string(), format!("{:?}", s.kind)),
        ];
        let mut reads = if s.reads.is_empty() { "no table".to_string() } else { names(&s.reads) };
        if s.reads_any {
            reads.push_str(" (and any table: it calls a function that may read one)");
        }
        rows.push(("reads".into(), reads));
        let keys: Vec<String> = s
            .read_keys
            .iter()
            .map(|k| format!("{} by {}", catalog.name(k.table), if k.range { "a key range" } else { "key" }))
            .collect();
        rows.push(("read keys".into(), if keys.is_empty() { "none: whole tables".into() } else { keys.join(", ") }));
        let named = names(&s.writes);
        let further = "rows it does not name (several statements, functions, triggers, rules, cascades): \
                       the session's reads wait for the change stream to pass its commit";
        let writes = match (s.writes_unknown, s.writes_opaque, named.is_empty()) {
            (true, _, _) => "unknown: when it succeeds, everything cached is invalidated".to_string(),
            (false, true, true) => further.to_string(),
            (false, true, false) => format!("{named}, and {further}"),
            (false, false, true) => "nothing".to_string(),
            (false, false, false) => named,
        };
        rows.push(("writes".into(), writes));
        rows.push((
            "cacheable".into(),
            match &s.cacheable {
                Ok(()) => "yes".into(),
                Err(e) => format!("no: {e}"),
            },
        ));
        rows.push(("entry lives".into(), self.lifetime(&s)));
        rows.push(("session".into(), session_effect(&s)));
        rows.push(("served".into(), self.where_served(session, &p)));
        rows
    }

    /// How long an entry of this shape would stay.
    fn lifetime(&self, s: &Shape) -> String {
        let ttl = self.l1.config().ttl;
        let keyed =
            !s.reads.is_empty() && !s.reads_any && s.reads.iter().all(|t| s.read_keys.iter().any(|k| k.table == *t));
        match (self.config.fresh_ttl, self.config.invalidation.key_level() && self.config.cdc_silence_max.is_some()) {
            (Some(fresh), true) if keyed => format!(
                "while the change stream vouches for its rows, up to {} s (evicted by budget or by a change to one of them)",
                fresh.max(ttl).as_secs()
            ),
            _ => format!("{} s (ttl_s), or until a change to what it read", ttl.as_secs()),
        }
    }

    /// Where a read of this shape would be answered for `session` now.
    fn where_served(&self, session: SessionId, p: &Prepared) -> String {
        let s = &p.shape;
        let Some(sess) = self.sessions.get(&session) else { return "unknown session".into() };
        if !s.is_cacheable() || p.relative_time {
            return "the primary, on the session's connection (not cacheable)".into();
        }
        if self.catalog_stale {
            return "the primary (the catalog is being read again after DDL)".into();
        }
        if sess.in_txn {
            return "the primary (inside a transaction)".into();
        }
        if sess.consistency == Consistency::Strong {
            return "the primary (strong consistency)".into();
        }
        if sess.private {
            return "the session's own connection (its state is its own: private context)".into();
        }
        "L1, else L2, if they hold a valid entry that meets the session's floor; else a replica at or past it, \
         else the primary; the answer is then filed"
            .into()
    }
}

fn session_effect(s: &Shape) -> String {
    let mut out = Vec::new();
    if s.session_opaque {
        out.push("its effect on the session cannot be known: the session goes private until DISCARD ALL");
    } else if s.session_private {
        out.push("may shadow tables (temporary objects): the session's entries become its own");
    }
    if s.reads_settings {
        out.push("reads settings: keyed by every setting");
    }
    if s.kind == StatementKind::Session {
        out.push("changes a setting: the cache context follows it");
    }
    if out.is_empty() { "none".into() } else { out.join("; ") }
}

impl<V: Clone> EdgeNode<V> {
    /// Whether `sql` is one statement whose effects this node sees, as
    /// `session` would run it now: what `POSTAI EXPLAIN` may ask PostgreSQL
    /// to plan. Text a session reads with backslash escapes may hide more
    /// statements than the lexer saw: never.
    pub fn plain_statement(&mut self, session: SessionId, sql: &str) -> bool {
        let Ok(p) = self.prepare_once(sql) else { return false };
        let p = self.as_seen_now(session, &p).unwrap_or(p);
        let s = &p.shape;
        matches!(s.kind, StatementKind::Read | StatementKind::Write)
            && !s.writes_unknown
            && !s.writes_opaque
            && !s.session_opaque
            && !s.session_private
            && !s.reads_any
    }
}

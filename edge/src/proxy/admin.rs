//! The proxy's own commands, answered by the proxy and never sent upstream:
//! `SHOW POSTAI STATS`, `SHOW POSTAI CACHES`, `SHOW POSTAI POOLS` and
//! `POSTAI RELOAD`, in the simple protocol and in the extended one (drivers
//! prepare them: tokio-postgres always, psycopg after a few executions).
//! Parse of such a text is answered ParseComplete and its name remembered;
//! Bind, Describe, Execute and Close of it (and of its portals) are answered
//! here; in a pipeline that also holds relayed requests, those are sent
//! upstream in order, each run followed by a Flush, so that the client gets
//! every answer in the order it asked.
//!
//! Who may run them, as PgBouncer's admin console: a user in `admin_users`
//! every command, one in `stats_users` the `SHOW` ones; a superuser (the
//! server's `is_superuser`, reported at login and at each change of role)
//! every command; otherwise the session's role upstream, asked at each
//! command where the question disturbs nothing: a member of
//! `pg_read_all_stats` may run the `SHOW` ones (pools name other roles and
//! databases, counters tell other sessions' activity, `POSTAI RELOAD`
//! applies the file). Anyone else gets 42501.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{BIND_COMPLETE, Client, PARSE_COMPLETE, bind_statement, frame_into, parse_message, text_result};
use crate::metrics::Path;
use crate::pool::Pool;
use crate::protocol::{self, Message};
use crate::proxy::Proxy;

/// One of the proxy's commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Command {
    Stats,
    Caches,
    Pools,
    Reload,
}

impl Command {
    /// The command `sql` is (case, spaces and a final `;` do not matter).
    pub(super) fn parse(sql: &str) -> Option<Command> {
        let words: Vec<String> =
            sql.trim().trim_end_matches(';').split_whitespace().map(str::to_ascii_lowercase).collect();
        match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["show", "postai", "stats"] => Some(Command::Stats),
            ["show", "postai", "caches"] => Some(Command::Caches),
            ["show", "postai", "pools"] => Some(Command::Pools),
            ["postai", "reload"] => Some(Command::Reload),
            _ => None,
        }
    }

    fn columns(self) -> &'static [&'static str] {
        match self {
            Command::Stats => &["name", "value"],
            Command::Caches => {
                &["tier", "entries", "bytes", "hits", "misses", "inserts", "invalidations", "evictions", "expirations"]
            }
            // like PgBouncer's SHOW POOLS: empty without transaction pooling
            Command::Pools => &["server", "user", "database", "idle", "lent", "size", "statements"],
            Command::Reload => &["setting", "result"],
        }
    }

    /// Whether a session with `may` may run it.
    fn allowed(self, may: Privilege) -> bool {
        if self == Command::Reload { may.admin } else { may.admin || may.stats }
    }

    /// The refusal of a session that may not run it (42501).
    fn refusal(self) -> &'static str {
        if self == Command::Reload {
            "postai-edge: permission denied: POSTAI RELOAD needs a user of admin_users or a superuser"
        } else {
            "postai-edge: permission denied: SHOW POSTAI needs a user of admin_users or stats_users, \
             a superuser or a member of pg_read_all_stats"
        }
    }

    fn tag(self) -> &'static str {
        if self == Command::Reload { "RELOAD" } else { "SHOW" }
    }

    /// Runs the command: its rows, or an ErrorResponse's (SQLSTATE, message).
    fn run(self, proxy: &Proxy) -> Result<Vec<Vec<String>>, (&'static str, String)> {
        Ok(match self {
            Command::Stats => proxy.stats_rows().into_iter().map(|(k, v)| vec![k, v]).collect(),
            Command::Caches => proxy.cache_rows(),
            Command::Pools => proxy.pool.as_ref().map(Pool::rows).unwrap_or_default(),
            // F0000: config_file_error
            Command::Reload => proxy.reload().map_err(|e| ("F0000", e))?.into_iter().map(|(k, v)| vec![k, v]).collect(),
        })
    }

    /// The simple protocol's answer: RowDescription, DataRows and
    /// CommandComplete, or an ErrorResponse.
    pub(super) fn answer(self, proxy: &Proxy) -> BytesMut {
        match self.run(proxy) {
            Ok(rows) => text_result(self.columns(), &rows, self.tag()),
            Err((code, message)) => BytesMut::from(&protocol::error_response("ERROR", code, &message)[..]),
        }
    }

    /// RowDescription alone (Describe).
    fn row_description(self) -> BytesMut {
        let mut all = text_result(self.columns(), &[], self.tag());
        match protocol::decode(&mut all, usize::MAX, b"T") {
            Ok(Some(m)) => BytesMut::from(&m.raw[..]),
            _ => BytesMut::new(),
        }
    }

    /// What Execute answers: DataRows and CommandComplete (no
    /// RowDescription), or an ErrorResponse; and whether it failed.
    fn execute(self, proxy: &Proxy) -> (BytesMut, bool) {
        let mut all = self.answer(proxy);
        if all.first() == Some(&b'E') {
            return (all, true);
        }
        let described = self.row_description().len();
        (all.split_off(described.min(all.len())), false)
    }
}

/// What a session may run of the proxy's commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Privilege {
    /// Every command.
    pub admin: bool,
    /// The `SHOW` commands.
    pub stats: bool,
}

/// A session's user, its prepared admin statements and their portals.
#[derive(Default)]
pub(super) struct AdminState {
    user: String,
    /// The session's role upstream is a superuser (the server's
    /// `is_superuser`, reported at login and at each change of role).
    superuser: bool,
    statements: HashMap<String, Command>,
    portals: HashMap<String, Command>,
    /// The batch being collected holds a Parse of an admin command.
    parsed: bool,
}

/// What the proxy answers for one request of a batch.
#[derive(Clone, Copy)]
enum Local {
    ParseComplete,
    BindComplete,
    CloseComplete,
    DescribeStatement(Command),
    DescribePortal(Command),
    Execute(Command),
}

/// The name a Describe or Close names, and its kind (`S` or `P`).
fn target(m: &Message) -> Option<(u8, String)> {
    let (&kind, rest) = m.body().split_first()?;
    let end = rest.iter().position(|c| *c == 0)?;
    Some((kind, String::from_utf8_lossy(&rest[..end]).into_owned()))
}

fn first_cstr(m: &Message) -> Option<String> {
    let b = m.body();
    let end = b.iter().position(|c| *c == 0)?;
    Some(String::from_utf8_lossy(&b[..end]).into_owned())
}

impl AdminState {
    pub(super) fn new(user: &str) -> AdminState {
        AdminState { user: user.to_string(), ..AdminState::default() }
    }

    /// A ParameterStatus the server sent.
    pub(super) fn note_parameter(&mut self, name: &str, value: &str) {
        if name == "is_superuser" {
            self.superuser = value == "on";
        }
    }

    /// The login's ParameterStatus messages.
    pub(super) fn note_greeting(&mut self, greeting: &[u8]) {
        let mut rest = BytesMut::from(greeting);
        while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
            if let Some((name, value)) = postai_wire::messages::parameter_status(&m).filter(|_| m.tag == b'S') {
                self.note_parameter(&name, &value);
            }
        }
    }

    /// What the proxy answers for `m`, if it is about an admin statement;
    /// the session's admin statements and portals follow the request.
    fn classify(&mut self, m: &Message) -> Option<Local> {
        match m.tag {
            b'P' => {
                let (name, sql) = parse_message(m)?;
                match Command::parse(&sql) {
                    Some(c) => {
                        self.statements.insert(name, c);
                        Some(Local::ParseComplete)
                    }
                    None => {
                        self.statements.remove(&name);
                        None
                    }
                }
            }
            b'B' => {
                let portal = first_cstr(m)?;
                match bind_statement(m).and_then(|s| self.statements.get(s)).copied() {
                    Some(c) => {
                        self.portals.insert(portal, c);
                        Some(Local::BindComplete)
                    }
                    None => {
                        self.portals.remove(&portal);
                        None
                    }
                }
            }
            b'D' => match target(m)? {
                (b'S', name) => self.statements.get(&name).map(|c| Local::DescribeStatement(*c)),
                (b'P', name) => self.portals.get(&name).map(|c| Local::DescribePortal(*c)),
                _ => None,
            },
            b'E' => self.portals.get(&first_cstr(m)?).map(|c| Local::Execute(*c)),
            b'C' => match target(m)? {
                (b'S', name) => self.statements.remove(&name).map(|_| Local::CloseComplete),
                (b'P', name) => self.portals.remove(&name).map(|_| Local::CloseComplete),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Client {
    /// What this session may run of the proxy's commands (see the module's
    /// header): its user in `admin_users` or `stats_users`, a superuser,
    /// else its role upstream, asked now (roles change) unless `batch` (the
    /// extended protocol's requests) or the session's state forbids it. An
    /// answer that fails (an aborted transaction, a dead upstream) allows
    /// nothing.
    pub(super) async fn admin_privilege(&mut self, batch: Option<&[Message]>) -> anyhow::Result<Privilege> {
        let cfg = &self.proxy.config;
        let user = &self.admin.user;
        let mut may = Privilege { admin: cfg.admin_users.contains(user), stats: cfg.stats_users.contains(user) };
        if may.admin || self.admin.superuser {
            may.admin = true;
            return Ok(may);
        }
        // a query of the proxy's own (a simple query: it drops the unnamed
        // statement) is not sent inside the client's pipeline, behind an
        // error, or beside a batch that uses the unnamed statement: the
        // lists alone decide there
        let unnamed = |m: &Message| match m.tag {
            b'P' => parse_message(m).is_some_and(|(name, _)| name.is_empty()),
            b'B' => bind_statement(m) == Some(""),
            _ => false,
        };
        if self.wire.unsynced() || self.wire.status() == b'E' || batch.is_some_and(|b| b.iter().any(unnamed)) {
            return Ok(may);
        }
        // (every name qualified: the client's search_path is its own)
        let sql = "SELECT r.rolsuper::pg_catalog.text, \
                   pg_catalog.pg_has_role(CURRENT_USER, 'pg_read_all_stats', 'USAGE')::pg_catalog.text \
                   FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER";
        let msgs = match self.own_query(sql).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("postai-edge: the privileges of a session asking for a proxy command: {e}");
                return Ok(may);
            }
        };
        // in the extended protocol the client's unnamed statement outlives
        // its requests: prepared again before its next batch
        if batch.is_some()
            && !self.pooled()
            && let Some(p) = self.wire.parse_of("").cloned()
        {
            self.wire.defer_parse(p);
        }
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            eprintln!(
                "postai-edge: the privileges of a session asking for a proxy command: {}",
                crate::upstream::error_message(e)
            );
        }
        let row = msgs.iter().find(|m| m.tag == b'D').and_then(protocol::text_columns).unwrap_or_default();
        let yes = |i: usize| row.get(i).and_then(|v| v.as_deref()) == Some("true");
        may.admin |= yes(0);
        may.stats |= yes(1);
        Ok(may)
    }

    /// The answer to the command `sql` names, if it names one: its rows, or
    /// the refusal of a session that may not run it.
    pub(super) async fn admin(&mut self, sql: &str) -> anyhow::Result<Option<BytesMut>> {
        let Some(c) = Command::parse(sql) else { return Ok(None) };
        let may = self.admin_privilege(None).await?;
        Ok(Some(if c.allowed(may) {
            c.answer(&self.proxy)
        } else {
            BytesMut::from(&protocol::error_response("ERROR", "42501", c.refusal())[..])
        }))
    }

    /// A Parse arriving: whether it prepares an admin command (nothing
    /// about it may reach the node or the statements relayed upstream).
    pub(super) fn admin_parse(&mut self, m: &Message) -> bool {
        let Some((name, sql)) = parse_message(m) else { return false };
        if Command::parse(&sql).is_none() {
            return false;
        }
        self.wire.forget_statement(&name);
        self.admin.parsed = true;
        true
    }

    /// A batch ending in `tail` (Sync or Flush) that involves admin
    /// statements: answered in order, the admin requests here and the others
    /// relayed. `None` (nothing done) for a batch without admin requests.
    pub(super) async fn admin_batch(&mut self, batch: &[Message], tail: &Message) -> anyhow::Result<Option<Path>> {
        let a = &mut self.admin;
        if !a.parsed && a.statements.is_empty() && a.portals.is_empty() {
            return Ok(None);
        }
        a.parsed = false;
        let kinds: Vec<Option<Local>> = batch.iter().map(|m| a.classify(m)).collect();
        if kinds.iter().all(Option::is_none) {
            return Ok(None);
        }
        if tail.tag == b'S' && self.wire.status() == b'I' {
            // portals end with the transaction
            a.portals.clear();
        }
        // (asked before any of the batch goes upstream)
        let may = match kinds.iter().any(|k| matches!(k, Some(Local::Execute(_)))) {
            true => self.admin_privilege(Some(batch)).await?,
            false => Privilege::default(),
        };
        let flush = Message { tag: b'H', raw: Bytes::from_static(&[b'H', 0, 0, 0, 4]) };
        let mut run: Vec<Message> = Vec::new();
        // an error skips every request up to Sync, as PostgreSQL does
        let mut failed = false;
        let mut upstream = false;
        for (m, kind) in batch.iter().zip(kinds) {
            let Some(local) = kind else {
                run.push(m.clone());
                continue;
            };
            if !run.is_empty() && !failed {
                // (the server's state is unknown until its next ReadyForQuery)
                self.send_batch(&run, Some(&flush)).await?;
                failed = self.relay_responses(&run).await?;
                upstream = true;
            }
            run.clear();
            if failed {
                continue;
            }
            let mut out = BytesMut::new();
            match local {
                Local::ParseComplete => out.extend_from_slice(&PARSE_COMPLETE),
                Local::BindComplete => out.extend_from_slice(&BIND_COMPLETE),
                Local::CloseComplete => frame_into(&mut out, b'3', &[]),
                Local::DescribeStatement(c) => {
                    let mut none = BytesMut::new();
                    none.put_i16(0);
                    frame_into(&mut out, b't', &none);
                    out.extend_from_slice(&c.row_description());
                }
                Local::DescribePortal(c) => out.extend_from_slice(&c.row_description()),
                Local::Execute(c) if !c.allowed(may) => {
                    out.extend_from_slice(&protocol::error_response("ERROR", "42501", c.refusal()));
                    failed = true;
                }
                Local::Execute(c) => {
                    let (answer, error) = c.execute(&self.proxy);
                    out = answer;
                    failed = error;
                }
            }
            self.wr.write_all(&out).await?;
        }
        let rest: &[Message] = if failed { &[] } else { &run };
        if tail.tag == b'S' {
            if upstream || !rest.is_empty() {
                // the primary ends the batch (and says the transaction status)
                self.relay_batch(rest, tail, None).await?;
                return Ok(Some(Path::Primary));
            }
            self.wr.write_all(&protocol::ready_for_query(self.wire.status())).await?;
        } else if !rest.is_empty() {
            self.send_batch(rest, Some(tail)).await?;
            self.relay_responses(rest).await?;
        }
        Ok(Some(Path::Proxy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised_by_their_words() {
        assert_eq!(Command::parse("SHOW POSTAI STATS"), Some(Command::Stats));
        assert_eq!(Command::parse("  show   postai\tcaches ;"), Some(Command::Caches));
        assert_eq!(Command::parse("Show Postai Pools"), Some(Command::Pools));
        assert_eq!(Command::parse("POSTAI RELOAD;"), Some(Command::Reload));
        assert_eq!(Command::parse("RELOAD"), None);
        assert_eq!(Command::parse("SHOW POSTAI"), None);
        assert_eq!(Command::parse("SHOW search_path"), None);
    }

    #[test]
    fn describe_and_execute_split_the_simple_answer() {
        let t = Command::Stats.row_description();
        assert_eq!(t.first(), Some(&b'T'));
        let all = text_result(&["name", "value"], &[], "SHOW");
        assert_eq!(&all[..t.len()], &t[..]);
    }
}

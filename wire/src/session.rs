//! The client session's protocol state, as a machine: what the client
//! prepared, what the server has seen of it, which upstream messages the
//! client must not see, and what the extended protocol ran outside the
//! core's view. No sockets, no clock, no locks: the proxy (and the Worker)
//! feed it the client's messages (`handle_parse`, `handle_close`,
//! `encode_batch`) and the server's (`handle_backend`), and move the bytes
//! it returns.
//!
//! The rules it keeps, each with a unit test (`session/tests.rs`):
//! - a Parse stands once its ParseComplete came back; an error before that
//!   (or a Parse after an error, skipped until Sync) prepares nothing;
//! - messages sent without a Sync leave the server's transaction state
//!   unknown until the next ReadyForQuery (`unsynced`);
//! - a Parse the server never saw (answered from the cache or a replica) is
//!   sent before the next batch and its ParseComplete swallowed;
//! - on a pooled server connection, named statements go under server-side
//!   names, and a failed batch leaves the ones it prepared uncertain.

use std::collections::{HashMap, VecDeque};

use bytes::BytesMut;
use postai_core::node::Prepared;
use postai_core::sql::StatementKind;

use crate::answers::Answers;
use crate::messages::{
    Bind, binary_param_as_text, bind_statement, parameter_description, parameter_status, parse_bind, parse_message,
    parse_param_types,
};
use crate::pooled::{ServerStatements, pooled_message};
use crate::protocol::{self, ANSWER_LSN, Message, parameter_name};

/// Statements noted per request at most; beyond, the session goes private.
pub const RELAYED_MAX: usize = 1024;

/// The client session's protocol state (see the module's header).
#[derive(Debug)]
pub struct Session {
    /// Transaction status of the last ReadyForQuery from upstream.
    status: u8,
    /// The extended protocol ran a statement that may write.
    extended_write: bool,
    /// Prepared statements by name, as analysed by the core.
    statements: HashMap<String, Prepared>,
    /// Their Parse messages (to prepare them elsewhere).
    parses: HashMap<String, Message>,
    /// Their parameter types: declared in Parse, or learned from the
    /// ParameterDescription answering a Describe of the statement.
    param_types: HashMap<String, Vec<u32>>,
    /// Statements described in the requests sent, in order, whose
    /// ParameterDescription has not come back yet.
    described: VecDeque<String>,
    /// Parses answered without the primary (cache hit, replica), not yet sent to it.
    unsent_parses: Vec<Message>,
    /// ParseComplete messages the client must not see (for re-sent Parses).
    swallow_parse_complete: u32,
    /// CloseComplete messages the client must not see (injected Closes).
    swallow_close_complete: u32,
    /// Server-side statements prepared by the batch in flight (pooling):
    /// uncertain if it fails.
    batch_server_parses: Vec<String>,
    /// The batch in flight got an ErrorResponse.
    batch_failed: bool,
    /// Server-side statements a batch prepared without error (pooling),
    /// for the pool to learn.
    learned: Vec<String>,
    /// Statements the extended protocol ran since the last request ended
    /// (relayed: the node did not see them), and the transaction status
    /// before the first of them.
    relayed: Vec<Prepared>,
    relayed_from: Option<u8>,
    relayed_overflow: bool,
    /// ParameterStatus the server sent during the request: what those
    /// parameters are now, whatever set them.
    reported: Vec<(String, String)>,
    /// Statements the client closed in the batch being collected, with
    /// their Parse: a Bind earlier in the same batch still names them when
    /// it is encoded (a pooled connection prepares them by their text).
    closing: Vec<(String, Message)>,
    /// What the answers reflect: told to a client that asked, and what a
    /// fill is filed at.
    pub answers: Answers,
    /// Extended-protocol messages went upstream without a Sync since the
    /// last ReadyForQuery: the server may be inside a transaction, or
    /// skipping until Sync after an error, that the last status does not
    /// show. Nothing is answered from the cache, filed, or given back to
    /// the pool until the next ReadyForQuery.
    unsynced: bool,
    /// Statements Parsed since the last ReadyForQuery, and whether an error
    /// came meanwhile: a Parse counts once it cannot have failed.
    parsed: Vec<String>,
    errored: bool,
    /// The request in flight is an extended-protocol batch (a COPY it
    /// starts ends with the client's Sync).
    extended_relay: bool,
}

/// What the extended protocol ran outside the core's view during a request
/// ([`Session::take_settled`]): for the node to note.
#[derive(Debug, Default)]
pub struct Settled {
    /// ParameterStatus reports, in order.
    pub reported: Vec<(String, String)>,
    /// Statements bound and sent upstream.
    pub relayed: Vec<Prepared>,
    /// Whether each of them surely ran alone, outside a transaction, and
    /// committed (their effects on the session are certain).
    pub certain: bool,
    /// More statements ran than were noted: the session must go private.
    pub overflow: bool,
}

/// What a statement does to the server's prepared statements, which SQL's
/// PREPARE, DEALLOCATE and DISCARD ALL share with the protocol's named ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreparedChange {
    /// `DEALLOCATE ALL`, `DISCARD ALL` (or several statements naming one
    /// of these commands).
    All,
    /// `PREPARE name`, `DEALLOCATE name`.
    Named(String),
}

/// What a statement (its normalised text) does to the server's prepared
/// statements, if anything. Code run from strings or functions (`DO`,
/// `EXECUTE`) may do it too: such a statement makes the session private,
/// so what it redefines reaches no one else's entries.
pub fn prepared_changes(shape: &postai_core::sql::Shape) -> Option<PreparedChange> {
    let words: Vec<&str> = shape.text.split(' ').collect();
    let touches = |w: &&str| matches!(*w, "prepare" | "deallocate" | "discard");
    if words.contains(&";") && words.iter().any(touches) {
        return Some(PreparedChange::All);
    }
    let name = |w: Option<&&str>| w.map(|n| n.trim_matches('"').to_string());
    match words.as_slice() {
        ["deallocate", "prepare", "all", ..] | ["deallocate", "all", ..] | ["discard", "all", ..] => {
            Some(PreparedChange::All)
        }
        ["deallocate", "prepare", rest @ ..] | ["deallocate", rest @ ..] | ["prepare", rest @ ..] => {
            name(rest.first()).map(PreparedChange::Named)
        }
        _ => None,
    }
}

/// A batch the cache may answer ([`Session::cacheable_batch`]).
#[derive(Debug)]
pub struct CacheableExec {
    pub prepared: Prepared,
    /// Its parameters as text, and last, what else shapes the answer's bytes.
    pub params: Vec<Option<Vec<u8>>>,
    /// The batch's own Parse (the primary must still see it).
    pub parse: Option<Message>,
    /// The prepared statement the batch binds.
    pub statement: String,
}

impl Session {
    /// A session that starts idle; `tell`: the client asked to be told what
    /// answers reflect ([`Answers`]).
    pub fn new(tell: bool) -> Session {
        Session {
            status: b'I',
            extended_write: false,
            statements: HashMap::new(),
            parses: HashMap::new(),
            param_types: HashMap::new(),
            described: VecDeque::new(),
            unsent_parses: Vec::new(),
            swallow_parse_complete: 0,
            swallow_close_complete: 0,
            batch_server_parses: Vec::new(),
            batch_failed: false,
            learned: Vec::new(),
            relayed: Vec::new(),
            relayed_from: None,
            relayed_overflow: false,
            reported: Vec::new(),
            closing: Vec::new(),
            answers: Answers::new(tell),
            unsynced: false,
            parsed: Vec::new(),
            errored: false,
            extended_relay: false,
        }
    }

    /// The transaction status of the server's last ReadyForQuery.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// See the field `unsynced`.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// The client's Parse `m`: `analyse` gives the core's view of its text.
    /// After an error the server skips it until Sync: nothing is prepared.
    /// Returns the statement as analysed, if it is one.
    pub fn handle_parse(&mut self, m: &Message, analyse: impl FnOnce(&str) -> Option<Prepared>) -> Option<&Prepared> {
        let (name, sql) = parse_message(m)?;
        let prepared = if self.errored { None } else { analyse(&sql) };
        match prepared {
            Some(p) => {
                self.param_types.insert(name.clone(), parse_param_types(m).unwrap_or_default());
                self.parses.insert(name.clone(), m.clone());
                // known once its batch ends without an error
                self.parsed.push(name.clone());
                self.statements.insert(name.clone(), p);
                self.statements.get(&name)
            }
            None => {
                self.forget_statement(&name);
                None
            }
        }
    }

    /// The client's Close: a closed statement is forgotten (a portal's
    /// close needs nothing).
    pub fn handle_close(&mut self, m: &Message) {
        if let Some(name) = m.body().strip_prefix(b"S").and_then(|n| n.strip_suffix(b"\0")) {
            let name = String::from_utf8_lossy(name).into_owned();
            if let Some(parse) = self.parses.get(&name) {
                self.closing.push((name.clone(), parse.clone()));
            }
            self.forget_statement(&name);
        }
    }

    /// Forgets a prepared statement (closed, never prepared after all, or
    /// taken over by the proxy's own commands).
    pub fn forget_statement(&mut self, name: &str) {
        self.statements.remove(name);
        self.param_types.remove(name);
        self.parses.remove(name);
    }

    /// The Parse the client sent for statement `name`.
    pub fn parse_of(&self, name: &str) -> Option<&Message> {
        self.parses.get(name)
    }

    /// A Parse the server has not seen (answered from the cache or a
    /// replica, or dropped by the proxy's own query): sent before the next
    /// batch, its ParseComplete swallowed. One per statement name.
    pub fn defer_parse(&mut self, parse: Message) {
        let name = parse_message(&parse).map(|(n, _)| n);
        self.unsent_parses.retain(|p| parse_message(p).map(|(n, _)| n) != name);
        self.unsent_parses.push(parse);
    }

    /// SQL changed the server's prepared statements ([`prepared_changes`]):
    /// the session forgets what it knew of those, so that a Bind of one is
    /// relayed as is (and makes the session private) instead of being
    /// answered or filed as the statement it was.
    pub fn forget(&mut self, changed: &PreparedChange) {
        match changed {
            PreparedChange::All => {
                self.statements.clear();
                self.parses.clear();
                self.param_types.clear();
            }
            PreparedChange::Named(name) => self.forget_statement(name),
        }
    }

    /// Parses wait to be sent before the next batch.
    pub fn has_unsent_parses(&self) -> bool {
        !self.unsent_parses.is_empty()
    }

    /// The ParseComplete messages to swallow from now on; returns the count
    /// it replaces (a replica connection has its own).
    pub fn swallow_parses(&mut self, n: u32) -> u32 {
        std::mem::replace(&mut self.swallow_parse_complete, n)
    }

    /// The request in flight is (or is no longer) an extended-protocol batch.
    pub fn relaying_batch(&mut self, on: bool) {
        self.extended_relay = on;
    }

    /// During COPY FROM STDIN, the client's message `tag` arrived after
    /// CopyDone or CopyFail (`done`): whether the server has all it waits
    /// for (in the extended protocol, the Sync after it).
    pub fn copy_ends(&self, done: bool, tag: u8) -> bool {
        done && (!self.extended_relay || tag == b'S')
    }

    /// The bytes that send `batch` and `tail` (a Sync or Flush) upstream:
    /// first the Parses the server has not seen, then each message as the
    /// server connection must see it (`server`: a pooled one's prepared
    /// statements). Notes what the batch binds (`refresh` brings a
    /// statement's analysis up to the current catalog).
    pub fn encode_batch(
        &mut self,
        batch: &[Message],
        tail: Option<&Message>,
        mut server: Option<&mut ServerStatements>,
        mut refresh: impl FnMut(&mut Prepared),
        out: &mut BytesMut,
    ) {
        let own_unnamed =
            batch.first().is_some_and(|m| m.tag == b'P' && parse_message(m).is_some_and(|(n, _)| n.is_empty()));
        for parse in std::mem::take(&mut self.unsent_parses) {
            if own_unnamed && parse_message(&parse).is_some_and(|(n, _)| n.is_empty()) {
                continue;
            }
            out.extend_from_slice(&parse.raw);
            self.swallow_parse_complete += 1;
        }
        // what the batch closes after using it is known while it is encoded
        let mut restored = Vec::new();
        for (name, parse) in std::mem::take(&mut self.closing) {
            if !self.parses.contains_key(&name) {
                self.parses.insert(name.clone(), parse);
                restored.push(name);
            }
        }
        for m in batch {
            match server.as_deref_mut() {
                Some(s) => pooled_message(
                    out,
                    m,
                    s,
                    &self.parses,
                    &mut self.swallow_parse_complete,
                    &mut self.swallow_close_complete,
                    &mut self.batch_server_parses,
                ),
                None => out.extend_from_slice(&m.raw),
            }
            if m.tag == b'B' {
                self.note_bind(m, &mut refresh);
            }
            if m.tag == b'D'
                && let Some(name) = m.body().strip_prefix(b"S").and_then(|n| n.strip_suffix(b"\0"))
            {
                self.described.push_back(String::from_utf8_lossy(name).into_owned());
            }
        }
        for name in restored {
            self.parses.remove(&name);
        }
        if let Some(t) = tail {
            out.extend_from_slice(&t.raw);
        }
        if tail.is_none_or(|t| t.tag != b'S') {
            // answered along with what follows: the server's state is unknown until then
            self.unsynced = true;
        }
    }

    /// A Bind going upstream: a statement that may write makes the
    /// session's later cached reads wait for it; its effects on the session
    /// are noted once its fate is known.
    fn note_bind(&mut self, m: &Message, refresh: &mut impl FnMut(&mut Prepared)) {
        if let Some(p) = bind_statement(m).and_then(|n| self.statements.get_mut(n)) {
            // as the current catalog sees it (functions redefined since Parse)
            refresh(p);
        }
        let prepared = bind_statement(m).and_then(|n| self.statements.get(n));
        self.extended_write |= prepared.is_none_or(|p| p.shape.kind != StatementKind::Read);
        if prepared.is_none() {
            // a statement SQL prepared (or redefined): what it does is not
            // known here, and the session goes private
            self.relayed_overflow = true;
        }
        if let Some(p) = prepared {
            self.relayed_from.get_or_insert(self.status);
            if self.relayed.len() < RELAYED_MAX {
                self.relayed.push(p.clone());
            } else {
                self.relayed_overflow = true;
            }
        }
    }

    /// A message from upstream: whether the client must not see it (the
    /// answer to a Parse or Close the proxy injected, the upstream proxy's
    /// word on what the answer reflects). Learns parameter types and the
    /// transaction status; a failed batch leaves the statements it prepared
    /// on `server` (a pooled connection) uncertain.
    pub fn handle_backend(&mut self, m: &Message, server: Option<&mut ServerStatements>) -> bool {
        match m.tag {
            b'S' if parameter_name(m) == Some(ANSWER_LSN.as_bytes()) => {
                let told = parameter_status(m).and_then(|(_, v)| protocol::parse_lsn(&v));
                self.answers.told(told.map(postai_core::Lsn));
                return true;
            }
            b'S' => {
                if let Some((name, value)) = parameter_status(m)
                    && self.reported.len() < RELAYED_MAX
                {
                    self.reported.push((name, value));
                }
            }
            b'1' if self.swallow_parse_complete > 0 => {
                self.swallow_parse_complete -= 1;
                return true;
            }
            // the client's Parses complete in order: this one stands
            b'1' if !self.parsed.is_empty() => {
                self.parsed.remove(0);
            }
            b'3' if self.swallow_close_complete > 0 => {
                self.swallow_close_complete -= 1;
                return true;
            }
            b't' => {
                if let Some(name) = self.described.pop_front()
                    && let Some(types) = parameter_description(m)
                    && self.statements.contains_key(&name)
                {
                    self.param_types.insert(name, types);
                }
            }
            b'E' => {
                // the Parses of this batch not yet complete failed, or are skipped until Sync
                self.errored = true;
                for name in std::mem::take(&mut self.parsed) {
                    self.forget_statement(&name);
                }
                if let Some(s) = server {
                    self.batch_failed = true;
                    s.failed(self.batch_server_parses.drain(..));
                }
                self.described.clear();
            }
            b'Z' => {
                self.status = protocol::ready_status(m).unwrap_or(b'I');
                // whatever an error skipped never comes
                self.swallow_parse_complete = 0;
                self.swallow_close_complete = 0;
                (self.unsynced, self.errored) = (false, false);
                self.parsed.clear();
                self.described.clear();
                // (replaced, not added to: one batch's worth at most)
                let parsed = std::mem::take(&mut self.batch_server_parses);
                self.learned = if std::mem::take(&mut self.batch_failed) { Vec::new() } else { parsed };
            }
            _ => {}
        }
        false
    }

    /// Server-side statements the batch that just ended (its ReadyForQuery)
    /// prepared without error (pooling: the pool learns them).
    pub fn take_learned(&mut self) -> Vec<String> {
        std::mem::take(&mut self.learned)
    }

    /// A request answered without the server (the cache, the proxy): the
    /// Parses it named stand.
    pub fn answered_here(&mut self) {
        self.parsed.clear();
    }

    /// After a request: what the server reported and what the extended
    /// protocol ran outside the node's view (`None` when nothing).
    pub fn take_settled(&mut self) -> Settled {
        // (a batch answered without the server encoded nothing: its closes stand)
        self.closing.clear();
        let mut s = Settled { reported: std::mem::take(&mut self.reported), ..Settled::default() };
        if let Some(from) = self.relayed_from.take() {
            s.certain = from == b'I'
                && self.status == b'I'
                && !self.relayed_overflow
                && self.relayed.iter().all(|p| p.shape.txn.is_none());
            s.relayed = std::mem::take(&mut self.relayed);
            s.overflow = std::mem::take(&mut self.relayed_overflow);
        }
        s
    }

    /// The extended protocol ran a statement that may write, not yet taken.
    pub fn may_have_written(&self) -> bool {
        self.extended_write
    }

    /// Once no transaction is open: whether the extended protocol ran a
    /// statement that may write since the last time this said so.
    pub fn take_extended_write(&mut self) -> bool {
        let wrote = self.extended_write && self.status == b'I';
        if wrote {
            self.extended_write = false;
        }
        wrote
    }

    /// A batch the cache may answer: `[Parse] Bind [Describe portal] Execute`
    /// on the unnamed portal, all rows, a cacheable read, outside a
    /// transaction; binary parameters as text when their type is known and
    /// simple. `refresh` brings the analysis up to the current catalog.
    pub fn cacheable_batch(&self, batch: &[Message], refresh: impl FnOnce(&mut Prepared)) -> Option<CacheableExec> {
        if self.status != b'I' {
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
        if describe.is_some_and(|d| d.body() != b"P\0") || execute.body() != b"\0\0\0\0\0" {
            return None;
        }
        let parse = match parse.and_then(parse_message) {
            Some((name, _)) if name != bind.statement => return None,
            Some(_) => parse.cloned(),
            None => None,
        };
        let mut prepared = self.statements.get(&bind.statement)?.clone();
        refresh(&mut prepared);
        if !prepared.shape.is_cacheable() {
            return None;
        }
        let params = self.params_as_text(&bind, describe.is_some())?;
        Some(CacheableExec { prepared, params, parse, statement: bind.statement })
    }

    /// A cacheable Bind's parameters as text, and last, what else changes
    /// the bytes of the answer: Describe, result formats, declared types.
    fn params_as_text(&self, bind: &Bind, describe: bool) -> Option<Vec<Option<Vec<u8>>>> {
        let mut params = bind.params.clone();
        if bind.param_formats.iter().any(|f| *f != 0) {
            let types = self.param_types.get(&bind.statement)?;
            for (i, p) in params.iter_mut().enumerate() {
                if bind.param_formats[i] != 0
                    && let Some(v) = p.as_mut()
                {
                    *v = binary_param_as_text(*types.get(i)?, v)?;
                }
            }
        }
        let mut shape_of_answer = vec![u8::from(describe)];
        shape_of_answer.extend_from_slice(&bind.result_formats);
        // the parameter types the Parse declared decide the result's types
        // (`SELECT $1` as int4 or as numeric)
        let declared = self.parses.get(&bind.statement).and_then(parse_param_types).unwrap_or_default();
        shape_of_answer.push(0xff);
        declared.iter().for_each(|oid| shape_of_answer.extend_from_slice(&oid.to_be_bytes()));
        params.push(Some(shape_of_answer));
        Some(params)
    }
}

/// After a Flush: the message tags that complete the server's answer to the
/// client's request `req` (an ErrorResponse ends them all); `None` for a
/// request the server does not answer before Sync.
pub fn completions(req: &Message) -> Option<&'static [u8]> {
    match req.tag {
        b'P' => Some(b"1"),
        b'B' => Some(b"2"),
        b'C' => Some(b"3"),
        b'D' => Some(b"Tn"),
        b'E' => Some(b"CsI"),
        _ => None,
    }
}

/// The copy of an answer kept to fill the cache while it is relayed:
/// RowDescription, DataRows and CommandComplete (a notification, notice or
/// report is the session's, not the answer's), while they fit in the limit;
/// and the first error.
#[derive(Debug)]
pub struct Kept {
    limit: Option<usize>,
    copy: Option<BytesMut>,
    error: Option<String>,
}

impl Kept {
    /// Keeps up to `limit` bytes (`None`: keeps nothing).
    pub fn new(limit: Option<usize>) -> Kept {
        Kept { limit, copy: limit.map(|_| BytesMut::new()), error: None }
    }

    /// A message relayed to the client.
    pub fn handle(&mut self, m: &Message) {
        match m.tag {
            b'E' => {
                self.error.get_or_insert_with(|| protocol::error_message(m));
                self.copy = None;
            }
            // COPY: not an answer to keep
            b'G' | b'H' | b'W' => self.copy = None,
            b'T' | b'D' | b'C' => {
                if let (Some(k), Some(limit)) = (self.copy.as_mut(), self.limit) {
                    if k.len() + m.raw.len() > limit {
                        self.copy = None;
                    } else {
                        k.extend_from_slice(&m.raw);
                    }
                }
            }
            _ => {}
        }
    }

    /// The copy (if it was kept whole) and the first error's message.
    pub fn finish(self) -> (Option<BytesMut>, Option<String>) {
        (self.copy, self.error)
    }
}

#[cfg(test)]
mod tests;

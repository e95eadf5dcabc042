//! The session machine's interleavings, message by message.

use bytes::{BufMut, BytesMut};
use postai_core::Duration;
use postai_core::cache::{Eviction, TierConfig};
use postai_core::node::{EdgeNode, NodeConfig, Prepared};
use postai_core::router::Zone;
use postai_core::sql::Catalog;

use super::*;
use crate::protocol::{BACKEND_TAGS, decode, frame_into, ready_for_query};

fn node() -> EdgeNode<u64> {
    let mut catalog = Catalog::new();
    catalog.set_primary_key("items", "id");
    let tier =
        |n| TierConfig { bytes_max: 1 << 20, entries_max: n, ttl: Duration::from_secs(60), eviction: Eviction::Sieve };
    EdgeNode::new(NodeConfig::new(Zone::Eu, tier(10), tier(100)), catalog, postai_core::Lsn(0)).expect("valid config")
}

fn msg(tag: u8, body: &[u8]) -> Message {
    let mut out = BytesMut::new();
    frame_into(&mut out, tag, body);
    Message { tag, raw: out.freeze() }
}

fn parse(name: &str, sql: &str) -> Message {
    msg(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat())
}

fn bind(statement: &str, params: &[&str]) -> Message {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_slice(statement.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        b.put_i32(p.len() as i32);
        b.put_slice(p.as_bytes());
    }
    b.put_i16(0);
    msg(b'B', &b)
}

fn execute() -> Message {
    msg(b'E', b"\0\0\0\0\0")
}

fn sync() -> Message {
    msg(b'S', b"")
}

fn flush() -> Message {
    msg(b'H', b"")
}

fn ready(status: u8) -> Message {
    Message { tag: b'Z', raw: ready_for_query(status) }
}

fn error() -> Message {
    msg(b'E', b"SERROR\0C42P01\0Mno such table\0\0")
}

/// The session after the client's Parse of `sql` as `name`.
fn parsed(s: &mut Session, n: &mut EdgeNode<u64>, name: &str, sql: &str) -> Message {
    let m = parse(name, sql);
    s.handle_parse(&m, |sql| n.prepare(sql).ok());
    m
}

fn encode(s: &mut Session, batch: &[Message], tail: Option<&Message>) -> Vec<Message> {
    let mut out = BytesMut::new();
    s.encode_batch(batch, tail, None, |_: &mut Prepared| {}, &mut out);
    let mut msgs = Vec::new();
    while let Ok(Some(m)) = decode(&mut out, usize::MAX, crate::protocol::FRONTEND_TAGS) {
        msgs.push(m);
    }
    msgs
}

#[test]
fn a_parse_stands_once_its_parse_complete_came_back() {
    let (mut s, mut n) = (Session::new(false), node());
    let p = parsed(&mut s, &mut n, "s1", "SELECT * FROM items WHERE id = $1");
    encode(&mut s, &[p], Some(&sync()));
    assert!(s.parse_of("s1").is_some(), "known while in flight");
    assert!(!s.handle_backend(&msg(b'1', b""), None), "the client's own ParseComplete");
    assert!(!s.handle_backend(&error(), None));
    assert!(!s.handle_backend(&ready(b'I'), None));
    assert!(s.parse_of("s1").is_some(), "completed before the error: it stands");
}

#[test]
fn a_parse_an_error_overtook_prepares_nothing() {
    let (mut s, mut n) = (Session::new(false), node());
    let p1 = parsed(&mut s, &mut n, "s1", "SELECT * FROM nope");
    let p2 = parsed(&mut s, &mut n, "s2", "SELECT * FROM items WHERE id = $1");
    encode(&mut s, &[p1, p2], Some(&sync()));
    s.handle_backend(&error(), None);
    // a Parse after the error, before Sync: the server skips it
    let p3 = parsed(&mut s, &mut n, "s3", "SELECT 1");
    s.handle_backend(&ready(b'I'), None);
    for name in ["s1", "s2", "s3"] {
        assert!(s.parse_of(name).is_none(), "{name} was never prepared");
    }
    assert_eq!(p3.tag, b'P');
    // after ReadyForQuery a Parse counts again
    parsed(&mut s, &mut n, "s4", "SELECT 1");
    assert!(s.parse_of("s4").is_some());
}

#[test]
fn messages_without_a_sync_leave_the_server_unsynced_until_ready() {
    let (mut s, mut n) = (Session::new(false), node());
    let begin = parsed(&mut s, &mut n, "", "BEGIN");
    encode(&mut s, &[begin, bind("", &[]), execute()], Some(&flush()));
    assert!(s.unsynced(), "a Flush: the server may be in a transaction now");
    s.handle_backend(&msg(b'1', b""), None);
    s.handle_backend(&msg(b'2', b""), None);
    assert!(s.unsynced());
    assert!(s.cacheable_batch(&[bind("", &[]), execute()], |_| {}).is_none() || s.unsynced());
    encode(&mut s, &[], Some(&sync()));
    s.handle_backend(&ready(b'T'), None);
    assert!(!s.unsynced());
    assert_eq!(s.status(), b'T');
    // messages sent ahead of a simple query (no tail) are unsynced too
    encode(&mut s, &[parse("x", "SELECT 1")], None);
    assert!(s.unsynced());
}

#[test]
fn a_deferred_parse_is_sent_first_and_its_completion_swallowed() {
    let (mut s, mut n) = (Session::new(false), node());
    let p = parsed(&mut s, &mut n, "s1", "SELECT * FROM items WHERE id = $1");
    // answered from the cache: the server never saw it
    s.answered_here();
    s.defer_parse(p.clone());
    s.defer_parse(p.clone());
    assert!(s.has_unsent_parses());
    let sent = encode(&mut s, &[bind("s1", &["1"]), execute()], Some(&sync()));
    assert_eq!(sent.iter().map(|m| m.tag).collect::<Vec<_>>(), b"PBES", "one Parse, first");
    assert!(s.handle_backend(&msg(b'1', b""), None), "the injected Parse's completion is swallowed");
    assert!(!s.handle_backend(&msg(b'2', b""), None));
    // an error skips the rest: nothing more is swallowed after ReadyForQuery
    s.defer_parse(p);
    encode(&mut s, &[], Some(&sync()));
    s.handle_backend(&error(), None);
    s.handle_backend(&ready(b'I'), None);
    assert!(!s.handle_backend(&msg(b'1', b""), None), "a later ParseComplete is the client's");
}

#[test]
fn the_clients_own_unnamed_parse_replaces_a_deferred_one() {
    let (mut s, mut n) = (Session::new(false), node());
    let old = parsed(&mut s, &mut n, "", "SELECT 1");
    s.defer_parse(old);
    let new = parsed(&mut s, &mut n, "", "SELECT 2");
    let sent = encode(&mut s, &[new.clone(), bind("", &[]), execute()], Some(&sync()));
    assert_eq!(sent[0], new, "the old unnamed statement is not prepared over the new one");
    assert_eq!(sent.len(), 4);
}

#[test]
fn a_failed_pooled_batch_leaves_its_statements_uncertain() {
    let (mut s, mut n) = (Session::new(false), node());
    let mut server = ServerStatements::default();
    let p = parsed(&mut s, &mut n, "s1", "SELECT * FROM items WHERE id = $1");
    let mut out = BytesMut::new();
    s.encode_batch(&[p.clone(), bind("s1", &["1"]), execute()], Some(&sync()), Some(&mut server), |_| {}, &mut out);
    assert_eq!(server.statements.len(), 1, "prepared under its server-side name");
    s.handle_backend(&error(), Some(&mut server));
    s.handle_backend(&ready(b'I'), Some(&mut server));
    assert!(server.statements.is_empty() && server.uncertain.len() == 1);
    assert!(s.take_learned().is_empty(), "a failed batch teaches the pool nothing");
    // the next use closes the uncertain name and prepares it again
    let p = parsed(&mut s, &mut n, "s1", "SELECT * FROM items WHERE id = $1");
    let mut out = BytesMut::new();
    s.encode_batch(&[p, bind("s1", &["1"]), execute()], Some(&sync()), Some(&mut server), |_| {}, &mut out);
    let mut tags = Vec::new();
    while let Ok(Some(m)) = decode(&mut out, usize::MAX, crate::protocol::FRONTEND_TAGS) {
        tags.push(m.tag);
    }
    assert_eq!(tags, b"CPBES");
    assert!(s.handle_backend(&msg(b'3', b""), Some(&mut server)), "the injected Close's completion");
    s.handle_backend(&msg(b'1', b""), Some(&mut server));
    s.handle_backend(&ready(b'I'), Some(&mut server));
    assert_eq!(s.take_learned().len(), 1, "a clean batch: the pool learns the statement");
}

#[test]
fn relayed_statements_are_certain_only_alone_and_outside_a_transaction() {
    let (mut s, mut n) = (Session::new(false), node());
    let set = parsed(&mut s, &mut n, "", "SET search_path = other");
    encode(&mut s, &[set, bind("", &[]), execute()], Some(&sync()));
    s.handle_backend(&ready(b'I'), None);
    let settled = s.take_settled();
    assert_eq!(settled.relayed.len(), 1);
    assert!(settled.certain);
    assert!(s.take_settled().relayed.is_empty(), "taken once");
    let begin = parsed(&mut s, &mut n, "", "BEGIN");
    encode(&mut s, &[begin, bind("", &[]), execute()], Some(&sync()));
    s.handle_backend(&ready(b'T'), None);
    assert!(!s.take_settled().certain, "inside a transaction its fate is unknown");
}

#[test]
fn a_write_is_taken_once_the_transaction_is_over() {
    let (mut s, mut n) = (Session::new(false), node());
    let w = parsed(&mut s, &mut n, "w", "UPDATE items SET v = $1 WHERE id = 1");
    encode(&mut s, &[w, bind("w", &["2"]), execute()], Some(&sync()));
    s.handle_backend(&ready(b'T'), None);
    assert!(!s.take_extended_write(), "still in a transaction");
    s.handle_backend(&ready(b'I'), None);
    assert!(s.take_extended_write());
    assert!(!s.take_extended_write(), "taken once");
    // a Bind of a statement the session does not know may write
    encode(&mut s, &[bind("unknown", &[]), execute()], Some(&sync()));
    s.handle_backend(&ready(b'I'), None);
    assert!(s.take_extended_write());
}

#[test]
fn parameter_types_come_from_describe_in_order() {
    let (mut s, mut n) = (Session::new(false), node());
    let a = parsed(&mut s, &mut n, "a", "SELECT * FROM items WHERE id = $1");
    let b = parsed(&mut s, &mut n, "b", "SELECT * FROM items WHERE id = $1");
    encode(&mut s, &[a, b, msg(b'D', b"Sa\0"), msg(b'D', b"Sb\0")], Some(&sync()));
    let mut int8 = BytesMut::new();
    int8.put_i16(1);
    int8.put_u32(20);
    s.handle_backend(&msg(b't', &int8), None);
    let mut boolean = BytesMut::new();
    boolean.put_i16(1);
    boolean.put_u32(16);
    s.handle_backend(&msg(b't', &boolean), None);
    s.handle_backend(&ready(b'I'), None);
    // a binary int8 parameter reads as text for `a` only
    let mut bin = BytesMut::new();
    bin.put_u8(0);
    bin.put_slice(b"a\0");
    bin.put_i16(1);
    bin.put_i16(1);
    bin.put_i16(1);
    bin.put_i32(8);
    bin.put_i64(42);
    bin.put_i16(0);
    let exec = s.cacheable_batch(&[msg(b'B', &bin), execute()], |_| {}).expect("cacheable");
    assert_eq!(exec.params[0].as_deref(), Some(&b"42"[..]));
    let bin_b = msg(b'B', &[&b"\0b"[..], &bin[2..]].concat());
    assert!(s.cacheable_batch(&[bin_b, execute()], |_| {}).is_none(), "8 bytes are no bool");
}

#[test]
fn cacheable_batches_are_reads_on_the_unnamed_portal_outside_a_transaction() {
    let (mut s, mut n) = (Session::new(false), node());
    let p = parsed(&mut s, &mut n, "r", "SELECT * FROM items WHERE id = $1");
    let w = parsed(&mut s, &mut n, "w", "UPDATE items SET v = 1 WHERE id = $1");
    assert!(s.cacheable_batch(&[p.clone(), bind("r", &["1"]), execute()], |_| {}).is_some());
    assert!(s.cacheable_batch(&[bind("w", &["1"]), execute()], |_| {}).is_none(), "a write");
    let named_portal = msg(b'B', &[&b"p\0r\0"[..], &bind("r", &["1"]).body()[3..]].concat());
    assert!(s.cacheable_batch(&[named_portal, execute()], |_| {}).is_none(), "a named portal");
    assert!(s.cacheable_batch(&[bind("r", &["1"]), msg(b'E', b"\0\0\0\0\x01")], |_| {}).is_none(), "a row limit");
    assert!(s.cacheable_batch(&[parse("x", "SELECT 1"), bind("r", &["1"]), execute()], |_| {}).is_none());
    // the same values with another Describe are another answer
    let plain = s.cacheable_batch(&[bind("r", &["1"]), execute()], |_| {}).expect("cacheable");
    let described = s.cacheable_batch(&[bind("r", &["1"]), msg(b'D', b"P\0"), execute()], |_| {}).expect("cacheable");
    assert_ne!(plain.params, described.params);
    s.handle_backend(&ready(b'T'), None);
    assert!(s.cacheable_batch(&[bind("r", &["1"]), execute()], |_| {}).is_none(), "inside a transaction");
    drop(w);
}

#[test]
fn the_upstream_proxys_answer_lsn_is_swallowed_and_used() {
    let mut s = Session::new(false);
    s.answers.start(true);
    let told = msg(b'S', &[ANSWER_LSN.as_bytes(), b"\0", b"0/16B3748\0"].concat());
    assert!(s.handle_backend(&told, None));
    assert_eq!(s.answers.end(), Some(postai_core::Lsn(0x16B_3748)));
    let other = msg(b'S', b"TimeZone\0UTC\0");
    assert!(!s.handle_backend(&other, None));
    assert_eq!(s.take_settled().reported, vec![("TimeZone".to_string(), "UTC".to_string())]);
}

#[test]
fn copy_from_stdin_ends_with_the_sync_in_the_extended_protocol() {
    let mut s = Session::new(false);
    assert!(s.copy_ends(true, b'c'));
    assert!(!s.copy_ends(false, b'd'));
    s.relaying_batch(true);
    assert!(!s.copy_ends(true, b'c'), "the server waits for the Sync after CopyDone");
    assert!(s.copy_ends(true, b'S'));
}

#[test]
fn the_kept_copy_is_the_answer_only_and_within_its_limit() {
    let row = msg(b'D', b"\0\x01\0\0\0\x011");
    let mut k = Kept::new(Some(64));
    for m in [msg(b'T', b"\0\0"), msg(b'N', b"SNOTICE\0\0"), row.clone(), msg(b'C', b"SELECT 1\0")] {
        k.handle(&m);
    }
    let (copy, failed) = k.finish();
    let mut copy = copy.expect("kept");
    let mut tags = Vec::new();
    while let Ok(Some(m)) = decode(&mut copy, usize::MAX, BACKEND_TAGS) {
        tags.push(m.tag);
    }
    assert_eq!(tags, b"TDC", "the notice is the session's");
    assert!(failed.is_none());
    let mut k = Kept::new(Some(10));
    k.handle(&row);
    k.handle(&row);
    assert!(k.finish().0.is_none(), "past the limit nothing is kept");
    let mut k = Kept::new(Some(64));
    k.handle(&error());
    k.handle(&row);
    assert_eq!(k.finish(), (None, Some("no such table".to_string())));
    let mut k = Kept::new(Some(64));
    k.handle(&msg(b'H', b"\0\0\0"));
    assert!(k.finish().0.is_none(), "a COPY is no answer to keep");
}

/// PostgreSQL reads a Bind's counts as unsigned (up to 65535 parameters)
/// and refuses one with bytes missing or left over: read as signed, 40 000
/// parameters were taken for none, and two such batches with different
/// values had one cache key.
#[test]
fn binds_are_read_as_postgresql_reads_them() {
    let values: Vec<String> = (0..40_000).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let b = crate::messages::parse_bind(&bind("s", &refs)).expect("a valid Bind");
    assert_eq!(b.params.len(), 40_000);
    assert_eq!(b.params[39_999].as_deref(), Some(&b"39999"[..]));
    let mut extra = bind("s", &["1"]).body().to_vec();
    extra.push(0);
    assert!(crate::messages::parse_bind(&msg(b'B', &extra)).is_none(), "a byte left over");
    let short = bind("s", &["1"]).body()[..10].to_vec();
    assert!(crate::messages::parse_bind(&msg(b'B', &short)).is_none(), "bytes missing");
    // a length below -1 is no NULL (PostgreSQL refuses it)
    let mut minus_two = bind("s", &["1"]).body().to_vec();
    let at = minus_two.len() - 2 - 1 - 4;
    minus_two.splice(at..at + 5, (-2i32).to_be_bytes());
    assert!(crate::messages::parse_bind(&msg(b'B', &minus_two)).is_none(), "length -2");
}

#[test]
fn a_statement_closed_in_the_batch_that_uses_it_is_bound_by_its_server_name() {
    let (mut s, mut n) = (Session::new(false), node());
    let mut server = ServerStatements::default();
    let p = parsed(&mut s, &mut n, "s1", "SELECT * FROM items WHERE id = $1");
    let close = msg(b'C', b"Ss1\0");
    s.handle_close(&close);
    let mut out = BytesMut::new();
    s.encode_batch(&[p, bind("s1", &["1"]), execute(), close], Some(&sync()), Some(&mut server), |_| {}, &mut out);
    let sname = server.statements.iter().next().cloned().expect("prepared under its server-side name");
    let mut binds = Vec::new();
    while let Ok(Some(m)) = decode(&mut out, usize::MAX, crate::protocol::FRONTEND_TAGS) {
        if m.tag == b'B' {
            binds.push(crate::messages::bind_statement(&m).map(str::to_string));
        }
    }
    assert_eq!(binds, vec![Some(sname)], "the Bind names the server's statement, not the client's closed name");
    assert!(s.parse_of("s1").is_none(), "closed for good after the batch");
}

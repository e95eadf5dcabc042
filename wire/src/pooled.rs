//! Transaction pooling on the wire: which statements pin a client to its
//! server connection, and a client's named statements on shared server
//! connections (prepared there under a digest of their text, as PgBouncer
//! 1.21 does).

use std::collections::{HashMap, HashSet};

use bytes::{Bytes, BytesMut};

use crate::protocol::{Message, frame_into};
use postai_core::sql::Shape;

/// What is prepared on one server connection.
#[derive(Debug, Default, Clone)]
pub struct ServerStatements {
    /// Server-side names of the statements prepared on it.
    pub statements: HashSet<String>,
    /// Names whose Parse was sent in a batch that failed: whether they exist
    /// is unknown (closed and prepared again before use).
    pub uncertain: HashSet<String>,
    /// The client Parse (as sent) of the unnamed statement prepared there.
    pub unnamed: Option<Bytes>,
}

impl ServerStatements {
    /// A batch that prepared `names` failed: they may or may not exist.
    pub fn failed(&mut self, names: impl IntoIterator<Item = String>) {
        for name in names {
            self.statements.remove(&name);
            self.uncertain.insert(name);
        }
        self.unnamed = None;
    }

    /// DEALLOCATE ALL or DISCARD ran: nothing is prepared any more.
    pub fn clear(&mut self) {
        self.statements.clear();
        self.unnamed = None;
    }
}

/// The server-side name of a named statement: a digest of its Parse body
/// after the name (query text and parameter types).
pub fn server_name(parse_rest: &[u8]) -> String {
    let mut d = postai_core::hash::Digest128::new();
    d.bytes(parse_rest);
    format!("postai_{:032x}", d.finish())
}

/// Whether a statement leaves session state on its server connection that
/// another client must not inherit, or this one must find again.
pub fn pins_session(shape: &Shape) -> bool {
    let text = shape.text.as_str();
    let mut words = text.split([' ', '(']).filter(|w| !w.is_empty());
    let (first, second) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let session_command = match first {
        "set" => !matches!(second, "local" | "transaction" | "constraints"),
        "reset" | "discard" | "deallocate" | "listen" | "prepare" | "declare" | "load" => true,
        _ => false,
    };
    session_command
        || shape.session_private
        || shape.session_opaque
        || ((text.contains("pg_advisory_lock") || text.contains("pg_try_advisory_lock")) && !text.contains("xact"))
}

/// Appends `m` as a pooled server connection must see it: named statements
/// under their server-side names, prepared first where missing; a client's
/// Close of a named statement leaves the shared one alone.
pub fn pooled_message(
    out: &mut BytesMut,
    m: &Message,
    server: &mut ServerStatements,
    parses: &HashMap<String, Message>,
    swallow_parse: &mut u32,
    swallow_close: &mut u32,
    parsed: &mut Vec<String>,
) {
    let body = m.body();
    let cstr_end = |from: usize| body.get(from..).and_then(|b| b.iter().position(|c| *c == 0)).map(|e| from + e);
    // the server-side name of a client's statement, prepared there if missing
    let mut ensure = |out: &mut BytesMut, server: &mut ServerStatements, name: &[u8]| -> Option<String> {
        let client_name = std::str::from_utf8(name).ok()?;
        let parse = parses.get(client_name)?;
        let p = parse.body();
        let rest = &p[p.iter().position(|c| *c == 0)? + 1..];
        if name.is_empty() {
            if server.unnamed.as_ref() != Some(&parse.raw) {
                out.extend_from_slice(&parse.raw);
                *swallow_parse += 1;
                server.unnamed = Some(parse.raw.clone());
            }
            return Some(String::new());
        }
        let sname = server_name(rest);
        if !server.statements.contains(&sname) || server.uncertain.contains(&sname) {
            if server.uncertain.remove(&sname) {
                frame_into(out, b'C', &[b"S", sname.as_bytes(), b"\0"].concat());
                *swallow_close += 1;
            }
            frame_into(out, b'P', &[sname.as_bytes(), b"\0", rest].concat());
            *swallow_parse += 1;
            server.statements.insert(sname.clone());
            parsed.push(sname.clone());
        }
        Some(sname)
    };
    match m.tag {
        b'P' => {
            let Some(name_end) = cstr_end(0) else { return out.extend_from_slice(&m.raw) };
            let rest = &body[name_end + 1..];
            if name_end == 0 {
                out.extend_from_slice(&m.raw);
                server.unnamed = Some(m.raw.clone());
                return;
            }
            let sname = server_name(rest);
            if server.statements.contains(&sname) && !server.uncertain.contains(&sname) {
                // prepared already: the same text as the unnamed statement
                // gives the client its ParseComplete
                frame_into(out, b'P', &[b"\0", rest].concat());
                server.unnamed = None;
            } else {
                if server.uncertain.remove(&sname) {
                    frame_into(out, b'C', &[b"S", sname.as_bytes(), b"\0"].concat());
                    *swallow_close += 1;
                }
                frame_into(out, b'P', &[sname.as_bytes(), b"\0", rest].concat());
                server.statements.insert(sname.clone());
                parsed.push(sname);
            }
        }
        b'B' => {
            let (Some(portal_end), Some(stmt_end)) = (cstr_end(0), cstr_end(cstr_end(0).unwrap_or(0) + 1)) else {
                return out.extend_from_slice(&m.raw);
            };
            match ensure(out, server, &body[portal_end + 1..stmt_end]) {
                Some(sname) => frame_into(
                    out,
                    b'B',
                    &[&body[..=portal_end], sname.as_bytes(), b"\0", &body[stmt_end + 1..]].concat(),
                ),
                None => out.extend_from_slice(&m.raw),
            }
        }
        b'D' if body.first() == Some(&b'S') => match cstr_end(1).and_then(|e| ensure(out, server, &body[1..e])) {
            Some(sname) => frame_into(out, b'D', &[b"S", sname.as_bytes(), b"\0"].concat()),
            None => out.extend_from_slice(&m.raw),
        },
        // the shared statement stays: a Close of a name nobody uses answers the same
        b'C' if body.first() == Some(&b'S') && body.get(1) != Some(&0) => {
            frame_into(out, b'C', b"Spostai_closed\0");
        }
        _ => out.extend_from_slice(&m.raw),
    }
}

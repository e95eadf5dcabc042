//! Transaction pooling: which statements pin a client to its server
//! connection, named statements on shared server connections, Parses
//! answered without a server.

use super::*;

/// Whether a statement leaves session state on its server connection that
/// another client must not inherit, or this one must find again.
pub(super) fn pins_session(shape: &Shape) -> bool {
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
pub(super) fn pooled_message(
    out: &mut BytesMut,
    m: &Message,
    server: &mut ServerConn,
    parses: &std::collections::HashMap<String, Message>,
    swallow_parse: &mut u32,
    swallow_close: &mut u32,
    parsed: &mut Vec<String>,
) {
    let body = m.body();
    let cstr_end = |from: usize| body.get(from..).and_then(|b| b.iter().position(|c| *c == 0)).map(|e| from + e);
    // the server-side name of a client's statement, prepared there if missing
    let mut ensure = |out: &mut BytesMut, server: &mut ServerConn, name: &[u8]| -> Option<String> {
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
        let sname = crate::pool::server_name(rest);
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
            let sname = crate::pool::server_name(rest);
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
        if batch.is_empty() || self.status != b'I' || !self.unsent_parses.is_empty() {
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
        self.out.extend_from_slice(&protocol::ready_for_query(self.status));
        self.wr.write_all(&self.out).await?;
        Ok(true)
    }

    /// Pooling: session state the statement leaves on the server connection
    /// keeps it with this client.
    pub(super) fn note_session_state(&mut self, shape: &Shape) {
        if let Upstream::Pooled { lease, pinned, .. } = &mut self.upstream {
            let first = shape.text.split([' ', '(']).next().unwrap_or("");
            if matches!(first, "deallocate" | "discard")
                && let Some(l) = lease.as_mut()
            {
                // the server's prepared statements are gone
                l.server.statements.clear();
                l.server.unnamed = None;
            }
            *pinned |= pins_session(shape);
        }
    }

    /// Pooling: gives the server connection back between transactions.
    pub(super) fn release_idle(&mut self) {
        if self.status != b'I' || self.unsynced {
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

//! A frontend speaking the protocol by hand over a blocking socket: exact
//! message sequences (pipelines, Flush, COPY) as drivers send them.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postai_edge::protocol::{self, BACKEND_TAGS, Message};

/// A client speaking the protocol by hand.
pub struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &b)
}

/// Bind of the unnamed portal to `statement`, text parameters and results.
pub fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    frame(b'B', &b)
}

pub fn describe_portal() -> Vec<u8> {
    frame(b'D', b"P\0")
}

pub fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

pub fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    frame(b'H', b"")
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    frame(b'Q', &b)
}

impl Raw {
    pub fn connect(port: u16, user: &str) -> Raw {
        Raw::login(port, &[("user", user), ("database", "postgres")]).0
    }

    /// A login with these startup parameters: the connection and what it
    /// got up to ReadyForQuery.
    pub fn login(port: u16, params: &[(&str, &str)]) -> (Raw, Vec<Message>) {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = Raw { s, buf: BytesMut::new() };
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        r.s.write_all(&protocol::startup(&params).expect("startup")).expect("startup");
        let login = r.until_ready();
        assert!(login.iter().all(|m| m.tag != b'E'), "login: {}", tags(&login));
        (r, login)
    }

    pub fn send(&mut self, parts: &[Vec<u8>]) {
        let all: Vec<u8> = parts.concat();
        self.s.write_all(&all).expect("send");
    }

    /// The next message; `None` when none comes within the read timeout.
    pub fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = protocol::decode(&mut self.buf, 1 << 24, BACKEND_TAGS).expect("a backend message") {
                return Some(m);
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.put_slice(&chunk[..n]),
            }
        }
    }

    /// Messages up to ReadyForQuery (included), within 20 s (a stream that
    /// never ends, as a subscription's, fails the test instead of hanging it).
    pub fn until_ready(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(std::time::Instant::now() < deadline, "no ReadyForQuery within 20 s after {}", tags(&out));
            let m = self.next().unwrap_or_else(|| panic!("no ReadyForQuery after {}", tags(&out)));
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// A simple query: its answer up to and including ReadyForQuery.
    pub fn query(&mut self, sql: &str) -> Vec<Message> {
        self.send(&[query(sql)]);
        self.until_ready()
    }

    /// Exactly `n` messages.
    pub fn take(&mut self, n: usize) -> Vec<Message> {
        (0..n).map(|i| self.next().unwrap_or_else(|| panic!("message {i} of {n} missing"))).collect()
    }
}

pub fn tags(msgs: &[Message]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// The first column of the first DataRow.
pub fn value(msgs: &[Message]) -> Option<String> {
    let row = msgs.iter().find(|m| m.tag == b'D')?;
    protocol::text_columns(row)?.into_iter().next().flatten()
}

pub fn status(msgs: &[Message]) -> Option<u8> {
    msgs.iter().rev().find(|m| m.tag == b'Z').and_then(protocol::ready_status)
}

pub fn sqlstate(msgs: &[Message]) -> Option<String> {
    let e = msgs.iter().find(|m| m.tag == b'E')?;
    let mut fields = e.body();
    while let Some((&f, rest)) = fields.split_first() {
        let end = rest.iter().position(|b| *b == 0)?;
        if f == b'C' {
            return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
        fields = &rest[end + 1..];
    }
    None
}

/// The first column of each DataRow, as text (`NULL` for a null).
pub fn values(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .filter_map(|m| protocol::text_columns(m)?.into_iter().next())
        .map(|v| v.unwrap_or_else(|| "NULL".into()))
        .collect()
}

/// The value a ParameterStatus among `msgs` reports for `name`.
pub fn reported(msgs: &[Message], name: &str) -> Option<String> {
    msgs.iter().filter(|m| m.tag == b'S').find_map(|m| {
        let mut parts = m.body().split(|b| *b == 0);
        (parts.next()? == name.as_bytes()).then(|| parts.next().map(|v| String::from_utf8_lossy(v).into_owned()))?
    })
}

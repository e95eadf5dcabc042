//! One `POST /sql` request, end to end, over any stream the caller can
//! open: the Worker opens a `worker::Socket`, the host's tests a tokio
//! `TcpStream`, and both run this same code.
//!
//! Every answer says which tier served it (`x-postai-served`) and what it
//! reflects (`x-postai-lsn`: every commit up to that WAL position), and
//! carries the session token (`x-postai-session`: the newest position the
//! session has seen or written), which the client sends back as
//! `x-postai-session` to read its own writes at any edge.

use std::future::Future;

use bytes::BytesMut;
use postai_wire::protocol;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::access::{Access, bearer};
use crate::neon::{self, Body, DbError, Options, Query, QueryResult};
use crate::pg::{self, Client, PgError};

pub const SERVED: &str = "x-postai-served";
pub const LSN: &str = "x-postai-lsn";
pub const SESSION: &str = "x-postai-session";

/// What the Worker answers: status, JSON or text body, and its headers.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub json: bool,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn json(status: u16, v: &Value) -> Answer {
        Answer { status, body: v.to_string(), json: true, headers: Vec::new() }
    }

    /// A PostgreSQL-shaped error, as the driver reads one: HTTP 400, the
    /// fields at the top level (`err.code` is the SQLSTATE).
    pub fn db_error(e: &DbError) -> Answer {
        Answer::json(400, &e.to_json())
    }

    pub fn text(status: u16, body: &str) -> Answer {
        Answer { status, body: body.into(), json: false, headers: Vec::new() }
    }
}

const CURRENT_LSN: &str = "SELECT pg_current_wal_lsn()";

/// Handles one request: `header` looks a header up by lower-case name,
/// `connect` opens a stream to PostgreSQL (TLS, if any, negotiated).
pub async fn handle<S, F, Fut>(
    access: &Access,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    connect: F,
) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let auth = header("authorization");
    let login = match access.authorize(header("neon-connection-string").as_deref(), bearer(auth.as_deref())) {
        Ok(l) => l,
        Err(e) => return Answer::db_error(&e),
    };
    let (options, body) = match Options::from_headers(&header).and_then(|o| Ok((o, neon::parse_body(body)?))) {
        Ok(ok) => ok,
        Err(e) => return Answer::db_error(&DbError::new(e.code(), &e.to_string())),
    };
    let floor = header(SESSION).and_then(|s| protocol::parse_lsn(&s));
    let stream = match connect().await {
        Ok(s) => s,
        Err(e) => return Answer::db_error(&unreachable(&e)),
    };
    let mut client = match Client::login(stream, &login).await {
        Ok(c) => c,
        Err(e) => return error_answer(e),
    };
    let ran = match &body {
        Body::One(q) => one(&mut client, q).await.map(|(r, lsns)| (r.to_json(&options), lsns)),
        Body::Batch(qs) => {
            batch(&mut client, qs, &options.begin).await.map(|(r, l)| (neon::batch_json(&r, &options), l))
        }
    };
    client.terminate().await;
    match ran {
        Ok((json, (before, after))) => {
            let mut a = Answer::json(200, &json);
            a.headers.push((SERVED, "primary".into()));
            if let Some(l) = before {
                a.headers.push((LSN, lsn_text(l)));
            }
            if let Some(l) = after.max(floor) {
                a.headers.push((SESSION, lsn_text(l)));
            }
            a
        }
        Err(e) => error_answer(e),
    }
}

/// What a failure looks like to the driver: PostgreSQL's own error as is;
/// a lost connection as `08006` (connection failure), so that the
/// application can tell it from a bad statement and retry.
fn error_answer(e: PgError) -> Answer {
    match e {
        PgError::Db(d) => Answer::db_error(&d),
        PgError::Io(e) => Answer::db_error(&DbError::new("08006", &format!("connection to the database lost: {e}"))),
        other => Answer::db_error(&DbError::new("08P01", &other.to_string())),
    }
}

fn unreachable(e: &std::io::Error) -> DbError {
    DbError::new("08006", &format!("the database is unreachable: {e}"))
}

type Lsns = (Option<u64>, Option<u64>);

/// One statement, between two readings of the WAL position, in one round
/// trip: the answer reflects every commit up to the first; the second
/// covers what the statement wrote.
async fn one<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, q: &Query) -> Result<(QueryResult, Lsns), PgError> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&protocol::query(CURRENT_LSN));
    pg::extended(&mut out, &q.query, &q.params)?;
    out.extend_from_slice(&protocol::query(CURRENT_LSN));
    let mut parts = c.pipeline(&out, 3).await?.into_iter();
    let before = parts.next().and_then(lsn_of);
    let result = parts.next().unwrap_or(Ok(Vec::new()))?.pop().unwrap_or_default();
    let after = parts.next().and_then(lsn_of);
    Ok((result, (before, after)))
}

/// A transaction: `begin`, each statement, COMMIT; the first error rolls
/// it back and is the answer (as Neon runs a batch).
async fn batch<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    qs: &[Query],
    begin: &str,
) -> Result<(Vec<QueryResult>, Lsns), PgError> {
    let mut out = BytesMut::new();
    out.extend_from_slice(&protocol::query(CURRENT_LSN));
    out.extend_from_slice(&protocol::query(begin));
    let mut parts = c.pipeline(&out, 2).await?.into_iter();
    let before = parts.next().and_then(lsn_of);
    parts.next().unwrap_or(Ok(Vec::new()))?;
    let mut results = Vec::with_capacity(qs.len());
    for q in qs {
        match c.query(&q.query, &q.params).await {
            Ok(r) => results.push(r),
            Err(e) => {
                if matches!(e, PgError::Db(_)) {
                    c.simple("ROLLBACK").await?;
                }
                return Err(e);
            }
        }
    }
    let mut out = BytesMut::new();
    out.extend_from_slice(&protocol::query("COMMIT"));
    out.extend_from_slice(&protocol::query(CURRENT_LSN));
    let mut parts = c.pipeline(&out, 2).await?.into_iter();
    parts.next().unwrap_or(Ok(Vec::new()))?;
    let after = parts.next().and_then(lsn_of);
    Ok((results, (before, after)))
}

fn lsn_of(part: Result<Vec<QueryResult>, PgError>) -> Option<u64> {
    let r = part.ok()?.pop()?;
    let text = r.rows.first()?.first()?.as_deref()?;
    protocol::parse_lsn(text)
}

/// An LSN as PostgreSQL prints it.
pub fn lsn_text(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF)
}

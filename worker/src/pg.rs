//! A PostgreSQL connection over any byte stream: a `worker::Socket` in the
//! Worker, a tokio `TcpStream` in the host's tests. It logs in (cleartext,
//! MD5, SCRAM-SHA-256) and runs statements the way Neon's proxy does:
//! Parse, Bind (text parameters of unspecified type), Describe, Execute,
//! Sync, so one statement per request and PostgreSQL's own errors.

use bytes::{BufMut, BytesMut};
use postai_wire::protocol::{self, BACKEND_TAGS, Message, frame_into};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::neon::{DbError, Field, QueryResult};

/// The largest message accepted from PostgreSQL (a DataRow of a 1 GB value
/// would not fit in a Worker's 128 MB anyway).
pub const MESSAGE_MAX: usize = 64 << 20;

/// The most row data one answer may hold, as Neon's proxy limits it: a
/// larger answer is refused (HTTP 507) instead of exhausting the isolate.
pub const RESPONSE_MAX: usize = 10 << 20;

/// What each cell of an answer counts against [`RESPONSE_MAX`] beyond its
/// bytes: held as text and then as JSON, a cell costs the isolate far more
/// than its bytes on the wire.
pub const CELL_COST: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{}", .0.message())]
    Db(DbError),
    #[error("connection to the database failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the database broke the protocol: {0}")]
    Protocol(String),
    #[error("the database asked for an authentication method the Worker does not speak ({0})")]
    Auth(i32),
    #[error("response is too large (max is {0} bytes)")]
    TooLarge(usize),
}

impl From<protocol::ProtocolError> for PgError {
    fn from(e: protocol::ProtocolError) -> Self {
        PgError::Protocol(e.to_string())
    }
}

/// Who logs in, to what.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub database: String,
    pub application_name: String,
    /// Settings for the session, sent in the startup message.
    pub settings: Vec<(String, String)>,
}

pub struct Client<S> {
    stream: S,
    buf: BytesMut,
    /// The transaction status of the last ReadyForQuery (`I`, `T`, `E`).
    pub status: u8,
    /// The login's greeting as sent: ParameterStatus and BackendKeyData
    /// (what a relayed client is handed).
    pub greeting: BytesMut,
    /// The most row data one answer may hold ([`RESPONSE_MAX`]; the
    /// catalog's queries have no limit).
    pub response_max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Logs in over `stream` (already connected, TLS already negotiated).
    pub async fn login(stream: S, login: &Login) -> Result<Client<S>, PgError> {
        use postgres_protocol::authentication::md5_hash;
        use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
        use postgres_protocol::message::frontend;

        let mut c = Client {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
            status: b'I',
            greeting: BytesMut::new(),
            response_max: RESPONSE_MAX,
        };
        let params = [
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
            ("application_name", login.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        let mut params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        params.extend(login.settings.iter().cloned());
        c.send(&protocol::startup(&params).map_err(|e| PgError::Protocol(e.to_string()))?).await?;
        let mut scram: Option<ScramSha256> = None;
        let mut out = BytesMut::new();
        let bad = |what: &str| PgError::Protocol(format!("malformed {what}"));
        loop {
            let m = c.recv().await?;
            let body = m.body();
            match m.tag {
                b'R' => {
                    let code = body.get(..4).map_or(-1, |c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    let data = body.get(4..).unwrap_or_default();
                    out.clear();
                    match code {
                        0 => continue,
                        3 => frontend::password_message(login.password.as_bytes(), &mut out)?,
                        5 => {
                            let salt: [u8; 4] = data.try_into().map_err(|_| bad("MD5 request"))?;
                            let hash = md5_hash(login.user.as_bytes(), login.password.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        10 => {
                            if !data.split(|b| *b == 0).any(|m| m == SCRAM_SHA_256.as_bytes()) {
                                return Err(PgError::Auth(code));
                            }
                            let s = ScramSha256::new(login.password.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| bad("SASL exchange"))?;
                            s.update(data)?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        12 => {
                            scram.as_mut().ok_or_else(|| bad("SASL exchange"))?.finish(data)?;
                            continue;
                        }
                        code => return Err(PgError::Auth(code)),
                    }
                    c.send(&out).await?;
                }
                b'E' => return Err(PgError::Db(DbError::parse(body))),
                b'Z' => {
                    c.status = protocol::ready_status(&m).unwrap_or(b'I');
                    return Ok(c);
                }
                b'S' | b'K' => c.greeting.extend_from_slice(&m.raw),
                // notices, NegotiateProtocolVersion
                _ => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a simple Query whose answer the caller reads message by
    /// message ([`Client::message`]): a subscription's CopyData.
    pub async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        self.send(&protocol::query(sql)).await
    }

    /// The next message from the server.
    pub async fn message(&mut self) -> Result<Message, PgError> {
        self.recv().await
    }

    async fn recv(&mut self) -> Result<Message, PgError> {
        loop {
            if let Some(m) = protocol::decode(&mut self.buf, MESSAGE_MAX, BACKEND_TAGS)? {
                return Ok(m);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(PgError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs one statement with text parameters; its rows come back as text.
    /// A PostgreSQL error is `Err(PgError::Db)` and leaves the connection
    /// usable (its transaction, if any, aborted).
    pub async fn query(&mut self, sql: &str, params: &[Option<String>]) -> Result<QueryResult, PgError> {
        let mut out = BytesMut::new();
        extended(&mut out, sql, params)?;
        self.send(&out).await?;
        let mut results = self.results().await?;
        Ok(results.pop().unwrap_or_default())
    }

    /// Sends `out` (several requests, each ending in Sync or a simple
    /// Query) in one flight and reads `parts` answers: a PostgreSQL error
    /// fails its own part only; a broken connection fails them all.
    pub async fn pipeline(
        &mut self,
        out: &[u8],
        parts: usize,
    ) -> Result<Vec<Result<Vec<QueryResult>, PgError>>, PgError> {
        self.send(out).await?;
        let mut answers = Vec::with_capacity(parts);
        for _ in 0..parts {
            match self.results().await {
                Ok(r) => answers.push(Ok(r)),
                Err(PgError::Db(e)) => answers.push(Err(PgError::Db(e))),
                Err(e) => return Err(e),
            }
        }
        Ok(answers)
    }

    /// Runs `sql` in the simple protocol (transaction control, the Worker's
    /// own statements): one result per statement.
    pub async fn simple(&mut self, sql: &str) -> Result<Vec<QueryResult>, PgError> {
        self.send(&protocol::query(sql)).await?;
        self.results().await
    }

    /// Reads results up to ReadyForQuery; the first error, if any, once
    /// ReadyForQuery has come (so the connection stays in step).
    async fn results(&mut self) -> Result<Vec<QueryResult>, PgError> {
        let mut results = Vec::new();
        let mut current = QueryResult::default();
        let mut error = None;
        let (mut bytes, mut too_large) = (0usize, false);
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'T' => current.fields = row_description(m.body()).ok_or_else(|| bad("RowDescription"))?,
                // past the limit the rows are read and dropped, to the end of the answer
                b'D' if too_large => {}
                b'D' => {
                    // what the row costs in the isolate, not only on the wire
                    // (a NULL is 4 bytes there and about 60 once held and shown)
                    let cells = m.body().get(..2).map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
                    bytes += m.raw.len() + CELL_COST * cells;
                    if bytes > self.response_max {
                        too_large = true;
                        results.clear();
                        current.rows = Vec::new();
                        continue;
                    }
                    current.rows.push(protocol::text_columns(&m).ok_or_else(|| bad("DataRow"))?);
                }
                b'C' => {
                    current.tag = cstr(m.body());
                    results.push(std::mem::take(&mut current));
                }
                b'I' => results.push(std::mem::take(&mut current)),
                b'E' => {
                    error.get_or_insert(DbError::parse(m.body()));
                    current = QueryResult::default();
                }
                b'Z' => {
                    self.status = protocol::ready_status(&m).unwrap_or(b'I');
                    return match (error, too_large) {
                        (Some(e), _) => Err(PgError::Db(e)),
                        (None, true) => Err(PgError::TooLarge(self.response_max)),
                        (None, false) => Ok(results),
                    };
                }
                // ParseComplete, BindComplete, NoData, notices, ParameterStatus, notifications
                _ => {}
            }
        }
    }

    /// The stream, for a relay, and what was read from it past the last
    /// message handled.
    pub fn into_stream(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }

    /// Ends the session (Terminate) and closes the stream: a socket
    /// reset under Hyperdrive's local proxy has crashed `wrangler dev`.
    pub async fn terminate(mut self) {
        let _ = self.send(&[b'X', 0, 0, 0, 4]).await;
        let _ = self.stream.shutdown().await;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> postai_wire::catalog::Rows for Client<S> {
    /// The catalog's queries (simple protocol); an error answer is an error.
    async fn rows(&mut self, sql: &str) -> std::io::Result<Vec<Vec<Option<String>>>> {
        let limit = std::mem::replace(&mut self.response_max, usize::MAX);
        let answer = self.simple(sql).await;
        self.response_max = limit;
        match answer {
            Ok(mut results) => Ok(results.pop().map(|r| r.rows).unwrap_or_default()),
            Err(PgError::Io(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(format!("reading the catalog: {e}"))),
        }
    }
}

fn bad(what: &str) -> PgError {
    PgError::Protocol(format!("malformed {what}"))
}

/// Parse, Bind, Describe, Execute and Sync for one statement, unnamed.
pub fn extended(out: &mut BytesMut, sql: &str, params: &[Option<String>]) -> Result<(), PgError> {
    if sql.contains('\0') || params.iter().flatten().any(|p| p.contains('\0')) {
        return Err(PgError::Db(DbError::new("22021", "invalid byte sequence for encoding \"UTF8\": 0x00")));
    }
    // (PostgreSQL reads the count as unsigned: up to 65535)
    let n = u16::try_from(params.len()).map_err(|_| PgError::Db(DbError::new("54000", "too many parameters")))?;
    let mut body = BytesMut::new();
    body.put_u8(0); // unnamed statement
    body.put_slice(sql.as_bytes());
    body.put_u8(0);
    body.put_i16(0); // no parameter types: PostgreSQL infers them
    frame_into(out, b'P', &body);
    body.clear();
    body.put_u8(0); // unnamed portal
    body.put_u8(0); // of the unnamed statement
    body.put_i16(0); // every parameter in text
    body.put_u16(n);
    for p in params {
        match p {
            None => body.put_i32(-1),
            Some(v) => {
                body.put_i32(i32::try_from(v.len()).map_err(|_| bad("parameter"))?);
                body.put_slice(v.as_bytes());
            }
        }
    }
    body.put_i16(0); // every result column in text
    frame_into(out, b'B', &body);
    frame_into(out, b'D', b"P\0");
    frame_into(out, b'E', &[0, 0, 0, 0, 0]);
    frame_into(out, b'S', &[]);
    Ok(())
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A RowDescription's fields; `None` if malformed.
pub fn row_description(b: &[u8]) -> Option<Vec<Field>> {
    let n = i16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut at = 2usize;
    let mut fields = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let end = at + b.get(at..)?.iter().position(|c| *c == 0)?;
        let name = String::from_utf8_lossy(&b[at..end]).into_owned();
        at = end + 1;
        let fixed = b.get(at..at + 18)?;
        at += 18;
        let u32_at = |i: usize| u32::from_be_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        fields.push(Field {
            name,
            table_oid: u32_at(0),
            column: i16::from_be_bytes([fixed[4], fixed[5]]),
            type_oid: u32_at(6),
            type_size: i16::from_be_bytes([fixed[10], fixed[11]]),
            type_modifier: u32_at(12) as i32,
        });
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_descriptions_parse_and_truncated_ones_do_not() {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_slice(b"id\0");
        b.put_u32(16390);
        b.put_i16(1);
        b.put_u32(23);
        b.put_i16(4);
        b.put_i32(-1);
        b.put_i16(0);
        let f = row_description(&b).unwrap();
        assert_eq!(f[0].name, "id");
        assert_eq!(
            (f[0].table_oid, f[0].column, f[0].type_oid, f[0].type_size, f[0].type_modifier),
            (16390, 1, 23, 4, -1)
        );
        for cut in 0..b.len() - 1 {
            assert!(row_description(&b[..cut]).is_none() || cut < 2, "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_row_descriptions_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = row_description(&bytes);
        }
    }

    #[test]
    fn nul_bytes_are_refused_before_they_reach_the_wire() {
        let mut out = BytesMut::new();
        assert!(matches!(extended(&mut out, "SELECT 1\0", &[]), Err(PgError::Db(_))));
        assert!(matches!(extended(&mut out, "SELECT $1", &[Some("a\0b".into())]), Err(PgError::Db(_))));
        assert!(out.is_empty());
        extended(&mut out, "SELECT $1", &[None]).unwrap();
        assert_eq!(out[0], b'P');
    }
}

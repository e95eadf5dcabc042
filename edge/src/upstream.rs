//! A message-level connection to PostgreSQL: raw frames in, raw frames out.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{self, BACKEND_TAGS, Message};

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    max: usize,
}

impl Conn {
    pub async fn connect(addr: &str, max: usize) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: BytesMut::with_capacity(16 << 10), max })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next backend message; an error on EOF or a protocol violation.
    pub async fn recv(&mut self) -> std::io::Result<Message> {
        loop {
            match protocol::decode(&mut self.buf, self.max, BACKEND_TAGS) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "upstream closed the connection"));
            }
        }
    }

    /// Runs a simple query and returns every message up to ReadyForQuery.
    pub async fn simple(&mut self, sql: &str) -> std::io::Result<Vec<Message>> {
        self.send(&protocol::query(sql)).await?;
        let mut out = Vec::new();
        loop {
            let m = self.recv().await?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Logs in with trust authentication (the CDC connection).
    pub async fn login(addr: &str, user: &str, database: &str, max: usize) -> std::io::Result<Conn> {
        let params = vec![("user".to_string(), user.to_string()), ("database".to_string(), database.to_string())];
        Conn::login_with(addr, &params, max).await
    }

    /// Logs in with these startup parameters (trust authentication; see
    /// [`login`] for a password).
    pub async fn login_with(addr: &str, params: &[(String, String)], max: usize) -> std::io::Result<Conn> {
        login(addr, params, None, max).await.map(|l| l.conn).map_err(|e| match e {
            LoginError::Io(e) | LoginError::Unreachable(_, e) => e,
            e => std::io::Error::other(e.to_string()),
        })
    }
}

/// A login to PostgreSQL done: the connection and what the server sent
/// between authentication and ReadyForQuery.
pub struct Login {
    pub conn: Conn,
    /// The ParameterStatus, BackendKeyData and NoticeResponse messages, encoded
    /// as received and in order: what a client must see after AuthenticationOk.
    pub greeting: BytesMut,
    /// BackendKeyData (process id, secret key): what cancels this session.
    pub backend_key: Option<(i32, i32)>,
    /// The transaction status of the ReadyForQuery that ended the login.
    pub status: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("upstream {0} unreachable: {1}")]
    Unreachable(String, std::io::Error),
    #[error("upstream: {0}")]
    Io(#[from] std::io::Error),
    /// The server's ErrorResponse, as it sent it.
    #[error("upstream refused the login: {}", error_message(.0))]
    Refused(Message),
    #[error(
        "the primary asks for a password for user \"{0}\" and postai-edge has none: give the user a password \
         (or upstream_password) in a [[users]] entry of the proxy's configuration"
    )]
    NoPassword(String),
    #[error("the primary asks for an authentication method postai-edge does not support (code {0})")]
    Unsupported(i32),
    #[error("SCRAM authentication with the primary failed: {0}")]
    Scram(std::io::Error),
    #[error("unexpected {0:?} message from the primary during login")]
    Unexpected(char),
}

impl LoginError {
    /// The ErrorResponse a client gets for this failure (the server's own
    /// when it refused).
    pub fn client_error(&self) -> Bytes {
        match self {
            LoginError::Refused(m) => m.raw.clone(),
            LoginError::NoPassword(_) => protocol::error_response("FATAL", "28000", &format!("postai-edge: {self}")),
            _ => protocol::error_response("FATAL", "08006", &format!("postai-edge: {self}")),
        }
    }
}

/// Connects to `addr` and logs in with the startup `params` (`user` among
/// them), answering cleartext, MD5 and SCRAM-SHA-256 password requests with
/// `password`. Returns when the server is ready for queries.
pub async fn login(
    addr: &str,
    params: &[(String, String)],
    password: Option<&str>,
    max: usize,
) -> Result<Login, LoginError> {
    use postgres_protocol::authentication::md5_hash;
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
    use postgres_protocol::message::frontend;

    let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.as_str()).unwrap_or_default();
    let mut conn = Conn::connect(addr, max).await.map_err(|e| LoginError::Unreachable(addr.to_string(), e))?;
    conn.send(&protocol::startup(params)).await?;
    let mut greeting = BytesMut::new();
    let mut backend_key = None;
    let mut scram: Option<ScramSha256> = None;
    let mut out = BytesMut::new();
    let no_password = || LoginError::NoPassword(user.to_string());
    loop {
        let m = conn.recv().await?;
        let body = m.body();
        match m.tag {
            b'R' => {
                let code = body.get(..4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])).unwrap_or(-1);
                let data = body.get(4..).unwrap_or_default();
                out.clear();
                match code {
                    0 => continue,
                    3 => frontend::password_message(password.ok_or_else(no_password)?.as_bytes(), &mut out)?,
                    5 => {
                        let salt: [u8; 4] = data.try_into().map_err(|_| LoginError::Unexpected('R'))?;
                        let pw = password.ok_or_else(no_password)?;
                        frontend::password_message(
                            md5_hash(user.as_bytes(), pw.as_bytes(), salt).as_bytes(),
                            &mut out,
                        )?;
                    }
                    10 => {
                        let offered = data.split(|b| *b == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offered {
                            return Err(LoginError::Unsupported(code));
                        }
                        let pw = password.ok_or_else(no_password)?;
                        // a plaintext upstream connection: no channel binding ('n')
                        let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or(LoginError::Unexpected('R'))?;
                        s.update(data).map_err(LoginError::Scram)?;
                        frontend::sasl_response(s.message(), &mut out)?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or(LoginError::Unexpected('R'))?;
                        s.finish(data).map_err(LoginError::Scram)?;
                        continue;
                    }
                    code => return Err(LoginError::Unsupported(code)),
                }
                conn.send(&out).await?;
            }
            b'K' => {
                if let Some(k) = body.get(..8) {
                    let word = |i: usize| i32::from_be_bytes([k[i], k[i + 1], k[i + 2], k[i + 3]]);
                    backend_key = Some((word(0), word(4)));
                }
                greeting.extend_from_slice(&m.raw);
            }
            b'S' | b'N' => greeting.extend_from_slice(&m.raw),
            // NegotiateProtocolVersion: the server runs 3.0 without the options it did not know
            b'v' => {}
            b'E' => return Err(LoginError::Refused(m)),
            b'Z' => {
                let status = protocol::ready_status(&m).unwrap_or(b'I');
                return Ok(Login { conn, greeting, backend_key, status });
            }
            other => return Err(LoginError::Unexpected(other as char)),
        }
    }
}

/// The M (message) field of an ErrorResponse.
pub fn error_message(m: &Message) -> String {
    let mut fields = m.body();
    while let Some((&field, rest)) = fields.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        if field == b'M' {
            return String::from_utf8_lossy(&rest[..end]).into_owned();
        }
        fields = rest.get(end + 1..).unwrap_or(&[]);
    }
    "error".into()
}

pub type Raw = Bytes;

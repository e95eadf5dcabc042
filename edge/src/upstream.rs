//! A message-level connection to PostgreSQL: raw frames in, raw frames out.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::SslMode;
use crate::protocol::{self, BACKEND_TAGS, Message};
use crate::tls::UpstreamTls;

/// How the proxy reaches its upstreams: the message size limit and TLS.
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    pub max: usize,
    pub tls: Arc<UpstreamTls>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct Conn {
    stream: Stream,
    buf: BytesMut,
    max: usize,
    /// The server's BackendKeyData (process id, secret key) once logged in:
    /// what cancels a query running on this connection.
    pub backend_key: Option<(i32, i32)>,
    /// The server is a postai proxy that tells what each answer reflects
    /// ([`protocol::ANSWER_LSN`]): a cache, whose answers may be older than
    /// the primary's current position.
    pub tells_lsn: bool,
}

/// How long a TCP connection to an upstream may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a login may take, TLS and authentication included (a server
/// that accepts and never answers must not hold a pool's permit for good).
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `SSLRequest` code (PostgreSQL's `NEGOTIATE_SSL_CODE`).
const SSL_REQUEST: i32 = 80877103;

impl Conn {
    /// Connects to `addr` and negotiates TLS as the dialer's mode says.
    pub async fn connect(addr: &str, dialer: &Dialer) -> Result<Conn, LoginError> {
        let unreachable = |e| LoginError::Unreachable(addr.to_string(), e);
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to the connection");
        let mut tcp = connecting.map_err(|_| unreachable(timed_out()))?.map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;
        // an idle connection to a server that stopped answering (power
        // lost, packets dropped) is noticed in about 25 s. (No TCP user
        // timeout: it would also end a healthy COPY whose server waits on a
        // lock with its receive window closed.)
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(10))
            .with_interval(std::time::Duration::from_secs(5))
            .with_retries(3);
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive).map_err(unreachable)?;
        let tls = &dialer.tls;
        let stream = match tls.connector() {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let tls_error = |m: String| LoginError::Tls(addr.to_string(), m);
                let mut request = [0u8; 8];
                request[..4].copy_from_slice(&8i32.to_be_bytes());
                request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
                tcp.write_all(&request).await.map_err(unreachable)?;
                // exactly one byte: nothing sent before the handshake may be read as part of it
                let answer = tcp.read_u8().await.map_err(unreachable)?;
                match answer {
                    b'S' => {
                        let name = tls
                            .server_name(addr)
                            .ok_or_else(|| tls_error("no server name to check the certificate against".into()))?;
                        let s = connector.connect(name, tcp).await.map_err(|e| tls_error(e.to_string()))?;
                        Stream::Tls(Box::new(s))
                    }
                    b'N' if tls.mode == SslMode::Prefer => Stream::Plain(tcp),
                    b'N' => return Err(tls_error("the server does not accept TLS connections".into())),
                    other => return Err(tls_error(format!("unexpected answer {:?} to SSLRequest", other as char))),
                }
            }
        };
        let buf = BytesMut::with_capacity(16 << 10);
        Ok(Conn { stream, buf, max: dialer.max, backend_key: None, tells_lsn: false })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// The next backend message; an error on EOF or a protocol violation.
    pub async fn recv(&mut self) -> std::io::Result<Message> {
        loop {
            match protocol::decode(&mut self.buf, self.max, BACKEND_TAGS) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
            }
            let n = match &mut self.stream {
                Stream::Plain(s) => s.read_buf(&mut self.buf).await?,
                Stream::Tls(s) => s.read_buf(&mut self.buf).await?,
            };
            if n == 0 {
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

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The `tls-server-end-point` data of the server's certificate, for
    /// SCRAM-SHA-256-PLUS: `None` without TLS or for a certificate whose
    /// signature algorithm names no hash.
    fn end_point(&self) -> Option<Vec<u8>> {
        let Stream::Tls(s) = &self.stream else { return None };
        let leaf = s.get_ref().1.peer_certificates()?.first()?;
        crate::tls::certificate_hash(leaf)
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
    #[error("TLS to upstream {0}: {1}")]
    Tls(String, String),
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
/// `password`. Returns when the server is ready for queries. In `prefer`
/// mode a failed TLS handshake or a login refused over TLS is tried once
/// more in plaintext, as libpq does.
pub async fn login(
    dialer: &Dialer,
    addr: &str,
    params: &[(String, String)],
    password: Option<&str>,
) -> Result<Login, LoginError> {
    match tokio::time::timeout(LOGIN_TIMEOUT, login_trying(dialer, addr, params, password)).await {
        Ok(done) => done,
        Err(_) => Err(LoginError::Unreachable(
            addr.to_string(),
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no login within {LOGIN_TIMEOUT:?}")),
        )),
    }
}

async fn login_trying(
    dialer: &Dialer,
    addr: &str,
    params: &[(String, String)],
    password: Option<&str>,
) -> Result<Login, LoginError> {
    match login_asking(dialer, addr, params, password).await {
        Err(LoginError::Tls(..) | LoginError::Refused(_))
            if dialer.tls.mode == SslMode::Prefer && dialer.tls.connector().is_some() =>
        {
            let plain = Dialer { max: dialer.max, tls: Arc::new(UpstreamTls::default()) };
            login_asking(&plain, addr, params, password).await
        }
        other => other,
    }
}

/// A login that asks a postai upstream what its answers reflect
/// ([`protocol::ANSWER_LSN_OPTION`]); an upstream that refuses the option
/// instead of negotiating it away (a pooler that rejects startup parameters
/// it does not know, as PgBouncer does) is asked again without it.
async fn login_asking(
    dialer: &Dialer,
    addr: &str,
    params: &[(String, String)],
    password: Option<&str>,
) -> Result<Login, LoginError> {
    match login_once(dialer, addr, params, password, true).await {
        Err(LoginError::Refused(m)) if refuses_option(&m) => login_once(dialer, addr, params, password, false).await,
        other => other,
    }
}

/// Whether a login was refused for the answer-LSN startup option.
fn refuses_option(m: &Message) -> bool {
    let text = error_message(m);
    text.contains(protocol::ANSWER_LSN_OPTION) || text.contains("unsupported startup parameter")
}

async fn login_once(
    dialer: &Dialer,
    addr: &str,
    params: &[(String, String)],
    password: Option<&str>,
    ask_answer_lsn: bool,
) -> Result<Login, LoginError> {
    use postgres_protocol::authentication::md5_hash;
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
    use postgres_protocol::message::frontend;

    let user = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.as_str()).unwrap_or_default();
    let mut conn = Conn::connect(addr, dialer).await?;
    // asks a postai upstream to tell what its answers reflect
    let mut params = params.to_vec();
    params.retain(|(k, _)| k != protocol::ANSWER_LSN_OPTION);
    if ask_answer_lsn {
        params.push((protocol::ANSWER_LSN_OPTION.to_string(), "on".to_string()));
    }
    conn.send(&protocol::startup(&params).map_err(std::io::Error::other)?).await?;
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
                        let offers = |name: &str| data.split(|b| *b == 0).any(|m| m == name.as_bytes());
                        let pw = password.ok_or_else(no_password)?;
                        // bound to the server's certificate when both can ('p'); over TLS
                        // to a server without -PLUS, 'y'; otherwise 'n' (a 'y' to a server
                        // offering -PLUS reads as a downgrade: a certificate whose
                        // signature names no hash cannot be bound to, by libpq either)
                        let (mechanism, binding) = match conn.end_point() {
                            Some(hash) if offers(SCRAM_SHA_256_PLUS) => {
                                (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash))
                            }
                            _ if !offers(SCRAM_SHA_256) => return Err(LoginError::Unsupported(code)),
                            _ if conn.is_tls() && !offers(SCRAM_SHA_256_PLUS) => {
                                (SCRAM_SHA_256, ChannelBinding::unrequested())
                            }
                            _ => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        };
                        let s = ScramSha256::new(pw.as_bytes(), binding);
                        frontend::sasl_initial_response(mechanism, s.message(), &mut out)?;
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
            b'S' if parameter_name(&m) == Some(protocol::ANSWER_LSN.as_bytes()) => conn.tells_lsn = true,
            b'S' | b'N' => greeting.extend_from_slice(&m.raw),
            // NegotiateProtocolVersion: the server runs 3.0 without the options it did not know
            b'v' => {}
            b'E' => return Err(LoginError::Refused(m)),
            b'Z' => {
                let status = protocol::ready_status(&m).unwrap_or(b'I');
                conn.backend_key = backend_key;
                return Ok(Login { conn, greeting, backend_key, status });
            }
            other => return Err(LoginError::Unexpected(other as char)),
        }
    }
}

pub use crate::protocol::{error_message, parameter_name};

pub type Raw = Bytes;

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers an SSLRequest with `answer` and hangs up.
    async fn answering(answer: u8) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = [0u8; 8];
                if s.read_exact(&mut request).await.is_ok() && request[4..] == SSL_REQUEST.to_be_bytes() {
                    let _ = s.write_all(&[answer]).await;
                }
            }
        });
        addr
    }

    fn dialer(mode: SslMode) -> Dialer {
        let tls = UpstreamTls::load(mode, None, None).expect("loads");
        Dialer { max: 1 << 20, tls: Arc::new(tls) }
    }

    #[tokio::test]
    async fn ssl_modes_against_a_server_without_tls() {
        let addr = answering(b'N').await;
        let c = Conn::connect(&addr, &dialer(SslMode::Prefer)).await.expect("prefer falls back to plaintext");
        assert!(!c.is_tls());
        let e = Conn::connect(&addr, &dialer(SslMode::Require)).await.err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("does not accept TLS") && e.contains(&addr)));
        let garbled = answering(b'X').await;
        let e = Conn::connect(&garbled, &dialer(SslMode::Prefer)).await.err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unexpected answer")));
    }

    #[test]
    fn server_names_come_from_the_address() {
        let tls = UpstreamTls::load(SslMode::Require, None, None).expect("loads");
        assert_eq!(tls.server_name("db.internal:5432").map(|n| n.to_str().into_owned()), Some("db.internal".into()));
        assert_eq!(tls.server_name("127.0.0.1:5432").map(|n| n.to_str().into_owned()), Some("127.0.0.1".into()));
        assert_eq!(tls.server_name("[::1]:5432").map(|n| n.to_str().into_owned()), Some("::1".into()));
        let named = UpstreamTls::load(SslMode::VerifyFull, None, Some("db.example"));
        assert!(named.is_err(), "verify-full without root_cert");
    }

    /// PgBouncer refuses startup parameters it does not know (FATAL
    /// "unsupported startup parameter: ..."): the login is tried again
    /// without the option; other refusals are not.
    #[test]
    fn a_refused_option_is_dropped_other_refusals_stand() {
        let refusal = |text: &str| {
            let mut raw = BytesMut::from(&protocol::error_response("FATAL", "08P01", text)[..]);
            protocol::decode(&mut raw, 1 << 20, BACKEND_TAGS).ok().flatten().expect("an ErrorResponse")
        };
        assert!(refuses_option(&refusal("unsupported startup parameter: _pq_.postai_answer_lsn")));
        assert!(!refuses_option(&refusal("password authentication failed for user \"app\"")));
    }
}

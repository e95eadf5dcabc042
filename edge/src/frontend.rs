//! The client side of a connection's start, terminated at the proxy:
//! SSLRequest (TLS with the configured certificate, or 'N'), GSSENCRequest
//! ('N'), the StartupMessage or a CancelRequest, then authentication
//! (SCRAM-SHA-256 against `[[users]]`, or none when there are no users).
//! The upstream login on the client's behalf is the caller's (`upstream::login`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::auth::{self, AuthError, ScramServer};
use crate::config::{Config, UserConfig};
use crate::protocol::{self, Message, Startup};

/// A client's byte stream: plain TCP or TLS.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}
pub type ClientStream = Box<dyn ClientIo>;

/// A TLS stream that sends what it holds before it waits for the client.
/// tokio-rustls may keep encrypted bytes after a write the socket refused in
/// part (the write still reports every byte taken); the proxy never flushes,
/// so the bytes go out at the next read at the latest: a client waiting for
/// them is never the reason the proxy waits.
pub struct FlushingTls<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FlushingTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.0).poll_flush(cx))?;
        Pin::new(&mut this.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FlushingTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// PostgreSQL's `authentication_timeout` default: the whole start, TLS
/// handshake and password exchange included.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// PostgreSQL's limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP: usize = 10_000;

/// What a new connection turned out to be.
pub enum Opening {
    /// A CancelRequest: the caller forwards it to the primary.
    Cancel { pid: i32, key: i32 },
    /// An authenticated client (or any client when no users are configured).
    Login(Box<Accepted>),
    /// The client left, timed out, or was refused (and told why).
    Closed,
}

/// A client past authentication, before the upstream login.
pub struct Accepted {
    pub rd: ReadHalf<ClientStream>,
    pub wr: WriteHalf<ClientStream>,
    /// What the client sent after its StartupMessage (typed messages).
    pub buf: BytesMut,
    /// The StartupMessage parameters as the client sent them.
    pub params: Vec<(String, String)>,
    pub user: String,
    pub database: String,
    /// The password the proxy logs in upstream with, if any.
    pub upstream_password: Option<String>,
    /// AuthenticationOk (after SASLFinal when SCRAM ran): what the client
    /// gets first once the upstream login succeeds.
    pub auth_ok: BytesMut,
    pub tls: bool,
}

impl Accepted {
    /// The startup parameters for the upstream login: the client's, with the
    /// user and database first (the proxy's own protocol option is its, not
    /// the session's).
    pub fn upstream_params(&self) -> Vec<(String, String)> {
        let mut p = vec![("user".to_string(), self.user.clone()), ("database".to_string(), self.database.clone())];
        let ours = |k: &str| matches!(k, "user" | "database" | protocol::ANSWER_LSN_OPTION);
        p.extend(self.params.iter().filter(|(k, _)| !ours(k)).cloned());
        p
    }

    /// The client is a postai proxy asking what each answer reflects
    /// ([`protocol::ANSWER_LSN_OPTION`]).
    pub fn wants_answer_lsn(&self) -> bool {
        self.params.iter().any(|(k, v)| k == protocol::ANSWER_LSN_OPTION && v == "on")
    }
}

/// Runs a connection's start: TLS negotiation, the StartupMessage, and
/// client authentication against `users` (the running `[[users]]`, which a
/// reload replaces), within [`STARTUP_TIMEOUT`].
pub async fn open(config: &Config, users: &[UserConfig], socket: TcpStream) -> std::io::Result<Opening> {
    match tokio::time::timeout(STARTUP_TIMEOUT, open_inner(config, users, socket)).await {
        Ok(r) => r,
        Err(_) => Ok(Opening::Closed),
    }
}

/// The next startup-phase message; `None` when the client left, or sent
/// one that does not parse (it gets an ErrorResponse first).
async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Startup>> {
    loop {
        match protocol::decode_startup(buf, max) {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {
                if s.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(e) => {
                s.write_all(&protocol::error_response("FATAL", "08P01", &e.to_string())).await?;
                return Ok(None);
            }
        }
    }
}

async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, code: &str, message: &str) -> std::io::Result<Opening> {
    s.write_all(&protocol::error_response("FATAL", code, message)).await?;
    // TLS: the last bytes and close_notify
    let _ = s.shutdown().await;
    Ok(Opening::Closed)
}

async fn open_inner(config: &Config, users: &[UserConfig], mut tcp: TcpStream) -> std::io::Result<Opening> {
    let max = config.max_message_bytes.min(MAX_STARTUP);
    let mut buf = BytesMut::with_capacity(2 << 10);
    let tls = config.tls.as_ref().and_then(|t| t.loaded.clone());
    // on the plain socket: negotiation requests until TLS or a StartupMessage
    let (mut stream, first, secure): (ClientStream, Startup, bool) = loop {
        let Some(m) = read_startup(&mut tcp, &mut buf, max).await? else { return Ok(Opening::Closed) };
        match (m, &tls) {
            (Startup::GssEnc, _) | (Startup::Ssl, None) => tcp.write_all(b"N").await?,
            (Startup::Ssl, Some(t)) => {
                if !buf.is_empty() {
                    // bytes sent before the handshake would be taken as encrypted (CVE-2021-23214)
                    return refuse(&mut tcp, "08P01", "received unencrypted data after SSL request").await;
                }
                tcp.write_all(b"S").await?;
                let mut s: ClientStream = Box::new(FlushingTls(t.acceptor.accept(tcp).await?));
                let Some(m) = read_startup(&mut s, &mut buf, max).await? else { return Ok(Opening::Closed) };
                if matches!(m, Startup::Ssl | Startup::GssEnc) {
                    return refuse(&mut s, "08P01", "encryption requested on an encrypted connection").await;
                }
                break (s, m, true);
            }
            (m, _) => break (Box::new(tcp), m, false),
        }
    };
    let params = match first {
        Startup::Params(p) => p,
        Startup::Cancel { pid, key } => return Ok(Opening::Cancel { pid, key }),
        Startup::Ssl | Startup::GssEnc => return Ok(Opening::Closed),
    };
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = param("user").filter(|u| !u.is_empty()) else {
        return refuse(&mut stream, "28000", "no PostgreSQL user name specified in startup packet").await;
    };
    let database = param("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    let mut auth_ok = BytesMut::new();
    let upstream_password = if users.is_empty() {
        // no [[users]]: no client authentication, and no password upstream
        None
    } else {
        let entry = users.iter().find(|u| u.name == user);
        let binding = if secure { tls.as_ref().and_then(|t| t.end_point.as_deref()) } else { None };
        let mut scram = ScramServer::new(&user, entry.and_then(|e| e.secret.as_ref()), binding);
        match sasl_exchange(&mut stream, &mut buf, &mut scram).await? {
            Ok(Some(server_final)) => auth_ok.extend_from_slice(&auth::sasl_final(&server_final)),
            Ok(None) => return Ok(Opening::Closed),
            Err(e) => {
                if matches!(e, AuthError::Failed(_)) {
                    eprintln!("postai-edge: {e}");
                }
                return refuse(&mut stream, e.sqlstate(), &e.to_string()).await;
            }
        }
        entry.and_then(|e| e.upstream_password.clone())
    };
    auth_ok.extend_from_slice(&auth::authentication_ok());
    let (rd, wr) = tokio::io::split(stream);
    Ok(Opening::Login(Box::new(Accepted {
        rd,
        wr,
        buf,
        params,
        user,
        database,
        upstream_password,
        auth_ok,
        tls: secure,
    })))
}

/// AuthenticationSASL, then the client's two messages. `Ok(Ok(None))`: the
/// client left (libpq does so when it has no password to give).
async fn sasl_exchange(
    s: &mut ClientStream,
    buf: &mut BytesMut,
    scram: &mut ScramServer,
) -> std::io::Result<Result<Option<String>, AuthError>> {
    s.write_all(&scram.sasl_request()).await?;
    let Some(m) = password_message(s, buf).await? else { return Ok(Ok(None)) };
    let first = match m.and_then(|m| {
        let (mechanism, data) = auth::parse_sasl_initial(m.body())?;
        scram.client_first(mechanism, data)
    }) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    s.write_all(&auth::sasl_continue(&first)).await?;
    let Some(m) = password_message(s, buf).await? else { return Ok(Ok(None)) };
    Ok(m.and_then(|m| scram.client_final(m.body())).map(Some))
}

/// The next message of the password exchange: it must be a 'p' message.
async fn password_message(
    s: &mut ClientStream,
    buf: &mut BytesMut,
) -> std::io::Result<Option<Result<Message, AuthError>>> {
    loop {
        match protocol::decode(buf, auth::MAX_AUTH_MESSAGE + 5, b"p") {
            Ok(Some(m)) => return Ok(Some(Ok(m))),
            Ok(None) => {
                if s.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            Err(protocol::ProtocolError::UnknownType(_)) => {
                return Ok(Some(Err(AuthError::Malformed("expected a SASL response message"))));
            }
            Err(_) => return Ok(Some(Err(AuthError::Malformed("invalid SASL response message length")))),
        }
    }
}

/// What a client gets once the upstream login succeeded: SASLFinal (after
/// SCRAM) and AuthenticationOk, the primary's ParameterStatus and
/// BackendKeyData as it sent them, then ReadyForQuery.
pub fn greeting(auth_ok: &[u8], upstream: &[u8], status: u8) -> Bytes {
    let mut out = BytesMut::with_capacity(auth_ok.len() + upstream.len() + 6);
    out.extend_from_slice(auth_ok);
    out.extend_from_slice(upstream);
    out.extend_from_slice(&protocol::ready_for_query(status));
    out.freeze()
}

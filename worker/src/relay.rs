//! The driver's WebSocket mode (`Pool`, `Client`): the PostgreSQL protocol
//! itself, as bytes in binary WebSocket frames. The Worker ends the
//! client's login (the API token as a cleartext password: the WebSocket is
//! the TLS), logs in to PostgreSQL with its own credentials, hands the
//! client PostgreSQL's greeting, then relays the session both ways.
//! Nothing is cached in this mode yet: the statements go to PostgreSQL as
//! sent.
//!
//! The driver pipelines its login (`pipelineConnect: "password"`): the
//! StartupMessage and the PasswordMessage arrive together, before any
//! request for them; a driver that does not pipeline waits for the request
//! for a cleartext password, which is sent either way.

use bytes::{BufMut, Bytes, BytesMut};
use postai_wire::protocol::{self, FRONTEND_TAGS, ProtocolError, Startup};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::access::Access;
use crate::handler::{Net, connect};
use crate::neon::DbError;
use postai_core::Duration;

/// The largest message a client may send before it has logged in.
const LOGIN_MAX: usize = 64 << 10;

/// Where the client's login stands.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Startup,
    Password,
}

/// The client's side of the login, sans IO: bytes in, bytes to send back
/// and the outcome out.
#[derive(Debug)]
pub struct FrontLogin {
    phase: Phase,
    buf: BytesMut,
}

/// What one call of [`FrontLogin::handle`] gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoginStep {
    /// Bytes for the client.
    pub send: Vec<u8>,
    /// The login is done: what the client sent after it (a pipelined
    /// query), to relay once the upstream is ready.
    pub done: Option<Bytes>,
    /// The client must be told this and disconnected.
    pub refused: Option<DbError>,
}

impl Default for FrontLogin {
    fn default() -> Self {
        FrontLogin { phase: Phase::Startup, buf: BytesMut::new() }
    }
}

impl FrontLogin {
    /// Bytes from the client; `access` decides who may log in.
    pub fn handle(&mut self, bytes: &[u8], access: &Access) -> LoginStep {
        self.buf.extend_from_slice(bytes);
        let mut step = LoginStep::default();
        loop {
            match self.phase {
                Phase::Startup => match protocol::decode_startup(&mut self.buf, LOGIN_MAX) {
                    Ok(None) => return step,
                    Err(e) => return refuse(step, &e),
                    // TLS is the WebSocket's: no second layer
                    Ok(Some(Startup::Ssl | Startup::GssEnc)) => step.send.push(b'N'),
                    Ok(Some(Startup::Cancel { .. })) => {
                        step.refused = Some(DbError::new("0A000", "cancel requests are not relayed by this edge"));
                        return step;
                    }
                    Ok(Some(Startup::Params(params))) => {
                        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                        let user = get("user").unwrap_or("");
                        let database = get("database").unwrap_or(user);
                        let up = &access.upstream;
                        if user != up.user || database != up.database {
                            let m = format!(
                                "this edge serves role {:?} on database {:?} only (asked for {user:?} on {database:?})",
                                up.user, up.database
                            );
                            step.refused = Some(DbError::new("28000", &m));
                            return step;
                        }
                        // AuthenticationCleartextPassword
                        step.send.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                        self.phase = Phase::Password;
                    }
                },
                Phase::Password => match protocol::decode(&mut self.buf, LOGIN_MAX, FRONTEND_TAGS) {
                    Ok(None) => return step,
                    Err(e) => return refuse(step, &e),
                    Ok(Some(m)) if m.tag == b'p' => {
                        let body = m.body();
                        let password = body.strip_suffix(&[0]).unwrap_or(body);
                        let token = access.token.as_bytes();
                        if token.is_empty() || !bool::from(password.ct_eq(token)) {
                            let e = DbError::new("28P01", "password authentication failed: wrong or missing API token");
                            step.refused = Some(e);
                            return step;
                        }
                        step.done = Some(self.buf.split().freeze());
                        return step;
                    }
                    Ok(Some(m)) => {
                        let e = DbError::new("08P01", &format!("expected a password message, got {:?}", m.tag as char));
                        step.refused = Some(e);
                        return step;
                    }
                },
            }
        }
    }
}

fn refuse(mut step: LoginStep, e: &ProtocolError) -> LoginStep {
    step.refused = Some(DbError::new("08P01", &format!("invalid startup: {e}")));
    step
}

/// An ErrorResponse for the client.
pub fn error_response(e: &DbError) -> Vec<u8> {
    let mut body = BytesMut::new();
    for (code, value) in &e.fields {
        body.put_u8(*code);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::new();
    protocol::frame_into(&mut out, b'E', &body);
    out.to_vec()
}

/// Serves one client over `client` (the WebSocket's bytes, or a TCP stream
/// in the host's tests): its login, then the session relayed to PostgreSQL
/// until either side leaves. A session idle for `idle_ms` (in a
/// transaction or not) is ended by PostgreSQL: a client cannot hold a
/// server connection by holding its WebSocket open.
pub async fn serve_client<C, N>(mut client: C, access: &Access, net: &N, idle_ms: u64) -> Result<(), String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    N: Net,
{
    let mut login = FrontLogin::default();
    let mut chunk = vec![0u8; 16 << 10];
    let pipelined = loop {
        let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        let step = login.handle(&chunk[..n], access);
        client.write_all(&step.send).await.map_err(|e| e.to_string())?;
        if let Some(e) = step.refused {
            let _ = client.write_all(&error_response(&e)).await;
            let _ = client.shutdown().await;
            return Err(e.message().to_string());
        }
        if let Some(rest) = step.done {
            break rest;
        }
    };
    let mut login = crate::access::login_of(&access.upstream, None);
    let idle = idle_ms.max(1).to_string();
    login.settings.push(("idle_session_timeout".into(), idle.clone()));
    login.settings.push(("idle_in_transaction_session_timeout".into(), idle));
    let upstream = match connect(net, &access.upstream, &login).await {
        Ok(c) => c,
        Err(e) => {
            let e = match e {
                crate::pg::PgError::Db(d) => d,
                other => DbError::new("08006", &other.to_string()),
            };
            let _ = client.write_all(&error_response(&e)).await;
            let _ = client.shutdown().await;
            return Err(e.message().to_string());
        }
    };
    // AuthenticationOk, then PostgreSQL's own greeting and ReadyForQuery
    let mut hello = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    hello.extend_from_slice(&upstream.greeting);
    hello.extend_from_slice(&protocol::ready_for_query(upstream.status));
    let (mut stream, unread) = upstream.into_stream();
    hello.extend_from_slice(&unread);
    client.write_all(&hello).await.map_err(|e| e.to_string())?;
    stream.write_all(&pipelined).await.map_err(|e| e.to_string())?;
    // (the greeting ended with ReadyForQuery)
    let mut requests = Requests { ready: true, ..Requests::default() };
    requests.server_sent(&unread);
    requests.client_sent(&pipelined);
    relay(client, stream, net, Duration::from_millis(idle_ms.max(1).saturating_mul(2)), requests).await
}

/// One direction of the protocol, read as it passes: where each message
/// starts, and its tag.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 5],
    have: usize,
    left: usize,
}

impl Frames {
    /// Calls `tag` with the tag of each message whose header completes in `b`.
    fn feed(&mut self, mut b: &[u8], mut tag: impl FnMut(u8)) {
        while !b.is_empty() {
            if self.left > 0 {
                let n = self.left.min(b.len());
                self.left -= n;
                b = &b[n..];
                continue;
            }
            let n = (5 - self.have).min(b.len());
            self.header[self.have..self.have + n].copy_from_slice(&b[..n]);
            self.have += n;
            b = &b[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.left = (len as usize).saturating_sub(4);
                self.have = 0;
                tag(self.header[0]);
            }
        }
    }

    fn between_messages(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// Whether a session is idle: the server's last word was ReadyForQuery
/// (notifications, notices and settings aside) and the client has sent
/// nothing since, and no message is half sent either way. A statement
/// running long is not idle; nor is a COPY under way, however its Syncs are
/// counted (PostgreSQL ignores a Sync during COPY FROM STDIN).
#[derive(Debug, Default)]
struct Requests {
    client: Frames,
    server: Frames,
    /// The server's last message was ReadyForQuery.
    ready: bool,
    /// The client sent bytes since.
    asked: bool,
}

impl Requests {
    fn client_sent(&mut self, b: &[u8]) {
        self.asked |= !b.is_empty();
        self.client.feed(b, |_| {});
    }

    fn server_sent(&mut self, b: &[u8]) {
        let (ready, asked) = (&mut self.ready, &mut self.asked);
        self.server.feed(b, |t| match t {
            b'Z' => (*ready, *asked) = (true, false),
            b'A' | b'N' | b'S' => {}
            _ => *ready = false,
        });
    }

    fn idle(&self) -> bool {
        self.ready && !self.asked && self.client.between_messages() && self.server.between_messages()
    }
}

/// Moves bytes both ways until either side leaves, or until the session
/// has been idle ([`Requests`]) for `quiet` (the session's own timeouts are
/// settings its client may change: `SET idle_session_timeout = 0` must not
/// let it hold a server connection for good). The client is told why.
async fn relay<C, S, N>(client: C, server: S, net: &N, quiet: Duration, mut requests: Requests) -> Result<(), String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    N: Net,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        let idle = requests.idle();
        tokio::select! {
            r = cr.read(&mut up) => match r.map_err(|e| e.to_string())? {
                0 => return Ok(()),
                n => {
                    requests.client_sent(&up[..n]);
                    sw.write_all(&up[..n]).await.map_err(|e| e.to_string())?;
                }
            },
            r = sr.read(&mut down) => match r.map_err(|e| e.to_string())? {
                0 => return Ok(()),
                n => {
                    requests.server_sent(&down[..n]);
                    cw.write_all(&down[..n]).await.map_err(|e| e.to_string())?;
                }
            },
            () = net.sleep(quiet), if idle => {
                let m = "terminating connection: idle for twice POSTAI_IDLE_MS";
                let mut e = DbError::new("57P05", m);
                e.fields.retain(|(c, _)| !matches!(c, b'S' | b'V'));
                e.fields.splice(0..0, [(b'S', "FATAL".to_string()), (b'V', "FATAL".to_string())]);
                let _ = cw.write_all(&error_response(&e)).await;
                let _ = cw.shutdown().await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages split anywhere across reads: a session is idle only between
    /// a request's ReadyForQuery and the next request.
    #[test]
    fn a_session_is_idle_between_requests_only() {
        let mut r = Requests { ready: true, ..Requests::default() };
        assert!(r.idle());
        let mut q = protocol::query("SELECT pg_sleep(10)").to_vec();
        q.extend_from_slice(&protocol::query("SELECT 1"));
        for chunk in q.chunks(3) {
            r.client_sent(chunk);
            assert!(!r.idle());
        }
        let mut answers = Vec::new();
        for _ in 0..2 {
            let mut c = BytesMut::new();
            protocol::frame_into(&mut c, b'C', b"SELECT 1\0");
            answers.extend_from_slice(&c);
            answers.extend_from_slice(&protocol::ready_for_query(b'I'));
        }
        let (first, second) = answers.split_at(answers.len() / 2);
        r.server_sent(first);
        r.server_sent(&second[..4]);
        assert!(!r.idle(), "a message half received");
        r.server_sent(&second[4..]);
        assert!(r.idle());
        // COPY FROM STDIN: data then CopyDone, no ReadyForQuery yet
        r.client_sent(&protocol::query("COPY t FROM STDIN"));
        let mut g = BytesMut::new();
        protocol::frame_into(&mut g, b'G', b"\0\0\0");
        r.server_sent(&g);
        assert!(!r.idle(), "a COPY under way");
        let mut done = BytesMut::new();
        protocol::frame_into(&mut done, b'c', b"");
        r.client_sent(&done);
        assert!(!r.idle());
        r.server_sent(&protocol::ready_for_query(b'I'));
        assert!(r.idle());
        // a notification while idle leaves it idle
        let mut a = BytesMut::new();
        protocol::frame_into(&mut a, b'A', b"\0\0\0\x01ch\0\0");
        r.server_sent(&a);
        assert!(r.idle());
    }
    use crate::access::parse_conn;

    fn access() -> Access {
        let upstream = parse_conn("postgresql://app:pw@db:5432/shop").unwrap();
        Access { token: "tok".into(), upstream, feed: None }
    }

    fn startup(user: &str, db: &str) -> Vec<u8> {
        protocol::startup(&[("user".into(), user.into()), ("database".into(), db.into())]).expect("startup").to_vec()
    }

    fn password(p: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        protocol::frame_into(&mut out, b'p', format!("{p}\0").as_bytes());
        out.to_vec()
    }

    #[test]
    fn a_pipelined_login_with_the_token_is_done_at_once() {
        let mut bytes = startup("app", "shop");
        bytes.extend(password("tok"));
        bytes.extend_from_slice(&protocol::query("SELECT 1"));
        let step = FrontLogin::default().handle(&bytes, &access());
        assert_eq!(step.send, [b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        assert_eq!(step.done.as_deref(), Some(&protocol::query("SELECT 1")[..]), "the pipelined query kept");
        assert!(step.refused.is_none());
    }

    #[test]
    fn a_login_in_pieces_with_tls_asked_first() {
        let mut l = FrontLogin::default();
        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(l.handle(&ssl, &access()).send, b"N");
        let s = startup("app", "shop");
        let (a, b) = s.split_at(5);
        assert_eq!(l.handle(a, &access()), LoginStep::default());
        assert_eq!(l.handle(b, &access()).send.len(), 9);
        let p = password("tok");
        assert!(l.handle(&p[..3], &access()).done.is_none());
        assert_eq!(l.handle(&p[3..], &access()).done.as_deref(), Some(&[][..]));
    }

    #[test]
    fn wrong_tokens_users_and_bytes_are_refused() {
        let mut bytes = startup("app", "shop");
        bytes.extend(password("nope"));
        assert_eq!(FrontLogin::default().handle(&bytes, &access()).refused.unwrap().code(), "28P01");
        let mut bytes = startup("app", "shop");
        bytes.extend(password("tok\0x"));
        assert!(FrontLogin::default().handle(&bytes, &access()).refused.is_some());
        assert_eq!(FrontLogin::default().handle(&startup("admin", "shop"), &access()).refused.unwrap().code(), "28000");
        assert_eq!(FrontLogin::default().handle(&startup("app", "other"), &access()).refused.unwrap().code(), "28000");
        let mut bytes = startup("app", "shop");
        bytes.extend_from_slice(&protocol::query("SELECT 1"));
        assert_eq!(FrontLogin::default().handle(&bytes, &access()).refused.unwrap().code(), "08P01");
        let huge = [0x7f, 0, 0, 0, 0, 3, 0, 0];
        assert!(FrontLogin::default().handle(&huge, &access()).refused.is_some());
        let no_token = Access { token: String::new(), ..access() };
        let mut bytes = startup("app", "shop");
        bytes.extend(password(""));
        assert!(FrontLogin::default().handle(&bytes, &no_token).refused.is_some());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_in_any_pieces_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            cut in 0usize..256,
        ) {
            let mut l = FrontLogin::default();
            let (a, b) = bytes.split_at(cut.min(bytes.len()));
            let first = l.handle(a, &access());
            if first.refused.is_none() && first.done.is_none() {
                let _ = l.handle(b, &access());
            }
        }
    }

    #[test]
    fn errors_encode_as_postgresql_does() {
        let e = error_response(&DbError::new("28P01", "no"));
        assert_eq!(e[0], b'E');
        let body = &e[5..];
        assert_eq!(DbError::parse(body).code(), "28P01");
    }
}

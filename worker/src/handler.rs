//! One `POST /sql` request, end to end, over any stream the caller can
//! open: the Worker opens a `worker::Socket`, the host's tests a tokio
//! `TcpStream`, and both run this same code.
//!
//! Every answer says which tier served it (`x-postai-served`) and what it
//! reflects (`x-postai-lsn`: every commit up to that WAL position), and
//! carries the session token (`x-postai-session`: the newest position the
//! session has seen or written), which the client sends back as
//! `x-postai-session` to read its own writes at any edge.

use std::cell::RefCell;
use std::future::Future;

use bytes::BytesMut;
use futures_util::future::{Either, select};
use postai_core::consistency::Consistency;
use postai_core::stream::Line;
use postai_core::{Duration, Instant, Lsn};
use postai_wire::protocol;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::access::{Access, ConnInfo, bearer, login_of};
use crate::cache::{Edge, Start};
use crate::neon::{self, Body, DbError, Options, Query, QueryResult};
use crate::pg::{self, Client, Login, PgError};

pub const SERVED: &str = "x-postai-served";
pub const LSN: &str = "x-postai-lsn";
pub const SESSION: &str = "x-postai-session";
/// The request's consistency: `eventual`, `read-your-writes` (the
/// default: the session token is a floor) or `strong` (PostgreSQL only).
pub const CONSISTENCY: &str = "x-postai-consistency";

/// What the Worker answers: status, JSON or text body, and its headers.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub json: bool,
    pub headers: Vec<(&'static str, String)>,
    /// The isolate's change feed is due: the driver runs [`pull`] after
    /// answering (off the request's path).
    pub pull_feed: bool,
}

impl Answer {
    fn json(status: u16, v: &Value) -> Answer {
        Answer { status, body: v.to_string(), json: true, headers: Vec::new(), pull_feed: false }
    }

    /// A PostgreSQL-shaped error, as the driver reads one: HTTP 400, the
    /// fields at the top level (`err.code` is the SQLSTATE).
    pub fn db_error(e: &DbError) -> Answer {
        Answer::json(400, &e.to_json())
    }

    pub fn text(status: u16, body: &str) -> Answer {
        Answer { status, body: body.into(), json: false, headers: Vec::new(), pull_feed: false }
    }
}

const CURRENT_LSN: &str = "SELECT pg_current_wal_lsn()";

/// The largest request body accepted (statements and parameters).
pub const REQUEST_MAX: usize = 10 << 20;

/// What the Worker connects to, and its clock: `worker::Socket` and
/// `Date.now()` in the Worker, tokio and the system clock in the host's tests.
pub trait Net {
    type Stream: AsyncRead + AsyncWrite + Unpin;
    /// Opens a stream to `to` (TLS, if any, negotiated).
    fn open(&self, to: &ConnInfo) -> impl Future<Output = std::io::Result<Self::Stream>>;
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration) -> impl Future<Output = ()>;
}

/// A request the Worker accepted: who, what, how.
struct Admitted {
    login: Login,
    options: Options,
    body: Body,
    floor: Option<u64>,
    consistency: Consistency,
}

/// What the driver checks before it reads a request's body: the token
/// (nothing else is looked at without it), then a declared length over
/// [`REQUEST_MAX`]. The body is then read up to one byte past the limit.
pub fn precheck(access: &Access, header: &impl Fn(&str) -> Option<String>) -> Result<Login, Answer> {
    let auth = header("authorization");
    let login = access
        .authorize(header("neon-connection-string").as_deref(), bearer(auth.as_deref()))
        .map_err(|e| Answer::db_error(&e))?;
    let declared = header("content-length").and_then(|l| l.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > REQUEST_MAX as u64) {
        return Err(too_large(n));
    }
    Ok(login)
}

fn too_large(n: u64) -> Answer {
    Answer::db_error(&DbError::new("54000", &format!("request body of {n} bytes: at most {REQUEST_MAX}")))
}

/// Checks the token first (nothing else is looked at without it), then the
/// headers and the body.
fn admit(access: &Access, header: &impl Fn(&str) -> Option<String>, body: &[u8]) -> Result<Admitted, Answer> {
    let login = precheck(access, header)?;
    let bad = |code: &str, m: &str| Answer::db_error(&DbError::new(code, m));
    if body.len() > REQUEST_MAX {
        return Err(too_large(body.len() as u64));
    }
    let options = Options::from_headers(header).map_err(|e| bad(e.code(), &e.to_string()))?;
    let body = neon::parse_body(body).map_err(|e| bad(e.code(), &e.to_string()))?;
    let floor = match header(SESSION) {
        None => None,
        Some(s) => Some(protocol::parse_lsn(&s).ok_or_else(|| bad("22023", &format!("{SESSION}: not an LSN: {s:?}")))?),
    };
    let consistency = match header(CONSISTENCY).as_deref() {
        None => Consistency::ReadYourWrites,
        Some(c @ ("eventual" | "read-your-writes" | "strong")) => c.parse().unwrap_or_default(),
        Some(other) => {
            return Err(bad("22023", &format!("{CONSISTENCY}: eventual, read-your-writes or strong, not {other:?}")));
        }
    };
    Ok(Admitted { login, options, body, floor, consistency })
}

/// Handles one request: `header` looks a header up by lower-case name.
/// With `edge` (a feed is configured), single statements go through the
/// cache; transactions and everything the cache cannot take run on
/// PostgreSQL.
pub async fn handle<N: Net>(
    access: &Access,
    edge: Option<&RefCell<Edge>>,
    net: &N,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
) -> Answer {
    let a = match admit(access, &header, body) {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    if let (Some(edge), Some(_), Body::One(q)) = (edge, &access.feed, &a.body) {
        return cached(edge, net, access, &a, q).await;
    }
    direct(net, access, &a, edge.filter(|_| access.feed.is_some())).await
}

/// On PostgreSQL, uncached; what it wrote is invalidated in `edge`.
async fn direct<N: Net>(net: &N, access: &Access, a: &Admitted, edge: Option<&RefCell<Edge>>) -> Answer {
    let mut client = match connect(net, &access.upstream, &a.login).await {
        Ok(c) => c,
        Err(e) => return error_answer(e),
    };
    let ran = match &a.body {
        Body::One(q) => one(&mut client, q).await.map(|(r, lsns)| (r.to_json(&a.options), lsns)),
        Body::Batch(qs) => {
            batch(&mut client, qs, &a.options.begin).await.map(|(r, l)| (neon::batch_json(&r, &a.options), l))
        }
    };
    client.terminate().await;
    match ran {
        Ok((json, (before, after))) => {
            if let Some(edge) = edge {
                let statements: Vec<(&str, &[Option<String>])> = match &a.body {
                    Body::One(q) => vec![(q.query.as_str(), q.params.as_slice())],
                    Body::Batch(qs) => qs.iter().map(|q| (q.query.as_str(), q.params.as_slice())).collect(),
                };
                let who = (a.login.user.as_str(), a.login.database.as_str());
                edge.borrow_mut().wrote(net.now(), who, &statements, after.map(Lsn));
            }
            answered(json, "primary", before, after.max(a.floor))
        }
        Err(e) => error_answer(e),
    }
}

/// Through the cache: a hit, or a miss run on PostgreSQL and handed back
/// to the node; the answer says whether the feed is due to be pulled.
async fn cached<N: Net>(edge: &RefCell<Edge>, net: &N, access: &Access, a: &Admitted, q: &Query) -> Answer {
    let pull_due = edge.borrow().pull_due(net.now());
    let mut answer = served(edge, net, access, a, q).await;
    answer.pull_feed = pull_due;
    answer
}

/// Pulls the change feed, unless another request of the isolate is: what
/// the driver runs after answering when [`Answer::pull_feed`] says so (the
/// Worker in `waitUntil`), so that no request waits for it.
pub async fn pull<N: Net>(edge: &RefCell<Edge>, net: &N, access: &Access) {
    let Some(feed) = &access.feed else { return };
    if !edge.borrow_mut().pull(net.now()) {
        return;
    }
    let guard = Pulling(edge);
    let login = login_of(&access.upstream, None);
    // the whole pull, catalog and roles included, within a bound: a stalled
    // socket must not keep the isolate from pulling again
    let limit = edge.borrow().pull_timeout().saturating_mul(3);
    let pulling = std::pin::pin!(pull_feed(edge, net, feed, (&access.upstream, &login)));
    let pulled = match select(pulling, std::pin::pin!(net.sleep(limit))).await {
        Either::Left((pulled, _)) => pulled,
        Either::Right(_) => Err(PgError::Protocol(format!("the pull took longer than {} ms", limit.as_millis()))),
    };
    if let Err(e) = &pulled {
        // the node's silence bound decides what may still be served
        log(&format!("the change feed: {e}"));
    }
    std::mem::forget(guard);
    edge.borrow_mut().pulled(net.now(), pulled.is_ok());
}

/// A statement through the node: a hit, or a miss run on PostgreSQL.
async fn served<N: Net>(edge: &RefCell<Edge>, net: &N, access: &Access, a: &Admitted, q: &Query) -> Answer {
    let who = (a.login.user.as_str(), a.login.database.as_str());
    let start = edge.borrow_mut().start(net.now(), who, a.consistency, a.floor.map(Lsn), &q.query, &q.params);
    let pending = match start {
        Start::Hit { value, lsn } => {
            return answered(value.to_json(&a.options), "L1", Some(lsn.0), a.floor.max(Some(lsn.0)));
        }
        Start::Pass => return direct(net, access, a, Some(edge)).await,
        Start::Miss(p) => p,
    };
    let mut guard = Finishing { edge, pending: Some(pending), at: net.now() };
    let ran = match connect(net, &access.upstream, &a.login).await {
        Ok(mut c) => {
            let r = one(&mut c, q).await;
            c.terminate().await;
            r
        }
        Err(e) => Err(e),
    };
    let Some(pending) = guard.pending.take() else {
        return error_answer(PgError::Protocol("the request's cache state was lost".into()));
    };
    match ran {
        Ok((r, (before, after))) => {
            let value = std::sync::Arc::new(r);
            let commit = after.filter(|_| pending.writes).map(Lsn);
            edge.borrow_mut().finish(net.now(), pending, Ok((value.clone(), commit)));
            answered(value.to_json(&a.options), "primary", before, after.max(a.floor))
        }
        Err(e) => {
            edge.borrow_mut().finish(net.now(), pending, Err(e.to_string()));
            error_answer(e)
        }
    }
}

/// A miss under way, handed back to the node however its request ends: a
/// client that leaves drops the request's future, and without this the
/// node would keep its session and request for good (at its limits, every
/// request would pass the cache).
struct Finishing<'a> {
    edge: &'a RefCell<Edge>,
    pending: Option<crate::cache::Pending>,
    at: Instant,
}

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        if let (Some(p), Ok(mut e)) = (self.pending.take(), self.edge.try_borrow_mut()) {
            e.finish(self.at, p, Err("the request was given up".into()));
        }
    }
}

/// A pull under way, ended however its request ends: a client that leaves
/// drops the request's future mid-pull, and without this no request of the
/// isolate would pull again (its cache silent for good).
struct Pulling<'a>(&'a RefCell<Edge>);

impl Drop for Pulling<'_> {
    fn drop(&mut self) {
        if let Ok(mut e) = self.0.try_borrow_mut() {
            e.pull_abandoned();
        }
    }
}

/// A 200 answer with its tier, what it reflects and the session's token.
fn answered(json: Value, served: &str, reflects: Option<u64>, token: Option<u64>) -> Answer {
    let mut a = Answer::json(200, &json);
    a.headers.push((SERVED, served.into()));
    if let Some(l) = reflects {
        a.headers.push((LSN, lsn_text(l)));
    }
    if let Some(l) = token {
        a.headers.push((SESSION, lsn_text(l)));
    }
    a
}

pub(crate) async fn connect<N: Net>(net: &N, to: &ConnInfo, login: &Login) -> Result<Client<N::Stream>, PgError> {
    let at = (to.host.clone(), to.port);
    let refused = REFUSES_SETTINGS.with(|r| r.borrow().contains(&at));
    let plain = Login { settings: Vec::new(), ..login.clone() };
    let login = if refused { &plain } else { login };
    let stream = net.open(to).await.map_err(|e| PgError::Db(unreachable(&e)))?;
    match Client::login(stream, login).await {
        // a pooler (PgBouncer refuses startup parameters it does not know)
        // or an older PostgreSQL: the login again, without the settings,
        // and from now on for this server
        Err(PgError::Db(e)) if !login.settings.is_empty() && refuses_settings(&e) => {
            REFUSES_SETTINGS.with(|r| r.borrow_mut().insert(at));
            let stream = net.open(to).await.map_err(|e| PgError::Db(unreachable(&e)))?;
            Client::login(stream, &plain).await
        }
        other => other,
    }
}

thread_local! {
    /// The servers that refused the Worker's startup settings (per isolate).
    static REFUSES_SETTINGS: RefCell<std::collections::HashSet<(String, u16)>> = RefCell::default();
}

/// Whether a login was refused for one of its startup settings.
pub fn refuses_settings(e: &DbError) -> bool {
    let m = e.message();
    e.code() == "42704"
        || m.contains("unsupported startup parameter")
        || m.contains("unrecognized configuration parameter")
}

/// Pulls the change feed: the lines of one subscription up to its first
/// live keepalive (within the silence bound, else nothing is applied), then
/// applied in order; the catalog is read where the stream opens on a
/// position whose past is unknown, and after DDL; the roles' digest when due.
async fn pull_feed<N: Net>(
    edge: &RefCell<Edge>,
    net: &N,
    feed: &ConnInfo,
    db: (&ConnInfo, &Login),
) -> Result<(), PgError> {
    let (command, timeout) = {
        let mut e = edge.borrow_mut();
        (e.subscribe_command(), e.pull_timeout())
    };
    let collect = std::pin::pin!(collect_feed(net, feed, &command));
    let lines = match select(collect, std::pin::pin!(net.sleep(timeout))).await {
        Either::Left((lines, _)) => lines?,
        Either::Right(_) => {
            let m = format!("no live keepalive from the regional proxy within {} ms", timeout.as_millis());
            return Err(PgError::Protocol(m));
        }
    };
    // the stream was heard live when its live keepalive came, not after
    // the catalog reads below (the silence bound counts from then)
    let heard = net.now();
    let mut stale = false;
    for text in &lines {
        if edge.borrow().opens_unknown(text) {
            read_catalog(edge, net, db).await?;
        }
        stale |= edge.borrow_mut().feed_line(heard, text);
    }
    // (also when a read after DDL did not complete in an earlier pull)
    if stale || edge.borrow().catalog_stale() {
        read_catalog(edge, net, db).await?;
    }
    if edge.borrow().roles_due(net.now()) {
        read_roles(edge, net, db).await?;
    }
    Ok(())
}

/// One subscription's lines up to its first live keepalive. The opening
/// (`C` and the rows kept since, or a `K` where the stream stands) ends at
/// its first keepalive, which a regional sends even when its own stream
/// has stalled (the last position it applied); the next one comes from a
/// poll of the primary the regional made since: the proof that it is live.
async fn collect_feed<N: Net>(net: &N, feed: &ConnInfo, command: &str) -> Result<Vec<String>, PgError> {
    let mut sub = connect(net, feed, &login_of(feed, Some("postai-worker feed".into()))).await?;
    sub.send_query(command).await?;
    let mut lines = Vec::new();
    let mut keepalives = 0;
    let outcome = loop {
        let m = match sub.message().await {
            Ok(m) => m,
            Err(e) => break Err(e),
        };
        match m.tag {
            b'E' => break Err(PgError::Db(DbError::parse(m.body()))),
            b'Z' | b'c' => break Err(PgError::Protocol("the regional proxy ended the subscription".into())),
            b'd' => {}
            _ => continue,
        }
        let text = String::from_utf8_lossy(m.body()).into_owned();
        let keepalive = matches!(Line::parse(&text), Some(Line::Keepalive(_)));
        lines.push(text);
        keepalives += usize::from(keepalive);
        if keepalives == 2 {
            break Ok(lines);
        }
    };
    sub.terminate().await;
    outcome
}

/// Reads the roles' digest and the primary's position (one round trip).
async fn read_roles<N: Net>(edge: &RefCell<Edge>, net: &N, (to, login): (&ConnInfo, &Login)) -> Result<(), PgError> {
    let mut c = connect(net, to, login).await?;
    let mut out = BytesMut::new();
    out.extend_from_slice(&protocol::query(postai_wire::catalog::ROLES_DIGEST));
    out.extend_from_slice(&protocol::query(CURRENT_LSN));
    let parts = c.pipeline(&out, 2).await;
    c.terminate().await;
    let mut parts = parts?.into_iter();
    let digest = parts.next().transpose()?.and_then(|mut r| r.pop()).and_then(|r| r.rows.into_iter().next());
    let digest = digest.and_then(|row| row.into_iter().next().flatten());
    let at = parts.next().and_then(lsn_of);
    match (digest, at) {
        (Some(d), Some(at)) => {
            edge.borrow_mut().set_roles(net.now(), d, Lsn(at));
            Ok(())
        }
        _ => Err(PgError::Protocol("the roles' digest or the WAL position was not answered".into())),
    }
}

/// Reads the database's catalog (the Worker's own login) for the node.
async fn read_catalog<N: Net>(edge: &RefCell<Edge>, net: &N, (to, login): (&ConnInfo, &Login)) -> Result<(), PgError> {
    let mut c = connect(net, to, login).await?;
    let live = postai_wire::catalog::load(&mut c).await;
    c.terminate().await;
    edge.borrow_mut().set_catalog(&live?);
    Ok(())
}

/// A line in the Worker's log (`console.log` in the Worker, stderr on the host).
fn log(line: &str) {
    #[cfg(target_arch = "wasm32")]
    worker::console_log!("postai-worker: {line}");
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("postai-worker: {line}");
}

/// What a failure looks like to the driver: PostgreSQL's own error as is;
/// a lost connection as `08006` (connection failure), so that the
/// application can tell it from a bad statement and retry.
fn error_answer(e: PgError) -> Answer {
    match e {
        PgError::Db(d) => Answer::db_error(&d),
        // as Neon's proxy answers it
        PgError::TooLarge(_) => Answer::text(507, &e.to_string()),
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

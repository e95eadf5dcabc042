//! The Worker's `fetch` handler: routes, reads the environment, opens the
//! socket to PostgreSQL, and hands the rest to [`crate::handler`].
//!
//! Environment (wrangler.toml `[vars]`, `wrangler secret put`):
//! - `POSTAI_TOKEN` (secret): the API token clients present.
//! - `DATABASE_URL` (secret): the Worker's own login and the database's
//!   address; or a Hyperdrive binding `HYPERDRIVE`, whose address and
//!   login replace it.
//! - `POSTAI_UPSTREAM_TLS`: `disable` (default) or `require`.
//! - `POSTAI_FEED_URL` (secret, optional): the regional proxy whose change
//!   feed keeps the cache fresh (a role with REPLICATION there). Without
//!   it nothing is cached: every statement runs on PostgreSQL.
//! - `POSTAI_FEED_MS` (default 1000), `POSTAI_SILENCE_MS` (default 5000):
//!   how often the feed is pulled, and how old it may be before the cache
//!   serves nothing.
//! - `POSTAI_IDLE_MS` (default 300 000): a WebSocket session idle this long
//!   (in a transaction or not) is ended by PostgreSQL.

use std::cell::RefCell;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use worker::*;

use crate::access::{Access, ConnInfo, parse_conn};
use crate::cache::{CacheConfig, Edge};
use crate::handler::{self, Answer, Net};

thread_local! {
    /// The isolate's cache: requests of one isolate share it.
    static EDGE: RefCell<Option<&'static RefCell<Edge>>> = const { RefCell::new(None) };
}

/// The isolate's cache, made on first use (leaked: it lives as long as the isolate).
fn edge(config: CacheConfig) -> &'static RefCell<Edge> {
    EDGE.with(|e| *e.borrow_mut().get_or_insert_with(|| Box::leak(Box::new(RefCell::new(Edge::new(config))))))
}

struct Sockets {
    tls: bool,
}

impl Net for Sockets {
    type Stream = Socket;
    async fn open(&self, to: &ConnInfo) -> std::io::Result<Socket> {
        open(to.host.clone(), to.port, self.tls).await
    }
    fn now(&self) -> postai_core::Instant {
        postai_core::Instant::from_millis(Date::now().as_millis())
    }
    async fn sleep(&self, d: postai_core::Duration) {
        Delay::from(d).await
    }
}

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, ctx: Context) -> Result<Response> {
    let upgrade = req.headers().get("upgrade").ok().flatten();
    if upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return websocket(&env);
    }
    let answer = match (req.method(), req.path().as_str()) {
        (Method::Options, _) => Answer::text(204, ""),
        (Method::Post, "/sql") => match settings(&env) {
            Err(e) => Answer::text(500, &format!("POST AI Worker misconfigured: {e}")),
            Ok((access, tls, cache)) => {
                let headers = req.headers().clone();
                let header = move |name: &str| headers.get(name).ok().flatten();
                // the token and a declared length first: a body is read only
                // for a client that may send one, and only up to the limit
                if let Err(answer) = handler::precheck(&access, &header) {
                    return respond(answer);
                }
                let body = read_body(&mut req, handler::REQUEST_MAX + 1).await;
                let edge = access.feed.as_ref().map(|_| edge(cache));
                let answer = handler::handle(&access, edge, &Sockets { tls }, header, &body).await;
                if let (true, Some(edge)) = (answer.pull_feed, edge) {
                    // off the request's path: the response goes now
                    ctx.wait_until(async move { handler::pull(edge, &Sockets { tls }, &access).await });
                }
                answer
            }
        },
        _ => Answer::text(400, "query is not supported: POST /sql"),
    };
    respond(answer)
}

/// The request's body, up to `max` bytes (a longer one is cut there, and
/// refused for its length).
async fn read_body(req: &mut Request, max: usize) -> Vec<u8> {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let Ok(mut stream) = req.stream() else { return body };
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]);
        if body.len() >= max {
            break;
        }
    }
    body
}

/// The driver's WebSocket mode (`Pool`, `Client`): any path. The session
/// runs in the background while the WebSocket is open (`crate::relay`).
fn websocket(env: &Env) -> Result<Response> {
    let ((access, tls, _), idle_ms) = match settings(env).and_then(|s| Ok((s, idle_ms(env)?))) {
        Ok(s) => s,
        Err(e) => return respond(Answer::text(500, &format!("POST AI Worker misconfigured: {e}"))),
    };
    let pair = WebSocketPair::new()?;
    let server = pair.server;
    server.accept()?;
    wasm_bindgen_futures::spawn_local(async move {
        if let Err(e) = bridge(server, access, tls, idle_ms).await {
            console_log!("postai-worker: websocket session: {e}");
        }
    });
    Response::from_websocket(pair.client)
}

/// The WebSocket's binary frames as a byte stream (an in-memory pipe) for
/// [`crate::relay::serve_client`]; the WebSocket closes when the session ends.
async fn bridge(ws: WebSocket, access: Access, tls: bool, idle_ms: u64) -> std::result::Result<(), String> {
    use futures_util::StreamExt;
    let (near, far) = tokio::io::duplex(64 << 10);
    let (mut far_rd, mut far_wr) = tokio::io::split(far);
    let mut events = ws.events().map_err(|e| e.to_string())?;
    let inbound = async {
        while let Some(Ok(WebsocketEvent::Message(m))) = events.next().await {
            let Some(bytes) = message_bytes(m.as_ref().data()).await else { continue };
            if far_wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = far_wr.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = far_rd.read(&mut buf).await {
            if n == 0 || ws.send_with_bytes(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = ws.close(Some(1000), Some("session ended"));
    };
    let net = Sockets { tls };
    let served = crate::relay::serve_client(near, &access, &net, idle_ms);
    let (served, (), ()) = futures_util::future::join3(served, inbound, outbound).await;
    served
}

/// `POSTAI_IDLE_MS` (default 300 000): a WebSocket session idle this long is ended.
fn idle_ms(env: &Env) -> std::result::Result<u64, String> {
    text(env, "POSTAI_IDLE_MS")
        .map_or(Ok(300_000), |v| v.parse().map_err(|_| "POSTAI_IDLE_MS must be milliseconds".into()))
}

/// A WebSocket message's bytes: binary frames arrive as a Blob (read
/// asynchronously) or an ArrayBuffer; the driver sends no text frames, whose
/// UTF-8 is taken as is.
async fn message_bytes(data: wasm_bindgen::JsValue) -> Option<Vec<u8>> {
    use wasm_bindgen::JsCast;
    if let Some(text) = data.as_string() {
        return Some(text.into_bytes());
    }
    let read = js_sys::Reflect::get(&data, &"arrayBuffer".into()).ok()?;
    let buffer = match read.dyn_ref::<js_sys::Function>() {
        Some(f) => {
            let promise: js_sys::Promise = f.call0(&data).ok()?.dyn_into().ok()?;
            wasm_bindgen_futures::JsFuture::from(promise).await.ok()?
        }
        None => data,
    };
    Some(js_sys::Uint8Array::new(&buffer).to_vec())
}

fn respond(a: Answer) -> Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", if a.json { "application/json" } else { "text/plain; charset=utf-8" })?;
    headers.set("access-control-allow-origin", "*")?;
    headers.set("access-control-allow-headers", "*")?;
    headers.set("access-control-expose-headers", "x-postai-served, x-postai-lsn, x-postai-session")?;
    for (k, v) in &a.headers {
        headers.set(k, v)?;
    }
    Ok(Response::ok(a.body)?.with_status(a.status).with_headers(headers))
}

fn text(env: &Env, name: &str) -> Option<String> {
    env.secret(name).map(|s| s.to_string()).or_else(|_| env.var(name).map(|v| v.to_string())).ok()
}

fn settings(env: &Env) -> std::result::Result<(Access, bool, CacheConfig), String> {
    let token = text(env, "POSTAI_TOKEN").filter(|t| !t.is_empty()).ok_or("POSTAI_TOKEN is not set")?;
    let upstream = match env.hyperdrive("HYPERDRIVE") {
        Ok(h) => ConnInfo {
            user: h.user(),
            password: h.password(),
            host: h.host(),
            port: h.port(),
            database: h.database(),
            application_name: None,
        },
        Err(_) => parse_conn(&text(env, "DATABASE_URL").ok_or("neither DATABASE_URL nor HYPERDRIVE is set")?)?,
    };
    let tls = match text(env, "POSTAI_UPSTREAM_TLS").as_deref() {
        None | Some("disable") => false,
        Some("require") => true,
        Some(other) => return Err(format!("POSTAI_UPSTREAM_TLS must be disable or require, not {other:?}")),
    };
    let feed = text(env, "POSTAI_FEED_URL").filter(|f| !f.is_empty()).map(|f| parse_conn(&f)).transpose()?;
    let ms = |name: &str, default: u64| -> std::result::Result<postai_core::Duration, String> {
        let v = text(env, name)
            .map_or(Ok(default), |v| v.parse::<u64>().map_err(|_| format!("{name} must be milliseconds")))?;
        Ok(postai_core::Duration::from_millis(v.max(1)))
    };
    let cache = CacheConfig {
        feed_every: ms("POSTAI_FEED_MS", 1000)?,
        silence: ms("POSTAI_SILENCE_MS", 5000)?,
        ..CacheConfig::default()
    };
    Ok((Access { token, upstream, feed }, tls, cache))
}

/// Opens the socket to PostgreSQL; with `tls`, asks for TLS (SSLRequest)
/// and upgrades the socket when the server agrees.
async fn open(host: String, port: u16, tls: bool) -> std::io::Result<Socket> {
    let io = |e: worker::Error| std::io::Error::other(e.to_string());
    let transport = if tls { SecureTransport::StartTls } else { SecureTransport::Off };
    let mut socket = Socket::builder().secure_transport(transport).connect(host, port).map_err(io)?;
    socket.opened().await.map_err(io)?;
    if !tls {
        return Ok(socket);
    }
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&postai_wire::protocol::SSL_REQUEST.to_be_bytes());
    socket.write_all(&request).await?;
    socket.flush().await?;
    match socket.read_u8().await? {
        b'S' => Ok(socket.start_tls()),
        _ => Err(std::io::Error::other("the database does not accept TLS connections")),
    }
}

//! The Worker's `fetch` handler: routes, reads the environment, opens the
//! socket to PostgreSQL, and hands the rest to [`crate::handler`].
//!
//! Environment (wrangler.toml `[vars]`, `wrangler secret put`):
//! - `POSTAI_TOKEN` (secret): the API token clients present.
//! - `DATABASE_URL` (secret): the Worker's own login and the database's
//!   address; or a Hyperdrive binding `HYPERDRIVE`, whose address and
//!   login replace it.
//! - `POSTAI_UPSTREAM_TLS`: `disable` (default) or `require`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use worker::*;

use crate::access::{Access, ConnInfo, parse_conn};
use crate::handler::{self, Answer};

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, _ctx: Context) -> Result<Response> {
    let answer = match (req.method(), req.path().as_str()) {
        (Method::Options, _) => Answer::text(204, ""),
        (Method::Post, "/sql") => match settings(&env) {
            Err(e) => Answer::text(500, &format!("POST AI Worker misconfigured: {e}")),
            Ok((access, tls)) => {
                let body = req.bytes().await.unwrap_or_default();
                let headers = req.headers().clone();
                let header = move |name: &str| headers.get(name).ok().flatten();
                let (host, port) = (access.upstream.host.clone(), access.upstream.port);
                handler::handle(&access, header, &body, move || open(host, port, tls)).await
            }
        },
        _ => Answer::text(400, "query is not supported: POST /sql"),
    };
    respond(answer)
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

fn settings(env: &Env) -> std::result::Result<(Access, bool), String> {
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
    Ok((Access { token, upstream }, tls))
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

//! POST AI's Cloudflare Workers edge. Serverless applications reach
//! PostgreSQL over HTTP: the Worker speaks `@neondatabase/serverless`'s
//! HTTP protocol (`neon(url)`, and drizzle, kysely and Prisma's Neon
//! adapter on top of it) and runs each request on PostgreSQL over an
//! outbound socket (`worker::Socket`; Hyperdrive's address in production).
//!
//! - `neon`: the protocol, sans IO (request bodies and headers in, the
//!   driver's JSON out).
//! - `access`: the API token, the connection string, the Worker's login.
//! - `pg`: a PostgreSQL connection over any byte stream (login, statements).
//! - `cache`: the core's node per isolate, fed by a regional's change feed.
//! - `handler`: one request end to end, generic over the stream, so the
//!   host's tests run it against PostgreSQL without a Worker.
//! - `relay`: the driver's WebSocket mode: the login ended here (the API
//!   token), the session relayed to PostgreSQL.
//! - `entry` (wasm32 only): the `fetch` handler around them.

pub mod access;
pub mod cache;
pub mod handler;
pub mod neon;
pub mod pg;
pub mod relay;

#[cfg(target_arch = "wasm32")]
mod entry;

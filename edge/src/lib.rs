//! POST AI's native edge proxy: clients speak the PostgreSQL protocol to it;
//! it drives the core's `EdgeNode` and relays what must go to the primary,
//! byte for byte. Only this crate knows tokio.

pub mod auth;
pub mod catalog;
pub mod cdc;
pub mod config;
pub mod frontend;
pub mod health;
pub mod l2;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub use postai_wire::protocol;
pub mod reload;
pub mod signals;
pub mod tasks;
pub mod tls;
pub mod topology;
pub mod upstream;
pub mod visible;

pub use config::Config;

/// A cached result: the encoded backend messages, ReadyForQuery excluded.
pub type Value = std::sync::Arc<[u8]>;
pub use proxy::{EventLoops, Proxy, serve, serve_on};

//! POST AI's native edge proxy: clients speak the PostgreSQL protocol to it;
//! it drives the core's `EdgeNode` and relays what must go to the primary,
//! byte for byte. Only this crate knows tokio.

pub mod cdc;
pub mod config;
pub mod protocol;
pub mod proxy;
pub mod upstream;

pub use config::Config;
pub use proxy::{Proxy, serve};

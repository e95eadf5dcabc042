//! POST AI's sans-IO core: SQL analysis, the tiered cache, invalidation,
//! consistency, routing and failover as plain state machines. Nothing here does
//! IO, reads a clock or draws OS randomness: time and seeds are arguments.

pub mod cache;
pub mod consistency;
pub mod failover;
pub mod hash;
pub mod invalidation;
pub mod node;
pub mod open_map;
pub mod refresh;
pub mod rng;
pub mod router;
pub mod sql;
pub mod stream;
pub mod time;

pub use invalidation::Lsn;
pub use time::{Duration, Instant};

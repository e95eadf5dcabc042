//! POST AI's PostgreSQL wire protocol, sans IO: message framing
//! (`protocol`), the fields the proxy reads (`messages`), what an answer
//! reflects (`answers`), statements on pooled server connections
//! (`pooled`), and the client session's protocol state as a machine
//! (`session`). The native proxy (`edge/`) drives it over TCP; the Workers
//! edge can drive it over a WebSocket.

pub mod answers;
pub mod catalog;
pub mod messages;
pub mod pooled;
pub mod protocol;
pub mod session;

pub use answers::Answers;
pub use session::{CacheableExec, Kept, Session, Settled};

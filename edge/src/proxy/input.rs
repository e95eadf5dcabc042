//! What a session reads from its client: whole messages, each buffered
//! within the proxy-wide budget for unfinished messages
//! (`buffer_bytes_max`), and the end of an idle session when the proxy
//! shuts down.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Client;
use crate::limits::{self, Held};
use crate::protocol::{self, FRONTEND_TAGS, Message};
use crate::signals::TERMINATING;

/// How long a refused client's remaining bytes are read and dropped before
/// its connection closes (closing with unread bytes resets the connection,
/// and the client may lose the error it was sent).
const LINGER: Duration = Duration::from_secs(2);

impl Client {
    /// The next request, between requests (`batch_empty`: no extended
    /// protocol message is waiting for its Sync). Once the proxy shuts down,
    /// a session outside a transaction is closed here with 57P01.
    /// Extended protocol messages wait for their Sync (or Flush) in the
    /// batch: their bytes stay reserved from the budget until it is sent.
    pub(super) async fn next_request(&mut self, batch_empty: bool) -> anyhow::Result<Option<Message>> {
        if batch_empty {
            self.batch_held = None;
        }
        if batch_empty && self.wire.status() == b'I' && self.proxy.shutdown.started() {
            self.close_with("57P01", TERMINATING, false).await;
            return Ok(None);
        }
        self.between_requests = batch_empty;
        let m = self.client_message().await;
        self.between_requests = false;
        let Some(m) = m? else { return Ok(None) };
        // the messages serve_queries sends at once are not batched
        if !b"QSHXdcf".contains(&m.tag) {
            let n = m.raw.len();
            let budget = &self.proxy.limits.buffers;
            let held = match &mut self.batch_held {
                Some(h) => h.grow(n),
                None => {
                    self.batch_held = budget.take(n);
                    self.batch_held.is_some()
                }
            };
            if !held {
                let what = format!(
                    "a message of {n} bytes after {} bytes of requests waiting for their Sync",
                    self.batch_held.as_ref().map_or(0, Held::units)
                );
                let e = limits::no_room(budget, &what);
                self.close_with("53200", &e, true).await;
                return Ok(None);
            }
        }
        Ok(Some(m))
    }

    /// The next message from the client; `None` when it left, or when it
    /// was told why it is closed (framing lost, no room in the buffer
    /// budget for its message, the proxy shutting down while it is idle).
    pub(super) async fn client_message(&mut self) -> anyhow::Result<Option<Message>> {
        let max = self.proxy.config.max_message_bytes;
        // the reservation of the unfinished message at the head of the buffer
        let mut held: Option<Held> = None;
        loop {
            match protocol::decode(&mut self.buf, max, FRONTEND_TAGS) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {
                    match limits::reserve_message(&self.proxy.limits.buffers, &mut self.buf, &mut held, max) {
                        Ok(()) => {}
                        Err(e) => {
                            drop(held);
                            // 53200: out_of_memory; this client only
                            self.close_with("53200", &e, true).await;
                            return Ok(None);
                        }
                    }
                    let limit = limits::unreserved(&self.buf, &held);
                    if !self.read_more(limit).await? {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    // framing is lost: tell the client and close its connection only
                    self.wr.write_all(&protocol::error_response("FATAL", "08P01", &e.to_string())).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// Reads what the client sent; `false` when it left or was closed
    /// because the proxy shuts down.
    async fn read_more(&mut self, limit: Option<usize>) -> anyhow::Result<bool> {
        let idle = self.between_requests && self.buf.is_empty() && self.wire.status() == b'I';
        if let Some(n) = limit.filter(|n| *n > 0) {
            // a message under way: no more than is reserved for it
            let mut reserved = (&mut self.rd).take(n as u64);
            return Ok(reserved.read_buf(&mut self.buf).await? > 0);
        }
        if !idle {
            return Ok(self.rd.read_buf(&mut self.buf).await? > 0);
        }
        tokio::select! {
            n = self.rd.read_buf(&mut self.buf) => Ok(n? > 0),
            () = self.proxy.shutdown.wait() => {
                self.close_with("57P01", TERMINATING, false).await;
                Ok(false)
            }
        }
    }

    /// A FATAL ErrorResponse, then the end of the connection. With `linger`,
    /// what the client still sends is read and dropped for a moment first.
    async fn close_with(&mut self, code: &str, message: &str, linger: bool) {
        self.buf = bytes::BytesMut::new();
        let _ = self.wr.write_all(&protocol::error_response("FATAL", code, message)).await;
        let _ = self.wr.shutdown().await;
        if linger {
            let mut sink = [0u8; 8192];
            let drain = async { while matches!(self.rd.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
    }
}

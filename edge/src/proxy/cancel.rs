//! Cancel requests. A client holds the key of the primary backend its
//! session logged in to (or, pooled, a key of the proxy's); the request
//! goes where the client's query runs now: the primary, a pooled server
//! connection, or the replica connection running its read.

use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};

use super::Proxy;
use crate::protocol;
use crate::upstream::Conn;

/// The server a pooled client's cancel request must reach: (addr, pid, key).
pub type CancelTarget = Mutex<Option<(String, i32, i32)>>;

/// Forwards a CancelRequest with the client's `(pid, key)`: to the backend
/// the proxy-wide map names for that key, else to the primary as it is.
pub async fn forward(proxy: &Proxy, pid: i32, key: i32) -> anyhow::Result<()> {
    let mapped = proxy.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&(pid, key)).cloned();
    let (addr, pid, key) = match mapped {
        Some(t) => match t.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(target) => target,
            // a pooled client between transactions: nothing runs
            None => return Ok(()),
        },
        None => (proxy.primary_addr(), pid, key),
    };
    let mut c = Conn::connect(&addr, &proxy.dialer).await?;
    let mut m = BytesMut::with_capacity(16);
    m.put_i32(16);
    m.put_i32(protocol::CANCEL_REQUEST);
    m.put_i32(pid);
    m.put_i32(key);
    c.send(&m).await?;
    Ok(())
}

/// The (process id, secret key) of the BackendKeyData in a login greeting.
pub fn key_in(greeting: &[u8]) -> Option<(i32, i32)> {
    let mut rest = BytesMut::from(greeting);
    while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
        if m.tag == b'K' {
            let b = m.body();
            let pid = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
            let key = i32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            return Some((pid, key));
        }
    }
    None
}

/// While alive, a cancel request with the client's key reaches `target`
/// (a replica backend running the client's read); on drop the key goes
/// back to where it pointed before.
pub struct Redirect {
    proxy: Arc<Proxy>,
    key: (i32, i32),
    entry: Arc<CancelTarget>,
    /// The key had no entry (a dedicated session: the primary's key).
    inserted: bool,
    previous: Option<(String, i32, i32)>,
}

impl Redirect {
    pub fn new(proxy: &Arc<Proxy>, key: (i32, i32), target: (String, i32, i32)) -> Redirect {
        let mut map = proxy.cancels.lock().unwrap_or_else(|p| p.into_inner());
        let (entry, inserted) = match map.get(&key) {
            Some(e) => (e.clone(), false),
            None => {
                let e: Arc<CancelTarget> = Arc::new(Mutex::new(None));
                map.insert(key, e.clone());
                (e, true)
            }
        };
        drop(map);
        let previous = entry.lock().unwrap_or_else(|p| p.into_inner()).replace(target);
        Redirect { proxy: proxy.clone(), key, entry, inserted, previous }
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        if self.inserted {
            let mut map = self.proxy.cancels.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&self.key).is_some_and(|e| Arc::ptr_eq(e, &self.entry)) {
                map.remove(&self.key);
            }
        } else {
            *self.entry.lock().unwrap_or_else(|p| p.into_inner()) = self.previous.take();
        }
    }
}

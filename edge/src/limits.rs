//! What clients can make the proxy hold, bounded: bytes buffered for client
//! messages not yet complete (`buffer_bytes_max`, one budget for every
//! client), client connections (`max_client_conn`), and the accepting loop's
//! pause when the process runs out of descriptors (PgBouncer's behaviour:
//! log, back off, keep serving).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::config::Config;

/// The proxy's bounds, shared by every connection. Their maxima can change
/// at runtime (`POSTAI RELOAD`, SIGHUP).
pub struct Limits {
    /// Bytes of client messages not yet complete.
    pub buffers: Arc<Counter>,
    /// Client connections, from accept to close.
    pub clients: Arc<Counter>,
    /// Over-limit clients being told so (a connection each, for a moment).
    pub refusals: Arc<Counter>,
}

/// Refusals in progress at most; past it an over-limit client gets the
/// error without its startup message being read.
const REFUSALS_MAX: usize = 64;
/// How long an over-limit client has to send its startup message.
pub const REFUSAL_WAIT: Duration = Duration::from_secs(2);

impl Limits {
    pub fn new(config: &Config) -> Limits {
        Limits {
            buffers: Counter::new(config.buffer_bytes_max),
            clients: Counter::new(config.max_client_conn),
            refusals: Counter::new(REFUSALS_MAX),
        }
    }
}

/// A quantity in use and its maximum.
pub struct Counter {
    used: AtomicUsize,
    max: AtomicUsize,
}

/// `n` units of a [`Counter`], given back on drop.
pub struct Held {
    counter: Arc<Counter>,
    n: usize,
}

impl Counter {
    pub fn new(max: usize) -> Arc<Counter> {
        Arc::new(Counter { used: AtomicUsize::new(0), max: AtomicUsize::new(max) })
    }

    /// Takes `n` units, if they fit under the maximum.
    pub fn take(self: &Arc<Self>, n: usize) -> Option<Held> {
        self.add(n).then(|| Held { counter: self.clone(), n })
    }

    /// Adds `n` to the use if it stays under the maximum.
    fn add(&self, n: usize) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|u| *u <= max))
            .is_ok()
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A new maximum; what is held stays held (nothing more is taken until
    /// the use falls under it).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

impl Held {
    pub fn units(&self) -> usize {
        self.n
    }

    /// Takes `n` more units into this hold, if they fit.
    pub fn grow(&mut self, n: usize) -> bool {
        let added = self.counter.add(n);
        if added {
            self.n += n;
        }
        added
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counter.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// The whole length of the typed message at the head of `buf` (tag
/// included), once its 5-byte header is there; `None` before, or for a
/// length the decoder will refuse anyway.
pub fn declared_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    usize::try_from(len).ok().filter(|l| *l >= 4).map(|l| l + 1)
}

/// How much of an incomplete message is reserved ahead of its bytes: one
/// read's worth.
pub const READ_AHEAD: usize = 64 << 10;

/// Reserves the buffer for the incomplete message at the head of `buf` as
/// its bytes arrive: what is there and one read more ([`READ_AHEAD`]), never
/// its declared length at once (a client declaring four messages of 64 MB
/// and sending nothing more would hold the whole budget, and every other
/// client's messages would be refused). `held` grows to cover it; an error
/// message (for a 53200 ErrorResponse) when the budget cannot take it. The
/// buffer's capacity is made to fit what is reserved.
pub fn reserve_message(
    budget: &Arc<Counter>,
    buf: &mut BytesMut,
    held: &mut Option<Held>,
    max_message: usize,
) -> Result<(), String> {
    let Some(total) = declared_len(buf) else { return Ok(()) };
    if total > max_message {
        // too large: the decoder refuses it (08P01)
        return Ok(());
    }
    let want = total.min(buf.len().saturating_add(READ_AHEAD));
    let have = held.as_ref().map_or(0, Held::units);
    let room = match held {
        _ if have >= want => true,
        Some(h) => h.grow(want - have),
        None => {
            *held = budget.take(want);
            held.is_some()
        }
    };
    if !room {
        return Err(no_room(budget, &format!("a message of {total} bytes")));
    }
    buf.reserve(want.saturating_sub(buf.len()));
    Ok(())
}

/// How many more bytes a read may take into `buf` while its message is
/// incomplete: what `held` covers beyond what is there (reads never outrun
/// the reservation; `None`: no message under way).
pub fn unreserved(buf: &BytesMut, held: &Option<Held>) -> Option<usize> {
    declared_len(buf)?;
    Some(held.as_ref()?.units().saturating_sub(buf.len()))
}

/// The 53200 message: `what` does not fit in the budget.
pub fn no_room(budget: &Counter, what: &str) -> String {
    format!(
        "postai-edge: out of memory for client messages: {what} does not fit in buffer_bytes_max ({} bytes, {} in \
         use by the messages of all clients not yet complete or waiting for their Sync)",
        budget.max(),
        budget.used()
    )
}

/// The accepting loop's pause after a failed accept (EMFILE, ENFILE,
/// ECONNABORTED, ENOBUFS...): 10 ms doubling to 1 s, reset by a success.
/// One line is logged when a burst of failures starts and one when it ends.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u64,
    delay: Duration,
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// A failed accept: how long to wait before the next one, and whether
    /// the failure starts a burst (to be logged).
    pub fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.delay = if self.failures == 1 { Self::FIRST } else { (self.delay * 2).min(Self::MAX) };
        (self.delay, self.failures == 1)
    }

    /// A successful accept: the number of failures of the burst it ends, if any.
    pub fn succeeded(&mut self) -> Option<u64> {
        let ended = std::mem::take(&mut self.failures);
        self.delay = Duration::ZERO;
        (ended > 0).then_some(ended)
    }
}

/// Accepts the next client, pausing (and logging once per burst) while
/// accepting fails: a proxy out of descriptors keeps serving the clients it
/// has and accepts again once some leave.
pub async fn accept(listener: &tokio::net::TcpListener, backoff: &mut AcceptBackoff) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                if let Some(n) = backoff.succeeded() {
                    eprintln!("postai-edge: accepting clients again after {n} failed accepts");
                }
                return socket;
            }
            Err(e) => {
                let (wait, first) = backoff.failed();
                if first {
                    eprintln!(
                        "postai-edge: accept: {e}; pausing new clients (retrying every {:?} to {:?}), \
                         serving the connected ones",
                        AcceptBackoff::FIRST,
                        AcceptBackoff::MAX
                    );
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        assert_eq!(b.succeeded(), None);
        let waits: Vec<(u64, bool)> = (0..10)
            .map(|_| {
                let (d, first) = b.failed();
                (d.as_millis() as u64, first)
            })
            .collect();
        let first: Vec<bool> = waits.iter().map(|w| w.1).collect();
        assert_eq!(first, [true, false, false, false, false, false, false, false, false, false]);
        let ms: Vec<u64> = waits.iter().map(|w| w.0).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(b.succeeded(), Some(10));
        assert_eq!(b.failed(), (AcceptBackoff::FIRST, true), "a new burst starts over");
    }

    #[test]
    fn counters_hold_until_dropped() {
        let c = Counter::new(10);
        let a = c.take(6).expect("fits");
        assert!(c.take(5).is_none(), "6 + 5 > 10");
        let b = c.take(4).expect("fits exactly");
        assert_eq!(c.used(), 10);
        drop(a);
        assert_eq!(c.used(), 4);
        c.set_max(3);
        assert!(c.take(1).is_none(), "over the new maximum");
        drop(b);
        let mut d = c.take(3).expect("fits");
        assert!(c.take(usize::MAX).is_none(), "no overflow");
        assert!(!d.grow(1), "over the maximum");
        c.set_max(5);
        assert!(d.grow(2));
        assert_eq!((d.units(), c.used()), (5, 5));
        drop(d);
        assert_eq!(c.used(), 0, "a grown hold gives everything back");
    }

    #[test]
    fn messages_reserve_as_their_bytes_arrive() {
        let budget = Counter::new(150 << 10);
        let mut buf = BytesMut::from(&b"Q\x00\x00"[..]);
        let mut held = None;
        assert!(reserve_message(&budget, &mut buf, &mut held, 1 << 30).is_ok() && held.is_none(), "no header yet");
        buf.extend_from_slice(&[0, 63, b'S']);
        reserve_message(&budget, &mut buf, &mut held, 1 << 30).expect("fits");
        assert_eq!(held.as_ref().map(Held::units), Some(64), "a small message: its length");
        assert!(buf.capacity() >= 64);
        // a message declared at 64 MB holds one read ahead of its bytes, not 64 MB
        let mut big = BytesMut::from(&b"Q\x04\x00\x00\x00"[..]);
        let mut big_held = None;
        reserve_message(&budget, &mut big, &mut big_held, 1 << 30).expect("fits");
        assert_eq!(big_held.as_ref().map(Held::units), Some(5 + READ_AHEAD));
        assert_eq!(unreserved(&big, &big_held), Some(READ_AHEAD), "what the next read may take");
        big.extend_from_slice(&vec![b'x'; READ_AHEAD]);
        reserve_message(&budget, &mut big, &mut big_held, 1 << 30).expect("grows");
        assert_eq!(big_held.as_ref().map(Held::units), Some(5 + 2 * READ_AHEAD));
        // past the budget: refused, with what is in use
        big.extend_from_slice(&vec![b'x'; READ_AHEAD]);
        let e = reserve_message(&budget, &mut big, &mut big_held, 1 << 30).err().unwrap_or_default();
        assert!(e.contains("buffer_bytes_max"), "{e}");
        drop(big_held);
        let mut huge = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        let mut none = None;
        assert!(reserve_message(&budget, &mut huge, &mut none, 1000).is_ok() && none.is_none(), "left to the decoder");
        assert_eq!(declared_len(b"Q\xff\xff\xff\xff"), None);
    }
}

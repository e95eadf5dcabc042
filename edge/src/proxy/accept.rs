//! Accepting clients: the listener loop (EMFILE backoff, `max_client_conn`)
//! and the event loops clients are dealt out to.

use super::*;

/// Accepts clients until the future is dropped.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) -> std::io::Result<()> {
    serve_on(proxy, listener, None).await
}

/// Accepts clients on `listener`; with `loops`, deals them out in turn to
/// this thread and to the loops' threads. A failed accept (out of
/// descriptors) pauses accepting, never ends it (`limits::accept`).
pub async fn serve_on(proxy: Arc<Proxy>, listener: TcpListener, loops: Option<&EventLoops>) -> std::io::Result<()> {
    let mut turn = 0usize;
    let mut backoff = crate::limits::AcceptBackoff::default();
    loop {
        let socket = crate::limits::accept(&listener, &mut backoff).await;
        let _ = socket.set_nodelay(true);
        let n = loops.map_or(0, |l| l.senders.len());
        turn = (turn + 1) % (n + 1);
        let socket = match loops {
            // turn 0: this thread's
            Some(l) if turn > 0 => {
                let to = &l.senders[turn - 1];
                match socket.into_std() {
                    // a loop that is gone: the client is served here
                    Ok(std) => match to.send(std).map_err(|back| TcpStream::from_std(back.0)) {
                        Ok(()) => continue,
                        Err(Ok(socket)) => socket,
                        Err(Err(e)) => {
                            eprintln!("postai-edge: client socket: {e}");
                            continue;
                        }
                    },
                    Err(e) => {
                        eprintln!("postai-edge: accept: {e}");
                        continue;
                    }
                }
            }
            _ => socket,
        };
        spawn_client(&proxy, socket);
    }
}

pub(super) fn spawn_client(proxy: &Arc<Proxy>, socket: TcpStream) {
    let p = proxy.clone();
    // a slot of max_client_conn for the connection's whole life
    let Some(slot) = proxy.limits.clients.take(1) else {
        tokio::spawn(refuse_client(p, socket));
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = Client::run(p, socket).await {
            // one client's failure never stops the proxy
            eprintln!("postai-edge: client: {e}");
        }
    });
}

/// Event loops of their own, one thread each (a single-threaded runtime, as
/// PgBouncer's processes or Envoy's workers): a client lives on one thread,
/// so its wakeups never cross threads. On a loaded two-core machine this
/// takes a third fewer context switches per query than a work-stealing
/// runtime of the same size.
///
/// Not for transaction pooling: a pooled server connection is lent to clients
/// of every loop, and its socket would wake the loop that opened it.
/// Dropping the loops closes their clients and waits for the threads (so that
/// what they hold, the L2 file writer among it, is finished).
pub struct EventLoops {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EventLoops {
    /// Starts `n` loops serving the clients [`serve_on`] hands them.
    pub fn start(proxy: &Arc<Proxy>, n: usize) -> std::io::Result<EventLoops> {
        let mut loops = EventLoops { senders: Vec::with_capacity(n), threads: Vec::with_capacity(n) };
        for i in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
            let proxy = proxy.clone();
            // the runtime is made on its thread: never dropped inside another
            let thread = std::thread::Builder::new().name(format!("postai-loop-{}", i + 1)).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    // its clients are served by the accepting thread (the send fails)
                    Err(e) => return eprintln!("postai-edge: event loop {}: {e}", i + 1),
                };
                rt.block_on(async move {
                    while let Some(std) = rx.recv().await {
                        match TcpStream::from_std(std) {
                            Ok(socket) => spawn_client(&proxy, socket),
                            Err(e) => eprintln!("postai-edge: client socket: {e}"),
                        }
                    }
                })
            })?;
            loops.senders.push(tx);
            loops.threads.push(thread);
        }
        Ok(loops)
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A client past `max_client_conn`: it is told so (53300) after its startup
/// message, as PostgreSQL does, and closed. SSLRequest and GSSENCRequest are
/// answered 'N'; a CancelRequest is still forwarded (a full proxy must not
/// stop cancels).
pub(super) async fn refuse_client(proxy: Arc<Proxy>, socket: TcpStream) {
    let message =
        format!("postai-edge: sorry, too many clients already (max_client_conn = {})", proxy.limits.clients.max());
    let error = protocol::error_response("FATAL", "53300", &message);
    let Some(_refusing) = proxy.limits.refusals.take(1) else {
        // many at once: the error at once, nothing read
        let _ = socket.try_write(&error);
        return;
    };
    let mut socket = socket;
    let mut buf = BytesMut::with_capacity(512);
    let read = async {
        loop {
            match protocol::decode_startup(&mut buf, 10_000) {
                Ok(Some(protocol::Startup::Ssl | protocol::Startup::GssEnc)) => socket.write_all(b"N").await?,
                Ok(Some(protocol::Startup::Cancel { pid, key })) => return Ok(Some((pid, key))),
                Ok(Some(protocol::Startup::Params(_))) | Err(_) => return Ok(None),
                Ok(None) => {
                    if socket.read_buf(&mut buf).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    };
    let first: std::io::Result<Option<(i32, i32)>> =
        tokio::time::timeout(crate::limits::REFUSAL_WAIT, read).await.unwrap_or(Ok(None));
    match first {
        Ok(Some((pid, key))) => {
            if let Err(e) = cancel::forward(&proxy, pid, key).await {
                eprintln!("postai-edge: cancel request: {e}");
            }
        }
        Ok(None) => {
            let _ = socket.write_all(&error).await;
            let _ = socket.shutdown().await;
        }
        Err(_) => {}
    }
}

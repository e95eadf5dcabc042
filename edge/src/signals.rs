//! Signals: SIGHUP reloads the configuration file (`reload.rs`); SIGTERM and
//! SIGINT shut down gracefully: the listener closes, clients finish their
//! transactions (an idle client is closed with 57P01 after its current
//! request), and the process exits once they are gone or
//! `shutdown_timeout_ms` has passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The proxy's shutdown state.
pub struct Shutdown {
    started: tokio::sync::watch::Sender<bool>,
    timeout_ms: AtomicU64,
}

/// What an idle client is told when the proxy shuts down (PostgreSQL's
/// message for a smart or fast shutdown).
pub const TERMINATING: &str = "terminating connection due to administrator command";

impl Shutdown {
    pub fn new(timeout_ms: u64) -> Shutdown {
        Shutdown { started: tokio::sync::watch::channel(false).0, timeout_ms: AtomicU64::new(timeout_ms) }
    }

    /// Starts the shutdown: sessions close when idle.
    pub fn begin(&self) {
        self.started.send_replace(true);
    }

    pub fn started(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the shutdown has started.
    pub async fn wait(&self) {
        let mut rx = self.started.subscribe();
        // the sender lives as long as the proxy: an error cannot happen while it is borrowed here
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_timeout_ms(&self, ms: u64) {
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }
}

/// The signals the process handles, installed at start (before it listens:
/// from then on none of them ends it abruptly).
pub struct Signals {
    hangup: Option<Signal>,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Must run inside the tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hangup: Some(signal(SignalKind::hangup())?),
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Runs `reload` (the proxy's configuration reload) on every SIGHUP,
    /// logging what happened.
    pub fn reload_on_hangup(&mut self, reload: impl Fn() -> Result<Vec<(String, String)>, String> + Send + 'static) {
        let Some(mut hangups) = self.hangup.take() else { return };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match reload() {
                    Ok(rows) => {
                        for (setting, result) in rows {
                            eprintln!("postai-edge: reload (SIGHUP): {setting}: {result}");
                        }
                    }
                    Err(e) => eprintln!("postai-edge: reload (SIGHUP) refused: {e}"),
                }
            }
        });
    }

    /// Resolves at the first SIGTERM or SIGINT; the name of the signal.
    pub async fn terminated(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

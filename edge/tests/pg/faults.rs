//! Faults the tests inject between the proxy and its peers: a TCP relay
//! that cuts its connections or goes silent, and a replication slot held by
//! another reader.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP relay to `target`: `cut` ends every connection made so far;
/// `freeze` stops moving bytes without closing anything (a server whose
/// host died with its connections open: power lost, packets dropped).
pub struct Relay {
    pub port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    pub fn new(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let frozen = Arc::new(AtomicBool::new(false));
        let (held, f) = (conns.clone(), frozen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = match TcpStream::connect(("127.0.0.1", target)) {
                    Ok(s) if !f.load(Ordering::Relaxed) => s,
                    // frozen: accepted, and nothing more
                    _ => {
                        held.lock().expect("lock").push(client);
                        continue;
                    }
                };
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
                    (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                held.lock().expect("lock").extend([c3, s3]);
                pipe(client, s2, f.clone());
                pipe(server, c2, f.clone());
            }
        });
        Relay { port, conns, frozen }
    }

    /// Ends every connection made so far.
    pub fn cut(&self) {
        for c in self.conns.lock().expect("lock").drain(..) {
            drop(c.shutdown(std::net::Shutdown::Both));
        }
    }

    /// Moves no byte from now on, and closes nothing.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either ends, moving nothing while `frozen`.
fn pipe(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        drop(from.set_read_timeout(Some(Duration::from_millis(50))));
        let mut buf = [0u8; 16384];
        loop {
            if frozen.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if to.write_all(&buf[..n]).is_ok() => {}
                Ok(_) => break,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        drop(to.shutdown(std::net::Shutdown::Both));
    });
}

/// Holds a replication slot of database `db` on the server at `port` with `pg_recvlogical` (output
/// thrown away): the proxy that reads it fails from then on, and a regional
/// proxy's stream stalls. Killed on drop.
pub struct SlotHeld(std::process::Child);

impl SlotHeld {
    pub fn new(port: u16, db: &str, slot: &str) -> SlotHeld {
        let started = Instant::now();
        loop {
            let mut child = std::process::Command::new("pg_recvlogical")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", db])
                .args(["--slot", slot, "--start", "-f", "/dev/null", "--no-loop"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("pg_recvlogical runs");
            std::thread::sleep(Duration::from_millis(300));
            if child.try_wait().expect("wait").is_none() {
                return SlotHeld(child);
            }
            // the proxy was reading the slot at that moment: again
            assert!(started.elapsed() < Duration::from_secs(10), "pg_recvlogical never held the slot");
        }
    }
}

impl Drop for SlotHeld {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

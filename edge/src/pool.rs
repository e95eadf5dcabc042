//! Transaction pooling (the regional role): clients share a few server
//! connections; a client holds one only for a transaction (or a request
//! outside one) and gives it back at ReadyForQuery 'I'. A client whose
//! session state a shared connection cannot carry (a SET, a temporary table,
//! LISTEN, an advisory lock) keeps its connection until it leaves.
//!
//! Prepared statements survive it, as in PgBouncer 1.21: a client's named
//! statement is prepared on the server under a name derived from its text and
//! parameter types (`postai_<digest>`), so every client using the same
//! statement shares it, and a statement is prepared on a server connection
//! the first time a client binds it there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::{self, Conn, LoginError};
use postai_wire::pooled::ServerStatements;

/// Which clients may share a server connection: same server, same startup
/// parameters (user, database, and every setting they carry).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: String,
    pub params: Vec<(String, String)>,
}

impl PoolKey {
    /// The key for a client logging in with `params` to `addr`. The
    /// application name does not change results and is left out.
    pub fn new(addr: &str, params: &[(String, String)]) -> PoolKey {
        let mut params: Vec<(String, String)> =
            params.iter().filter(|(k, _)| k != "application_name").cloned().collect();
        params.sort();
        PoolKey { addr: addr.to_string(), params }
    }
}

/// A server connection and what is prepared on it.
pub struct ServerConn {
    pub conn: Conn,
    /// What is prepared on it.
    pub prepared: ServerStatements,
    /// ParameterStatus and BackendKeyData of its login.
    pub greeting: BytesMut,
    pub backend_key: Option<(i32, i32)>,
    /// The pool's generation at its login (see [`Pool::retire`]).
    generation: u64,
    /// The `application_name` the server runs under (the key leaves it out:
    /// it is set for each client that borrows the connection).
    application_name: String,
}

impl ServerConn {
    /// Runs as `name` (the borrowing client's `application_name`, as it
    /// logged in): what `current_setting('application_name')` and
    /// `pg_stat_activity` show while it holds the connection.
    pub async fn run_as(&mut self, name: &str) -> std::io::Result<()> {
        if self.application_name == name {
            return Ok(());
        }
        // dollar-quoted with a tag the name does not hold
        let mut tag = String::from("postai");
        while name.contains(&format!("${tag}$")) {
            tag.push('x');
        }
        let msgs = self.conn.simple(&format!("SET application_name = ${tag}${name}${tag}$")).await?;
        // (a simple query ends the unnamed statement)
        self.prepared.unnamed = None;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            return Err(std::io::Error::other(upstream::error_message(e)));
        }
        self.application_name = name.to_string();
        Ok(())
    }
}

struct Slot {
    idle: Mutex<Vec<ServerConn>>,
    permits: Arc<Semaphore>,
    /// Server-side statement names a connection of this slot prepared
    /// without error (the same text may not parse for another user or database).
    known: Mutex<HashSet<String>>,
    /// The greeting (ParameterStatus, BackendKeyData) of the last login for
    /// this key: a client that connects gets it without a server connection.
    greeting: Mutex<Option<BytesMut>>,
}

/// Server connections by [`PoolKey`], at most `size` per key.
pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    size: usize,
    keys_max: usize,
    dialer: upstream::Dialer,
    /// Logins of an older generation are not lent again (see [`Pool::retire`]).
    generation: Arc<AtomicU64>,
}

/// Statement names remembered as known at most (then forgotten, and learnt again).
const KNOWN_MAX: usize = 100_000;

/// A server connection lent to one client.
pub struct Lease {
    pub server: ServerConn,
    slot: Arc<Slot>,
    /// The pool's generation now.
    generation: Arc<AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection free within {0} ms (pool size {1})")]
    Timeout(u64, usize),
    #[error("too many distinct pools (max {0}): user, database and startup parameters")]
    TooManyKeys(usize),
    #[error(transparent)]
    Login(#[from] LoginError),
}

impl PoolError {
    /// The ErrorResponse a client gets.
    pub fn client_error(&self) -> Bytes {
        match self {
            PoolError::Login(e) => e.client_error(),
            e => crate::protocol::error_response("ERROR", "53300", &format!("postai-edge: {e}")),
        }
    }
}

impl Pool {
    pub fn new(size: usize, keys_max: usize, dialer: upstream::Dialer) -> Pool {
        Pool {
            slots: Mutex::new(HashMap::new()),
            size: size.max(1),
            keys_max: keys_max.max(1),
            dialer,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// These statements were prepared without error for `key`.
    pub fn learn(&self, key: &PoolKey, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let Some(slot) = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned() else { return };
        let mut known = slot.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() + names.len() > KNOWN_MAX {
            known.clear();
        }
        known.extend(names);
    }

    /// Whether a statement was prepared without error for `key`.
    pub fn knows(&self, key: &PoolKey, name: &str) -> bool {
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
        slot.is_some_and(|s| s.known.lock().unwrap_or_else(|p| p.into_inner()).contains(name))
    }

    fn slot(&self, key: &PoolKey) -> Result<Arc<Slot>, PoolError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(key) {
            return Ok(s.clone());
        }
        if slots.len() >= self.keys_max {
            // forget pools that hold nothing (no idle connection, none lent)
            slots.retain(|_, s| {
                s.permits.available_permits() < self.size || !s.idle.lock().map(|i| i.is_empty()).unwrap_or(true)
            });
            if slots.len() >= self.keys_max {
                return Err(PoolError::TooManyKeys(self.keys_max));
            }
        }
        let s = Arc::new(Slot {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(self.size)),
            known: Mutex::new(HashSet::new()),
            greeting: Mutex::new(None),
        });
        slots.insert(key.clone(), s.clone());
        Ok(s)
    }

    /// A server connection for `key`: an idle one, or a new login; waits up
    /// to `wait_ms` while `size` are lent.
    pub async fn acquire(&self, key: &PoolKey, password: Option<&str>, wait_ms: u64) -> Result<Lease, PoolError> {
        let slot = self.slot(key)?;
        let permit =
            tokio::time::timeout(std::time::Duration::from_millis(wait_ms), slot.permits.clone().acquire_owned())
                .await
                .map_err(|_| PoolError::Timeout(wait_ms, self.size))?
                .map_err(|_| PoolError::Timeout(wait_ms, self.size))?;
        let generation = self.generation();
        let idle = {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            // retired logins are closed (dropped) here
            idle.retain(|s| s.generation == generation);
            idle.pop()
        };
        let server = match idle {
            Some(s) => s,
            None => {
                let login = upstream::login(&self.dialer, &key.addr, &key.params, password).await?;
                if self.generation() == generation {
                    *slot.greeting.lock().unwrap_or_else(|p| p.into_inner()) = Some(login.greeting.clone());
                }
                ServerConn {
                    conn: login.conn,
                    prepared: ServerStatements::default(),
                    greeting: login.greeting,
                    backend_key: login.backend_key,
                    generation,
                    application_name: String::new(),
                }
            }
        };
        Ok(Lease { server, slot, generation: self.generation.clone(), _permit: permit })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// What a login gets changed (a role's settings, memberships or
    /// attributes; a reloaded configuration): no connection logged in before
    /// is lent again (idle ones are closed, lent ones when given back), and
    /// clients are greeted by a new login.
    pub fn retire(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        let slots: Vec<Arc<Slot>> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for slot in slots {
            slot.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
            *slot.greeting.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The greeting a login for `key` got, once one did: what a client
    /// connecting with the same user, database and settings is greeted with
    /// (the same login, so the same outcome), before it needs a server
    /// connection, if ever (its reads may all be answered by the cache).
    pub fn greeting(&self, key: &PoolKey) -> Option<BytesMut> {
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()?;
        slot.greeting.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One row per pool: server, user, database, idle, lent, size, statements
    /// known good (`SHOW POSTAI POOLS`), sorted.
    pub fn rows(&self) -> Vec<Vec<String>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let param = |k: &PoolKey, name: &str| {
            k.params.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
        };
        let mut rows: Vec<Vec<String>> = slots
            .iter()
            .map(|(k, s)| {
                let idle = s.idle.lock().map(|i| i.len()).unwrap_or(0);
                let lent = self.size - s.permits.available_permits();
                let known = s.known.lock().map(|k| k.len()).unwrap_or(0);
                vec![
                    k.addr.clone(),
                    param(k, "user"),
                    param(k, "database"),
                    idle.to_string(),
                    lent.to_string(),
                    self.size.to_string(),
                    known.to_string(),
                ]
            })
            .collect();
        rows.sort();
        rows
    }

    /// Server connections idle and lent, over every key.
    pub fn counts(&self) -> (usize, usize) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let idle = slots.values().map(|s| s.idle.lock().map(|i| i.len()).unwrap_or(0)).sum();
        let lent = slots.values().map(|s| self.size - s.permits.available_permits()).sum();
        (idle, lent)
    }
}

impl Lease {
    /// Gives the connection back, idle and ready for another client (closed
    /// instead when its login was retired meanwhile).
    pub fn release(self) {
        let Lease { server, slot, generation, _permit } = self;
        if server.generation == generation.load(Ordering::Relaxed) {
            slot.idle.lock().unwrap_or_else(|p| p.into_inner()).push(server);
        }
    }
}

pub use postai_wire::pooled::server_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_the_application_name_and_order() {
        let p = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let a = PoolKey::new("h:1", &p(&[("user", "u"), ("database", "d"), ("application_name", "x")]));
        let b = PoolKey::new("h:1", &p(&[("database", "d"), ("user", "u"), ("application_name", "y")]));
        assert_eq!(a, b);
        let c = PoolKey::new("h:1", &p(&[("database", "d"), ("user", "u"), ("DateStyle", "SQL")]));
        assert_ne!(a, c, "a startup setting changes results");
        assert_ne!(a, PoolKey::new("h:2", &p(&[("user", "u"), ("database", "d")])));
    }

    #[test]
    fn server_names_follow_text_and_types() {
        let a = server_name(b"SELECT 1\0\0\0");
        assert_eq!(a, server_name(b"SELECT 1\0\0\0"));
        assert_ne!(a, server_name(b"SELECT 2\0\0\0"));
        assert_ne!(a, server_name(b"SELECT 1\0\0\x01\0\0\0\x17"));
        assert!(a.starts_with("postai_") && a.len() < 64, "fits NAMEDATALEN");
    }

    #[tokio::test]
    async fn a_full_pool_times_out_with_a_clear_error() {
        let pool = Pool::new(1, 4, upstream::Dialer { max: 1 << 20, ..Default::default() });
        let key = PoolKey::new("127.0.0.1:1", &[]);
        // port 1: the login fails, and the permit comes back
        let e = pool.acquire(&key, None, 100).await.err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("127.0.0.1:1")), "a dead server is named");
        assert_eq!(pool.counts(), (0, 0));
    }
}

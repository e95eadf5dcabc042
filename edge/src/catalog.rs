//! The database's catalog and roles kept current for the node: loaded
//! (`postai_wire::catalog`, over the proxy's upstream connection) when the
//! change-stream reader starts and again after every DDL (the event
//! triggers' messages, or DDL through the proxy); the roles' digest compared
//! on every poll (roles change without DDL events).

use std::sync::atomic::Ordering;

use postai_core::Lsn;
pub use postai_wire::catalog::{LiveCatalog, ROLES_DIGEST, Rows, load};

use crate::protocol::{self, Message};
use crate::proxy::Proxy;
use crate::upstream::{Conn, error_message};

/// What the change-stream reader knows of the database beyond the stream,
/// across its reconnections: the catalog and the roles it last saw.
#[derive(Debug, Default)]
pub struct Watch {
    catalog: Option<u128>,
    roles: Option<String>,
}

impl Watch {
    /// Loads the catalog and gives it to the node when it changed: the
    /// first time before the stream opens (nothing cached was analysed by
    /// another catalog), later by dropping what was cached (DDL changed
    /// what it means). Returns the catalog's digest.
    pub async fn sync_catalog(&mut self, proxy: &Proxy, conn: &mut Conn) -> std::io::Result<u128> {
        let ddl_before = proxy.ddl_count.load(Ordering::SeqCst);
        proxy.catalog_stale.store(false, Ordering::Relaxed);
        let live = load(conn).await?;
        let digest = live.digest();
        // DDL through the proxy while the catalog was read: what was read
        // may predate it, and the node stays without a catalog it trusts
        let stale_again = |node: &mut postai_core::node::EdgeNode<_>| {
            if proxy.ddl_count.load(Ordering::SeqCst) != ddl_before {
                proxy.catalog_stale.store(true, Ordering::Relaxed);
                node.catalog_changed();
            }
        };
        if self.catalog == Some(digest) {
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            node.catalog_current();
            stale_again(&mut node);
        } else {
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            if self.catalog.is_none() {
                node.load_catalog(|c| live.apply(c));
            } else {
                node.update_catalog(|c| live.apply(c));
                if let Some(f) = &proxy.l2_file {
                    f.clear("the database's catalog changed");
                }
            }
            stale_again(&mut node);
            drop(node);
            eprintln!("postai-edge: catalog loaded: {}", live.summary());
            self.catalog = Some(digest);
        }
        proxy.catalog_loads.fetch_add(1, Ordering::Relaxed);
        Ok(digest)
    }

    /// Compares the roles' digest with the last one: a change (a
    /// membership, an attribute, a per-role setting, a reloaded
    /// configuration) drops what was cached under the old privileges.
    pub async fn check_roles(&mut self, proxy: &Proxy, conn: &mut Conn) -> std::io::Result<()> {
        let digest = conn.rows(ROLES_DIGEST).await?.into_iter().next().and_then(|r| r.into_iter().next().flatten());
        let Some(digest) = digest else { return Ok(()) };
        if self.roles.as_ref().is_some_and(|old| *old != digest) {
            // every read that ran under the old roles has an older snapshot
            let at = conn.rows("SELECT pg_current_wal_lsn()::text").await?;
            let at = at.first().and_then(|r| r.first().cloned().flatten()).and_then(|s| protocol::parse_lsn(&s));
            let Some(at) = at.map(Lsn) else {
                return Err(std::io::Error::other("roles changed, and the primary gave no WAL position"));
            };
            proxy.node.lock().unwrap_or_else(|p| p.into_inner()).roles_changed(at);
            if let Some(f) = &proxy.l2_file {
                f.clear("the database's roles changed");
            }
            // pooled connections carry their login's settings and privileges
            if let Some(pool) = &proxy.pool {
                pool.retire();
            }
            eprintln!("postai-edge: roles changed: cached entries dropped");
        }
        self.roles = Some(digest);
        Ok(())
    }
}

/// Without a change stream the catalog and the roles are read by a task of
/// their own: the catalog at start, after DDL through the proxy and every
/// `CATALOG_POLL_MS`; the roles every second.
pub async fn run_without_cdc(proxy: std::sync::Arc<Proxy>) {
    const CATALOG_POLL_MS: u64 = 30_000;
    let mut watch = Watch::default();
    loop {
        let cfg = &proxy.config.cdc;
        let result: std::io::Result<()> = async {
            let mut conn = proxy.service_login(&proxy.primary_addr(), &cfg.user, &cfg.database).await?;
            let mut loaded = std::time::Instant::now();
            watch.sync_catalog(&proxy, &mut conn).await?;
            loop {
                watch.check_roles(&proxy, &mut conn).await?;
                tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
                let stale = proxy.catalog_needs_read();
                if stale || loaded.elapsed() >= std::time::Duration::from_millis(CATALOG_POLL_MS) {
                    watch.sync_catalog(&proxy, &mut conn).await?;
                    loaded = std::time::Instant::now();
                }
            }
        }
        .await;
        if let Err(e) = result {
            eprintln!("postai-edge: catalog: {e}; retrying");
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
}

impl Rows for Conn {
    /// The rows of a query, text columns; an error answer is an error.
    async fn rows(&mut self, sql: &str) -> std::io::Result<Vec<Vec<Option<String>>>> {
        let msgs: Vec<Message> = self.simple(sql).await?;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            return Err(std::io::Error::other(format!("reading the catalog: {}", error_message(e))));
        }
        Ok(msgs.iter().filter(|m| m.tag == b'D').filter_map(protocol::text_columns).collect())
    }
}

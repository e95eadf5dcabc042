//! The primary's visible position (`postai_core::stream::visibility`),
//! probed by a task of its own, more often than the change stream is
//! polled: a row written is filled again once the position passes the
//! write, so the shorter the probe's interval, the sooner.

use std::sync::Arc;
use std::time::Duration;

use postai_core::Lsn;
use postai_core::stream::parse_lsn;
use postai_core::stream::visibility::{RUNNING_SQL, Visibility, parse_running};

use crate::protocol;
use crate::proxy::Proxy;
use crate::upstream::error_message;

/// Probes forever (a proxy reading a slot of its own); reconnects after
/// errors and after a failover (the new primary's positions start over).
pub async fn run(proxy: Arc<Proxy>) {
    loop {
        if let Err(e) = probe(&proxy).await {
            eprintln!("postai-edge: visible position: {e}; retrying");
            tokio::time::sleep(Duration::from_millis(proxy.config.cdc.poll_ms.max(100) * 10)).await;
        }
    }
}

/// The interval between probes: a fifth of the change stream's poll, 5 to 50 ms.
pub fn interval(poll_ms: u64) -> Duration {
    Duration::from_millis((poll_ms / 5).clamp(5, 50))
}

async fn probe(proxy: &Proxy) -> std::io::Result<()> {
    let cfg = &proxy.config.cdc;
    let (addr, generation) = {
        let t = proxy.topology();
        (cfg.upstream.clone().unwrap_or_else(|| t.primary_addr()), t.primary_generation())
    };
    let mut conn = proxy.service_login(&addr, &cfg.user, &cfg.database).await?;
    // the position, then (a later statement) what was running
    let sql = format!("SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text; {RUNNING_SQL}");
    let mut visibility = Visibility::new();
    loop {
        if cfg.upstream.is_none() && proxy.topology().primary_generation() != generation {
            return Err(std::io::Error::other("the primary changed; probing the new one"));
        }
        let msgs = conn.simple(&sql).await?;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            return Err(std::io::Error::other(error_message(e)));
        }
        let mut columns = msgs.iter().filter(|m| m.tag == b'D').filter_map(protocol::text_columns);
        let lsn = columns.next().and_then(|c| c.into_iter().next().flatten()).and_then(|t| parse_lsn(&t));
        let running = columns.next().and_then(|c| parse_running(c.into_iter().next().flatten().as_deref()));
        if let (Some(lsn), Some(running)) = (lsn, running) {
            let visible: Lsn = visibility.handle_probe(lsn, &running);
            proxy.saw_visible_lsn(generation, visible);
        }
        tokio::time::sleep(interval(cfg.poll_ms)).await;
    }
}

//! The proxy's background tasks, started on its shared state: the change
//! stream (`cdc`, and `visible` beside a slot reader) or, without one, the
//! catalog and roles (`catalog`), and the health checks (`health`). These
//! modules depend on `proxy`; nothing in `proxy` depends on them.

use std::sync::Arc;

use crate::proxy::Proxy;

impl Proxy {
    /// Starts the background tasks: the CDC reader and the health checks.
    pub fn spawn_tasks(self: &Arc<Self>) {
        if self.config.cdc.enabled {
            tokio::spawn(crate::cdc::run(self.clone()));
            if self.config.cdc.source == crate::config::CdcSource::Slot {
                tokio::spawn(crate::visible::run(self.clone()));
            }
        } else {
            // the catalog (for what is cached and what pins a pooled
            // client) and the roles, read by a task of their own
            tokio::spawn(crate::catalog::run_without_cdc(self.clone()));
        }
        tokio::spawn(crate::health::run(self.clone()));
    }
}

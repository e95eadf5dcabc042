//! The state every connection shares (`Proxy`): the node, the topology,
//! the pool, the change stream's feed and history, the positions seen, and
//! the background tasks that keep them.

use super::*;

/// State shared by every connection.
pub struct Proxy {
    pub config: Config,
    pub node: Mutex<EdgeNode<Value>>,
    /// Highest `pg_current_wal_lsn()` seen: every commit made so far is
    /// below it (a floor for reads that must reflect them).
    pub lsn_seen: AtomicU64,
    /// A position every commit below which was visible when it was found
    /// (`postai_core::stream::visibility`): what a fill from the primary is
    /// dated with. Found by the slot reader's probes; `None` (0) without one.
    pub lsn_visible: AtomicU64,
    /// The topology generation whose primary `lsn_seen` and `lsn_visible`
    /// are positions of (set where they are forgotten).
    pub lsn_generation: AtomicU64,
    /// The database nodes: primary, replicas, failover.
    pub topology: Mutex<Topology>,
    pub metrics: Metrics,
    /// Server connections shared by clients (transaction pooling), if on.
    pub pool: Option<Pool>,
    /// How upstream connections are made (TLS, message limit).
    pub dialer: upstream::Dialer,
    /// What this proxy's slot reader applied, for subscribed edges.
    pub cdc_feed: tokio::sync::broadcast::Sender<Arc<postai_core::stream::history::Feed>>,
    /// What a regional proxy published lately, for edges that subscribe again.
    pub cdc_history: Mutex<postai_core::stream::history::History>,
    /// Bumped to end every open subscription ([`Proxy::end_subscriptions`]).
    pub(super) subscriptions: tokio::sync::watch::Sender<u64>,
    /// The last commit the slot reader applied.
    pub cdc_last: AtomicU64,
    /// Pooled clients' cancel keys (ours) -> the server they run on.
    pub cancels: Mutex<std::collections::HashMap<(i32, i32), Arc<CancelTarget>>>,
    /// L2 persisted in `[cache] l2_path` (`l2.rs`), if set.
    pub l2_file: Option<crate::l2::L2File>,
    /// DDL ran through this proxy: the CDC reader reloads the database's
    /// catalog on its next poll (also without the DDL event triggers).
    pub catalog_stale: std::sync::atomic::AtomicBool,
    /// DDL through this proxy so far: a catalog read that began before the
    /// last of them may not show it.
    pub ddl_count: std::sync::atomic::AtomicU64,
    /// Times the catalog was read (`SHOW POSTAI STATS` catalog_loads).
    pub catalog_loads: std::sync::atomic::AtomicU64,
    /// Buffered bytes and client connections, bounded (`limits.rs`).
    pub limits: crate::limits::Limits,
    /// What a reload replaces (`reload.rs`): users.
    pub live: crate::reload::Live,
    /// Graceful shutdown (`signals.rs`).
    pub shutdown: crate::signals::Shutdown,
    pub(super) next_session: AtomicU64,
    pub(super) start: std::time::Instant,
}

impl Proxy {
    pub fn new(config: Config) -> anyhow::Result<Arc<Proxy>> {
        let mut catalog = Catalog::new();
        for t in &config.tables {
            catalog.set_primary_key(&t.name, &t.primary_key);
            if t.integer_key {
                catalog.set_integer_key(&t.name);
            }
        }
        let c = &config.cache;
        let tier = |entries, bytes| TierConfig {
            bytes_max: bytes,
            entries_max: entries,
            ttl: Duration::from_secs(c.ttl_s),
            eviction: Eviction::Sieve,
        };
        let node_config = NodeConfig {
            zone: Zone::Eu,
            l1: tier(c.l1_entries, c.l1_bytes),
            l2: tier(c.l2_entries, c.l2_bytes),
            versions: VersionMapConfig::default(),
            analyzer: AnalyzerConfig::default(),
            sessions_max: 100_000,
            pending_max: 100_000,
            residency: Vec::new(),
            invalidation: InvalidationMode::Key,
            cdc_silence_max: config.cdc.enabled.then(|| Duration::from_millis(config.cdc.silence_max_ms)),
            // the CDC reader loads the database's catalog before it opens the stream
            fills_wait_for_cdc: config.cdc.enabled,
            fresh_ttl: (c.fresh_ttl_s > 0).then(|| Duration::from_secs(c.fresh_ttl_s)),
        };
        let mut node = EdgeNode::new(node_config, catalog, Lsn(0))?;
        // restored entries are served once the CDC reader has vouched for them
        let start = std::time::Instant::now();
        let l2_file = crate::l2::open_for(&config, &mut node, Instant::ZERO);
        let f = &config.failover;
        let failover = f.enabled.then(|| FailoverConfig {
            heartbeat_timeout: Duration::from_millis(f.timeout_ms),
            promote_timeout: Duration::from_millis(f.promote_timeout_ms),
            nodes_max: config.replicas.len() + 2,
        });
        let topology = Topology::new(&config.upstream, &config.replicas, failover, Instant::ZERO);
        let dialer =
            upstream::Dialer { max: config.max_message_bytes, tls: Arc::new(config.upstream_tls.loaded.clone()) };
        let pool = (config.pool_mode() == crate::config::PoolMode::Transaction)
            .then(|| Pool::new(config.pool.size, config.pool.keys_max, dialer.clone()));
        let (limits, live) = (crate::limits::Limits::new(&config), crate::reload::Live::new(&config));
        let shutdown = crate::signals::Shutdown::new(config.shutdown_timeout_ms);
        Ok(Arc::new(Proxy {
            limits,
            live,
            shutdown,
            config,
            node: Mutex::new(node),
            topology: Mutex::new(topology),
            metrics: Metrics::default(),
            pool,
            dialer,
            cancels: Mutex::new(std::collections::HashMap::new()),
            cdc_feed: tokio::sync::broadcast::channel(CDC_FEED_DEPTH).0,
            cdc_history: Mutex::new(postai_core::stream::history::History::default()),
            subscriptions: tokio::sync::watch::channel(0).0,
            cdc_last: AtomicU64::new(0),
            lsn_seen: AtomicU64::new(0),
            lsn_visible: AtomicU64::new(0),
            lsn_generation: AtomicU64::new(0),
            l2_file,
            catalog_stale: std::sync::atomic::AtomicBool::new(false),
            ddl_count: std::sync::atomic::AtomicU64::new(0),
            catalog_loads: std::sync::atomic::AtomicU64::new(0),
            next_session: AtomicU64::new(1),
            start,
        }))
    }

    /// The core's clock: nanoseconds since the proxy started.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    pub(super) fn node(&self) -> std::sync::MutexGuard<'_, EdgeNode<Value>> {
        // a panic while holding the lock is a bug; keep serving with the state as is
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every open `POSTAI SUBSCRIBE` stream with an error (subscribers
    /// subscribe again, from where they were).
    pub fn end_subscriptions(&self) {
        self.subscriptions.send_modify(|n| *n += 1);
    }

    pub fn topology(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current primary (it changes on failover).
    pub fn primary_addr(&self) -> String {
        self.topology().primary_addr()
    }

    /// A connection of the proxy's own (CDC, health checks) as `user`, with
    /// the password `[[users]]` gives it upstream, if any.
    pub async fn service_login(&self, addr: &str, user: &str, database: &str) -> std::io::Result<Conn> {
        // named, so an operator (and the tests) can tell the proxy's own
        // connections from its clients' in pg_stat_activity
        let params = vec![
            ("user".to_string(), user.to_string()),
            ("database".to_string(), database.to_string()),
            ("application_name".to_string(), SERVICE_APPLICATION_NAME.to_string()),
            // the catalog's names, whatever search_path a database or role
            // owner set (a function of theirs must not run as this user)
            ("options".to_string(), "-c search_path=pg_catalog".to_string()),
        ];
        let password = self.upstream_password(user);
        match upstream::login(&self.dialer, addr, &params, password.as_deref()).await {
            Ok(l) => Ok(l.conn),
            Err(upstream::LoginError::Io(e) | upstream::LoginError::Unreachable(_, e)) => Err(e),
            Err(e @ upstream::LoginError::Tls(..)) => {
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    /// DDL ran through this proxy: the CDC reader reads the catalog again on
    /// its next poll, and until then nothing is cached (functions and views
    /// may mean something else now).
    pub fn ddl_ran(&self) {
        self.ddl_count.fetch_add(1, Ordering::SeqCst);
        self.catalog_stale.store(true, Ordering::Relaxed);
        self.node().catalog_changed();
    }

    /// Whether the catalog must be read again: DDL ran through the proxy,
    /// or the node holds no catalog it trusts (DDL seen in the change
    /// stream, a read that DDL through the proxy overtook).
    pub fn catalog_needs_read(&self) -> bool {
        self.catalog_stale.load(Ordering::Relaxed) || self.node().catalog_is_stale()
    }

    /// Drops every cached entry (a failover: the old CDC stream is gone),
    /// every answer in flight unfiled, and the primary's position seen: the
    /// new primary's timeline reuses the positions of whatever the old one
    /// lost, so no answer of the new one may be stamped with an old one.
    pub fn forget_cache(&self, _now: Instant) {
        let mut n = self.node();
        self.lsn_seen.store(0, Ordering::Relaxed);
        self.lsn_visible.store(0, Ordering::Relaxed);
        // positions raised from now on are of this primary (`raise` checks)
        self.lsn_generation.store(self.topology().primary_generation(), Ordering::Relaxed);
        n.primary_changed();
        if let Some(f) = &self.l2_file {
            f.clear("the in-memory tiers were cleared");
        }
    }

    /// Every commit below `lsn` on the primary of topology generation
    /// `generation` was visible (see [`Proxy::saw_primary_lsn`] for the guard).
    pub fn saw_visible_lsn(&self, generation: u64, lsn: Lsn) {
        self.raise(&self.lsn_visible, generation, lsn);
    }

    /// What an answer of the primary, to a request sent now, reflects at
    /// least: the visible position when the slot reader finds it, else
    /// (no change stream of its own) the position seen.
    pub fn primary_answer_floor(&self) -> Lsn {
        let seen = self.lsn_seen.load(Ordering::Relaxed);
        if self.config.cdc.enabled && self.config.cdc.source == crate::config::CdcSource::Slot {
            Lsn(seen.min(self.lsn_visible.load(Ordering::Relaxed)))
        } else {
            Lsn(seen)
        }
    }

    /// Every commit up to this position is visible on the primary (a proxy
    /// reading its own slot probes it), for the `V` lines of `POSTAI
    /// SUBSCRIBE`: `None` when this proxy does not know it.
    pub fn visible_position(&self) -> Option<Lsn> {
        let slot = self.config.cdc.enabled && self.config.cdc.source == crate::config::CdcSource::Slot;
        // after a failover, until the old primary's positions are forgotten,
        // they are not the new one's (its timeline reuses them)
        let current = self.lsn_generation.load(Ordering::Relaxed) == self.topology().primary_generation();
        Some(self.primary_answer_floor()).filter(|l| slot && current && l.0 > 0)
    }

    /// The oldest an answer relayed now may reflect for the `filling` stat:
    /// a proxy reading its own slot knows it ([`Self::primary_answer_floor`]);
    /// one behind a regional is told each answer's position by it.
    fn fill_floor(&self) -> Lsn {
        if self.config.cdc.enabled && self.config.cdc.source == crate::config::CdcSource::Slot {
            self.primary_answer_floor()
        } else {
            Lsn(u64::MAX)
        }
    }

    /// The primary of topology generation `generation` stood at `lsn`:
    /// every commit made there so far is below it (not every one visible:
    /// see [`Proxy::saw_visible_lsn`]).
    pub fn saw_primary_lsn(&self, generation: u64, lsn: Lsn) {
        self.raise(&self.lsn_seen, generation, lsn);
    }

    /// Raises a position of the primary of `generation`; ignored when the
    /// primary changed since (checked under the node's lock, which
    /// [`Proxy::forget_cache`] holds when it forgets the old positions).
    fn raise(&self, position: &AtomicU64, generation: u64, lsn: Lsn) {
        let _n = self.node();
        if self.topology().primary_generation() == generation {
            position.fetch_max(lsn.0, Ordering::Relaxed);
        }
    }

    /// The graceful part of a shutdown, once the listener is closed: sessions
    /// are told to close when idle, and this waits until none is left or the
    /// timeout passed. Returns the sessions still open.
    pub async fn drain(&self) -> u64 {
        self.shutdown.begin();
        // subscribers (POSTAI SUBSCRIBE) are never idle: their streams end
        self.end_subscriptions();
        let deadline = tokio::time::Instant::now() + self.shutdown.timeout();
        loop {
            let open = self.metrics.clients.load(Ordering::Relaxed);
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The users the proxy authenticates now (`[[users]]`, as last reloaded).
    pub fn users(&self) -> Arc<Vec<crate::config::UserConfig>> {
        self.live.users()
    }

    /// The password the proxy logs in upstream with as `user`, as last reloaded.
    pub fn upstream_password(&self, user: &str) -> Option<String> {
        self.users().iter().find(|u| u.name == user).and_then(|u| u.upstream_password.clone())
    }

    /// Reads the configuration file again and applies what can change at
    /// runtime (`crate::reload`).
    pub fn reload(&self) -> Result<Vec<(String, String)>, String> {
        self.live.reload(&self.config, &self.limits, &self.shutdown)
    }

    /// `SHOW POSTAI CACHES`: one row per tier.
    pub fn cache_rows(&self) -> Vec<Vec<String>> {
        let n = self.node();
        [TierName::L1, TierName::L2]
            .iter()
            .filter_map(|t| n.tier(*t).map(|tier| (t, tier.stats())))
            .map(|(t, s)| {
                let mut row = vec![format!("{t:?}").to_lowercase()];
                row.extend(
                    [s.entries, s.bytes, s.hits, s.misses, s.inserts, s.invalidations, s.evictions, s.expirations]
                        .iter()
                        .map(u64::to_string),
                );
                row
            })
            .collect()
    }

    /// Serves `/metrics` on `metrics_listen`, if configured; returns its address.
    pub async fn start_metrics(self: &Arc<Self>) -> std::io::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = self.config.metrics_listen.as_deref() else { return Ok(None) };
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(super::exporter::serve(self.clone(), listener));
        Ok(Some(local))
    }

    /// `SHOW POSTAI STATS` as (name, value) rows.
    pub fn stats_rows(&self) -> Vec<(String, String)> {
        let n = self.node();
        let s = n.stats();
        let mut rows = vec![
            ("queries".to_string(), s.queries.to_string()),
            ("l1_hits".into(), s.l1_hits.to_string()),
            ("l2_hits".into(), s.l2_hits.to_string()),
            ("upstream".into(), s.upstream.to_string()),
            ("uncacheable".into(), s.uncacheable.to_string()),
            ("writes".into(), s.writes.to_string()),
            ("cdc_events".into(), s.cdc_events.to_string()),
            ("cdc_silent_misses".into(), s.cdc_silent_misses.to_string()),
            ("cdc_resumed".into(), self.metrics.cdc_resumed.load(Ordering::Relaxed).to_string()),
            // whether an answer of the primary read now would be filed
            ("filling".into(), u8::from(n.files_at(self.fill_floor())).to_string()),
            ("catalog_stale".into(), u8::from(n.catalog_is_stale()).to_string()),
            ("catalog_loads".into(), self.catalog_loads.load(Ordering::Relaxed).to_string()),
        ];
        for t in [TierName::L1, TierName::L2] {
            if let Some(tier) = n.tier(t) {
                let ts = tier.stats();
                rows.push((format!("{t:?}_entries").to_lowercase(), ts.entries.to_string()));
                rows.push((format!("{t:?}_invalidations").to_lowercase(), ts.invalidations.to_string()));
            }
        }
        drop(n);
        let t = self.topology();
        rows.push(("replica_reads".into(), t.replica_reads.to_string()));
        rows.push(("failovers".into(), t.failovers.to_string()));
        rows.push(("epoch".into(), t.epoch().0.to_string()));
        rows.push(("primary".into(), t.primary_addr()));
        rows.push(("fenced_returns".into(), t.fenced_returns.to_string()));
        if let Some(pool) = &self.pool {
            let (idle, lent) = pool.counts();
            rows.push(("pool_idle".into(), idle.to_string()));
            rows.push(("pool_lent".into(), lent.to_string()));
        }
        drop(t);
        if let Some(f) = &self.l2_file {
            rows.extend(f.stats_rows());
        }
        rows
    }
}

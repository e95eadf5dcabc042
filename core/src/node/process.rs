//! What the node knows as a process, beside its requests: the database's
//! catalog and roles, its tiers as a whole, a failover (the primary
//! changed), where its change stream opened, a restart from its L2 file.

use super::*;

impl<V: Clone> EdgeNode<V> {
    /// Loses a site tier (fault injection, or an operator flush).
    pub fn clear_tier(&mut self, name: TierName) {
        match name {
            TierName::L1 => self.l1.clear(),
            TierName::L2 => self.l2.clear(),
            TierName::L3 => {}
        }
    }

    /// The database's roles changed (memberships, attributes, per-role
    /// settings) in a way no change event shows: what was cached under the
    /// old privileges is dropped, and sessions that log in from now on
    /// share nothing with sessions that logged in before (their per-role
    /// settings may differ).
    pub fn roles_changed(&mut self, at: Lsn) {
        self.login_generation += 1;
        // reads in flight ran with the old privileges: their snapshots are older
        self.versions.apply(&Change { lsn: at, targets: vec![ChangeTarget::All] });
        self.clear_tier(TierName::L1);
        self.clear_tier(TierName::L2);
    }

    /// Changes the catalog (a reload from the database: relations,
    /// functions, keys): shapes are analysed anew, prepared statements on
    /// their next execution, and what is cached is dropped (it was cached by
    /// the old catalog's rules).
    pub fn update_catalog(&mut self, update: impl FnOnce(&mut Catalog)) {
        self.catalog_stale = false;
        self.shape_stats.retire(&self.analyzer);
        self.analyzer.update_catalog(update);
        self.clear_tier(TierName::L1);
        self.clear_tier(TierName::L2);
    }

    /// The first load of the database's catalog, before the CDC stream is
    /// heard (with [`NodeConfig::fills_wait_for_cdc`] nothing was filled
    /// yet): what L2 holds was restored by a driver that checks it was
    /// cached under the same catalog, and stays.
    pub fn load_catalog(&mut self, update: impl FnOnce(&mut Catalog)) {
        if self.last_cdc.is_some() || !self.config.fills_wait_for_cdc {
            return self.update_catalog(update);
        }
        self.shape_stats.retire(&self.analyzer);
        self.analyzer.update_catalog(update);
        self.clear_tier(TierName::L1);
    }

    /// Whether DDL ran and the catalog was not read again since (nothing
    /// is cached meanwhile).
    pub fn catalog_is_stale(&self) -> bool {
        self.catalog_stale
    }

    /// DDL ran through this node: until the driver has read the catalog
    /// again ([`Self::catalog_current`] or an update), nothing is cached.
    pub fn catalog_changed(&mut self) {
        self.catalog_stale = true;
    }

    /// The driver read the catalog and found it unchanged.
    pub fn catalog_current(&mut self) {
        self.catalog_stale = false;
    }

    /// The change stream goes on on a new history from `start`
    /// ([`CdcEvent::starts_history`]): everything cached is dropped, nothing
    /// in flight is filed, the version map starts again at `start` (the old
    /// history's positions, reused by the new one, say nothing of it), and
    /// no answer older than `start` is filed.
    pub fn start_history(&mut self, start: Lsn) {
        self.primary_changed();
        self.versions.restart_at(start);
        self.fills_from = start;
        self.gap_since = None;
    }

    /// The primary changed (a failover): every cached entry is dropped, and
    /// no answer to a request in flight is filed (it was stamped with a
    /// position of the old primary, whose timeline the new one may reuse
    /// for other commits).
    pub fn primary_changed(&mut self) {
        self.clear_tier(TierName::L1);
        self.clear_tier(TierName::L2);
        for p in self.pending.values_mut() {
            p.cache_here = false;
        }
    }

    /// The driver could not keep the whole answer to `req` (larger than it
    /// caches) or cannot tell what it reflects: it is relayed, never filed.
    pub fn skip_fill(&mut self, req: RequestId) {
        if let Some(p) = self.pending.get_mut(&req) {
            p.cache_here = false;
        }
    }

    /// Restores an L2 entry that an earlier process persisted (a warm start).
    /// Stored only while the version map holds it valid; returns whether it
    /// was. The driver restores only what means the same in this process: keys
    /// of portable contexts ([`Self::context_is_portable`]) and deps on tables
    /// the catalog interns to the same ids. Restored entries are invalidated
    /// (never refreshed in place: the refresh index does not track them).
    /// The change stream opened at `lsn` (a slot found at its position, a
    /// subscription continued or started there): what changed at or below
    /// it reached this process only as what its tiers hold (an L2 file
    /// kept valid up to it), not as versions, so no answer older than it is
    /// filed: a lagging replica's answer could miss a change the version map
    /// never saw.
    pub fn fills_from(&mut self, lsn: Lsn) {
        self.fills_from = self.fills_from.max(lsn);
    }

    /// Whether an answer that reflects `lsn` would be filed now (the stream
    /// heard when fills wait for it, and `lsn` not older than where it
    /// opened): right after a start, answers are relayed but not filed
    /// until the positions the driver learns pass the stream's opening.
    pub fn files_at(&self, lsn: Lsn) -> bool {
        (!self.config.fills_wait_for_cdc || self.last_cdc.is_some()) && lsn >= self.fills_from
    }

    /// The node as a new process finds it after a restart from its L2 file:
    /// the L2 entries the file still holds stay (it applied every
    /// invalidation the node did: the entries the version map no longer
    /// vouches for are gone), everything else a process holds in memory
    /// goes: L1, the version map, the refresh index, answers in flight
    /// (never filed), the stream's clock (nothing is served until the stream
    /// is heard) and where it opened. Sessions stay (their clients reconnect
    /// at once; their floors only hold back).
    pub fn restart(&mut self) {
        let versions = &self.versions;
        let gone: Vec<u128> =
            self.l2.keyed_entries().filter(|(_, e)| !versions.is_valid(e.lsn, &e.deps)).map(|(k, _)| k).collect();
        for key in gone {
            self.l2.remove(key);
        }
        self.clear_tier(TierName::L1);
        let versions = VersionMap::new(self.config.versions.clone(), Lsn(0));
        if let Ok(v) = versions {
            self.versions = v;
        }
        self.refresh = RefreshIndex::new(self.config.l2.entries_max.saturating_mul(2));
        for p in self.pending.values_mut() {
            p.cache_here = false;
        }
        self.last_cdc = None;
        self.gap_since = None;
        self.fills_from = Lsn(0);
    }

    pub fn restore_l2(&mut self, now: Instant, key: u128, entry: Entry<V>) -> bool {
        self.versions.is_valid(entry.lsn, &entry.deps) && self.l2.insert(now, key, entry)
    }
}

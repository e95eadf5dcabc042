//! Fault injection.

use super::*;

impl World {
    /// Begins (`begin`) or ends fault `index` of the scenario; returns when
    /// it ends, in seconds from now, if it has an end.
    pub fn apply_fault(&mut self, index: usize, fault: &Fault, begin: bool) -> Option<f64> {
        let now = self.now();
        let region_of = |name: &str| Zone::parse(name).map(zone_index).unwrap_or(0);
        if begin {
            self.faults_log.push((now, fault.label()));
            let (scope, target_ms) = self.recovery_target(fault);
            let disrupted_ms = self.sc.network.timeout_ms as f64;
            self.checker.recovering.push(Recovering::new(fault.label(), index, target_ms, now, scope, disrupted_ms));
        }
        match fault {
            Fault::PrimaryCrash { restart_after_s, .. } => {
                let node = if begin { self.crash_target() } else { None };
                // answers sent before the crash reached their clients
                self.node_crash(index, node, *restart_after_s, begin, true)
            }
            Fault::ReplicaCrash { region, restart_after_s, .. } => {
                let z = Zone::parse(region).unwrap_or(Zone::Eu);
                let node = (0..self.db.nodes.len())
                    .find(|&i| i != self.db.primary && self.db.nodes[i].zone == z && self.db.nodes[i].up);
                self.node_crash(index, node.filter(|_| begin), *restart_after_s, begin, false)
            }
            Fault::RegionalOutage { region, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].up = !begin;
                if begin {
                    self.regions[r].l3.clear();
                } else {
                    // the pool's process starts again: a new history on its slot
                    self.restart_pool(r);
                }
                Some(*duration_s)
            }
            Fault::TierLoss { tier, region, .. } => {
                if !begin {
                    return None;
                }
                let zone = region.as_deref().and_then(Zone::parse);
                match tier.as_str() {
                    "L3" => {
                        for r in &mut self.regions {
                            if zone.is_none_or(|z| z == r.zone) {
                                r.l3.clear();
                            }
                        }
                    }
                    name => {
                        let t = if name == "L1" { TierName::L1 } else { TierName::L2 };
                        for s in &mut self.sites {
                            if zone.is_none_or(|z| z == s.place.zone) {
                                s.node.clear_tier(t);
                            }
                        }
                    }
                }
                None
            }
            Fault::EdgePartition { region, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].edge_partitioned = begin;
                Some(*duration_s)
            }
            Fault::PrimaryPartition { region, duration_s, .. } => {
                // the region loses the node that is primary now (not
                // whichever is primary later)
                let r = region_of(region);
                self.regions[r].cut_from = begin.then_some(self.db.primary);
                Some(*duration_s)
            }
            Fault::SlowLink { region, extra_ms, duration_s, .. } => {
                let r = region_of(region);
                self.regions[r].slow_ms = if begin { *extra_ms } else { 0.0 };
                Some(*duration_s)
            }
            Fault::CdcStall { duration_s, .. } => {
                if begin {
                    self.cdc_stalled_until = now + Duration::from_secs_f64(*duration_s);
                }
                None
            }
            Fault::SlotDrop { region, .. } => {
                if begin {
                    self.slot_dropped(region_of(region));
                }
                None
            }
            Fault::EdgeRestart { region, .. } => {
                if begin {
                    self.sites_restart(region_of(region));
                }
                None
            }
        }
    }

    /// A crash of `node` (fault `index`) begins (`settle`: the acknowledgements
    /// sent before it first), or the node it took down restarts; when it has
    /// an end, returns it (in seconds from now).
    fn node_crash(
        &mut self,
        index: usize,
        node: Option<usize>,
        restart_after_s: Option<f64>,
        begin: bool,
        settle: bool,
    ) -> Option<f64> {
        if !begin {
            if let Some(i) = self.fault_nodes[index] {
                self.restart_node(i);
            }
            return None;
        }
        let now = self.now();
        let i = node?;
        if settle {
            self.settle_acks(now);
        }
        self.db.crash(i, now);
        self.fault_nodes[index] = Some(i);
        restart_after_s
    }

    /// The node a primary crash takes down: the primary; while a promotion
    /// replaces it, the node being promoted; while it is down and its failure
    /// not yet declared, the synchronous standby the promotion will pick
    /// (back-to-back failures). `None` when that node is down too.
    fn crash_target(&self) -> Option<usize> {
        let db = &self.db;
        let next = self.controller.primary().0 as usize;
        if next != db.primary {
            return db.nodes[next].up.then_some(next);
        }
        if db.nodes[db.primary].up {
            return Some(db.primary);
        }
        let s = db.sync_standby;
        (s != db.primary && db.nodes[s].up).then_some(s)
    }

    /// A crashed node comes back.
    fn restart_node(&mut self, i: usize) {
        if self.db.nodes[i].up {
            return;
        }
        let now = self.now();
        // what only this primary had while it was down
        let only_here = if i == self.db.primary { self.db.on_no_live_node(now) } else { None };
        self.db.restart(i);
        if self.db.nodes[i].needs_rejoin {
            // an ex-primary a promotion replaced: its later commits are not in
            // the history; it rejoins (pg_rewind) as a replica in the current epoch
            let epoch = self.controller.epoch();
            self.db.nodes[i].fence.handle_epoch(epoch, false);
            self.db.nodes[i].needs_rejoin = false;
        } else if i == self.db.primary && self.controller.primary() == EndpointId(i as u32) {
            // the primary is back before its failure was declared: the
            // replicas reconnect to it
            self.db.resume_streaming();
            if let Some(from) = only_here {
                self.checker.reachable_again(from, self.db.commit_lsn(), now);
            }
        }
        // otherwise a primary the controller is already replacing: it comes
        // back as a primary of the old epoch (PostgreSQL does), no standby
        // follows it, and its fence waits for the next health check
    }

    /// The requests a fault disrupts and its recovery-time target, from the
    /// fault itself: a primary crash (or a partition of the controller's
    /// region from the primary, which fails it over) is a primary failure;
    /// a region's outage, its sites cut off, its pool cut off from the
    /// primary, a replica lost or a slow link are regional; a lost tier or a
    /// stalled change stream (the caches stop serving) is a cache failure.
    fn recovery_target(&self, fault: &Fault) -> (Scope, Option<f64>) {
        let t = &self.sc.targets;
        let zone = |region: &str| Zone::parse(region);
        match fault {
            Fault::PrimaryCrash { .. } => (Scope::Writes, Some(t.rto_primary_ms)),
            Fault::PrimaryPartition { region, .. } => match zone(region) {
                Some(z) if zone_index(z) == self.controller_region() => (Scope::Writes, Some(t.rto_primary_ms)),
                Some(z) => (Scope::ZoneWrites(z), Some(t.rto_regional_ms)),
                None => (Scope::All, Some(t.rto_regional_ms)),
            },
            Fault::RegionalOutage { region, .. }
            | Fault::EdgePartition { region, .. }
            | Fault::ReplicaCrash { region, .. }
            | Fault::SlowLink { region, .. } => {
                (zone(region).map_or(Scope::All, Scope::Upstream), Some(t.rto_regional_ms))
            }
            Fault::TierLoss { region, .. } => {
                (region.as_deref().and_then(zone).map_or(Scope::Reads, Scope::Zone), Some(t.rto_cache_ms))
            }
            Fault::CdcStall { .. } => (Scope::Reads, Some(t.rto_cache_ms)),
            // the region's sites drop what they held (a slot drop), or their L1
            Fault::SlotDrop { region, .. } | Fault::EdgeRestart { region, .. } => {
                (zone(region).map_or(Scope::Reads, Scope::Zone), Some(t.rto_cache_ms))
            }
        }
    }
}

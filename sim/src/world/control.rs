//! The control plane: heartbeats, the failover controller, promotions, fences,
//! health probes; writes that bypass the edge and their acknowledgements.

use super::*;

impl World {
    /// The region whose pool runs the failover controller: the first
    /// primary's.
    pub(super) fn controller_region(&self) -> usize {
        zone_index(self.db.nodes[0].zone)
    }

    /// Whether the controller can reach database node `node` (a primary
    /// partition of its region cuts it off).
    fn controller_reaches(&self, node: usize) -> bool {
        self.regions[self.controller_region()].cut_from != Some(node)
    }

    /// Heartbeats, health checks and the failover controller.
    pub fn tick_control(&mut self) -> Vec<(usize, Epoch)> {
        let now = self.now();
        for i in 0..self.db.nodes.len() {
            if self.db.nodes[i].up {
                let lsn = self.db.received_pos(i, now);
                if self.controller_reaches(i) {
                    self.controller.handle_heartbeat(now, EndpointId(i as u32), lsn);
                }
                let replay = self.db.replay_pos(i, now);
                for r in &mut self.regions {
                    r.router.handle_replay_lsn(EndpointId(i as u32), replay);
                }
            }
        }
        // a fenced node the controller reaches again (it came back, or the
        // partition healed) learns its fence at its next health check
        let pending = std::mem::take(&mut self.pending_fence);
        for (node, epoch) in pending {
            self.fence(node, epoch);
        }
        if self.controller.poll_timeout().is_some_and(|t| t <= now) {
            self.controller.handle_timeout(now);
        }
        let mut promotions = Vec::new();
        while let Some(out) = self.controller.poll_output() {
            match out {
                FailoverOutput::Fence { node, epoch } => self.fence(node.0 as usize, epoch),
                FailoverOutput::Promote { node, epoch } => promotions.push((node.0 as usize, epoch)),
                FailoverOutput::RoutesChanged { primary, epoch } => {
                    for r in &mut self.regions {
                        r.router.set_primary(primary);
                        r.epoch = epoch;
                    }
                    self.failovers.push((now, primary.0 as usize, epoch));
                }
                FailoverOutput::NoCandidate => {}
            }
        }
        promotions
    }

    /// Fences `node` in `epoch` now if it is up and reachable, else when it is.
    fn fence(&mut self, node: usize, epoch: Epoch) {
        if self.db.nodes[node].up && self.controller_reaches(node) {
            self.db.nodes[node].fence.handle_epoch(epoch, false);
        } else {
            self.pending_fence.push((node, epoch));
        }
    }

    /// The promotion of `node` in `epoch`, begun at `started`, completes. A
    /// node that crashed meanwhile did not finish it (the controller tries
    /// another after its promotion timeout).
    pub fn finish_promotion(&mut self, node: usize, epoch: Epoch, started: Instant) {
        let now = self.now();
        let n = &self.db.nodes[node];
        if !n.up || n.crashed_at.is_some_and(|t| t >= started) || self.controller.epoch() != epoch {
            return;
        }
        self.settle_acks(now);
        let failure = self.db.cutoff;
        let lost = self.db.promote(node, epoch, now);
        self.checker.lose(&lost, failure, now);
        let keys = lost.iter().filter_map(|(l, _)| Some((self.db.key_of(*l)?, *l)));
        self.checker.lose_values(keys, now);
        self.controller.handle_promoted(now, EndpointId(node as u32), epoch);
        // a new timeline: what the replicas reported on the old one says
        // nothing of the new one's positions (the proxy forgets them too)
        for r in &mut self.regions {
            r.router.forget_positions();
        }
        // the pools' slots on the new primary are new
        self.new_slots();
        // route changes are drained on the next control tick
    }

    /// Health probes that routers ask for (open breakers past their wait):
    /// `(site or region, endpoint, reachable, round trip ms)`.
    pub fn due_probes(&mut self) -> Vec<Probe> {
        let now = self.now();
        let timeout_ms = self.sc.network.timeout_ms as f64;
        let mut out = Vec::new();
        for (i, site) in self.sites.iter_mut().enumerate() {
            while let Some(id) = site.regions.poll_probe(now) {
                let r = &self.regions[id.0 as usize];
                let reachable = r.up && !r.edge_partitioned;
                let ms = if reachable { 2.0 * site.region_oneway_ms[id.0 as usize] } else { timeout_ms };
                out.push(Probe { from: ProbeFrom::Site(i), endpoint: id, reachable, ms });
            }
        }
        for (i, region) in self.regions.iter_mut().enumerate() {
            while let Some(id) = region.router.poll_probe(now) {
                let node = id.0 as usize;
                let n = &self.db.nodes[node];
                let reachable = region.up && n.up && region.cut_from != Some(node);
                let ms = if reachable { 2.0 * region.db_oneway_ms[node] } else { timeout_ms };
                out.push(Probe { from: ProbeFrom::Region(i), endpoint: id, reachable, ms });
            }
        }
        out
    }

    pub fn probe_result(&mut self, p: &Probe) {
        let now = self.now();
        let result = if p.reachable { Ok(Duration::from_secs_f64(p.ms / 1e3)) } else { Err(()) };
        match p.from {
            ProbeFrom::Site(i) => self.sites[i].regions.handle_result(now, p.endpoint, result),
            ProbeFrom::Region(i) => self.regions[i].router.handle_result(now, p.endpoint, result),
        }
    }

    /// A write that bypasses the edge, made directly on the primary (the
    /// node the others follow: its address). Its client learns of the
    /// commit as any client does ([`Database::acknowledged`]): with
    /// synchronous replication, once the standby has it.
    pub fn bypass_write(&mut self) {
        let now = self.now();
        let key = self.write_key();
        let p = self.db.primary;
        let epoch = self.db.nodes[p].fence.epoch;
        if let Ok((lsn, pos)) = self.db.write(p, epoch, now, Some(key)) {
            let h = key_hash(self.items, decimal(key, &mut [0; 20]));
            self.emit_cdc(pos, ChangeTarget::Keys(self.items, vec![h]));
            let due = now + Duration::from_secs_f64(self.db.ack_delay_ms() / 1e3);
            let deadline = now + Duration::from_millis(self.sc.network.timeout_ms);
            self.pending_acks.push_back(PendingAck { key, lsn, node: p, committed: now, due, deadline });
        }
    }

    /// Acknowledges the bypassing writes whose answer has come by `now`
    /// (at the moment it came); drops those whose client gave up.
    pub fn settle_acks(&mut self, now: Instant) {
        let mut acks = Vec::new();
        self.pending_acks.retain(|a| {
            if a.due > now {
                return true;
            }
            let at = if self.db.acknowledged(a.node, a.lsn, a.due) {
                Some(a.due)
            } else if now <= a.deadline && self.db.acknowledged(a.node, a.lsn, now) {
                Some(now)
            } else {
                None
            };
            if let Some(at) = at {
                acks.push((*a, at));
                return false;
            }
            now < a.deadline
        });
        for (a, at) in acks {
            self.acknowledge(Some(a.key), a.lsn, a.committed, at);
        }
    }
}

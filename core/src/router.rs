//! Endpoint choice for a read or a write: residency first, then freshness, then
//! health (a circuit breaker with half-open probes), then latency (EWMA) and
//! load (power of two choices on outstanding requests).

use crate::rng::Rng;
use crate::{Duration, Instant, Lsn};

/// A data-residency zone (EU, US, APAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Zone {
    Eu,
    Us,
    Apac,
}

impl Zone {
    pub const ALL: [Zone; 3] = [Zone::Eu, Zone::Us, Zone::Apac];
    pub fn name(self) -> &'static str {
        match self {
            Zone::Eu => "EU",
            Zone::Us => "US",
            Zone::Apac => "APAC",
        }
    }
    pub fn parse(s: &str) -> Option<Zone> {
        match s.trim().to_ascii_uppercase().as_str() {
            "EU" => Some(Zone::Eu),
            "US" => Some(Zone::Us),
            "APAC" => Some(Zone::Apac),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// How long an open breaker stays open before one half-open probe.
    pub open_for: Duration,
    /// EWMA weight of a new latency sample.
    pub ewma_alpha: f64,
    /// Candidates within this factor of the best EWMA compete on load.
    pub latency_slack: f64,
    pub endpoints_max: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            failures_to_open: 3,
            open_for: Duration::from_secs(2),
            ewma_alpha: 0.2,
            latency_slack: 1.5,
            endpoints_max: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub id: EndpointId,
    pub zone: Zone,
    pub role: Role,
    pub replay_lsn: Lsn,
    pub ewma_ms: f64,
    pub outstanding: u32,
    breaker: Breaker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Only endpoints in this zone (data tagged with a residency zone).
    pub residency: Option<Zone>,
    /// The replica must have replayed at least this far.
    pub floor: Option<Lsn>,
    /// Primary only.
    pub strong: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no endpoint in residency zone {0:?}")]
    NoEndpointInZone(Zone),
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    #[error("no primary")]
    NoPrimary,
    #[error("too many endpoints (max {0})")]
    TooMany(usize),
}

#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    endpoints: Vec<Endpoint>,
    rng: Rng,
}

impl Router {
    pub fn new(config: RouterConfig, seed: u64) -> Self {
        Router { config, endpoints: Vec::new(), rng: Rng::new(seed) }
    }

    pub fn add_endpoint(
        &mut self,
        id: EndpointId,
        zone: Zone,
        role: Role,
        rtt_ms_guess: f64,
    ) -> Result<(), RouteError> {
        if self.endpoints.len() >= self.config.endpoints_max {
            return Err(RouteError::TooMany(self.config.endpoints_max));
        }
        self.endpoints.push(Endpoint {
            id,
            zone,
            role,
            replay_lsn: Lsn(0),
            ewma_ms: rtt_ms_guess,
            outstanding: 0,
            breaker: Breaker::Closed { failures: 0 },
        });
        Ok(())
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    fn get_mut(&mut self, id: EndpointId) -> Option<&mut Endpoint> {
        self.endpoints.iter_mut().find(|e| e.id == id)
    }

    /// A health check or reply told us how far the endpoint has replayed.
    pub fn handle_replay_lsn(&mut self, id: EndpointId, lsn: Lsn) {
        if let Some(e) = self.get_mut(id) {
            e.replay_lsn = e.replay_lsn.max(lsn);
        }
    }

    /// A new timeline (a promotion): the positions endpoints reported on
    /// the old one say nothing of what they hold on the new one, whose
    /// positions reuse those of whatever the old primary lost.
    pub fn forget_positions(&mut self) {
        for e in &mut self.endpoints {
            e.replay_lsn = Lsn(0);
        }
    }

    /// Failover re-pointed the primary.
    pub fn set_primary(&mut self, id: EndpointId) {
        for e in &mut self.endpoints {
            e.role = if e.id == id { Role::Primary } else { Role::Replica };
        }
    }

    /// Removes an endpoint from routing (a fenced ex-primary).
    pub fn remove_endpoint(&mut self, id: EndpointId) {
        self.endpoints.retain(|e| e.id != id);
    }

    pub fn primary(&self) -> Option<EndpointId> {
        self.endpoints.iter().find(|e| e.role == Role::Primary).map(|e| e.id)
    }

    /// Client requests go to closed breakers only: an open breaker is tested
    /// by a health probe ([`Router::poll_probe`]), never by a client's request.
    fn usable(&mut self, idx: usize, _now: Instant) -> bool {
        matches!(self.endpoints[idx].breaker, Breaker::Closed { .. })
    }

    /// An endpoint whose breaker has been open long enough to be probed: the
    /// driver sends it a health check and reports with [`Router::handle_result`]
    /// (success closes the breaker, failure opens it again). One probe at a time
    /// per endpoint.
    #[must_use]
    pub fn poll_probe(&mut self, now: Instant) -> Option<EndpointId> {
        for e in &mut self.endpoints {
            match e.breaker {
                Breaker::Open { until } if now >= until => {
                    e.breaker = Breaker::HalfOpen { probing: true };
                    e.outstanding = e.outstanding.saturating_add(1);
                    return Some(e.id);
                }
                _ => {}
            }
        }
        None
    }

    /// When the next probe falls due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.endpoints
            .iter()
            .filter_map(|e| match e.breaker {
                Breaker::Open { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// The primary for a write, if its breaker lets a request through.
    pub fn route_write(&mut self, now: Instant) -> Result<EndpointId, RouteError> {
        let idx = self.endpoints.iter().position(|e| e.role == Role::Primary).ok_or(RouteError::NoPrimary)?;
        if !self.usable(idx, now) {
            return Err(RouteError::NoHealthyEndpoint);
        }
        self.start(idx);
        Ok(self.endpoints[idx].id)
    }

    /// The best endpoint for a read.
    pub fn route_read(&mut self, now: Instant, req: ReadRequest) -> Result<EndpointId, RouteError> {
        if req.strong {
            return self.route_write(now);
        }
        let mut candidates: Vec<usize> = Vec::with_capacity(self.endpoints.len());
        let mut any_in_zone = false;
        for i in 0..self.endpoints.len() {
            let e = &self.endpoints[i];
            if req.residency.is_some_and(|z| z != e.zone) {
                continue;
            }
            any_in_zone = true;
            let fresh = e.role == Role::Primary || req.floor.is_none_or(|f| e.replay_lsn >= f);
            if fresh && self.usable(i, now) {
                candidates.push(i);
            }
        }
        if candidates.is_empty() {
            return Err(match req.residency {
                Some(z) if !any_in_zone => RouteError::NoEndpointInZone(z),
                _ => RouteError::NoHealthyEndpoint,
            });
        }
        let best = candidates.iter().map(|&i| self.endpoints[i].ewma_ms).fold(f64::INFINITY, f64::min);
        let limit = best * self.config.latency_slack + 0.5;
        candidates.retain(|&i| self.endpoints[i].ewma_ms <= limit);
        let pick = if candidates.len() == 1 {
            candidates[0]
        } else {
            let a = candidates[self.rng.below(candidates.len() as u64) as usize];
            let b = candidates[self.rng.below(candidates.len() as u64) as usize];
            let load = |i: usize| self.endpoints[i].outstanding;
            if load(b) < load(a) { b } else { a }
        };
        self.start(pick);
        Ok(self.endpoints[pick].id)
    }

    fn start(&mut self, idx: usize) {
        let e = &mut self.endpoints[idx];
        e.outstanding = e.outstanding.saturating_add(1);
    }

    /// The outcome of a request routed to `id`: a latency on success.
    pub fn handle_result(&mut self, now: Instant, id: EndpointId, result: Result<Duration, ()>) {
        let alpha = self.config.ewma_alpha;
        let open_for = self.config.open_for;
        let failures_to_open = self.config.failures_to_open;
        let Some(e) = self.get_mut(id) else { return };
        e.outstanding = e.outstanding.saturating_sub(1);
        match result {
            Ok(latency) => {
                let ms = latency.as_secs_f64() * 1e3;
                e.ewma_ms = e.ewma_ms * (1.0 - alpha) + ms * alpha;
                e.breaker = Breaker::Closed { failures: 0 };
            }
            Err(()) => {
                e.breaker = match e.breaker {
                    Breaker::Closed { failures } if failures + 1 < failures_to_open => {
                        Breaker::Closed { failures: failures + 1 }
                    }
                    _ => Breaker::Open { until: now + open_for },
                };
            }
        }
    }

    /// Whether the breaker of `id` is currently letting requests through.
    pub fn is_healthy(&self, id: EndpointId) -> bool {
        self.endpoints.iter().any(|e| e.id == id && matches!(e.breaker, Breaker::Closed { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut r = Router::new(RouterConfig::default(), 7);
        r.add_endpoint(EndpointId(0), Zone::Us, Role::Primary, 80.0).expect("room");
        r.add_endpoint(EndpointId(1), Zone::Eu, Role::Replica, 10.0).expect("room");
        r.add_endpoint(EndpointId(2), Zone::Eu, Role::Replica, 12.0).expect("room");
        r.add_endpoint(EndpointId(3), Zone::Apac, Role::Replica, 150.0).expect("room");
        r
    }

    #[test]
    fn freshness_then_latency() {
        let mut r = router();
        let now = Instant::ZERO;
        let req = ReadRequest { residency: None, floor: None, strong: false };
        let id = r.route_read(now, req).expect("route");
        assert!(id == EndpointId(1) || id == EndpointId(2));
        // floor beyond every replica: only the primary is fresh
        let id = r.route_read(now, ReadRequest { floor: Some(Lsn(5)), ..req }).expect("route");
        assert_eq!(id, EndpointId(0));
        r.handle_replay_lsn(EndpointId(2), Lsn(9));
        let id = r.route_read(now, ReadRequest { floor: Some(Lsn(5)), ..req }).expect("route");
        assert_eq!(id, EndpointId(2));
        // a promotion: 9 was a position of the old timeline (positions only
        // grow otherwise: a lower report on the same timeline is stale)
        r.forget_positions();
        r.handle_replay_lsn(EndpointId(2), Lsn(3));
        let id = r.route_read(now, ReadRequest { floor: Some(Lsn(5)), ..req }).expect("route");
        assert_eq!(id, EndpointId(0), "replica 2 is at 3 on the new timeline");
    }

    #[test]
    fn residency_is_never_violated() {
        let mut r = router();
        let req = ReadRequest { residency: Some(Zone::Eu), floor: Some(Lsn(100)), strong: false };
        // no EU endpoint is fresh: refuse rather than leave the zone
        assert_eq!(r.route_read(Instant::ZERO, req), Err(RouteError::NoHealthyEndpoint));
        let mut r2 = Router::new(RouterConfig::default(), 1);
        r2.add_endpoint(EndpointId(0), Zone::Us, Role::Primary, 1.0).expect("room");
        assert_eq!(
            r2.route_read(Instant::ZERO, ReadRequest { residency: Some(Zone::Apac), floor: None, strong: false }),
            Err(RouteError::NoEndpointInZone(Zone::Apac))
        );
    }

    #[test]
    fn breaker_opens_and_is_probed_not_tried_with_client_requests() {
        let mut r = router();
        let t0 = Instant::ZERO;
        for _ in 0..3 {
            r.handle_result(t0, EndpointId(1), Err(()));
        }
        assert!(!r.is_healthy(EndpointId(1)));
        let req = ReadRequest { residency: Some(Zone::Eu), floor: None, strong: false };
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(r.poll_probe(t0), None, "not before open_for");
        let t1 = t0 + Duration::from_secs(3);
        for _ in 0..20 {
            assert_eq!(r.route_read(t1, req).expect("route"), EndpointId(2), "client requests avoid an open breaker");
            r.handle_result(t1, EndpointId(2), Ok(Duration::from_millis(12)));
        }
        assert_eq!(r.poll_probe(t1), Some(EndpointId(1)));
        assert_eq!(r.poll_probe(t1), None, "one probe at a time");
        r.handle_result(t1, EndpointId(1), Err(()));
        assert_eq!(r.poll_probe(t1), None, "a failed probe re-opens for open_for");
        let t2 = t1 + Duration::from_secs(3);
        assert_eq!(r.poll_probe(t2), Some(EndpointId(1)));
        r.handle_result(t2, EndpointId(1), Ok(Duration::from_millis(10)));
        assert!(r.is_healthy(EndpointId(1)));
        // every EU endpoint open: client requests are refused, not sent outside EU
        for id in [1, 2] {
            for _ in 0..3 {
                r.handle_result(t2, EndpointId(id), Err(()));
            }
        }
        assert_eq!(r.route_read(t2, req), Err(RouteError::NoHealthyEndpoint));
    }
}

//! Properties of routing and failover under random inputs.

use std::collections::BTreeMap;

use postai_core::failover::{Epoch, FailoverConfig, FailoverController, FailoverOutput, Fence};
use postai_core::router::{EndpointId, ReadRequest, Role, Router, RouterConfig, Zone};
use postai_core::{Duration, Instant, Lsn};
use proptest::prelude::*;

fn zone(i: u8) -> Zone {
    Zone::ALL[i as usize % 3]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Residency-tagged reads never leave their zone, whatever the health,
    /// freshness and latency of the endpoints.
    #[test]
    fn router_never_leaves_the_residency_zone(
        endpoints in proptest::collection::vec((0..3u8, 0..1000u64, 1.0..300.0f64), 1..8),
        steps in proptest::collection::vec((0..3u8, proptest::option::of(0..1000u64), any::<bool>(), 0..8usize, any::<bool>(), 0..5000u64), 1..60),
    ) {
        let mut r = Router::new(RouterConfig::default(), 3);
        for (i, (z, lsn, ms)) in endpoints.iter().enumerate() {
            let role = if i == 0 { Role::Primary } else { Role::Replica };
            r.add_endpoint(EndpointId(i as u32), zone(*z), role, *ms).expect("fewer than endpoints_max");
            r.handle_replay_lsn(EndpointId(i as u32), Lsn(*lsn));
        }
        let mut now = Instant::ZERO;
        for (z, floor, strong, fail_idx, fail, dt) in steps {
            now = now + Duration::from_millis(dt);
            let want = zone(z);
            let req = ReadRequest { residency: Some(want), floor: floor.map(Lsn), strong: false };
            if let Ok(id) = r.route_read(now, req) {
                let e = r.endpoints().iter().find(|e| e.id == id).expect("routed to a known endpoint");
                prop_assert_eq!(e.zone, want);
                if let Some(f) = floor {
                    prop_assert!(e.role == Role::Primary || e.replay_lsn >= Lsn(f), "a replica behind the floor");
                }
                r.handle_result(now, id, if fail { Err(()) } else { Ok(Duration::from_millis(5)) });
            }
            let _ = strong;
            let target = EndpointId((fail_idx % endpoints.len()) as u32);
            r.handle_result(now, target, if fail { Err(()) } else { Ok(Duration::from_millis(7)) });
        }
    }

    /// Heartbeats that stop and resume, lost fences and promotions, stale
    /// writers: never two nodes accepting writes in one epoch.
    #[test]
    fn failover_never_has_two_writable_primaries_in_an_epoch(
        steps in proptest::collection::vec((0..4usize, any::<bool>(), 0..3000u64, any::<bool>(), 0..4u64), 1..200),
    ) {
        let nodes = 4usize;
        let mut fences: Vec<Fence> = (0..nodes).map(|i| Fence { epoch: Epoch(1), is_primary: i == 0 }).collect();
        let mut alive = vec![true; nodes];
        let replicas: Vec<EndpointId> = (1..nodes as u32).map(EndpointId).collect();
        let config = FailoverConfig { heartbeat_timeout: Duration::from_secs(2), promote_timeout: Duration::from_secs(3), nodes_max: 8 };
        let mut c = FailoverController::new(config, Instant::ZERO, EndpointId(0), &replicas);
        let mut now = Instant::ZERO;
        let mut accepted: BTreeMap<Epoch, usize> = BTreeMap::new();
        let mut pending_promotions: Vec<(usize, Epoch)> = Vec::new();
        for (node, toggle, dt, deliver, write_epoch) in steps {
            now = now + Duration::from_millis(dt);
            if toggle {
                alive[node] = !alive[node];
            }
            for (i, a) in alive.iter().enumerate() {
                if *a {
                    c.handle_heartbeat(now, EndpointId(i as u32), Lsn(now.as_nanos() / 1_000_000 + i as u64));
                }
            }
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
            while let Some(out) = c.poll_output() {
                match out {
                    FailoverOutput::Fence { node, epoch } => {
                        // a fence may be lost (the node is down)
                        if alive[node.0 as usize] && deliver {
                            fences[node.0 as usize].handle_epoch(epoch, false);
                        }
                    }
                    FailoverOutput::Promote { node, epoch } => pending_promotions.push((node.0 as usize, epoch)),
                    FailoverOutput::RoutesChanged { .. } | FailoverOutput::NoCandidate => {}
                }
            }
            if deliver && let Some((n, e)) = pending_promotions.pop() {
                fences[n].handle_epoch(e, true);
                c.handle_promoted(now, EndpointId(n as u32), e);
            }
            // a writer with a possibly stale view tries every live node
            let e = Epoch(c.epoch().0.saturating_sub(write_epoch).max(1));
            for (i, f) in fences.iter().enumerate() {
                if alive[i] && f.check_write(e).is_ok() {
                    let prev = accepted.insert(e, i);
                    prop_assert!(prev.is_none() || prev == Some(i), "epoch {e:?} accepted on nodes {prev:?} and {i}");
                }
            }
        }
    }
}

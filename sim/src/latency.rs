//! The network's delays: one-way delay from great-circle distance, and a
//! request's jitter.
//!
//! Calibrated to published city-pair round-trip times (43 pairs): with a
//! single route factor of 1.5 the model's median was 1.14 times too fast
//! for intercontinental pairs and 1.6 times within continents, 2.0-2.8
//! times for pairs under 1 000 km (short paths are the least direct, and
//! pay a fixed cost per hop that distance does not). So the route factor
//! depends on distance: 2.5 up to 1 000 km, 1.72 from 5 000 km, linear in
//! between, plus 0.5 ms per hop. Jitter: uniform 0-0.5 ms for most
//! requests, and 1 % of them pay a heavy tail (Pareto, shape 1.5, scale
//! 2 ms: half of those under 1.2 ms more, one in ten over 7.3 ms, capped
//! at 200 ms), the queueing and retransmissions a uniform draw never shows.

use crate::geo::distance_km;
use crate::scenario::Network;

/// Distances up to this use the short route factor.
const SHORT_KM: f64 = 1_000.0;
/// Distances from this use the long route factor.
const LONG_KM: f64 = 5_000.0;
/// The tail's Pareto shape.
const TAIL_SHAPE: f64 = 1.5;
/// The tail's cap, in multiples of its scale.
const TAIL_CAP: f64 = 100.0;

/// Path length over great-circle distance for a pair `km` apart.
pub fn route_factor(net: &Network, km: f64) -> f64 {
    if km <= SHORT_KM {
        return net.route_factor_short;
    }
    if km >= LONG_KM {
        return net.route_factor;
    }
    let t = (km - SHORT_KM) / (LONG_KM - SHORT_KM);
    net.route_factor_short + (net.route_factor - net.route_factor_short) * t
}

/// One-way delay between two points (lat, lon), ms.
pub fn oneway_ms(net: &Network, a: (f64, f64), b: (f64, f64)) -> f64 {
    let km = distance_km(a, b);
    km / net.fiber_km_per_ms * route_factor(net, km) + net.hop_ms
}

/// A request's jitter from one uniform draw `u` in [0, 1) (one draw, as
/// before the tail was modelled, so that the draws after it stay).
pub fn jitter_ms(net: &Network, u: f64) -> f64 {
    let body = 1.0 - net.jitter_tail;
    if u < body || net.jitter_tail <= 0.0 {
        return u / body.max(f64::MIN_POSITIVE) * net.jitter_ms;
    }
    // where in the tail, in (0, 1]
    let v = ((1.0 - u) / net.jitter_tail).clamp(f64::MIN_POSITIVE, 1.0);
    let tail = net.jitter_tail_ms * (v.powf(-1.0 / TAIL_SHAPE) - 1.0);
    net.jitter_ms + tail.min(net.jitter_tail_ms * TAIL_CAP)
}

/// The longest jitter a request can draw, ms.
pub fn jitter_max_ms(net: &Network) -> f64 {
    net.jitter_ms + if net.jitter_tail > 0.0 { net.jitter_tail_ms * TAIL_CAP } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_paths_are_less_direct_than_long_ones() {
        let n = Network::default();
        assert_eq!(route_factor(&n, 300.0), 2.5);
        assert_eq!(route_factor(&n, 9_000.0), 1.72);
        let mid = route_factor(&n, 3_000.0);
        assert!(mid < 2.5 && mid > 1.72, "{mid}");
        // Frankfurt - Ashburn, about 6 500 km: 56 ms one way
        let ms = oneway_ms(&n, (50.11, 8.68), (39.04, -77.49));
        assert!((50.0..60.0).contains(&ms), "{ms}");
        // a pair 100 km apart: 1.75 ms, most of it the hop and the detour
        let ms = oneway_ms(&n, (50.0, 8.0), (50.9, 8.0));
        assert!((1.5..2.0).contains(&ms), "{ms}");
    }

    #[test]
    fn the_jitter_has_a_heavy_tail() {
        let n = Network::default();
        let draws: Vec<f64> = (0..100_000).map(|i| jitter_ms(&n, i as f64 / 100_000.0)).collect();
        let mut sorted = draws.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p) as usize];
        assert!(q(0.5) < 0.3, "median {}", q(0.5));
        assert!(q(0.98) <= 0.5, "98th {}", q(0.98));
        assert!(q(0.999) > 5.0, "99.9th {}", q(0.999));
        assert!(draws.iter().all(|d| *d >= 0.0 && *d <= jitter_max_ms(&n)));
        let none = Network { jitter_tail: 0.0, ..Network::default() };
        assert_eq!(jitter_ms(&none, 0.999), 0.4995);
    }
}

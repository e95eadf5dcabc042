//! The staleness bound a scenario's `targets.staleness_ms` states.
//!
//! A site serves from its tiers only while it hears the change stream (an
//! event or a keepalive, every 200 ms) within `cdc_silence_max_ms`; a pool
//! serves its L3 under the same rule. A read misses an acknowledged write W
//! when W's event has not reached the site: either the event is on its way
//! (its delivery, below), or the stream is cut (a regional outage, an edge
//! partition, a CDC stall): the site then heard last, at `t`, an event sent
//! before W committed, at most a delivery before `t`, and it stops serving
//! at `t + cdc_silence_max_ms`. A read's staleness (from W's
//! acknowledgement to the read) is therefore at most
//!
//! `cdc_silence_max_ms + delivery`, where delivery = `cdc_lag_ms` + the
//! longest one-way delay from a database node to a regional pool (the
//! primary may be any of them after failovers) + the longest from a pool to
//! one of its sites + one delivery tick (20 ms).
//!
//! A reordered event waits for the next one (at most a keepalive interval)
//! but it cannot extend a cut: the events before it bound the silence. A
//! replica's snapshot lags by its replication delay, well under this. The
//! bound does not cover writes a failover later lost (asynchronous
//! replication): those were never going to be read, and the checker judges
//! late reads against the history as it ended.

use crate::geo::{Place, hub};
use crate::scenario::Scenario;
use postai_core::router::Zone;

/// The stream's delivery tick: a site receives what arrived since the last one.
pub const DELIVERY_TICK_MS: f64 = 20.0;

/// The longest delivery of a change event to a site, in ms, for `sc`'s
/// network over `places` (every site a scenario may choose).
pub fn delivery_ms(sc: &Scenario, places: &[Place]) -> f64 {
    let n = &sc.network;
    let oneway = |a: (f64, f64), b: (f64, f64)| crate::latency::oneway_ms(n, a, b);
    let hubs: Vec<Place> = Zone::ALL.iter().map(|z| hub(*z)).collect();
    // database nodes sit at the hubs, and the standby next to the primary's
    // (as `World::new` places them)
    let nodes: Vec<(f64, f64)> = hubs.iter().flat_map(|h| [(h.lat, h.lon), (h.lat + 0.3, h.lon + 0.3)]).collect();
    let node_to_pool =
        nodes.iter().flat_map(|a| hubs.iter().map(move |b| oneway(*a, (b.lat, b.lon)))).fold(0.0, f64::max);
    let pool_to_site = places
        .iter()
        .map(|p| {
            let h = hub(p.zone);
            oneway((p.lat, p.lon), (h.lat, h.lon))
        })
        .fold(0.0, f64::max);
    sc.db.cdc_lag_ms + node_to_pool + pool_to_site + DELIVERY_TICK_MS
}

/// The staleness bound: the CDC-silence bound plus the longest delivery.
pub fn staleness_bound_ms(sc: &Scenario, places: &[Place]) -> f64 {
    sc.db.cdc_silence_max_ms as f64 + delivery_ms(sc, places)
}

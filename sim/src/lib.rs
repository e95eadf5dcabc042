//! Deterministic simulation of the POST AI fleet on madsim: 300 edge sites,
//! three regional pools, a modelled PostgreSQL with replicas, CDC, faults, and
//! the checkers that prove (or disprove) the design's targets.

#[cfg(not(madsim))]
compile_error!(
    "postai-sim needs `--cfg madsim` (set in .cargo/config.toml). An exported RUSTFLAGS replaces it: unset RUSTFLAGS."
);

pub mod bounds;
pub mod cdc;
pub mod check;
pub mod db;
pub mod geo;
pub mod latency;
pub mod report;
pub mod run;
pub mod scenario;
pub mod svg;
pub mod swarm;
pub mod sweep;
pub mod world;

pub use run::{Report, run_scenario};
pub use scenario::Scenario;

/// The default suite, in order.
pub const SUITE: &[&str] = &[
    "global-read-heavy",
    "primary-failover",
    "regional-outage",
    "cache-tier-loss",
    "edge-partition",
    "hot-key-write-burst",
    "residency-eu",
    "cdc-lag-reorder",
    "invalidation-strategies",
    "swarm",
];

/// The directory holding the scenario files.
pub fn scenarios_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

//! Per-session consistency: what a read may be answered from.

use crate::Lsn;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// TTL plus invalidation; may read data older than the session's own writes
    /// while invalidations are in flight.
    Eventual,
    /// The session's last write LSN is a floor for every read it makes.
    #[default]
    ReadYourWrites,
    /// Every write this node (proxy) acknowledged, to any session, before
    /// the read started is a floor for it: what users of a single
    /// PgBouncer expect, at the price of more reads going to the primary.
    Proxy,
    /// Primary only, never cached.
    Strong,
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "eventual" => Ok(Consistency::Eventual),
            "read-your-writes" | "read_your_writes" | "ryw" => Ok(Consistency::ReadYourWrites),
            "proxy" => Ok(Consistency::Proxy),
            "strong" => Ok(Consistency::Strong),
            other => Err(format!("unknown consistency mode {other:?} (eventual, read-your-writes, proxy, strong)")),
        }
    }
}

/// The floor a read must satisfy: `None` for eventual reads; the session's
/// last write, or (`Proxy`) the newest write the node acknowledged.
pub fn read_floor(mode: Consistency, last_write: Lsn, acknowledged: Lsn) -> Option<Lsn> {
    match mode {
        Consistency::Eventual => None,
        Consistency::ReadYourWrites | Consistency::Strong => Some(last_write),
        Consistency::Proxy => Some(last_write.max(acknowledged)),
    }
}

/// Whether a cached entry at `entry_lsn` may serve a read with `floor`, given
/// that the serving node's version map is complete through `complete_through`
/// and has seen the session's own writes when `writes_seen_locally`.
///
/// An entry older than the floor is still safe when the node's invalidation
/// state already covers the floor: then any write up to the floor that touched
/// the entry's dependencies has invalidated it.
pub fn entry_meets_floor(entry_lsn: Lsn, floor: Option<Lsn>, complete_through: Lsn, writes_seen_locally: bool) -> bool {
    match floor {
        None => true,
        Some(f) => entry_lsn >= f || complete_through >= f || writes_seen_locally,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors() {
        assert_eq!(read_floor(Consistency::Eventual, Lsn(5), Lsn(9)), None);
        assert_eq!(read_floor(Consistency::ReadYourWrites, Lsn(5), Lsn(9)), Some(Lsn(5)));
        assert_eq!(read_floor(Consistency::Proxy, Lsn(5), Lsn(9)), Some(Lsn(9)));
        assert!(entry_meets_floor(Lsn(1), None, Lsn(0), false));
        assert!(!entry_meets_floor(Lsn(1), Some(Lsn(5)), Lsn(4), false));
        assert!(entry_meets_floor(Lsn(1), Some(Lsn(5)), Lsn(5), false));
        assert!(entry_meets_floor(Lsn(6), Some(Lsn(5)), Lsn(0), false));
        assert!(entry_meets_floor(Lsn(1), Some(Lsn(5)), Lsn(0), true));
        assert_eq!("ryw".parse::<Consistency>(), Ok(Consistency::ReadYourWrites));
        assert!("x".parse::<Consistency>().is_err());
    }
}

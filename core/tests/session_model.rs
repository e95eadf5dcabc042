//! Model test of the session context: two sessions run random sequences of
//! what changes a PostgreSQL session's state (SET, RESET, RESET ALL, SET
//! ROLE, DISCARD ALL, set_config hidden in a function, transactions that
//! commit or roll back), a model keeps each session's true state as
//! PostgreSQL does, and after every step one session fills a read the other
//! then asks for: whenever the node serves the second session the first's
//! entry, the two true states must be equal.

use std::collections::BTreeMap;

use postai_core::cache::{Eviction, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, Lsn};
use postai_core::node::{EdgeNode, NodeConfig, NodeOutput, Served, SessionId, UpstreamReply};
use postai_core::router::Zone;
use postai_core::sql::Catalog;
use postai_core::{Duration, Instant};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Set(u8, u8),
    Reset(u8),
    ResetAll,
    SetRole(u8),
    ResetRole,
    DiscardAll,
    /// `SELECT set_config(...)` inside a user function: the state changes,
    /// the proxy cannot see how.
    Hidden(u8, u8),
    Begin,
    Commit,
    Rollback,
}

const NAMES: [&str; 3] = ["search_path", "timezone", "app.tenant"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const ROLES: [&str; 2] = ["alice", "bob"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..3u8).prop_map(|(n, v)| Op::Set(n, v)),
        2 => (0..3u8).prop_map(Op::Reset),
        1 => Just(Op::ResetAll),
        2 => (0..2u8).prop_map(Op::SetRole),
        1 => Just(Op::ResetRole),
        1 => Just(Op::DiscardAll),
        2 => (0..3u8, 0..3u8).prop_map(|(n, v)| Op::Hidden(n, v)),
        1 => Just(Op::Begin),
        1 => Just(Op::Commit),
        1 => Just(Op::Rollback),
    ]
}

impl Op {
    fn sql(&self) -> String {
        match self {
            Op::Set(n, v) => format!("SET {} = '{}'", NAMES[*n as usize], VALUES[*v as usize]),
            Op::Reset(n) => format!("RESET {}", NAMES[*n as usize]),
            Op::ResetAll => "RESET ALL".into(),
            Op::SetRole(r) => format!("SET ROLE {}", ROLES[*r as usize]),
            Op::ResetRole => "RESET ROLE".into(),
            Op::DiscardAll => "DISCARD ALL".into(),
            Op::Hidden(n, v) => format!("SELECT set_setting('{}', '{}')", NAMES[*n as usize], VALUES[*v as usize]),
            Op::Begin => "BEGIN".into(),
            Op::Commit => "COMMIT".into(),
            Op::Rollback => "ROLLBACK".into(),
        }
    }
}

/// A session's state as PostgreSQL keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    settings: BTreeMap<String, String>,
    role: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    state: State,
    startup: BTreeMap<String, String>,
    /// State before the open transaction, if one is open.
    txn: Option<State>,
    /// A statement of the open transaction failed: the rest fail, COMMIT
    /// rolls back.
    failed: bool,
    /// Custom settings the open transaction named (defined, empty, after it).
    customs: Vec<String>,
}

impl Model {
    /// What RESET gives `name`: its startup value; a custom setting that
    /// was defined stays defined, empty.
    fn reset_value(&self, name: &str) -> Option<String> {
        match self.startup.get(name) {
            Some(v) => Some(v.clone()),
            None if name.contains('.') => Some(String::new()),
            None => None,
        }
    }

    fn reset_all(&mut self) {
        // what RESET ALL resets: the settings there are (a custom one stays, empty)
        let names: Vec<String> = self.state.settings.keys().cloned().collect();
        let mut next = self.startup.clone();
        for name in names {
            if let Some(v) = self.reset_value(&name) {
                next.insert(name, v);
            }
        }
        self.state.settings = next;
    }

    /// Whether PostgreSQL refuses `op` now (DISCARD ALL in a transaction,
    /// anything but its end in an aborted one).
    fn fails(&self, op: &Op) -> bool {
        self.txn.is_some()
            && !matches!(op, Op::Commit | Op::Rollback | Op::Begin)
            && (self.failed || matches!(op, Op::DiscardAll))
    }

    fn end_txn(&mut self, commit: bool) {
        if let Some(before) = self.txn.take()
            && (!commit || self.failed)
        {
            self.state = before;
        }
        self.failed = false;
        for name in std::mem::take(&mut self.customs) {
            self.state.settings.entry(name).or_default();
        }
    }

    fn apply(&mut self, op: &Op) {
        if self.fails(op) {
            self.failed = true;
            return;
        }
        if let Op::Set(n, _) | Op::Reset(n) | Op::Hidden(n, _) = op
            && self.txn.is_some()
            && NAMES[*n as usize].contains('.')
        {
            self.customs.push(NAMES[*n as usize].to_string());
        }
        match op {
            Op::Set(n, v) | Op::Hidden(n, v) => {
                self.state.settings.insert(NAMES[*n as usize].into(), VALUES[*v as usize].into());
            }
            Op::Reset(n) => {
                let name = NAMES[*n as usize];
                match self.reset_value(name) {
                    Some(v) => self.state.settings.insert(name.into(), v),
                    None => self.state.settings.remove(name),
                };
            }
            Op::ResetAll => self.reset_all(),
            Op::SetRole(r) => self.state.role = Some(ROLES[*r as usize].into()),
            Op::ResetRole => self.state.role = None,
            Op::DiscardAll => {
                if self.txn.is_none() {
                    self.reset_all();
                    self.state.role = None;
                }
            }
            Op::Begin => {
                if self.txn.is_none() {
                    self.txn = Some(self.state.clone());
                }
            }
            Op::Commit => self.end_txn(true),
            Op::Rollback => self.end_txn(false),
        }
    }
}

fn node() -> EdgeNode<u64> {
    let mut catalog = Catalog::new();
    catalog.set_primary_key("items", "id");
    catalog.set_integer_key("items");
    // the hidden setter is a user function (not in the built-in table)
    let tier = |n| TierConfig {
        bytes_max: 1 << 22,
        entries_max: n,
        ttl: Duration::from_secs(3600),
        eviction: Eviction::Sieve,
    };
    let config = NodeConfig {
        cdc_silence_max: Some(Duration::from_secs(3600)),
        ..NodeConfig::new(Zone::Eu, tier(10_000), tier(10_000))
    };
    let mut n = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
    for s in [1, 2] {
        n.open_session(SessionId(s), "app", "app", Consistency::ReadYourWrites).expect("room");
    }
    let keepalive = CdcEvent { prev_lsn: Lsn(0), change: Change { lsn: Lsn(0), targets: Vec::new() } };
    n.handle_cdc(Instant::ZERO, &keepalive);
    n
}

/// Runs `sql` in `session`, answering upstream with success.
fn run(n: &mut EdgeNode<u64>, session: u64, sql: &str) -> Served {
    run_as(n, session, sql, false)
}

/// As [`run`]; `fail`: the upstream answers with an error.
fn run_as(n: &mut EdgeNode<u64>, session: u64, sql: &str, fail: bool) -> Served {
    n.handle_simple_query(Instant::ZERO, SessionId(session), sql);
    match n.poll_output() {
        Some(NodeOutput::Reply { served, .. }) => served,
        Some(NodeOutput::Upstream(u)) if fail => {
            n.handle_upstream(Instant::ZERO, u.req, Err("refused".into()));
            while n.poll_output().is_some() {}
            Served::Primary
        }
        Some(NodeOutput::Upstream(u)) => {
            let reply = UpstreamReply {
                value: 1,
                size_bytes: 8,
                served: Served::Primary,
                snapshot_lsn: Lsn(1),
                commit_lsn: Some(Lsn(1)),
                ttl: None,
            };
            n.handle_upstream(Instant::ZERO, u.req, Ok(reply));
            while n.poll_output().is_some() {}
            Served::Primary
        }
        other => panic!("unexpected {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sessions_share_entries_only_with_equal_states(
        startup in proptest::collection::vec((0..3u8, 0..3u8), 0..2),
        ops in proptest::collection::vec((0..2u64, op()), 1..40),
    ) {
        let mut n = node();
        let mut models = [Model::default(), Model::default()];
        // session 2 may start with settings in its startup packet
        for (name, value) in &startup {
            let (name, value) = (NAMES[*name as usize], VALUES[*value as usize]);
            n.set_session_setting(SessionId(2), name, value);
            models[1].startup.insert(name.into(), value.into());
            models[1].state.settings.insert(name.into(), value.into());
        }
        for (i, (who, op)) in ops.iter().enumerate() {
            let fails = models[*who as usize].fails(op);
            run_as(&mut n, who + 1, &op.sql(), fails);
            models[*who as usize].apply(op);
            // a read no step has used: filled by one session, asked by the other
            for (first, second) in [(1u64, 2u64), (2, 1)] {
                let read = format!("SELECT v FROM items WHERE id = {}", i * 2 + first as usize);
                run(&mut n, first, &read);
                let in_txn = models.iter().any(|m| m.txn.is_some());
                if run(&mut n, second, &read) != Served::Primary && !in_txn {
                    prop_assert_eq!(
                        &models[0].state, &models[1].state,
                        "session {} was served session {}'s entry after step {} ({:?})", second, first, i, op
                    );
                }
            }
        }
    }
}

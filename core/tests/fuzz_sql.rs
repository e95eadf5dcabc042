//! The SQL path never panics: arbitrary text and SQL-shaped token soup go
//! through the lexer, the analyser and the node (prepare, simple query,
//! execute with arbitrary parameters, upstream replies and CDC), as a proxy
//! would feed them from untrusted clients.

use postai_core::cache::{Eviction, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget};
use postai_core::node::{EdgeNode, NodeConfig, NodeOutput, Served, SessionId, UpstreamReply};
use postai_core::router::Zone;
use postai_core::sql::Catalog;
use postai_core::{Duration, Instant, Lsn};
use proptest::prelude::*;

const TOKENS: &[&str] = &[
    "SELECT",
    "select",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "JOIN",
    "LEFT",
    "ON",
    "USING",
    "GROUP BY",
    "ORDER BY",
    "LIMIT",
    "OFFSET",
    "FOR UPDATE",
    "FOR NO KEY UPDATE",
    "INSERT INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "RETURNING",
    "WITH",
    "AS",
    "UNION",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "SET LOCAL",
    "RESET",
    "DISCARD ALL",
    "TABLE",
    "COPY",
    "EXPLAIN",
    "PREPARE",
    "EXECUTE",
    "DO",
    "CALL",
    "LOCK",
    "NOTIFY",
    "items",
    "users",
    "public.items",
    "\"Items\"",
    "id",
    "v",
    "*",
    ",",
    ";",
    "(",
    ")",
    "=",
    "<",
    ">=",
    "<>",
    "::int",
    "::text[]",
    "$1",
    "$2",
    "$0",
    "$99999999999",
    "1",
    "-1",
    "1e308",
    "0x1F",
    "'a'",
    "'it''s'",
    "E'\\x00'",
    "U&'\\0041'",
    "$$x$$",
    "$tag$ a $tag$",
    "'unterminated",
    "\"unterminated",
    "/* c",
    "*/",
    "-- c\n",
    "now()",
    "random()",
    "nextval('s')",
    "count(*)",
    "ARRAY[1,2]",
    "NULL",
    "true",
    "\0",
    "é",
    "\u{1F600}",
    "\\",
    "\n",
    " ",
];

fn node() -> EdgeNode<u32> {
    let mut catalog = Catalog::new();
    catalog.set_primary_key("items", "id");
    catalog.set_integer_key("items");
    catalog.set_primary_key("users", "email");
    let tier =
        |n| TierConfig { bytes_max: 1 << 16, entries_max: n, ttl: Duration::from_secs(60), eviction: Eviction::Sieve };
    let config = NodeConfig { sessions_max: 4, pending_max: 64, ..NodeConfig::new(Zone::Eu, tier(8), tier(32)) };
    let mut n = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
    n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
    n
}

/// Drains the node's outputs, answering upstream requests (fill or error).
fn answer(n: &mut EdgeNode<u32>, now: Instant, lsn: &mut u64, fail: bool) {
    while let Some(out) = n.poll_output() {
        if let NodeOutput::Upstream(u) = out {
            *lsn += 1;
            let result = if fail {
                Err("boom".to_string())
            } else {
                Ok(UpstreamReply {
                    value: 1,
                    size_bytes: 10,
                    served: Served::Primary,
                    snapshot_lsn: Lsn(*lsn),
                    commit_lsn: Some(Lsn(*lsn)),
                    ttl: None,
                })
            };
            n.handle_upstream(now, u.req, result);
        }
    }
}

fn soup() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(TOKENS), 0..24).prop_map(|t| t.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_sql_never_panics(
        statements in proptest::collection::vec(prop_oneof![soup(), any::<String>()], 1..8),
        params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)), 0..4),
        fail in any::<bool>(),
    ) {
        let mut n = node();
        let mut lsn = 0u64;
        let mut now = Instant::ZERO;
        for sql in &statements {
            now = now + Duration::from_millis(3);
            n.handle_simple_query(now, SessionId(1), sql);
            answer(&mut n, now, &mut lsn, fail);
            if let Ok(p) = n.prepare(sql) {
                let args: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
                n.handle_execute(now, SessionId(1), &p, &args);
                answer(&mut n, now, &mut lsn, fail);
                // the same again: a hit or a miss, never a panic
                n.handle_execute(now, SessionId(1), &p, &args);
                answer(&mut n, now, &mut lsn, fail);
            }
            let event = CdcEvent { prev_lsn: Lsn(lsn), change: Change { lsn: Lsn(lsn + 1), targets: vec![ChangeTarget::All] } };
            lsn += 1;
            n.handle_cdc(now, &event);
        }
        // an unknown session is an error output, not a panic
        n.handle_simple_query(now, SessionId(99), "SELECT 1");
        prop_assert!(n.poll_output().is_some());
    }
}

//! The cache never serves what PostgreSQL would not have returned to that
//! session: session state the context cannot follow, volatility from the
//! catalog, writes that reach rows the statement does not name, views,
//! partitions, and the same key spelled differently. Each test drives the
//! node as a driver does: a query, the upstream's answer, CDC events.

use postai_core::cache::{Eviction, TierConfig};
use postai_core::consistency::Consistency;
use postai_core::invalidation::{CdcEvent, Change, ChangeTarget, Lsn, key_hash};
use postai_core::node::{EdgeNode, InvalidationMode, NodeConfig, NodeOutput, Route, Served, SessionId, UpstreamReply};
use postai_core::router::Zone;
use postai_core::sql::{Catalog, KeyType, RelKind, RelationSpec, TableId, Volatility, canonical_key};
use postai_core::{Duration, Instant};
use proptest::prelude::*;

/// A node with `items (id int)` and `docs (id uuid)`, CDC on (silence bound
/// of an hour, heard at the start), two sessions of the same role.
struct Rig {
    node: EdgeNode<u64>,
    items: TableId,
    /// The LSN the next upstream answer reflects.
    lsn: u64,
    /// The CDC stream's last event.
    cdc: u64,
    /// Routes of the upstream requests so far.
    routes: Vec<Route>,
}

impl Rig {
    fn new() -> Rig {
        Self::with(|_| {})
    }

    fn with(setup: impl FnOnce(&mut Catalog)) -> Rig {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        catalog.set_integer_key("items");
        catalog.set_primary_key("docs", "id");
        catalog.set_key_type("docs", KeyType::Uuid);
        setup(&mut catalog);
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(3600),
            eviction: Eviction::Sieve,
        };
        let config = NodeConfig {
            invalidation: InvalidationMode::Key,
            cdc_silence_max: Some(Duration::from_secs(3600)),
            ..NodeConfig::new(Zone::Eu, tier(100), tier(100))
        };
        let mut node = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
        for s in [1, 2] {
            node.open_session(SessionId(s), "app", "app", Consistency::ReadYourWrites).expect("room");
        }
        let mut rig = Rig { node, items, lsn: 10, cdc: 0, routes: Vec::new() };
        rig.keepalive();
        rig
    }

    /// A CDC keepalive at the stream's position (the stream is heard).
    fn keepalive(&mut self) {
        let e = CdcEvent { prev_lsn: Lsn(self.cdc), change: Change { lsn: Lsn(self.cdc), targets: Vec::new() } };
        self.node.handle_cdc(Instant::ZERO, &e);
    }

    /// The stream delivers every commit up to `lsn`, changing `targets` at `lsn`.
    fn cdc(&mut self, lsn: u64, targets: Vec<ChangeTarget>) {
        let e = CdcEvent { prev_lsn: Lsn(self.cdc), change: Change { lsn: Lsn(lsn), targets } };
        self.node.handle_cdc(Instant::ZERO, &e);
        self.cdc = lsn;
    }

    /// Runs `sql` in `session`; what served it. Upstream answers with a
    /// fresh value (its LSN), committing at that LSN.
    fn run(&mut self, session: u64, sql: &str) -> Served {
        self.run_params(session, sql, &[])
    }

    fn run_params(&mut self, session: u64, sql: &str, params: &[&str]) -> Served {
        let p = self.node.prepare(sql).expect("lexes");
        let params: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
        self.node.handle_execute(Instant::ZERO, SessionId(session), &p, &params);
        match self.node.poll_output() {
            Some(NodeOutput::Reply { served, .. }) => served,
            Some(NodeOutput::Upstream(u)) => {
                self.routes.push(u.route);
                self.lsn += 1;
                let reply = UpstreamReply {
                    value: self.lsn,
                    size_bytes: 8,
                    served: Served::Primary,
                    snapshot_lsn: Lsn(self.lsn),
                    commit_lsn: Some(Lsn(self.lsn)),
                    ttl: None,
                };
                self.node.handle_upstream(Instant::ZERO, u.req, Ok(reply));
                while self.node.poll_output().is_some() {}
                Served::Primary
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Session 1 reads `sql`, then session 2: whether 2 was served 1's entry.
    fn shared(&mut self, sql: &str) -> bool {
        self.run(1, sql);
        self.run(2, sql) == Served::L1
    }

    /// A commit made elsewhere, delivered by the stream.
    fn remote_commit(&mut self, targets: Vec<ChangeTarget>) {
        self.lsn += 1;
        self.cdc(self.lsn, targets);
    }

    fn last_route(&self) -> Route {
        *self.routes.last().expect("went upstream")
    }
}

const READ: &str = "SELECT id, v FROM items WHERE id = 1";

#[test]
fn statements_the_context_cannot_follow_make_the_session_private() {
    for opaque in [
        "SELECT set_config('app.tenant', '2', false)",
        "SELECT 1, set_config('role', 'bob', false)",
        "SELECT * FROM items WHERE id = 1 AND set_config('app.tenant', '2', false) IS NOT NULL",
        "SELECT set_tenant(2)",
        "SELECT * FROM set_tenant_rows(2)",
        "DO $$ BEGIN PERFORM set_config('app.tenant', '2', false); END $$",
        "CALL set_tenant(2)",
        "SET app.tenant = '2'; SELECT 1",
        "SELECT 1; SELECT set_config('app.tenant', '2', false)",
        "EXECUTE set_it(2)",
        "SELECT no_such_function_known(1)",
    ] {
        let mut r = Rig::new();
        assert!(r.shared(READ), "same role, same settings: shared");
        r.run(2, opaque);
        assert!(!r.shared("SELECT id, v FROM items WHERE id = 2"), "after {opaque}");
        // its own reads run on its own connection (not a replica without the state)
        r.run(2, "SELECT id, v FROM items WHERE id = 3");
        assert_eq!(r.last_route(), Route::Primary, "after {opaque}");
        // a private entry from before the next opaque statement is not served after it
        assert_eq!(r.run(2, "SELECT id, v FROM items WHERE id = 3"), Served::L1, "its own entry");
        r.run(2, opaque);
        assert_eq!(r.run(2, "SELECT id, v FROM items WHERE id = 3"), Served::Primary, "a new context: {opaque}");
        r.run(2, "RESET ALL");
        assert!(!r.shared("SELECT id, v FROM items WHERE id = 4"), "RESET ALL keeps a role set by set_config");
        r.run(2, "DISCARD ALL");
        // a custom setting created by the statement stays, empty: not the state of a new session
        assert!(!r.shared("SELECT id, v FROM items WHERE id = 5"), "DISCARD ALL after {opaque}");
    }
    // temporary objects are gone with DISCARD ALL: shared again
    let mut r = Rig::new();
    r.run(2, "CREATE TEMP TABLE items (id int, v text)");
    assert!(!r.shared(READ));
    r.run(2, "DISCARD ALL");
    assert!(r.shared("SELECT id, v FROM items WHERE id = 6"), "DISCARD ALL drops temporary tables");
}

#[test]
fn startup_settings_survive_reset_and_discard() {
    let mut r = Rig::new();
    r.node.set_session_setting(SessionId(2), "search_path", "tenant_b");
    assert!(!r.shared(READ));
    for (i, back) in ["RESET search_path", "RESET ALL", "DISCARD ALL"].iter().enumerate() {
        r.run(2, "SET search_path = public");
        r.run(2, back);
        let read = format!("SELECT id, v FROM items WHERE id = {}", 10 + i);
        assert!(!r.shared(&read), "{back} goes back to the startup search_path");
    }
    r.node.set_session_setting(SessionId(1), "search_path", "tenant_b");
    assert!(r.shared("SELECT id, v FROM items WHERE id = 8"));
}

#[test]
fn reported_parameters_set_the_context() {
    let mut r = Rig::new();
    r.node.report_parameter(SessionId(2), "TimeZone", "Asia/Tokyo");
    assert!(!r.shared(READ), "another time zone reported");
    r.node.report_parameter(SessionId(1), "TimeZone", "Asia/Tokyo");
    assert!(r.shared("SELECT id, v FROM items WHERE id = 2"));
}

fn live_functions(c: &mut Catalog) {
    let builtins = [
        ("lower", Volatility::Immutable),
        ("count", Volatility::Immutable),
        ("now", Volatility::Stable),
        ("nextval", Volatility::Volatile),
        ("random", Volatility::Volatile),
        ("to_char", Volatility::Stable),
    ];
    let user = [
        ("clock_wrapper", Volatility::Volatile),
        ("next_id", Volatility::Volatile),
        ("docs_of", Volatility::Stable),
        ("slug", Volatility::Immutable),
    ];
    c.set_functions(builtins.iter().map(|(n, v)| (*n, *v, true)).chain(user.iter().map(|(n, v)| (*n, *v, false))));
}

#[test]
fn volatility_comes_from_the_catalog() {
    let mut r = Rig::with(live_functions);
    for uncached in [
        "SELECT clock_wrapper()",
        "SELECT next_id()",
        "SELECT nextval('s')",
        "SELECT random()",
        "SELECT now()",
        "SELECT docs_of(1)",
        "SELECT upper('x')",
        "SELECT pg_backend_pid()",
        "SELECT pg_current_snapshot()",
        "SELECT 'now'::timestamptz",
        "SELECT timestamp 'TODAY'",
        "SELECT * FROM items WHERE id = 1 AND '2026-01-01'::date < 'tomorrow'",
    ] {
        r.run(1, uncached);
        assert_eq!(r.last_route(), Route::Primary, "{uncached} runs on the primary");
        assert_eq!(r.run(1, uncached), Served::Primary, "{uncached} is never cached");
    }
    // a parameter naming the current time
    r.run_params(1, "SELECT v FROM items WHERE id = 1 AND $1::timestamptz > '2020-01-01'", &["now"]);
    assert_eq!(
        r.run_params(1, "SELECT v FROM items WHERE id = 1 AND $1::timestamptz > '2020-01-01'", &["now"]),
        Served::Primary
    );
    // built-ins that only depend on data and session settings are cached
    for cached in ["SELECT lower(v) FROM items WHERE id = 1", "SELECT count(*) FROM items"] {
        r.run(1, cached);
        assert_eq!(r.run(1, cached), Served::L1, "{cached}");
    }
    // a user IMMUTABLE function is cached, but depends on every table
    r.run(1, "SELECT slug('a')");
    assert_eq!(r.run(1, "SELECT slug('a')"), Served::L1);
    r.remote_commit(vec![ChangeTarget::Table(TableId(99))]);
    assert_eq!(r.run(1, "SELECT slug('a')"), Served::Primary, "any table's change invalidates it");
    // a volatile user function is a write the analyzer cannot see, and
    // makes its session's state unknown (session 1 ran some above)
    let mut r = Rig::with(live_functions);
    assert!(r.shared("SELECT id, v FROM items WHERE id = 9"));
    r.run(2, "SELECT next_id()");
    assert!(!r.shared("SELECT id, v FROM items WHERE id = 10"), "and its session's state is unknown");
}

#[test]
fn a_function_redefined_after_prepare_is_seen() {
    let mut r = Rig::with(live_functions);
    let p = r.node.prepare("SELECT slug(v) FROM items WHERE id = $1").expect("lexes");
    assert!(p.shape.is_cacheable());
    r.node.update_catalog(|c| c.set_functions([("slug", Volatility::Volatile, false)]));
    r.node.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"1")]);
    match r.node.poll_output() {
        Some(NodeOutput::Upstream(u)) => {
            assert_eq!(u.route, Route::Primary);
            assert_eq!(u.cache_key, None, "analysed by the new catalog: not cacheable");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_write_whose_effects_are_unknown_waits_for_the_stream() {
    let mut r = Rig::with(|c| {
        c.set_relation("items", RelationSpec { writes_opaque: true, ..RelationSpec::default() });
    });
    r.run(1, "SELECT id, v FROM items WHERE id = 2");
    assert_eq!(r.run(1, "SELECT id, v FROM items WHERE id = 2"), Served::L1);
    // a trigger on items may write row 2 (or another table) on an update of row 1
    r.run(1, "UPDATE items SET v = 'x' WHERE id = 1");
    let commit = r.lsn;
    assert_eq!(r.run(1, "SELECT id, v FROM items WHERE id = 2"), Served::Primary, "not before the stream passes");
    // the other session is not bound by it
    r.run(2, "SELECT id, v FROM items WHERE id = 3");
    // once the stream has passed the commit (and invalidated what it changed), cached entries serve again
    r.cdc(commit, vec![ChangeTarget::Keys(r.items, vec![key_hash(r.items, b"1")])]);
    assert_eq!(r.run(1, "SELECT id, v FROM items WHERE id = 3"), Served::L1);
    // DO, CALL and volatile user functions are such writes too
    for opaque in ["DO $$ BEGIN UPDATE items SET v = 'y'; END $$", "CALL touch_items()", "SELECT touch_items()"] {
        r.run(1, "SELECT id, v FROM items WHERE id = 4");
        r.run(1, opaque);
        let private_read = r.run(1, "SELECT id, v FROM items WHERE id = 4");
        assert_eq!(private_read, Served::Primary, "{opaque}");
        r.run(1, "DISCARD ALL");
        let cdc = r.lsn;
        r.cdc(cdc, vec![]);
    }
}

#[test]
fn views_depend_on_their_base_tables() {
    let mut r = Rig::with(|c| {
        c.set_relation("items", RelationSpec::default());
        c.set_relation("docs", RelationSpec::default());
        let view = |sql: &str| RelationSpec { kind: RelKind::View, reads: vec![sql.into()], ..RelationSpec::default() };
        c.set_relation("item_view", view("SELECT id, v FROM items WHERE v IS NOT NULL"));
        c.set_relation("nested_view", view("SELECT id FROM item_view JOIN docs USING (id)"));
        c.set_relation("clock_view", view("SELECT now() AS t"));
        c.set_relation("s", RelationSpec { kind: RelKind::Sequence, ..RelationSpec::default() });
        c.set_complete(true);
    });
    for (read, table) in [("SELECT * FROM item_view WHERE id = 1", "items"), ("SELECT * FROM nested_view", "docs")] {
        r.run(1, read);
        assert_eq!(r.run(1, read), Served::L1, "{read}");
        let t = r.node.analyzer().catalog().get(table).expect("interned");
        r.remote_commit(vec![ChangeTarget::Keys(t, vec![key_hash(t, b"1")])]);
        assert_eq!(r.run(1, read), Served::Primary, "{read} after a change to {table}");
    }
    for uncached in ["SELECT * FROM clock_view", "SELECT last_value FROM s", "SELECT * FROM made_since"] {
        r.run(1, uncached);
        assert_eq!(r.run(1, uncached), Served::Primary, "{uncached}");
    }
    // a write through a view reaches its base table
    r.run(1, "SELECT id, v FROM items WHERE id = 1");
    r.run(1, "UPDATE item_view SET v = 'z' WHERE id = 1");
    assert_eq!(r.run(1, "SELECT id, v FROM items WHERE id = 1"), Served::Primary);
}

#[test]
fn a_partition_change_is_its_parents_change() {
    let mut r = Rig::with(|c| {
        c.set_primary_key("events", "id");
        c.set_integer_key("events");
        c.set_primary_key("events_2026", "id");
        c.set_integer_key("events_2026");
        c.set_relation("events", RelationSpec { writes_opaque: true, ..RelationSpec::default() });
        c.set_relation("events_2026", RelationSpec { ancestors: vec!["events".into()], ..RelationSpec::default() });
    });
    let read = "SELECT * FROM events WHERE id = 5";
    r.run(1, read);
    r.run(2, "UPDATE events_2026 SET v = 1 WHERE id = 5");
    assert_eq!(r.run(1, read), Served::Primary, "the write to the partition invalidated the parent's row");
    r.run(1, "SELECT * FROM events WHERE id = 6");
    assert_eq!(r.run(1, "SELECT * FROM events WHERE id = 6"), Served::L1, "only that row");
}

#[test]
fn spellings_of_one_key_share_invalidation() {
    let mut r = Rig::new();
    let spellings = ["70", "070", "' 70'", "'070'", "70.0", "'+70'", "'70 '"];
    for read in spellings {
        for write in spellings {
            let sql = format!("SELECT id, v FROM items WHERE id = {read}");
            r.run(1, &sql);
            assert_eq!(r.run(1, &sql), Served::L1, "{read} cached");
            r.run(2, &format!("UPDATE items SET v = 'x' WHERE id = {write}"));
            assert_eq!(r.run(1, &sql), Served::Primary, "read as {read}, written as {write}");
        }
        // a change arriving through the stream names the key as PostgreSQL prints it
        let sql = format!("SELECT id, v FROM items WHERE id = {read}");
        r.run(1, &sql);
        let items = r.items;
        r.remote_commit(vec![ChangeTarget::Keys(items, vec![key_hash(items, b"70")])]);
        assert_eq!(r.run(1, &sql), Served::Primary, "read as {read}, changed through the stream");
    }
    // uuids in any case and form
    let docs = r.node.analyzer().catalog().get("docs").expect("declared");
    for form in ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"] {
        let sql = format!("SELECT * FROM docs WHERE id = '{form}'");
        r.run(1, &sql);
        r.remote_commit(vec![ChangeTarget::Keys(docs, vec![key_hash(docs, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")])]);
        assert_eq!(r.run(1, &sql), Served::Primary, "{form}");
    }
}

/// Spellings PostgreSQL reads as the same integer.
fn integer_spelling(n: i64) -> impl Strategy<Value = String> {
    (0..3usize, 0..3usize, any::<bool>(), 0..3usize).prop_map(move |(zeros, spaces, plus, frac)| {
        let digits = n.unsigned_abs().to_string();
        let sign = if n < 0 {
            "-"
        } else if plus {
            "+"
        } else {
            ""
        };
        let pad = " ".repeat(spaces);
        let frac = ["", ".0", ".00"][frac];
        format!("{pad}{sign}{}{digits}{frac}{pad}", "0".repeat(zeros))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any two spellings of one integer are one key; different integers are
    /// different keys.
    #[test]
    fn integer_spellings_are_one_key(n in -100_000i64..100_000, m in -100_000i64..100_000,
                                     a in integer_spelling(7), seed in any::<u64>()) {
        let _ = (a, seed);
        let spell = |v: i64, zeros: usize| format!("{}{}", if v < 0 { "-" } else { "" }, "0".repeat(zeros) + &v.unsigned_abs().to_string());
        let k = |s: &str| canonical_key(KeyType::Integer, s).map(|c| c.into_owned());
        prop_assert_eq!(k(&spell(n, 0)), k(&spell(n, 3)));
        prop_assert_eq!(k(&format!(" {}.0 ", n)), Some(n.to_string()));
        prop_assert_eq!(k(&spell(n, 1)) == k(&spell(m, 0)), n == m);
    }

    #[test]
    fn generated_spellings_name_the_integer(n in -1_000_000i64..1_000_000, s in (-1_000_000i64..1_000_000).prop_flat_map(integer_spelling)) {
        let _ = n;
        let canonical = canonical_key(KeyType::Integer, &s).map(|c| c.into_owned());
        let value: i64 = s.trim().trim_start_matches('+').parse::<f64>().map(|f| f as i64).expect("a number");
        prop_assert_eq!(canonical, Some(value.to_string()));
    }
}

#[test]
fn row_security_policies_add_what_they_read() {
    let mut r = Rig::with(|c| {
        c.set_relation("members", RelationSpec::default());
        let policy = "SELECT 1 WHERE (tenant IN (SELECT m.tenant FROM members m WHERE m.who = CURRENT_USER))";
        c.set_relation("tdocs", RelationSpec { reads: vec![policy.into()], ..RelationSpec::default() });
        let own = "SELECT 1 WHERE (owner = CURRENT_USER)";
        c.set_relation("odocs", RelationSpec { reads: vec![own.into()], ..RelationSpec::default() });
        c.set_complete(true);
    });
    let read = "SELECT * FROM tdocs ORDER BY id";
    r.run(1, read);
    assert_eq!(r.run(1, read), Served::L1);
    let members = r.node.analyzer().catalog().get("members").expect("described");
    r.remote_commit(vec![ChangeTarget::Table(members)]);
    assert_eq!(r.run(1, read), Served::Primary, "a membership change changes what the policy lets through");
    r.run(1, "SELECT * FROM odocs");
    assert_eq!(r.run(1, "SELECT * FROM odocs"), Served::L1, "a policy on the role alone: cached");
}

#[test]
fn proxy_consistency_reads_every_write_the_node_acknowledged() {
    let mut r = Rig::with(|c| {
        c.set_relation("items", RelationSpec::default());
        c.set_relation("audit", RelationSpec { writes_opaque: true, ..RelationSpec::default() });
    });
    r.node.set_consistency(SessionId(2), Consistency::Proxy);
    r.node.open_session(SessionId(3), "app", "app", Consistency::ReadYourWrites).expect("room");
    for s in [2, 3] {
        r.run(s, "SELECT id, v FROM items WHERE id = 2");
    }
    r.run(1, "UPDATE items SET v = 'x' WHERE id = 1");
    let commit = r.lsn;
    // a miss of the proxy-consistent session needs an endpoint past session 1's write
    r.run(2, "SELECT id, v FROM items WHERE id = 1");
    assert_eq!(r.last_route(), Route::Read { floor: Some(Lsn(commit)) });
    r.run(3, "SELECT id, v FROM items WHERE id = 3");
    assert_eq!(r.last_route(), Route::Read { floor: Some(Lsn(0)) }, "read-your-writes: its own writes only");
    // a write the node applied does not cost the other rows their entries
    assert_eq!(r.run(2, "SELECT id, v FROM items WHERE id = 2"), Served::L1);
    // one whose effects it cannot see does, until the stream passes it
    r.run(1, "INSERT INTO audit VALUES (1)");
    let opaque = r.lsn;
    assert_eq!(r.run(2, "SELECT id, v FROM items WHERE id = 2"), Served::Primary);
    assert_eq!(r.run(3, "SELECT id, v FROM items WHERE id = 2"), Served::L1, "not bound by another's writes");
    r.cdc(opaque, vec![]);
    assert_eq!(r.run(2, "SELECT id, v FROM items WHERE id = 2"), Served::L1);
}

#[test]
fn a_cast_that_changes_the_value_is_no_key() {
    let mut r = Rig::new();
    for read in ["SELECT * FROM items WHERE id = 5::bool::int", "SELECT * FROM items WHERE id = '1'::bool::int"] {
        r.run(1, read);
        assert_eq!(r.run(1, read), Served::L1);
        // a write to any row of items reaches it: it depends on the table
        r.run(2, "UPDATE items SET v = 'x' WHERE id = 77");
        assert_eq!(r.run(1, read), Served::Primary, "{read}");
    }
    let read = "SELECT * FROM items WHERE id = 5::int";
    r.run(1, read);
    r.run(2, "UPDATE items SET v = 'x' WHERE id = 77");
    assert_eq!(r.run(1, read), Served::L1, "a cast that keeps the value keeps the key");
}

#[cfg(test)]
mod session_and_refresh {
    use crate::cache::{Eviction, TierConfig};
    use crate::consistency::Consistency;
    use crate::invalidation::{CdcEvent, Change, ChangeTarget, key_hash};
    use crate::node::*;
    use crate::sql::{Catalog, TableId};
    use crate::{Duration, Instant, Lsn};

    fn node(mode: InvalidationMode) -> (EdgeNode<u64>, TableId) {
        node_with(mode, |_| {})
    }

    /// A node of `mode` (tiers of 10 and 100 entries, a 60 s TTL), its
    /// config changed by `adjust`; one session open.
    fn node_with(mode: InvalidationMode, adjust: impl FnOnce(&mut NodeConfig)) -> (EdgeNode<u64>, TableId) {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let mut config = NodeConfig {
            sessions_max: 2,
            pending_max: 8,
            invalidation: mode,
            ..NodeConfig::new(Zone::Eu, tier(10), tier(100))
        };
        adjust(&mut config);
        let mut n = EdgeNode::new(config, catalog, Lsn(0)).expect("valid config");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        (n, items)
    }

    fn read(n: &mut EdgeNode<u64>, p: &Prepared, key: &str, origin: u64) -> (Served, u64) {
        n.handle_execute(Instant::ZERO, SessionId(1), p, &[Some(key.as_bytes())]);
        let answer = |_: &UpstreamRequest| Ok(harness::read_reply(origin, 8, Served::Replica, Lsn(origin)));
        match harness::through(n, Instant::ZERO, answer) {
            Some(NodeOutput::Reply { served, value, .. }) => (served, value),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn event(items: TableId, key: &str, prev: u64, lsn: u64) -> CdcEvent {
        CdcEvent {
            prev_lsn: Lsn(prev),
            change: Change {
                lsn: Lsn(lsn),
                targets: vec![ChangeTarget::Keys(items, vec![key_hash(items, key.as_bytes())])],
            },
        }
    }

    /// An answer the driver could not keep whole, or cannot date, is never
    /// filed; answers in flight across a primary change are not either; a
    /// hit tells what it reflects: its snapshot.
    #[test]
    fn answers_filed_only_whole_dated_and_from_the_current_primary() {
        let (mut n, items) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        let ask = |n: &mut EdgeNode<u64>, key: &str| {
            n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(key.as_bytes())]);
            n.poll_output()
        };
        let answer = |n: &mut EdgeNode<u64>, req, lsn: u64| {
            let reply = UpstreamReply {
                value: lsn,
                size_bytes: 8,
                served: Served::Primary,
                snapshot_lsn: Lsn(lsn),
                commit_lsn: None,
                ttl: None,
            };
            n.handle_upstream(Instant::ZERO, req, Ok(reply));
            n.poll_output()
        };
        let Some(NodeOutput::Upstream(u)) = ask(&mut n, "1") else { panic!("a miss") };
        n.skip_fill(u.req);
        assert!(matches!(answer(&mut n, u.req, 3), Some(NodeOutput::Reply { value: 3, .. })), "relayed");
        assert!(matches!(ask(&mut n, "1"), Some(NodeOutput::Upstream(_))), "not filed");
        let Some(NodeOutput::Upstream(u)) = ask(&mut n, "2") else { panic!("a miss") };
        n.primary_changed();
        let _ = answer(&mut n, u.req, 3);
        assert!(matches!(ask(&mut n, "2"), Some(NodeOutput::Upstream(_))), "in flight across a failover");
        let Some(NodeOutput::Upstream(u)) = ask(&mut n, "3") else { panic!("a miss") };
        let _ = answer(&mut n, u.req, 4);
        assert!(matches!(ask(&mut n, "3"), Some(NodeOutput::Reply { served: Served::L1, lsn: Lsn(4), .. })));
        // the stream passes 9 without touching row 3: the entry still tells its snapshot
        n.handle_cdc(Instant::ZERO, &event(items, "8", 0, 9));
        assert!(matches!(ask(&mut n, "3"), Some(NodeOutput::Reply { served: Served::L1, lsn: Lsn(4), .. })));
    }

    /// Fresh, not expired: with key-level invalidation, a silence bound
    /// and a fresh TTL, a point read stays past the tiers' TTL while the
    /// stream is heard, a write's event still invalidates it, and nothing
    /// is served once the stream has been silent past the bound. Without
    /// the bound (nothing to say the stream is live), or with TTL-only
    /// invalidation, or a range read (not vouched for row by row), the
    /// TTL holds.
    #[test]
    fn a_point_read_the_stream_keeps_valid_outlives_the_ttl_while_it_is_heard() {
        let build = |mode, silence: Option<u64>| {
            node_with(mode, |c| {
                c.cdc_silence_max = silence.map(Duration::from_secs);
                c.fresh_ttl = Some(Duration::from_secs(3600));
            })
        };
        let at = |s: u64| Instant::ZERO + Duration::from_secs(s);
        let heard = |n: &mut EdgeNode<u64>, items, s: u64| n.handle_cdc(at(s), &event(items, "99", 1, 1));
        // the origin answers as of the newest write (LSN 5) from second 121 on
        let ask = |n: &mut EdgeNode<u64>, p: &Prepared, s: u64, args: &[&str]| {
            let args: Vec<Option<&[u8]>> = args.iter().map(|a| Some(a.as_bytes())).collect();
            n.handle_execute(at(s), SessionId(1), p, &args);
            let lsn = if s > 120 { 5 } else { 1 };
            let answer = |_: &UpstreamRequest| Ok(harness::read_reply(lsn, 8, Served::Replica, Lsn(lsn)));
            match harness::through(n, at(s), answer) {
                Some(NodeOutput::Reply { served, .. }) => served,
                other => panic!("expected a reply, got {other:?}"),
            }
        };
        for (mode, silence, point_kept) in [
            (InvalidationMode::Key, Some(2), true),
            (InvalidationMode::Refresh, Some(2), true),
            (InvalidationMode::Key, None, false),
            (InvalidationMode::TtlOnly, Some(2), false),
        ] {
            let (mut n, items) = build(mode, silence);
            let point = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
            let range = n.prepare("SELECT id, v FROM items WHERE id BETWEEN $1 AND $2").expect("lexes");
            heard(&mut n, items, 0);
            assert_eq!(ask(&mut n, &point, 0, &["7"]), Served::Replica);
            assert_eq!(ask(&mut n, &range, 0, &["1", "5"]), Served::Replica);
            // the stream heard every second, for two minutes (the TTL is 60 s)
            for s in 1..=120 {
                heard(&mut n, items, s);
            }
            let want = if point_kept { Served::L1 } else { Served::Replica };
            assert_eq!(ask(&mut n, &point, 120, &["7"]), want, "{mode:?} {silence:?}");
            assert_eq!(ask(&mut n, &range, 120, &["1", "5"]), Served::Replica, "{mode:?}: a range keeps the TTL");
            if !point_kept {
                continue;
            }
            // a write to the row still invalidates it
            n.handle_cdc(at(121), &event(items, "7", 1, 5));
            assert_eq!(ask(&mut n, &point, 121, &["7"]), Served::Replica, "{mode:?}: invalidated");
            assert_eq!(ask(&mut n, &point, 121, &["7"]), Served::L1, "{mode:?}: filed again");
            // silent past the bound: not served
            assert_eq!(ask(&mut n, &point, 124, &["7"]), Served::Replica, "{mode:?}: the stream went silent");
        }
    }

    /// A new history (a new slot on a promoted primary) whose positions
    /// start at 4, below the 10 the old one's stream was complete through:
    /// what was known of the old positions vouches for nothing on the new
    /// timeline. An entry filed at 5 does not meet a floor of 6 (a write a
    /// site made at 6 that this node's stream has not brought yet): before,
    /// the old history's completeness served it.
    #[test]
    fn a_new_history_forgets_how_far_the_old_one_was_complete() {
        let (mut n, items) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        n.handle_cdc(Instant::ZERO, &event(items, "99", 0, 10));
        assert_eq!(n.versions().complete_through(), Lsn(10));
        let back = CdcEvent { prev_lsn: Lsn(10), change: Change { lsn: Lsn(4), targets: vec![ChangeTarget::All] } };
        assert!(back.starts_history());
        n.handle_cdc(Instant::ZERO, &back);
        assert_eq!(n.versions().complete_through(), Lsn(4));
        assert_eq!(read(&mut n, &p, "7", 3), (Served::Replica, 3), "older than the new history: not filed");
        assert_eq!(read(&mut n, &p, "7", 5), (Served::Replica, 5));
        assert_eq!(read(&mut n, &p, "7", 5), (Served::L1, 5), "filed on the new history");
        n.raise_floor(SessionId(1), Lsn(6));
        assert_eq!(read(&mut n, &p, "7", 6), (Served::Replica, 6), "the entry at 5 does not meet the floor");
        // the batch path: the same, in stream order
        let (mut n, items) = node(InvalidationMode::Refresh);
        let old = event(items, "99", 0, 10);
        let new = event(items, "7", 4, 5);
        n.handle_cdc_batch(Instant::ZERO, [&old, &back, &new], &mut |_, _, _, _| None);
        assert_eq!(n.versions().complete_through(), Lsn(5));
        assert_eq!(n.versions().required_lsn(&[crate::invalidation::Dep::Key(items, key_hash(items, b"7"))]), Lsn(5));
    }

    /// `POSTAI EXPLAIN`: the node's decisions in words, for this session now.
    #[test]
    fn explain_says_what_the_node_decides() {
        let (mut n, _) = node_with(InvalidationMode::Key, |c| {
            c.fresh_ttl = Some(Duration::from_secs(86_400));
            c.cdc_silence_max = Some(Duration::from_secs(2));
        });
        let row = |rows: &[(String, String)], name: &str| {
            rows.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
        };
        let point = n.explain(SessionId(1), "SELECT v FROM items WHERE id = 7");
        assert_eq!(row(&point, "kind"), "Read");
        assert_eq!(row(&point, "reads"), "items");
        assert_eq!(row(&point, "read keys"), "items by key");
        assert_eq!(row(&point, "cacheable"), "yes");
        assert!(row(&point, "entry lives").contains("86400 s"), "{point:?}");
        assert!(row(&point, "served").starts_with("L1, else L2"), "{point:?}");
        let scan = n.explain(SessionId(1), "SELECT count(*) FROM items");
        assert_eq!(row(&scan, "read keys"), "none: whole tables");
        assert!(row(&scan, "entry lives").starts_with("60 s"), "{scan:?}");
        let volatile = n.explain(SessionId(1), "SELECT random() FROM items WHERE id = 1");
        assert!(row(&volatile, "cacheable").starts_with("no: calls volatile function random"), "{volatile:?}");
        assert!(row(&volatile, "served").starts_with("the primary"), "{volatile:?}");
        let write = n.explain(SessionId(1), "UPDATE items SET v = 'x' WHERE id = 1");
        assert_eq!((row(&write, "kind").as_str(), row(&write, "writes").as_str()), ("Write", "items"));
        let many = n.explain(SessionId(1), "SELECT 1; DELETE FROM items");
        assert!(row(&many, "writes").starts_with("rows it does not name"), "{many:?}");
        assert!(row(&many, "cacheable").contains("multi-statement"), "{many:?}");
        // inside a transaction: the primary
        let _ = run(&mut n, 1, "BEGIN");
        let inside = n.explain(SessionId(1), "SELECT v FROM items WHERE id = 7");
        assert_eq!(row(&inside, "served"), "the primary (inside a transaction)");
        assert_eq!(row(&n.explain(SessionId(9), "SELECT 1"), "served"), "unknown session");
        let _ = run(&mut n, 1, "COMMIT");
        assert!(n.plain_statement(SessionId(1), "SELECT v FROM items WHERE id = 7"));
        assert!(!n.plain_statement(SessionId(1), "SELECT 1; DELETE FROM items"));
        // backslash escapes: the lexer's one string may hide a second statement
        let _ = run(&mut n, 1, "SET standard_conforming_strings = off");
        let smuggled = "SELECT 'x\\' , '; UPDATE items SET v = 'p'; SELECT $$ --'";
        assert!(!n.plain_statement(SessionId(1), smuggled));
        assert!(!n.plain_statement(SessionId(1), "SELECT v FROM items WHERE id = 7"));
    }

    /// Each shape's calls, tier answers and upstream requests are counted
    /// (what pg_stat_statements cannot see: the answers the cache gave),
    /// and a catalog change, which numbers shapes anew, keeps them.
    #[test]
    fn each_shape_counts_its_calls_and_who_answered_them() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        n.handle_cdc(Instant::ZERO, &event(TableId(0), "0", 0, 1));
        assert_eq!(read(&mut n, &p, "7", 5).0, Served::Replica);
        assert_eq!(read(&mut n, &p, "7", 5).0, Served::L1);
        assert_eq!(read(&mut n, &p, "8", 5).0, Served::Replica);
        let rows = n.shape_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text, p.shape.text);
        let c = rows[0].counters;
        assert_eq!((c.calls(), c.l1_hits, c.l2_hits, c.upstream), (3, 1, 0, 2));
        n.update_catalog(|_| {});
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        let _ = read(&mut n, &p, "9", 5);
        let rows = n.shape_rows();
        assert_eq!(rows.len(), 1, "one fingerprint across catalogs");
        assert_eq!((rows[0].counters.calls(), rows[0].counters.upstream), (4, 3));
        // bounded: clients can make shapes, and DDL renumber them
        for i in 0..(super::super::shape_stats::RETIRED_MAX + 1_000) {
            let p = n.prepare(&format!("SELECT v AS a{i} FROM items WHERE id = $1")).expect("lexes");
            let _ = read(&mut n, &p, "9", 5);
        }
        let before = n.shape_rows().len();
        assert!(before > super::super::shape_stats::RETIRED_MAX, "{before} shapes counted");
        n.update_catalog(|_| {});
        assert_eq!(n.shape_rows().len(), before.min(super::super::shape_stats::RETIRED_MAX), "from {before}");
    }

    /// A process that opened its stream at 10 never saw what changed at or
    /// below it: an answer reflecting only up to 5 (a lagging replica) may
    /// miss a change in between and is not filed; one at 10 or later is.
    /// A restart forgets where the stream opened, and what L1 held.
    #[test]
    fn no_answer_older_than_where_the_stream_opened_is_filed() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        n.fills_from(Lsn(10));
        assert_eq!(read(&mut n, &p, "7", 5), (Served::Replica, 5));
        assert_eq!(read(&mut n, &p, "7", 6), (Served::Replica, 6), "the older answer was not filed");
        assert_eq!(read(&mut n, &p, "7", 10), (Served::Replica, 10));
        assert_eq!(read(&mut n, &p, "7", 11), (Served::L1, 10), "filed at the opening position");
        n.restart();
        assert_eq!(n.tier(crate::cache::TierName::L1).map(|t| t.len()), Some(0), "L1 is gone with the process");
        assert_eq!(n.tier(crate::cache::TierName::L2).map(|t| t.len()), Some(1), "L2 is the file");
    }

    #[test]
    fn refresh_keeps_point_reads_hot_and_current() {
        let (mut n, items) = node(InvalidationMode::Refresh);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        assert!(p.shape.refreshable);
        assert_eq!(read(&mut n, &p, "7", 1), (Served::Replica, 1));
        n.handle_cdc_rows(Instant::ZERO, &event(items, "7", 0, 5), &mut |_, _, _, lsn| Some((lsn.0 * 100, 8)));
        assert_eq!(read(&mut n, &p, "7", 99), (Served::L1, 500), "refreshed in place, not invalidated");
        assert_eq!(n.refreshed(), 2, "L1 and L2 entries");
    }

    #[test]
    fn a_cdc_batch_leaves_the_node_as_its_events_one_by_one() {
        for mode in
            [InvalidationMode::Refresh, InvalidationMode::Key, InvalidationMode::Table, InvalidationMode::TtlOnly]
        {
            // 30 rows filled (L1 holds 10 of them), then 40 changes to rows
            // cached and not, a row changed twice, a gap in the stream
            let keys: Vec<String> = (0..30).map(|k| k.to_string()).collect();
            let events: Vec<CdcEvent> = (0..40u64)
                .map(|i| event(TableId(0), &((i * 7) % 45).to_string(), 100 + i - u64::from(i != 20), 101 + i))
                .collect();
            let run = |batched: bool| {
                let (mut n, items) = node(mode);
                assert_eq!(items, TableId(0));
                let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
                for k in &keys {
                    read(&mut n, &p, k, 1);
                }
                let mut refresh = |_: TableId, _: u64, _: &u64, lsn: Lsn| Some((lsn.0 * 10, 8));
                let now = Instant::from_millis(5);
                if batched {
                    n.handle_cdc_batch(now, &events, &mut refresh);
                } else {
                    // what a CDC event with rows means, one at a time
                    for e in &events {
                        n.handle_cdc(now, e);
                        if mode == InvalidationMode::Refresh {
                            n.refresh.apply(e, &mut [&mut n.l1, &mut n.l2], &mut refresh);
                        }
                    }
                }
                let served: Vec<(Served, u64)> = keys.iter().map(|k| read(&mut n, &p, k, 200)).collect();
                (served, n.refreshed(), n.versions.complete_through(), n.stats().cdc_events)
            };
            let (one_by_one, batched) = (run(false), run(true));
            assert_eq!(one_by_one, batched, "{mode:?}");
            if mode == InvalidationMode::Refresh {
                assert!(batched.1 > 0, "some entries refreshed in place");
            }
        }
    }

    #[test]
    fn key_mode_invalidates_instead() {
        let (mut n, items) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT id, v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "7", 1);
        n.handle_cdc_rows(Instant::ZERO, &event(items, "7", 0, 5), &mut |_, _, _, lsn| Some((lsn.0, 8)));
        assert_eq!(read(&mut n, &p, "7", 6), (Served::Replica, 6));
    }

    /// Runs `sql` in `session`, answering upstream with success; what served it.
    fn run(n: &mut EdgeNode<u64>, session: u64, sql: &str) -> Served {
        n.handle_simple_query(Instant::ZERO, SessionId(session), sql);
        match n.poll_output() {
            Some(NodeOutput::Reply { served, .. }) => served,
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

    /// Whether session 2 is served what session 1 cached (the same context).
    fn shares(n: &mut EdgeNode<u64>, id: u32) -> bool {
        let sql = format!("SELECT v FROM items WHERE id = {id}");
        run(n, 1, &sql);
        run(n, 2, &sql) == Served::L1
    }

    #[test]
    fn session_state_follows_roles_transactions_and_invisible_changes() {
        let (mut n, _) = node(InvalidationMode::Key);
        n.open_session(SessionId(2), "app", "app", Consistency::ReadYourWrites).expect("room");
        assert!(shares(&mut n, 1), "same login, same settings");
        run(&mut n, 2, "SET ROLE alice");
        assert!(!shares(&mut n, 2), "another role");
        run(&mut n, 2, "RESET ROLE");
        assert!(shares(&mut n, 3), "RESET ROLE goes back to the login role");
        for back in ["SET ROLE NONE", "SET SESSION AUTHORIZATION DEFAULT", "DISCARD ALL"] {
            run(&mut n, 2, "SET ROLE alice");
            run(&mut n, 2, back);
            assert!(shares(&mut n, 4), "{back}");
        }
        run(&mut n, 2, "SET ROLE alice");
        run(&mut n, 2, "RESET ALL");
        assert!(!shares(&mut n, 5), "RESET ALL keeps the role");
        run(&mut n, 2, "DISCARD ALL");

        // a SET inside a rolled-back transaction is undone
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "ROLLBACK");
        assert!(shares(&mut n, 6), "rolled back");
        // ... and kept when committed
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "COMMIT");
        assert!(!shares(&mut n, 7), "committed");
        run(&mut n, 2, "RESET search_path");
        assert!(shares(&mut n, 8));
        // a ROLLBACK TO after a SET: unknown, private
        run(&mut n, 2, "BEGIN");
        run(&mut n, 2, "SAVEPOINT a");
        run(&mut n, 2, "SET search_path = other");
        run(&mut n, 2, "ROLLBACK TO a");
        run(&mut n, 2, "COMMIT");
        assert!(!shares(&mut n, 9), "uncertain: private");
        run(&mut n, 2, "DISCARD ALL");
        assert!(shares(&mut n, 10));

        // changes no SET shows: private until DISCARD ALL
        for invisible in [
            "CREATE TEMP TABLE items (id int, v text)",
            "CREATE GLOBAL TEMPORARY TABLE items (id int)",
            "SELECT * INTO TEMP t FROM items",
            "SELECT * FROM pg_temp.items",
        ] {
            run(&mut n, 2, "DISCARD ALL");
            run(&mut n, 2, invisible);
            assert!(!shares(&mut n, 11), "{invisible}");
        }
        run(&mut n, 2, "DISCARD ALL");
        assert!(shares(&mut n, 12));

        // startup settings and relayed statements
        n.set_session_setting(SessionId(2), "DateStyle", "SQL, DMY");
        assert!(!shares(&mut n, 13), "a startup setting is in the context");
        n.set_session_setting(SessionId(1), "datestyle", "SQL, DMY");
        assert!(shares(&mut n, 14), "the same startup setting");
        let set = n.prepare("SET search_path = other").expect("lexes");
        n.note_relayed(SessionId(2), &set, true);
        assert!(!shares(&mut n, 15), "an extended-protocol SET");
        n.note_relayed(SessionId(1), &set, true);
        assert!(shares(&mut n, 16));
        n.note_relayed(SessionId(2), &set, false);
        assert!(!shares(&mut n, 17), "a SET of uncertain fate: private");
        let column = n.prepare("SELECT temp FROM weather WHERE temp > 3").expect("lexes");
        assert!(!column.shape.session_private, "a column named temp is not a temporary table");

        // set_config: private for good (a custom setting it defined outlives DISCARD ALL)
        run(&mut n, 2, "DISCARD ALL");
        run(&mut n, 1, "DISCARD ALL");
        assert!(shares(&mut n, 18));
        run(&mut n, 2, "SELECT set_config('search_path', 'other', false)");
        assert!(!shares(&mut n, 19));
        run(&mut n, 2, "DISCARD ALL");
        assert!(!shares(&mut n, 20));
    }

    #[test]
    fn only_single_row_projections_are_refreshable() {
        let (mut n, _) = node(InvalidationMode::Refresh);
        for (sql, want) in [
            ("SELECT * FROM items WHERE id = $1", true),
            ("SELECT items.v AS value FROM items WHERE items.id = 3", true),
            ("SELECT v FROM items WHERE id = $1 AND v > 2", false),
            ("SELECT v FROM items WHERE id = $1 LIMIT 1", false),
            ("SELECT count(*) FROM items WHERE id = $1", false),
            ("SELECT lower(v) FROM items WHERE id = $1", false),
            ("SELECT v FROM items WHERE id IN ($1, $2)", false),
            ("SELECT i.v FROM items i JOIN owners o ON o.id = i.owner WHERE i.id = $1", false),
        ] {
            let p = n.prepare(sql).expect("lexes");
            assert_eq!(p.shape.refreshable, want, "{sql}");
        }
    }

    #[test]
    fn session_settings_change_the_cache_context() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "1", 1);
        assert_eq!(read(&mut n, &p, "1", 2).0, Served::L1);
        // a result-neutral setting keeps the context
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SET application_name = 'x'");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("SET goes upstream") };
        let ok = UpstreamReply {
            value: 0,
            size_bytes: 0,
            served: Served::Primary,
            snapshot_lsn: Lsn(0),
            commit_lsn: None,
            ttl: None,
        };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok.clone()));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 3).0, Served::L1);
        // search_path changes what `items` means
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SET search_path TO tenant_b");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("SET goes upstream") };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 4).0, Served::Replica, "another search_path, another cache entry");
    }

    #[test]
    fn transactions_are_never_cached_and_writes_apply_at_commit() {
        let (mut n, _) = node(InvalidationMode::Key);
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        read(&mut n, &p, "1", 1);
        let ok = |lsn| UpstreamReply {
            value: 0u64,
            size_bytes: 0,
            served: Served::Primary,
            snapshot_lsn: Lsn(lsn),
            commit_lsn: Some(Lsn(lsn)),
            ttl: None,
        };
        for sql in ["BEGIN", "UPDATE items SET v = 2 WHERE id = 1"] {
            n.handle_simple_query(Instant::ZERO, SessionId(1), sql);
            let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("{sql} goes upstream") };
            assert_eq!(u.route, Route::Primary);
            n.handle_upstream(Instant::ZERO, u.req, Ok(ok(1)));
            while n.poll_output().is_some() {}
        }
        n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"1")]);
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("a read in a transaction goes upstream") };
        assert_eq!((u.route, u.cache_key), (Route::Primary, None));
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok(1)));
        while n.poll_output().is_some() {}
        n.handle_simple_query(Instant::ZERO, SessionId(1), "COMMIT");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("COMMIT goes upstream") };
        n.handle_upstream(Instant::ZERO, u.req, Ok(ok(9)));
        while n.poll_output().is_some() {}
        assert_eq!(read(&mut n, &p, "1", 9), (Served::Replica, 9), "the commit invalidated the row");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let (mut n, _) = node(InvalidationMode::Key);
        n.handle_simple_query(Instant::ZERO, SessionId(1), "SELECT 'unterminated");
        let Some(NodeOutput::Upstream(u)) = n.poll_output() else { panic!("goes to the primary for its error") };
        assert_eq!((u.route, u.cache_key), (Route::Primary, None));
        n.handle_simple_query(Instant::ZERO, SessionId(99), "SELECT 1");
        assert!(matches!(n.poll_output(), Some(NodeOutput::Failed { error: NodeError::UnknownSession(_), .. })));
        n.handle_upstream(Instant::ZERO, RequestId(12345), Err("late".into()));
        assert!(n.poll_output().is_none(), "an unknown request id is ignored");
    }

    /// Statements nested or chained deep enough to exhaust a thread's stack
    /// if analysed recursively (a stack overflow aborts the whole proxy):
    /// analysed or passed to the primary, on a thread of 2 MB as the
    /// proxy's are.
    #[test]
    fn deep_statements_do_not_exhaust_the_stack() {
        let n = 100_000;
        let texts = [
            format!("SELECT {}1", "1+".repeat(n)),
            format!("SELECT v FROM items WHERE {}id = 1", "id = 1 AND ".repeat(n)),
            format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n)),
            format!("SELECT {}1", "- ".repeat(n)),
            format!("SELECT {}true", "NOT ".repeat(n)),
            format!("SELECT v FROM items WHERE id IN ({}1)", "1, ".repeat(n)),
            format!("SELECT {}1{}", "ARRAY[".repeat(n / 10), "]".repeat(n / 10)),
            format!("SELECT * FROM {}items{}", "(SELECT * FROM ".repeat(n / 10), ") s".repeat(n / 10)),
            // chains under the limit at each of 45 levels of parentheses
            format!(
                "SELECT {}1{}",
                "(".repeat(45),
                format!("{}){}", " + 1".repeat(1999), " + 1".repeat(1999)).repeat(45)
            ),
            format!("SELECT 1{}", "::int".repeat(n)),
        ];
        let worker = std::thread::Builder::new().stack_size(2 << 20).spawn(move || {
            for text in texts {
                let (mut n, _) = node(InvalidationMode::Key);
                n.handle_simple_query(Instant::ZERO, SessionId(1), &text);
                assert!(n.poll_output().is_some(), "{}", &text[..40]);
            }
        });
        worker.expect("thread").join().expect("no panic");
    }
}

#[cfg(test)]
mod silence_tests {
    use crate::cache::{Eviction, TierConfig};
    use crate::consistency::Consistency;
    use crate::invalidation::{CdcEvent, Change};
    use crate::node::*;
    use crate::router::Zone;
    use crate::sql::Catalog;
    use crate::{Duration, Instant, Lsn};

    /// An event lost by the stream (a later one arrived): older entries are
    /// not served while the gap is open, and a gap still open past the
    /// silence bound invalidates everything older than the newest commit.
    #[test]
    fn a_gap_in_the_stream_stops_older_entries_until_filled_or_given_up() {
        let mut catalog = Catalog::new();
        catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(600),
            eviction: Eviction::Sieve,
        };
        let config = NodeConfig {
            cdc_silence_max: Some(Duration::from_secs(2)),
            ..NodeConfig::new(Zone::Eu, tier(10), tier(10))
        };
        let mut n: EdgeNode<u64> = EdgeNode::new(config, catalog, Lsn(0)).expect("valid");
        n.open_session(SessionId(1), "app", "app", Consistency::Eventual).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let read = |n: &mut EdgeNode<u64>, at: Instant, snapshot: u64| {
            n.handle_execute(at, SessionId(1), &p, &[Some(b"1")]);
            match n.poll_output() {
                Some(NodeOutput::Reply { served, .. }) => served,
                Some(NodeOutput::Upstream(u)) => {
                    let r = UpstreamReply {
                        value: 1,
                        size_bytes: 8,
                        served: Served::Replica,
                        snapshot_lsn: Lsn(snapshot),
                        commit_lsn: None,
                        ttl: None,
                    };
                    n.handle_upstream(at, u.req, Ok(r));
                    while n.poll_output().is_some() {}
                    Served::Replica
                }
                other => panic!("{other:?}"),
            }
        };
        let ev = |prev, lsn| CdcEvent { prev_lsn: Lsn(prev), change: Change { lsn: Lsn(lsn), targets: vec![] } };
        let t = |s: u64| Instant::from_millis(1000 * s);
        n.handle_cdc(t(1), &ev(0, 10));
        read(&mut n, t(1), 10);
        assert_eq!(read(&mut n, t(1), 10), Served::L1);
        // the event at 20 never comes; 30 does
        n.handle_cdc(t(2), &ev(20, 30));
        assert_eq!(read(&mut n, t(2), 10), Served::Replica, "older than the gap: not served");
        n.handle_cdc(t(5), &ev(30, 30));
        assert_eq!(n.versions().stats().cdc_gaps_skipped, 1, "given up after the bound");
        assert_eq!(read(&mut n, t(5), 30), Served::Replica);
        assert_eq!(read(&mut n, t(5), 30), Served::L1, "entries newer than the gap serve");
    }

    #[test]
    fn a_silent_cdc_stream_stops_cache_serving() {
        let mut catalog = Catalog::new();
        catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let config = NodeConfig {
            cdc_silence_max: Some(Duration::from_secs(2)),
            ..NodeConfig::new(Zone::Eu, tier(10), tier(10))
        };
        let mut n: EdgeNode<u64> = EdgeNode::new(config, catalog, Lsn(0)).expect("valid");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let read = |n: &mut EdgeNode<u64>, at: Instant| {
            n.handle_execute(at, SessionId(1), &p, &[Some(b"1")]);
            match n.poll_output() {
                Some(NodeOutput::Reply { served, .. }) => served,
                Some(NodeOutput::Upstream(u)) => {
                    let r = UpstreamReply {
                        value: 1,
                        size_bytes: 8,
                        served: Served::Replica,
                        snapshot_lsn: Lsn(1),
                        commit_lsn: None,
                        ttl: None,
                    };
                    n.handle_upstream(at, u.req, Ok(r));
                    while n.poll_output().is_some() {}
                    Served::Replica
                }
                other => panic!("{other:?}"),
            }
        };
        let t0 = Instant::from_millis(1000);
        assert_eq!(read(&mut n, t0), Served::Replica);
        assert_eq!(read(&mut n, t0), Served::Replica, "nothing is served before the stream is heard");
        let keepalive = CdcEvent { prev_lsn: Lsn(0), change: Change { lsn: Lsn(0), targets: Vec::new() } };
        n.unproven(|n| n.handle_cdc(t0, &keepalive));
        assert_eq!(read(&mut n, t0), Served::Replica, "an opening repeated is not news of the stream");
        n.handle_cdc(t0, &keepalive);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(1)), Served::L1);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(3)), Served::Replica, "silent for 3 s: go upstream");
        n.unproven(|n| n.handle_cdc(t0 + Duration::from_secs(3), &keepalive));
        assert_eq!(read(&mut n, t0 + Duration::from_secs(3)), Served::Replica, "nor after a silence");
        n.handle_cdc(t0 + Duration::from_secs(3), &keepalive);
        assert_eq!(read(&mut n, t0 + Duration::from_secs(3)), Served::L1);
        assert!(n.stats().cdc_silent_misses >= 3);
    }
}

#[cfg(test)]
mod restore_tests {
    use crate::cache::{Entry, Eviction, TierConfig};
    use crate::consistency::Consistency;
    use crate::invalidation::{CdcEvent, Change, ChangeTarget, key_hash};
    use crate::node::*;
    use crate::sql::Catalog;
    use crate::{Duration, Instant, Lsn};

    #[test]
    fn restored_entries_answer_until_a_change_invalidates_them() {
        let mut catalog = Catalog::new();
        let items = catalog.set_primary_key("items", "id");
        let tier = |n| TierConfig {
            bytes_max: 1 << 20,
            entries_max: n,
            ttl: Duration::from_secs(60),
            eviction: Eviction::Sieve,
        };
        let mut n: EdgeNode<u64> =
            EdgeNode::new(NodeConfig::new(Zone::Eu, tier(10), tier(10)), catalog, Lsn(0)).expect("valid");
        n.open_session(SessionId(1), "app", "app", Consistency::ReadYourWrites).expect("room");
        let p = n.prepare("SELECT v FROM items WHERE id = $1").expect("lexes");
        let execute = |n: &mut EdgeNode<u64>| {
            n.handle_execute(Instant::ZERO, SessionId(1), &p, &[Some(b"7")]);
            n.poll_output().expect("an output")
        };
        let Some(NodeOutput::Upstream(u)) = Some(execute(&mut n)) else { panic!("a miss") };
        let key = u.cache_key.expect("cacheable");
        assert_eq!(n.pending_fill_key(u.req), Some(key));
        n.handle_upstream(Instant::ZERO, u.req, Err("dropped".into()));
        while n.poll_output().is_some() {}
        assert!(n.context_is_portable(SessionId(1)));
        let entry =
            |value, lsn| Entry { value, lsn: Lsn(lsn), deps: u.deps.clone(), size_bytes: 8, expires_at: Instant::MAX };
        assert!(n.restore_l2(Instant::ZERO, key, entry(1, 10)));
        assert!(matches!(execute(&mut n), NodeOutput::Reply { served: Served::L2, value: 1, .. }));
        n.clear_tier(TierName::L1);
        // a change after the entry's snapshot, re-delivered by the stream
        let change = Change { lsn: Lsn(20), targets: vec![ChangeTarget::Keys(items, vec![key_hash(items, b"7")])] };
        n.handle_cdc(Instant::ZERO, &CdcEvent { prev_lsn: Lsn(0), change });
        assert!(matches!(execute(&mut n), NodeOutput::Upstream(_)));
        assert!(!n.restore_l2(Instant::ZERO, key, entry(1, 15)), "already invalid: refused");
        assert!(n.restore_l2(Instant::ZERO, key, entry(2, 20)));
        n.make_private(SessionId(1));
        assert!(!n.context_is_portable(SessionId(1)), "a private context is this process's own");
    }
}

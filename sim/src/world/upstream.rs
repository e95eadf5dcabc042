//! Requests that leave the site: the regional pool (L3, then a database
//! endpoint) and the way there and back.

use super::*;

fn sleep_ms(ms: f64) -> madsim::time::Sleep {
    madsim::time::sleep(std::time::Duration::from_secs_f64(ms.max(0.0) / 1e3))
}

/// A commit the database acknowledged.
#[derive(Clone, Copy, Debug)]
struct Committed {
    /// Its identity (what the checker knows it by).
    id: Lsn,
    /// Its WAL position (what the site's floor and stream carry).
    pos: Lsn,
    at: Instant,
}

enum DbOutcome {
    Ok {
        /// The state the answer holds (what the checker judges).
        snapshot: Lsn,
        /// The state the pool says it reflects (what the site files it at).
        told: Lsn,
        commit: Option<Committed>,
        served: Served,
        extra_ms: f64,
    },
    /// The request never reached the database: safe to retry.
    Unreachable,
    Refused(String),
}

/// The regional pool: L3, then a database endpoint chosen by the region's
/// router. A pool that cannot reach the primary relays a write (once)
/// through the nearest pool that is up (`relayed`: this is that pool).
async fn region_execute(w: &Shared, region: usize, u: &UpstreamRequest, ctx: OpCtx, relayed: bool) -> DbOutcome {
    let (l3_ms, cost_ms) = {
        let wb = w.borrow();
        let db = &wb.sc.db;
        let cost = match ctx.op {
            Op::Point => db.point_ms,
            Op::Range => db.range_ms,
            Op::Join => db.join_ms,
            Op::Write => db.write_ms,
        };
        (wb.sc.tiers.l3_ms, cost)
    };
    if let Some((v, at)) = w.borrow_mut().l3_lookup(region, u) {
        // the pool says what its answer reflects (the proxy's regional
        // tells it as the answer's LSN): the entry's position
        return DbOutcome::Ok { snapshot: v.lsn, told: at, commit: None, served: Served::L3, extra_ms: l3_ms };
    }
    let write = ctx.op == Op::Write;
    let now = w.borrow().now();
    let routed = {
        let mut wb = w.borrow_mut();
        let r = &mut wb.regions[region];
        match u.route {
            postai_core::node::Route::Primary => r.router.route_write(now),
            postai_core::node::Route::Read { floor } => {
                r.router.route_read(now, ReadRequest { residency: u.residency, floor, strong: false })
            }
        }
    };
    let Ok(endpoint) = routed else {
        // no usable primary from here (its breaker is open)
        return if write && !relayed { Box::pin(relay(w, region, u, ctx)).await } else { DbOutcome::Unreachable };
    };
    let node = endpoint.0 as usize;
    let (oneway, reachable, timeout_ms, slow) = {
        let mut wb = w.borrow_mut();
        let jitter = wb.jitter();
        let r = &wb.regions[region];
        let reachable = wb.db.nodes[node].up && r.cut_from != Some(node);
        (r.db_oneway_ms[node] + jitter, reachable, wb.sc.network.timeout_ms as f64, r.slow_ms)
    };
    if !reachable {
        sleep_ms(timeout_ms).await;
        let now = w.borrow().now();
        w.borrow_mut().regions[region].router.handle_result(now, endpoint, Err(()));
        // the attempt never reached the database: a write may go elsewhere
        return if write && !relayed { Box::pin(relay(w, region, u, ctx)).await } else { DbOutcome::Unreachable };
    }
    let history = w.borrow().regions[region].history;
    sleep_ms(oneway + slow).await;
    if !write {
        let (snapshot, told, served) = {
            let wb = w.borrow();
            let now = wb.now();
            let served = if node == wb.db.primary { Served::Primary } else { Served::Replica };
            let snapshot = wb.db.replay_lsn(node, now);
            (snapshot, wb.db.pos_of(snapshot), served)
        };
        sleep_ms(oneway + slow).await;
        let mut wb = w.borrow_mut();
        let now = wb.now();
        let rtt = 2.0 * (oneway + slow) + cost_ms;
        wb.regions[region].router.handle_result(now, endpoint, Ok(Duration::from_secs_f64(rtt / 1e3)));
        if wb.regions[region].history == history {
            wb.l3_fill(region, u, snapshot, told);
        }
        return DbOutcome::Ok { snapshot, told, commit: None, served, extra_ms: l3_ms + rtt };
    }
    let hop = Hop { region, node, endpoint, oneway, slow, timeout_ms, cost_ms, l3_ms };
    commit(w, &hop, ctx).await
}

/// One attempt's way from a pool to a database node.
struct Hop {
    region: usize,
    node: usize,
    endpoint: postai_core::router::EndpointId,
    oneway: f64,
    slow: f64,
    timeout_ms: f64,
    cost_ms: f64,
    l3_ms: f64,
}

/// A write at the node `hop` reached: committed there, answered once the
/// commit is acknowledged (or refused when it never is).
async fn commit(w: &Shared, hop: &Hop, ctx: OpCtx) -> DbOutcome {
    let Hop { region, node, endpoint, oneway, slow, timeout_ms, cost_ms, l3_ms } = *hop;
    let committed = {
        let mut wb = w.borrow_mut();
        let now = wb.now();
        let epoch = wb.regions[region].epoch;
        let key = if ctx.eu { None } else { Some(ctx.key) };
        match wb.db.write(node, epoch, now, key) {
            Ok((id, pos)) => {
                let table = if ctx.eu { wb.items_eu } else { wb.items };
                let h = key_hash(table, decimal(ctx.key, &mut [0; 20]));
                // the pools' slots are on the primary the others follow: a
                // commit on a node nobody follows reaches no stream
                if node == wb.db.primary {
                    wb.emit_cdc(pos, ChangeTarget::Keys(table, vec![h]));
                }
                Ok((Committed { id, pos, at: now }, wb.db.ack_delay_ms()))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let (c, ack_ms) = match committed {
        Ok(c) => c,
        Err(e) => {
            sleep_ms(oneway).await;
            return DbOutcome::Refused(e);
        }
    };
    // the commit's answer: at once (asynchronous), or once the synchronous
    // standby has it; PostgreSQL keeps the client waiting for it, and the
    // pool gives up at its timeout with the outcome unknown
    let mut waited_ms = ack_ms;
    if ack_ms > 0.0 {
        sleep_ms(ack_ms).await;
    }
    let acked = |w: &Shared| {
        let wb = w.borrow();
        wb.db.acknowledged(node, c.id, wb.now())
    };
    if !acked(w) {
        sleep_ms(timeout_ms - ack_ms).await;
        waited_ms = timeout_ms.max(ack_ms);
        if !acked(w) {
            sleep_ms(oneway).await;
            return DbOutcome::Refused("commit not acknowledged: the synchronous standby never answered".into());
        }
    }
    sleep_ms(oneway + slow).await;
    let mut wb = w.borrow_mut();
    let now = wb.now();
    let rtt = 2.0 * (oneway + slow) + cost_ms + waited_ms;
    wb.regions[region].router.handle_result(now, endpoint, Ok(Duration::from_secs_f64(rtt / 1e3)));
    DbOutcome::Ok { snapshot: c.id, told: c.pos, commit: Some(c), served: Served::Primary, extra_ms: l3_ms + rtt }
}

/// A pool that cannot reach the primary sends the write through the nearest
/// other pool that is up (one hop: that pool does not relay again).
async fn relay(w: &Shared, region: usize, u: &UpstreamRequest, ctx: OpCtx) -> DbOutcome {
    let to = {
        let wb = w.borrow();
        (0..wb.regions.len())
            // pools share what their breakers know of the primary
            .filter(|&r| {
                let router = &wb.regions[r].router;
                r != region && wb.regions[r].up && router.primary().is_some_and(|p| router.is_healthy(p))
            })
            .min_by(|&a, &b| wb.pool_links_ms[region][a].total_cmp(&wb.pool_links_ms[region][b]))
    };
    let Some(to) = to else { return DbOutcome::Unreachable };
    let hop_ms = w.borrow().pool_links_ms[region][to];
    sleep_ms(hop_ms).await;
    let outcome = region_execute(w, to, u, ctx, true).await;
    sleep_ms(hop_ms).await;
    match outcome {
        DbOutcome::Ok { snapshot, told, commit, served, extra_ms } => {
            w.borrow_mut().checker.relayed_writes += 1;
            DbOutcome::Ok { snapshot, told, commit, served, extra_ms: extra_ms + 2.0 * hop_ms }
        }
        other => other,
    }
}

/// What a site got back from its region.
struct Answer {
    /// What the answer holds.
    value: Val,
    /// What the region says it reflects.
    told: Lsn,
    served: Served,
    commit: Option<Committed>,
    /// The round trip, waits and retries included.
    ms: f64,
}

/// Carries one upstream request from a site to a region and back.
pub async fn upstream(w: Shared, site: usize, u: UpstreamRequest) {
    let Some(ctx) = w.borrow_mut().inflight[site].remove(&u.req) else { return };
    let result = attempt_regions(&w, site, &u, ctx).await;
    let mut wb = w.borrow_mut();
    let now = wb.now();
    match result {
        Ok(Answer { value, told, served, commit, ms: up_ms }) => {
            let ms = ctx.base_ms + up_ms;
            let reply = UpstreamReply {
                value,
                size_bytes: wb.sc.tiers.entry_bytes,
                served,
                snapshot_lsn: told,
                commit_lsn: commit.map(|c| c.pos),
                ttl: None,
            };
            let node = &mut wb.sites[site].node;
            node.handle_upstream(now, u.req, Ok(reply));
            while let Some(out) = node.poll_output() {
                if let NodeOutput::Failed { .. } = out {
                    wb.fail(ctx, now);
                    return;
                }
            }
            if ctx.op == Op::Write {
                let (lsn, committed) = commit.map_or((value.lsn, now), |c| (c.id, c.at));
                wb.acknowledge((!ctx.eu).then_some(ctx.key), lsn, committed, now);
                if !ctx.eu {
                    let sess = &mut wb.sites[site].sessions[ctx.session];
                    sess.writes.push_back((ctx.key, lsn, now));
                    if sess.writes.len() > 16 {
                        sess.writes.pop_front();
                    }
                }
                let zone = wb.sites[site].place.zone;
                wb.checker.observe(ctx.started, now, true, true, zone, true);
                if wb.checker.measured(ctx.started) {
                    wb.checker.write_ok += 1;
                    wb.checker.writes.record_ms(ms);
                    wb.checker.writes_by_zone.entry(zone).or_default().record_ms(ms);
                }
            } else {
                wb.checker.upstream_reads += u64::from(wb.checker.measured(ctx.started));
                wb.complete_read(ctx, served, value.lsn, ms);
            }
        }
        Err(e) => {
            let node = &mut wb.sites[site].node;
            node.handle_upstream(now, u.req, Err(e));
            while node.poll_output().is_some() {}
            wb.fail(ctx, now);
        }
    }
}

/// The request's attempts at the site's regions, as the site's router
/// picks them, until one answers or the site gives up: the answer, where
/// it was served, the commit (for a write) and the milliseconds it took.
async fn attempt_regions(w: &Shared, site: usize, u: &UpstreamRequest, ctx: OpCtx) -> Result<Answer, String> {
    let (timeout_ms, hold_ms) = {
        let wb = w.borrow();
        (
            wb.sc.network.timeout_ms as f64,
            wb.sc.db.heartbeat_timeout_ms as f64 + 3.0 * wb.sc.db.promote_ms as f64 + 5_000.0,
        )
    };
    let mut waited_ms = 0.0;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let pick = w.borrow_mut().pick_region(site, u.residency);
        let Some((region, oneway)) = pick else {
            // every region's breaker is open: wait for a half-open probe
            if waited_ms > hold_ms {
                return Err("no region reachable".into());
            }
            sleep_ms(200.0).await;
            waited_ms += 200.0;
            continue;
        };
        // the draws in the order they were made before loss was modelled
        // (reachability, then jitter), so that runs without loss keep theirs
        let reachable = w.borrow().region_reachable(region);
        let (jitter, resent_ms) = if reachable {
            let mut wb = w.borrow_mut();
            let jitter = wb.jitter();
            (jitter, [wb.resent_ms(2.0 * oneway), wb.resent_ms(2.0 * oneway)])
        } else {
            (0.0, [0.0; 2])
        };
        // a request still being resent when the site's timeout fires was not
        // delivered: the site gives up on it and tries again (a late answer
        // to a delivered request is waited for)
        if !reachable || (resent_ms[0] > 0.0 && oneway + jitter + resent_ms[0] >= timeout_ms) {
            sleep_ms(timeout_ms).await;
            waited_ms += timeout_ms;
            w.borrow_mut().region_result(site, region, Err(()));
            if waited_ms > hold_ms || attempts > 50 {
                return Err("region unreachable".into());
            }
            continue;
        }
        sleep_ms(oneway + jitter + resent_ms[0]).await;
        let outcome = region_execute(w, region, u, ctx, false).await;
        sleep_ms(oneway + jitter + resent_ms[1]).await;
        let lost_ms = resent_ms[0] + resent_ms[1];
        match outcome {
            DbOutcome::Ok { snapshot, told, commit, served, extra_ms } => {
                let ms = waited_ms + 2.0 * (oneway + jitter) + lost_ms + extra_ms;
                // the site's router weighs the way to the region, not what
                // the region did with the request (a write's trip to the
                // primary is not the region being far)
                w.borrow_mut().region_result(site, region, Ok(Duration::from_secs_f64((2.0 * oneway + lost_ms) / 1e3)));
                return Ok(Answer { value: Val { lsn: snapshot }, told, served, commit, ms });
            }
            DbOutcome::Unreachable => {
                // no database endpoint: hold the request (like PgBouncer's PAUSE)
                // until failover re-points the routes, then retry
                if waited_ms > hold_ms {
                    return Err("no database endpoint".into());
                }
                sleep_ms(250.0).await;
                waited_ms += 250.0 + 2.0 * oneway + lost_ms;
            }
            DbOutcome::Refused(e) => {
                if waited_ms > hold_ms {
                    return Err(e);
                }
                // a fenced or stale primary: wait for the new routes
                sleep_ms(250.0).await;
                waited_ms += 250.0 + 2.0 * oneway + lost_ms;
            }
        }
    }
}

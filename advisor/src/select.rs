//! Recommend across the whole workload: each candidate is tried as a
//! hypothetical index (HypoPG) beside the ones chosen so far, every
//! statement on its table planned again, and the candidate whose read time
//! saved, less its write cost, is largest is chosen next while the storage
//! budget allows; none is chosen whose net is not positive (no fixed
//! "50 % faster" threshold: a 20 % gain on a statement that runs all day
//! counts).

use serde::Serialize;
use tokio_postgres::Client;

use crate::candidates::Candidate;
use crate::capture::Workload;
use crate::db::{AdvisorError, exec, literal, num, rows};
use crate::plan::generic_plan;

/// The statements the selection weighs: their generic plans' costs now.
#[derive(Clone, Debug)]
pub struct Costed {
    pub index: usize,
    /// (schema, table) the plan reads or writes.
    pub tables: Vec<(String, String)>,
    pub cost: f64,
}

/// A chosen index and what it is expected to do.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub candidate: Candidate,
    pub ddl: String,
    /// Estimated bytes (HypoPG).
    pub bytes: f64,
    /// Database time saved over the statistics' window, in ms, estimated
    /// from the plans' costs (calls x mean time x the cost's fall).
    pub read_ms_saved: f64,
    /// Index maintenance over the same window, in ms (writes x entry cost,
    /// plus updates that stop being HOT).
    pub write_ms_cost: f64,
    /// Statements whose plan got cheaper: (statement index, cost before, with it).
    pub helps: Vec<(usize, f64, f64)>,
    /// Updates of the table that would no longer be HOT (an updated column is indexed).
    pub breaks_hot: bool,
}

/// A statement counts as helped when its plan's cost falls by this much
/// at least (a smaller fall is within the estimate's error).
pub const MIN_COST_FALL: f64 = 0.1;
/// An index is worth proposing when its net saving is at least this share
/// of the workload's time (an index that saves 0.5 ms a day is storage and
/// upkeep for nothing); there is no threshold per statement beyond
/// [`MIN_COST_FALL`], as Dexter's 50 % is.
pub const MIN_SHARE: f64 = 0.001;

/// The selection's knobs.
#[derive(Clone, Debug)]
pub struct Budget {
    pub bytes: f64,
    /// Estimated cost of one index entry written, in ms.
    pub entry_ms: f64,
}

/// The UPDATE statements of the workload on `table`: (the columns each
/// sets, the rows it updated over the window).
pub fn updates_of(w: &Workload, table: &str) -> Vec<(Vec<String>, f64)> {
    let mut out = Vec::new();
    for s in &w.statements {
        let q = crate::plan::inner_statement(&s.query).to_ascii_lowercase();
        let Some(rest) = q.trim_start().strip_prefix("update ") else { continue };
        let name = rest.split_whitespace().next().unwrap_or("").trim_matches('"');
        if name.rsplit('.').next() != Some(&table.to_ascii_lowercase()) {
            continue;
        }
        let Some(set) = rest.split_once(" set ").map(|x| x.1) else { continue };
        let set = set.split(" where ").next().unwrap_or(set);
        let cols =
            set.split(',').filter_map(|p| p.split_once('=')).map(|(c, _)| c.trim().trim_matches('"').to_string());
        out.push((cols.collect(), s.rows));
    }
    out
}

/// Write cost of an index on `c` over the window, in ms, and whether it
/// breaks HOT updates. Every insert, delete and non-HOT update writes an
/// entry in it; an update that sets one of its columns can no longer be
/// HOT, and then writes an entry in every index of the table. Those rows
/// are the workload's own UPDATE statements' (pg_stat_statements counts
/// them as they end; the table's HOT counters may lag a second).
fn write_cost(c: &Candidate, w: &Workload, b: &Budget) -> (f64, bool) {
    let Some(t) = w.table(&c.schema, &c.table) else { return (0.0, false) };
    let entries = t.inserts + t.deletes + (t.updates - t.hot_updates).max(0.0);
    let sets_it =
        |cols: &Vec<String>| c.columns.iter().chain(&c.include).any(|col| cols.contains(&col.to_ascii_lowercase()));
    let rows: f64 = updates_of(w, &c.table).iter().filter(|(cols, _)| sets_it(cols)).map(|(_, rows)| rows).sum();
    let indexes = w.indexes_of(&c.schema, &c.table).count() as f64 + 1.0;
    ((entries + rows * indexes) * b.entry_ms, rows > 0.0)
}

/// What the selection chose, best first, and what it declined: candidates
/// that would help some statement but whose write cost is larger than the
/// read time they save, or that did not fit in the budget (as evaluated
/// beside the chosen ones), largest saving first.
#[derive(Debug, Default)]
pub struct Selection {
    pub chosen: Vec<Choice>,
    pub declined: Vec<Choice>,
}

/// `fixed`: indexes already decided (kept by verification in an earlier
/// round): the statements' costs start with them, and they count against
/// the budget. `candidates` are the ones still open.
pub async fn select(
    client: &Client,
    w: &Workload,
    costed: &[Costed],
    candidates: &[Candidate],
    budget: &Budget,
    fixed: &[Choice],
) -> Result<Selection, AdvisorError> {
    let mut current = costs_with(client, w, costed, fixed).await?;
    let workload_ms: f64 = w.statements.iter().map(|s| s.total_ms).sum();
    let used = fixed.iter().map(|c| c.bytes).sum::<f64>();
    let (mut chosen, mut left, mut used) = (fixed.to_vec(), candidates.to_vec(), used);
    let mut declined;
    loop {
        let mut best: Option<(Choice, Vec<f64>)> = None;
        let mut round = Vec::new();
        for c in &left {
            let (choice, costs) = try_candidate(client, w, costed, &current, &chosen, c, budget).await?;
            let net = choice.read_ms_saved - choice.write_ms_cost;
            let better = best.as_ref().is_none_or(|(b, _)| net > b.read_ms_saved - b.write_ms_cost);
            let material = net > 0.0 && net >= MIN_SHARE * workload_ms;
            if material && !choice.helps.is_empty() && used + choice.bytes <= budget.bytes && better {
                best = Some((choice.clone(), costs));
            }
            if !choice.helps.is_empty() {
                round.push(choice);
            }
        }
        let Some((choice, costs)) = best else {
            declined = round;
            break;
        };
        used += choice.bytes;
        left.retain(|c| *c != choice.candidate);
        current = costs;
        chosen.push(choice);
    }
    exec(client, "SELECT hypopg_reset()").await?;
    declined.sort_by(|a, b| b.read_ms_saved.total_cmp(&a.read_ms_saved));
    chosen.drain(..fixed.len());
    Ok(Selection { chosen, declined })
}

/// The statements' plan costs with `indexes` (hypothetical) in place.
async fn costs_with(
    client: &Client,
    w: &Workload,
    costed: &[Costed],
    indexes: &[Choice],
) -> Result<Vec<f64>, AdvisorError> {
    if indexes.is_empty() {
        return Ok(costed.iter().map(|c| c.cost).collect());
    }
    exec(client, "SELECT hypopg_reset()").await?;
    for ch in indexes {
        rows(client, &format!("SELECT * FROM hypopg_create_index({})", literal(&ch.ddl))).await?;
    }
    let mut out = Vec::with_capacity(costed.len());
    for s in costed {
        let plan = generic_plan(client, &w.statements[s.index]).await;
        out.push(plan.map_or(s.cost, |p| p.total_cost.min(s.cost)));
    }
    Ok(out)
}

/// `c` as a hypothetical index beside the chosen ones: its size, the
/// statements' costs with it, the time it saves and costs.
async fn try_candidate(
    client: &Client,
    w: &Workload,
    costed: &[Costed],
    current: &[f64],
    chosen: &[Choice],
    c: &Candidate,
    budget: &Budget,
) -> Result<(Choice, Vec<f64>), AdvisorError> {
    exec(client, "SELECT hypopg_reset()").await?;
    for ch in chosen {
        rows(client, &format!("SELECT * FROM hypopg_create_index({})", literal(&ch.ddl))).await?;
    }
    let ddl = c.ddl(None);
    let sql =
        format!("SELECT indexrelid, hypopg_relation_size(indexrelid) FROM hypopg_create_index({})", literal(&ddl));
    let Ok(made) = rows(client, &sql).await else {
        // HypoPG refuses it (a type without a B-tree operator class, say): it helps nothing
        let (read_ms_saved, write_ms_cost, bytes) = (0.0, 0.0, 0.0);
        let choice =
            Choice { candidate: c.clone(), ddl, bytes, read_ms_saved, write_ms_cost, helps: vec![], breaks_hot: false };
        return Ok((choice, current.to_vec()));
    };
    let bytes = made.first().map_or(0.0, |r| num(r, 1));
    let mut costs = current.to_vec();
    let (mut saved, mut helps) = (0.0, Vec::new());
    for (i, s) in costed.iter().enumerate() {
        if !s.tables.iter().any(|(sc, t)| *sc == c.schema && *t == c.table) {
            continue;
        }
        let st = &w.statements[s.index];
        let Ok(plan) = generic_plan(client, st).await else { continue };
        if plan.total_cost < current[i] * (1.0 - MIN_COST_FALL) {
            // the time it takes now, scaled by how much cheaper its plan gets
            let now_ms = st.total_ms * current[i] / s.cost.max(1e-9);
            saved += now_ms * (1.0 - plan.total_cost / current[i]);
            helps.push((s.index, current[i], plan.total_cost));
            costs[i] = plan.total_cost;
        }
    }
    let (write_ms_cost, breaks_hot) = write_cost(c, w, budget);
    let choice = Choice { candidate: c.clone(), ddl, bytes, read_ms_saved: saved, write_ms_cost, helps, breaks_hot };
    Ok((choice, costs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Statement;

    #[test]
    fn updates_come_from_the_workloads_update_statements() {
        let st = |q: &str| Statement {
            queryid: String::new(),
            query: q.into(),
            calls: 1.0,
            total_ms: 1.0,
            mean_ms: 1.0,
            rows: 1.0,
            user_code: None,
        };
        let w = Workload {
            statements: vec![
                st("UPDATE orders SET status = $1, \"note\" = $2 WHERE id = $3"),
                st("update public.orders set total = total + $1 where id = $2"),
                st("UPDATE customers SET name = $1 WHERE id = $2"),
            ],
            ..Workload::default()
        };
        let set: Vec<String> = updates_of(&w, "orders").into_iter().flat_map(|(cols, _)| cols).collect();
        assert_eq!(set, vec!["status", "note", "total"]);
    }
}

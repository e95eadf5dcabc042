//! The reference the benchmark compares with: Dexter's published algorithm
//! and thresholds (github.com/ankane/dexter, README "How it works"), on the
//! same captured workload and generic plans the advisor uses:
//! - per statement, only plans of cost 100 or more;
//! - hypothetical single-column indexes on the columns the statement
//!   filters, joins and sorts on, then two-column indexes over them;
//! - the cheapest plan's index is suggested when it lowers the cost by 50 %
//!   or more; an index an existing B-tree already leads with is skipped;
//! - no model of write cost and no storage budget: the suggestions of every
//!   statement, together.

use tokio_postgres::Client;

use crate::candidates::{Candidate, candidates};
use crate::capture::Workload;
use crate::db::{AdvisorError, exec, literal, rows};
use crate::plan::{Node, generic_plan};

/// Dexter's thresholds.
pub const MIN_COST: f64 = 100.0;
pub const MIN_SAVINGS: f64 = 0.5;

/// Dexter's suggestions for the workload.
pub async fn suggest(client: &Client, w: &Workload, plans: &[Option<Node>]) -> Result<Vec<Candidate>, AdvisorError> {
    let mut out: Vec<Candidate> = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let Some(plan) = plan.as_ref().filter(|p| p.total_cost >= MIN_COST) else { continue };
        // its single and two-column candidates (no covering variants, which Dexter does not make)
        let mut tried: Vec<Candidate> = candidates(plan, w).into_iter().filter(|c| c.include.is_empty()).collect();
        tried.retain(|c| c.columns.len() <= 2);
        let mut best: Option<(f64, Candidate)> = None;
        for c in tried {
            exec(client, "SELECT hypopg_reset()").await?;
            rows(client, &format!("SELECT * FROM hypopg_create_index({})", literal(&c.ddl(None)))).await?;
            let Ok(p) = generic_plan(client, &w.statements[i]).await else { continue };
            if best.as_ref().is_none_or(|(cost, _)| p.total_cost < *cost) {
                best = Some((p.total_cost, c));
            }
        }
        if let Some((cost, c)) = best
            && cost <= plan.total_cost * (1.0 - MIN_SAVINGS)
            && !out.contains(&c)
        {
            out.push(c);
        }
    }
    exec(client, "SELECT hypopg_reset()").await?;
    Ok(out)
}

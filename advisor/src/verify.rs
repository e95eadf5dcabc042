//! Verify before proposing: a chosen index is built for real (on a scratch
//! copy of the database, or wherever the caller points), and every
//! statement it is expected to help runs with representative values
//! before and after; writes on its table run inside a transaction that is
//! rolled back. An index that makes any of them slower is withdrawn.

use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::candidates::predicates_by_table;
use crate::capture::Workload;
use crate::db::{AdvisorError, exec, ident, literal, rows, text};
use crate::plan::{Node, paging_params, param_count, stored_params};
use crate::select::Choice;

/// Runs per statement and side; the median counts.
pub const RUNS: usize = 7;
/// Slower than before by more than this fraction (and [`NOISE_MS`]): withdrawn.
pub const SLOWER: f64 = 0.2;
pub const NOISE_MS: f64 = 0.2;

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub statement: usize,
    pub before_ms: f64,
    pub after_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub timings: Vec<Timing>,
    /// Statements that could not run: no representative value for a parameter.
    pub unverified: Vec<usize>,
    /// The statements it made slower (then it is withdrawn).
    pub slower: Vec<usize>,
}

impl Verdict {
    pub fn kept(&self) -> bool {
        self.slower.is_empty() && !self.timings.is_empty()
    }
}

/// Representative values for a statement's parameters, as SQL literals: a
/// value of the column each is compared with or stored into, read from the
/// table; 20 rows for a LIMIT, 0 for an OFFSET (`None` when a parameter
/// is none of these).
async fn values(client: &Client, query: &str, plan: &Node, w: &Workload) -> Result<Option<Vec<String>>, AdvisorError> {
    let n = param_count(query);
    let mut out = vec![None; n];
    for (i, v) in paging_params(query) {
        if (1..=n).contains(&i) {
            out[i - 1] = Some(v.to_string());
        }
    }
    let stored = stored_params(query);
    // (column, parameter, whether an array) on each table
    let mut wanted: Vec<((String, String), String, usize, bool)> = Vec::new();
    for (table, preds) in predicates_by_table(plan) {
        wanted.extend(preds.into_iter().filter_map(|p| Some((table.clone(), p.column, p.param?, p.array))));
    }
    let written = plan
        .walk()
        .into_iter()
        .find(|x| x.node_type == "ModifyTable")
        .and_then(|m| m.schema.clone().zip(m.relation.clone()));
    if let Some(table) = written {
        wanted.extend(stored_params(query).into_iter().map(|(i, c)| (table.clone(), c, i, false)));
    }
    for ((schema, table), column, i, array) in wanted {
        if !(1..=n).contains(&i) || out[i - 1].is_some() {
            continue;
        }
        let live = w.table(&schema, &table).map_or(0.0, |t| t.live_rows);
        match sample(client, &schema, &table, &column, live).await? {
            Some(v) => {
                out[i - 1] = Some(literal(&if array { format!("{{\"{}\"}}", v.replace('"', "\\\"")) } else { v }))
            }
            // a column with no value yet: what a write stores may be NULL
            None if stored.iter().any(|(j, c)| *j == i && *c == column) => out[i - 1] = Some("NULL".into()),
            None => {}
        }
    }
    Ok(out.into_iter().collect())
}

/// A value of `column` from a row in the table's middle (not its first pages).
async fn sample(
    client: &Client,
    schema: &str,
    table: &str,
    column: &str,
    live: f64,
) -> Result<Option<String>, AdvisorError> {
    let offset = (live * 0.37) as u64 % 100_000;
    for off in [offset, 0] {
        let sql = format!(
            "SELECT {c}::text FROM {}.{} WHERE {c} IS NOT NULL OFFSET {off} LIMIT 1",
            ident(schema),
            ident(table),
            c = ident(column)
        );
        if let Some(r) = rows(client, &sql).await?.first() {
            return Ok(Some(text(r, 0)));
        }
    }
    Ok(None)
}

/// The median time of `RUNS` executions of the prepared statement.
async fn time(client: &Client, args: &str, write: bool) -> Result<f64, AdvisorError> {
    let run = format!("EXECUTE postai_verify{args}");
    let mut ms = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        if write {
            exec(client, "BEGIN").await?;
        }
        let t = Instant::now();
        let r = exec(client, &run).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if write {
            exec(client, "ROLLBACK").await?;
        }
        r?;
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[RUNS / 2])
}

/// Times each statement in `which` on `client`: (statement, median ms);
/// statements without representative values are returned apart.
async fn time_all(
    client: &Client,
    w: &Workload,
    plans: &[Option<Node>],
    which: &[usize],
) -> Result<(Vec<(usize, f64)>, Vec<usize>), AdvisorError> {
    let (mut out, mut unverified) = (Vec::new(), Vec::new());
    for &i in which {
        let (st, Some(plan)) = (&w.statements[i], &plans[i]) else { continue };
        let Some(vals) = values(client, &st.query, plan, w).await? else {
            unverified.push(i);
            continue;
        };
        let args = if vals.is_empty() { String::new() } else { format!("({})", vals.join(", ")) };
        let _ = exec(client, "DEALLOCATE postai_verify").await;
        if exec(client, &format!("PREPARE postai_verify AS {}", st.query)).await.is_err() {
            unverified.push(i);
            continue;
        }
        let write = !st.query.trim_start().to_ascii_lowercase().starts_with("select");
        let ms = time(client, &args, write).await;
        let _ = exec(client, "DEALLOCATE postai_verify").await;
        match ms {
            Ok(ms) => out.push((i, ms)),
            Err(_) => unverified.push(i),
        }
    }
    Ok((out, unverified))
}

/// Builds `choice` on `client` (a scratch copy), times the statements it
/// helps and the writes on its table before and after, drops it again.
pub async fn verify(
    client: &Client,
    w: &Workload,
    plans: &[Option<Node>],
    choice: &Choice,
) -> Result<Verdict, AdvisorError> {
    let mut which: Vec<usize> = choice.helps.iter().map(|h| h.0).collect();
    for (i, s) in w.statements.iter().enumerate() {
        let q = s.query.to_ascii_lowercase();
        let writes = ["update", "delete", "insert"].iter().any(|k| q.trim_start().starts_with(k));
        if writes && q.contains(&choice.candidate.table.to_ascii_lowercase()) && !which.contains(&i) {
            which.push(i);
        }
    }
    let (before, mut unverified) = time_all(client, w, plans, &which).await?;
    let name = "postai_verify_index";
    exec(client, &format!("DROP INDEX IF EXISTS {}.{}", ident(&choice.candidate.schema), ident(name))).await?;
    exec(client, &choice.candidate.ddl(Some(name))).await?;
    let after = time_all(client, w, plans, &which).await;
    exec(client, &format!("DROP INDEX IF EXISTS {}.{}", ident(&choice.candidate.schema), ident(name))).await?;
    let (after, more) = after?;
    unverified.extend(more);
    let mut timings = Vec::new();
    for (i, b) in before {
        if let Some((_, a)) = after.iter().find(|(j, _)| *j == i) {
            timings.push(Timing { statement: i, before_ms: b, after_ms: *a });
        }
    }
    let slower = slower(&timings);
    unverified.sort_unstable();
    unverified.dedup();
    Ok(Verdict { timings, unverified, slower })
}

/// The statements the index made slower: past [`SLOWER`] and [`NOISE_MS`].
pub fn slower(timings: &[Timing]) -> Vec<usize> {
    timings.iter().filter(|t| t.after_ms > t.before_ms * (1.0 + SLOWER) + NOISE_MS).map(|t| t.statement).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_that_slows_any_statement_is_withdrawn() {
        let t = |statement, before_ms, after_ms| Timing { statement, before_ms, after_ms };
        let helped = vec![t(0, 10.0, 0.2), t(1, 0.15, 0.3)];
        assert!(slower(&helped).is_empty(), "within the noise of a fast statement");
        let v = Verdict { timings: helped, unverified: vec![], slower: vec![] };
        assert!(v.kept());
        let hurt = vec![t(0, 10.0, 0.2), t(1, 4.0, 9.0)];
        assert_eq!(slower(&hurt), vec![1]);
        let v = Verdict { slower: slower(&hurt), timings: hurt, unverified: vec![] };
        assert!(!v.kept());
        assert!(!Verdict { timings: vec![], unverified: vec![0], slower: vec![] }.kept(), "nothing could run");
    }
}

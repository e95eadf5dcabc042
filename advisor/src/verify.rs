//! Verify before proposing: a chosen index is built for real (on a scratch
//! copy of the database, or wherever the caller points) beside the ones
//! kept before it, and every statement it is expected to help runs with
//! representative values before and after; writes on its table run inside
//! a transaction that is rolled back. An index that makes any of them
//! slower, or none of those it was chosen for faster, is withdrawn.

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
    /// The parameters it ran with (SQL literals).
    pub values: String,
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
    /// The statements it was chosen for that ran at least [`FASTER`] faster
    /// with it (none: withdrawn, its gain did not appear).
    pub faster: Vec<usize>,
}

/// A gain that counts: faster by this fraction at least.
pub const FASTER: f64 = 0.1;

impl Verdict {
    pub fn kept(&self) -> bool {
        self.slower.is_empty() && !self.faster.is_empty()
    }
}

/// Representative values for a statement's parameters, as SQL literals: a
/// value of the column each is compared with or stored into, read from the
/// table; 20 rows for a LIMIT, 0 for an OFFSET. Up to three variants: a
/// row from the table's middle, and the most and the least common of the
/// values the column's statistics list (a plan can be right for one and
/// wrong for another). `None` when a parameter is none of these.
async fn values(client: &Client, query: &str, plan: &Node, w: &Workload) -> Result<Option<Vec<String>>, AdvisorError> {
    let n = param_count(query);
    if n > crate::plan::PARAMS_MAX {
        return Ok(None);
    }
    let mut out: Vec<Vec<String>> = vec![Vec::new(); n];
    for (i, v) in paging_params(query) {
        if (1..=n).contains(&i) {
            out[i - 1] = vec![v.to_string()];
        }
    }
    let stored = stored_params(query);
    // (column, parameter, whether an array) on each table
    let mut wanted: Vec<((String, String), String, usize, bool)> = Vec::new();
    for (table, preds) in predicates_by_table(plan) {
        // a range with both bounds as parameters: a stretch of about 1 % of
        // the rows between two neighbouring bounds of the column's histogram
        // (one value for both would select nothing)
        for col in preds.iter().map(|p| &p.column) {
            let side =
                |low: bool| preds.iter().find(|p| p.column == *col && p.lower == Some(low)).and_then(|p| p.param);
            if let (Some(lo), Some(hi)) = (side(true), side(false))
                && (1..=n).contains(&lo)
                && (1..=n).contains(&hi)
                && out[lo - 1].is_empty()
                && let Some((a, b)) = neighbours(client, &table.0, &table.1, col).await?
            {
                out[lo - 1] = vec![literal(&a)];
                out[hi - 1] = vec![literal(&b)];
            }
        }
        wanted.extend(preds.into_iter().filter_map(|p| Some((table.clone(), p.column, p.param?, p.array))));
    }
    let written = plan
        .walk()
        .into_iter()
        .find(|x| x.node_type == "ModifyTable")
        .and_then(|m| m.schema.clone().zip(m.relation.clone()));
    if let Some(table) = written.clone() {
        let names = columns(client, &table.0, &table.1).await?;
        for (i, c) in &stored {
            // `#k`: the k-th column of the table (an INSERT without a column list)
            let c = match c.strip_prefix('#').and_then(|k| k.parse::<usize>().ok()) {
                Some(k) => k.checked_sub(1).and_then(|k| names.get(k)).cloned().unwrap_or_default(),
                None => c.clone(),
            };
            wanted.push((table.clone(), c, *i, false));
        }
    }
    for ((schema, table), column, i, array) in wanted {
        if !(1..=n).contains(&i) || !out[i - 1].is_empty() {
            continue;
        }
        let live = w.table(&schema, &table).map_or(0.0, |t| t.live_rows);
        let got = samples(client, &schema, &table, &column, live).await?;
        let quote =
            |v: &String| literal(&if array { format!("{{\"{}\"}}", v.replace('"', "\\\"")) } else { v.clone() });
        out[i - 1] = got.iter().map(quote).collect();
        if out[i - 1].is_empty() && stored.iter().any(|(j, c)| *j == i && *c == column) {
            // a column with no value yet: what a write stores may be NULL
            out[i - 1] = vec!["NULL".into()];
        }
    }
    if written.is_some() {
        // a write's other constants (pg_stat_statements made them `$n`):
        // what it stores matters little to what its index entries cost
        for v in out.iter_mut().filter(|v| v.is_empty()) {
            *v = vec!["'1'".into()];
        }
    }
    if out.iter().any(Vec::is_empty) {
        return Ok(None);
    }
    let variants = out.iter().map(Vec::len).max().unwrap_or(1);
    Ok(Some(
        (0..variants)
            .map(|k| {
                let args: Vec<&str> = out.iter().map(|vs| vs.get(k).unwrap_or(&vs[0]).as_str()).collect();
                if args.is_empty() { String::new() } else { format!("({})", args.join(", ")) }
            })
            .collect(),
    ))
}

/// The table's columns in order.
async fn columns(client: &Client, schema: &str, table: &str) -> Result<Vec<String>, AdvisorError> {
    let sql = format!(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n \
         ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
        literal(schema),
        literal(table)
    );
    Ok(rows(client, &sql).await?.iter().map(|r| text(r, 0)).collect())
}

/// Two neighbouring bounds of `column`'s histogram, a little past its middle.
async fn neighbours(
    client: &Client,
    schema: &str,
    table: &str,
    column: &str,
) -> Result<Option<(String, String)>, AdvisorError> {
    let sql = format!(
        "SELECT h[1 + array_upper(h, 1) * 37 / 100], h[2 + array_upper(h, 1) * 37 / 100] FROM \
         (SELECT histogram_bounds::text::text[] AS h FROM pg_stats WHERE schemaname = {} AND tablename = {} \
          AND attname = {}) s",
        literal(schema),
        literal(table),
        literal(column)
    );
    let r = rows(client, &sql).await?;
    Ok(r.first().and_then(|r| Some((r.first()?.clone()?, r.get(1)?.clone()?))))
}

/// Values of `column`: from a row in the table's middle (not its first
/// pages), and the most and least common values its statistics list.
async fn samples(
    client: &Client,
    schema: &str,
    table: &str,
    column: &str,
    live: f64,
) -> Result<Vec<String>, AdvisorError> {
    let mut out = Vec::new();
    let offset = (live * 0.37) as u64 % 100_000;
    for off in [offset, 0] {
        let sql = format!(
            "SELECT {c}::text FROM {}.{} WHERE {c} IS NOT NULL OFFSET {off} LIMIT 1",
            ident(schema),
            ident(table),
            c = ident(column)
        );
        if let Some(r) = rows(client, &sql).await?.first() {
            out.push(text(r, 0));
            break;
        }
    }
    // the most and the least common of the values the statistics list
    let sql = format!(
        "SELECT v[1], v[array_upper(v, 1)] FROM (SELECT most_common_vals::text::text[] AS v FROM pg_stats \
         WHERE schemaname = {} AND tablename = {} AND attname = {}) s",
        literal(schema),
        literal(table),
        literal(column)
    );
    for r in rows(client, &sql).await? {
        for v in r.into_iter().flatten() {
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// The median time of `RUNS` executions of the prepared statement, each in
/// a transaction rolled back (a write leaves nothing; a read is the same).
async fn time(client: &Client, args: &str) -> Result<f64, AdvisorError> {
    let run = format!("EXECUTE postai_verify{args}");
    let mut ms = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        exec(client, "BEGIN").await?;
        let t = Instant::now();
        let r = exec(client, &run).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        exec(client, "ROLLBACK").await?;
        r?;
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[RUNS / 2])
}

/// Times each statement in `which` with each variant of its values:
/// (statement, values, median ms); statements without representative
/// values, or that fail, are returned apart.
async fn time_all(
    client: &Client,
    w: &Workload,
    plans: &[Option<Node>],
    which: &[usize],
) -> Result<(Vec<(usize, String, f64)>, Vec<usize>), AdvisorError> {
    let (mut out, mut unverified) = (Vec::new(), Vec::new());
    for &i in which {
        let (st, Some(plan)) = (&w.statements[i], &plans[i]) else { continue };
        // (a value that cannot be read, a column spelled otherwise: unverified, not fatal)
        let Ok(Some(variants)) = values(client, &st.query, plan, w).await else {
            unverified.push(i);
            continue;
        };
        let _ = exec(client, "DEALLOCATE postai_verify").await;
        if crate::plan::prepare(client, "postai_verify", st).await.is_err() {
            unverified.push(i);
            continue;
        }
        for args in variants {
            match time(client, &args).await {
                Ok(ms) => out.push((i, args, ms)),
                Err(_) => unverified.push(i),
            }
        }
        let _ = exec(client, "DEALLOCATE postai_verify").await;
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
    name: &str,
) -> Result<Verdict, AdvisorError> {
    let mut which: Vec<usize> = choice.helps.iter().map(|h| h.0).collect();
    let c = &choice.candidate;
    for (i, plan) in plans.iter().enumerate() {
        // the writes on its table: each pays for the new index's entries
        let writes = plan.iter().flat_map(|p| p.walk()).any(|n| {
            n.node_type == "ModifyTable"
                && n.schema.as_deref() == Some(&c.schema)
                && n.relation.as_deref() == Some(&c.table)
        });
        if writes && !which.contains(&i) {
            which.push(i);
        }
    }
    // a statement that would run for long is cut short (and left unverified)
    exec(client, "SET statement_timeout = '30s'").await?;
    let (before, mut unverified) = time_all(client, w, plans, &which).await?;
    exec(client, &format!("DROP INDEX IF EXISTS {}.{}", ident(&c.schema), ident(name))).await?;
    // (building the index may take longer than a statement may)
    exec(client, "SET statement_timeout = 0").await?;
    exec(client, &c.ddl(Some(name))).await?;
    exec(client, "SET statement_timeout = '30s'").await?;
    let (after, more) = time_all(client, w, plans, &which).await?;
    unverified.extend(more);
    let mut timings = Vec::new();
    for (i, values, b) in before {
        if let Some((_, _, a)) = after.iter().find(|(j, v, _)| *j == i && *v == values) {
            timings.push(Timing { statement: i, values, before_ms: b, after_ms: *a });
        }
    }
    let mut slower = slower(&timings);
    slower.dedup();
    let mut faster: Vec<usize> = timings
        .iter()
        .filter(|t| choice.helps.iter().any(|h| h.0 == t.statement) && t.after_ms < t.before_ms * (1.0 - FASTER))
        .map(|t| t.statement)
        .collect();
    faster.dedup();
    unverified.sort_unstable();
    unverified.dedup();
    Ok(Verdict { timings, unverified, slower, faster })
}

/// Drops the index [`verify`] built under `name`.
pub async fn drop_built(client: &Client, schema: &str, name: &str) -> Result<(), AdvisorError> {
    exec(client, &format!("DROP INDEX IF EXISTS {}.{}", ident(schema), ident(name))).await
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
        let t = |statement, before_ms, after_ms| Timing { statement, values: String::new(), before_ms, after_ms };
        let helped = vec![t(0, 10.0, 0.2), t(1, 0.15, 0.3)];
        assert!(slower(&helped).is_empty(), "within the noise of a fast statement");
        let v = Verdict { timings: helped, unverified: vec![], slower: vec![], faster: vec![0] };
        assert!(v.kept());
        let none_faster =
            Verdict { timings: vec![t(0, 10.0, 9.8)], unverified: vec![], slower: vec![], faster: vec![] };
        assert!(!none_faster.kept(), "its gain did not appear");
        let hurt = vec![t(0, 10.0, 0.2), t(1, 4.0, 9.0)];
        assert_eq!(slower(&hurt), vec![1]);
        let v = Verdict { slower: slower(&hurt), timings: hurt, unverified: vec![], faster: vec![0] };
        assert!(!v.kept());
        assert!(
            !Verdict { timings: vec![], unverified: vec![0], slower: vec![], faster: vec![] }.kept(),
            "nothing could run"
        );
    }
}

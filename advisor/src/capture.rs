//! Capture: what the database serves (pg_stat_statements), its tables'
//! read and write traffic (pg_stat_user_tables), the indexes it has and
//! their use (pg_index, pg_stat_user_indexes).

use serde::Serialize;
use tokio_postgres::Client;

use crate::db::{AdvisorError, exec, flag, num, rows, text, text_array};

/// One normalised statement as pg_stat_statements counts it.
#[derive(Clone, Debug, Serialize)]
pub struct Statement {
    pub queryid: String,
    pub query: String,
    pub calls: f64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub rows: f64,
    /// Why it is not planned: planning it may run user code (`guard`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
}

/// One table's size and traffic since the statistics were reset.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub live_rows: f64,
    pub inserts: f64,
    pub updates: f64,
    pub hot_updates: f64,
    pub deletes: f64,
    pub seq_scans: f64,
    pub bytes: f64,
}

/// One existing index.
#[derive(Clone, Debug, Serialize)]
pub struct Index {
    pub schema: String,
    pub table: String,
    pub name: String,
    /// Key columns in order (an expression column is left out: see `expression`).
    pub columns: Vec<String>,
    pub method: String,
    pub unique: bool,
    /// It backs a constraint (primary key, unique, exclusion): never proposed for removal.
    pub constraint: bool,
    pub partial: bool,
    pub expression: bool,
    pub scans: f64,
    pub bytes: f64,
    pub definition: String,
}

/// What the advisor works from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Workload {
    pub statements: Vec<Statement>,
    pub tables: Vec<Table>,
    pub indexes: Vec<Index>,
    /// Distinct values per (schema, table, column), from pg_stats.
    pub distinct: Vec<((String, String, String), f64)>,
}

impl Workload {
    pub fn table(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.schema == schema && t.name == name)
    }

    /// How many distinct values `column` has (0 when unknown).
    pub fn distinct(&self, schema: &str, table: &str, column: &str) -> f64 {
        let key = |(s, t, c): &(String, String, String)| s == schema && t == table && c == column;
        self.distinct.iter().find(|(k, _)| key(k)).map_or(0.0, |(_, n)| *n)
    }

    pub fn indexes_of<'a>(&'a self, schema: &'a str, table: &'a str) -> impl Iterator<Item = &'a Index> + 'a {
        self.indexes.iter().filter(move |i| i.schema == schema && i.table == table)
    }
}

/// Statements that are the workload's own: the advisor's, catalogs, utility.
fn is_workload(query: &str) -> bool {
    let q = crate::plan::inner_statement(query).trim_start().to_ascii_lowercase();
    let dml = ["select", "with", "update", "delete", "insert"].iter().any(|k| q.starts_with(k));
    // the catalogs' and the advisor's own statements (pg_*, HypoPG's functions)
    let catalog = q
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w.starts_with("pg_") || w.starts_with("hypopg") || w == "information_schema");
    dml && !catalog
}

/// The workload of the current database: its `limit` statements that cost
/// the most time, every user table and index.
pub async fn capture(client: &Client, limit: usize) -> Result<Workload, AdvisorError> {
    // this connection's own counts reach the statistics views when it goes
    // idle, at most once a second: now (PostgreSQL 15; ignored before)
    let _ = exec(client, "SELECT pg_catalog.pg_stat_force_next_flush()").await;
    let has = rows(client, "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").await?;
    if has.is_empty() {
        return Err(AdvisorError::Missing(
            "pg_stat_statements is not installed in this database (shared_preload_libraries, then CREATE EXTENSION)"
                .into(),
        ));
    }
    // (one row per statement: pg_stat_statements keeps one per role, and
    // apart for statements run inside functions)
    let sql = "SELECT s.queryid, min(s.query), sum(s.calls), sum(s.total_exec_time), \
               sum(s.total_exec_time) / sum(s.calls), sum(s.rows) \
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
               WHERE d.datname = current_database() AND s.calls > 0 AND s.toplevel \
               GROUP BY s.queryid ORDER BY 4 DESC";
    let all = rows(client, sql).await?;
    // texts of other roles' statements are hidden from a role without the
    // privilege, and the advice would rest on a part of the workload
    if all.iter().any(|r| text(r, 1) == "<insufficient privilege>") {
        return Err(AdvisorError::Missing(
            "pg_stat_statements hides other roles' statements from this role: run the advisor as a member of \
             pg_read_all_stats (GRANT pg_read_all_stats TO ...) or as a superuser"
                .into(),
        ));
    }
    let statements = all
        .iter()
        .map(|r| Statement {
            queryid: text(r, 0),
            query: text(r, 1),
            calls: num(r, 2),
            total_ms: num(r, 3),
            mean_ms: num(r, 4),
            rows: num(r, 5),
            user_code: None,
        })
        .filter(|s| is_workload(&s.query))
        .take(limit)
        .collect();
    let mut tables = tables(client).await?;
    // the read time saved is over pg_stat_statements' window, the writes
    // over the table counters': the counters are scaled to the same window
    // (at their average rate)
    let ratio = window_ratio(client).await?;
    for t in &mut tables {
        for v in [&mut t.inserts, &mut t.updates, &mut t.hot_updates, &mut t.deletes] {
            *v *= ratio;
        }
    }
    let distinct = distinct(client, &tables).await?;
    Ok(Workload { statements, tables, indexes: indexes(client).await?, distinct })
}

async fn tables(client: &Client) -> Result<Vec<Table>, AdvisorError> {
    // (rows: the planner's count too, which a statistics reset leaves)
    let sql = "SELECT s.schemaname, s.relname, greatest(s.n_live_tup, c.reltuples), s.n_tup_ins, s.n_tup_upd, \
               s.n_tup_hot_upd, s.n_tup_del, s.seq_scan, pg_table_size(s.relid) \
               FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid ORDER BY 1, 2";
    Ok(rows(client, sql)
        .await?
        .iter()
        .map(|r| Table {
            schema: text(r, 0),
            name: text(r, 1),
            live_rows: num(r, 2),
            inserts: num(r, 3),
            updates: num(r, 4),
            hot_updates: num(r, 5),
            deletes: num(r, 6),
            seq_scans: num(r, 7),
            bytes: num(r, 8),
        })
        .collect())
}

/// pg_stat_statements' window over the table counters' (0 to 1): when
/// each was last reset (the counters: pg_stat_database, else the server's
/// start). 1 when pg_stat_statements does not say (before 1.9).
async fn window_ratio(client: &Client) -> Result<f64, AdvisorError> {
    let sql = "SELECT extract(epoch FROM now() - i.stats_reset), extract(epoch FROM now() - coalesce( \
               (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()), pg_postmaster_start_time())) \
               FROM pg_stat_statements_info i";
    let Ok(r) = rows(client, sql).await else { return Ok(1.0) };
    let (statements, counters) = r.first().map_or((1.0, 1.0), |r| (num(r, 0), num(r, 1)));
    Ok(if counters > 0.0 { (statements / counters).clamp(0.0, 1.0) } else { 1.0 })
}

/// Distinct values per column (pg_stats: a negative n_distinct is a
/// fraction of the rows).
async fn distinct(client: &Client, tables: &[Table]) -> Result<Vec<((String, String, String), f64)>, AdvisorError> {
    let sql = "SELECT schemaname, tablename, attname, n_distinct FROM pg_stats \
               WHERE schemaname NOT IN ('pg_catalog', 'information_schema')";
    Ok(rows(client, sql)
        .await?
        .iter()
        .map(|r| {
            let (s, t, n) = (text(r, 0), text(r, 1), num(r, 3));
            let live = tables.iter().find(|x| x.schema == s && x.name == t).map_or(0.0, |x| x.live_rows);
            ((s, t, text(r, 2)), if n < 0.0 { -n * live } else { n })
        })
        .collect())
}

async fn indexes(client: &Client) -> Result<Vec<Index>, AdvisorError> {
    let sql = "SELECT n.nspname, t.relname, i.relname, am.amname, ix.indisunique, \
               EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = ix.indexrelid), \
               ix.indpred IS NOT NULL, ix.indexprs IS NOT NULL, coalesce(s.idx_scan, 0), \
               pg_relation_size(ix.indexrelid), pg_get_indexdef(ix.indexrelid), \
               array(SELECT a.attname::text FROM generate_subscripts(ix.indkey::int2[], 1) AS g(k) \
                     JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = (ix.indkey::int2[])[g.k] \
                     WHERE g.k < ix.indnkeyatts ORDER BY g.k) \
               FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid JOIN pg_class t ON t.oid = ix.indrelid \
               JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_am am ON am.oid = i.relam \
               LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = ix.indexrelid \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
               ORDER BY 1, 2, 3";
    Ok(rows(client, sql)
        .await?
        .iter()
        .map(|r| Index {
            schema: text(r, 0),
            table: text(r, 1),
            name: text(r, 2),
            method: text(r, 3),
            unique: flag(r, 4),
            constraint: flag(r, 5),
            partial: flag(r, 6),
            expression: flag(r, 7),
            scans: num(r, 8),
            bytes: num(r, 9),
            definition: text(r, 10),
            columns: text_array(&text(r, 11)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_the_applications_statements() {
        assert!(is_workload("SELECT * FROM orders WHERE id = $1"));
        assert!(is_workload("  update orders set status = $1 where id = $2"));
        assert!(!is_workload("SELECT * FROM pg_stat_statements"));
        assert!(!is_workload("SELECT * FROM hypopg_create_index($1)"));
        assert!(!is_workload("CREATE INDEX ON t (a)"));
        assert!(!is_workload("EXPLAIN (FORMAT JSON) EXECUTE p"));
        assert!(!is_workload("SELECT $1 FROM pg_extension WHERE extname = $2"));
        assert!(is_workload("SELECT * FROM shop_pg_orders"));
        assert!(is_workload("PREPARE q (int) AS SELECT * FROM orders WHERE id = $1"));
    }
}

//! Schema hints, each with the numbers behind it: tables whose dead rows
//! autovacuum is not keeping up with (bloat), B-tree indexes much larger
//! than their rows need (index bloat), large tables the workload reads by
//! recent time ranges (partitioning), and large tables nothing reads
//! (cold data to archive). Hints only: nothing here changes the schema.

use serde::Serialize;
use tokio_postgres::Client;

use crate::capture::Workload;
use crate::db::{AdvisorError, ident, literal, num, rows, text};
use crate::plan::{Kind, Node};

/// The thresholds the hints use.
#[derive(Clone, Debug)]
pub struct Thresholds {
    /// Dead rows, as a share of all rows, and at least this many.
    pub dead_share: f64,
    pub dead_rows: f64,
    /// An index this many times the size its rows need, and at least `index_bytes`.
    pub index_factor: f64,
    pub index_bytes: f64,
    /// A table this large (bytes) is a partitioning or archival candidate.
    pub large_bytes: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { dead_share: 0.2, dead_rows: 10_000.0, index_factor: 2.0, index_bytes: 10e6, large_bytes: 1e9 }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Hint {
    pub kind: &'static str,
    pub object: String,
    pub detail: String,
    pub action: String,
}

/// Every hint for the advised database; `plans`: the workload's generic
/// plans (which tables are read by time ranges).
pub async fn hints(
    client: &Client,
    w: &Workload,
    plans: &[Option<Node>],
    t: &Thresholds,
) -> Result<Vec<Hint>, AdvisorError> {
    let mut out = bloat(client, t).await?;
    out.extend(index_bloat(client, t).await?);
    out.extend(time_ranges(client, w, plans, t).await?);
    for tb in w.tables.iter().filter(|tb| tb.bytes >= t.large_bytes && tb.seq_scans == 0.0) {
        let scans = w.indexes_of(&tb.schema, &tb.name).map(|i| i.scans).sum::<f64>();
        if scans == 0.0 {
            out.push(Hint {
                kind: "cold data",
                object: format!("{}.{}", tb.schema, tb.name),
                detail: format!("{:.0} MB not read since the statistics were reset", tb.bytes / 1e6),
                action: "archive it (move it to cheaper storage, or drop what is no longer needed)".into(),
            });
        }
    }
    Ok(out)
}

async fn bloat(client: &Client, t: &Thresholds) -> Result<Vec<Hint>, AdvisorError> {
    // (live rows: the planner's count too, which a statistics reset leaves)
    let sql = "SELECT s.schemaname, s.relname, greatest(s.n_live_tup, c.reltuples, 0), s.n_dead_tup, \
               coalesce(greatest(s.last_autovacuum, s.last_vacuum)::text, 'never') \
               FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid ORDER BY s.n_dead_tup DESC";
    let mut out = Vec::new();
    for r in rows(client, sql).await? {
        let (live, dead) = (num(&r, 2), num(&r, 3));
        let share = dead / (live + dead).max(1.0);
        if dead >= t.dead_rows && share >= t.dead_share {
            out.push(Hint {
                kind: "table bloat",
                object: format!("{}.{}", text(&r, 0), text(&r, 1)),
                detail: format!(
                    "{dead:.0} dead rows, {:.0} % of its rows; last vacuumed: {}",
                    share * 100.0,
                    text(&r, 4)
                ),
                action: "VACUUM it, and lower autovacuum_vacuum_scale_factor for it (ALTER TABLE ... SET)".into(),
            });
        }
    }
    Ok(out)
}

/// B-tree indexes against the size their entries need: rows x (key width
/// + 16 bytes of tuple header and pointer), at the default 90 % fill.
async fn index_bloat(client: &Client, t: &Thresholds) -> Result<Vec<Hint>, AdvisorError> {
    let sql = "SELECT n.nspname, i.relname, pg_relation_size(i.oid), t.reltuples, \
               (SELECT coalesce(sum(s.avg_width), 8) FROM pg_attribute a JOIN pg_stats s \
                  ON s.schemaname = n.nspname AND s.tablename = t.relname AND s.attname = a.attname \
                WHERE a.attrelid = t.oid AND a.attnum = ANY (x.indkey::int2[])) \
               FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
               JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_am am ON am.oid = i.relam \
               WHERE am.amname = 'btree' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%' AND x.indexprs IS NULL";
    let mut out = Vec::new();
    for r in rows(client, sql).await? {
        let (bytes, tuples, width) = (num(&r, 2), num(&r, 3), num(&r, 4));
        if tuples <= 0.0 {
            // never analysed: how many rows it has is not known
            continue;
        }
        let need = (tuples * (width + 16.0) / 0.9).max(8192.0);
        if bytes >= t.index_bytes && bytes >= need * t.index_factor {
            out.push(Hint {
                kind: "index bloat",
                object: format!("{}.{}", text(&r, 0), text(&r, 1)),
                detail: format!("{:.1} MB where its rows need about {:.1} MB", bytes / 1e6, need / 1e6),
                action: format!("REINDEX INDEX CONCURRENTLY {}.{}", ident(&text(&r, 0)), ident(&text(&r, 1))),
            });
        }
    }
    Ok(out)
}

/// Large tables the workload reads by a range of a date or timestamp
/// column: partitioning by that column lets PostgreSQL skip the old parts.
async fn time_ranges(
    client: &Client,
    w: &Workload,
    plans: &[Option<Node>],
    t: &Thresholds,
) -> Result<Vec<Hint>, AdvisorError> {
    let mut seen: Vec<(String, String, String)> = Vec::new();
    for p in plans.iter().flatten() {
        for ((schema, table), preds) in crate::candidates::predicates_by_table(p) {
            let large = w.table(&schema, &table).is_some_and(|tb| tb.bytes >= t.large_bytes);
            for pr in preds.iter().filter(|pr| pr.kind == Kind::Range && large) {
                let key = (schema.clone(), table.clone(), pr.column.clone());
                if !seen.contains(&key) {
                    seen.push(key);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (schema, table, column) in seen {
        let sql = format!(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} AND a.attname = {}",
            literal(&schema),
            literal(&table),
            literal(&column)
        );
        let ty = rows(client, &sql).await?.first().map(|r| text(r, 0)).unwrap_or_default();
        if !(ty.starts_with("timestamp") || ty == "date") {
            continue;
        }
        let bytes = w.table(&schema, &table).map_or(0.0, |tb| tb.bytes);
        out.push(Hint {
            kind: "partitioning",
            object: format!("{schema}.{table}"),
            detail: format!("{:.0} MB, read by ranges of {column} ({ty})", bytes / 1e6),
            action: format!(
                "partition it by RANGE ({}), by month or week, and detach old partitions to archive",
                ident(&column)
            ),
        });
    }
    Ok(out)
}

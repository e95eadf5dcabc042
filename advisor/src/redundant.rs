//! Indexes to drop: duplicates, indexes a wider B-tree leads with, and
//! indexes no statement used since the statistics were reset. An index
//! that backs a constraint (primary key, unique, exclusion) is never
//! proposed; a unique index is kept unless another one enforces the same.

use serde::Serialize;

use crate::capture::{Index, Workload};
use crate::db::ident;
use crate::select::Budget;

#[derive(Clone, Debug, Serialize)]
pub struct Drop {
    pub index: String,
    /// The statement, names quoted.
    pub ddl: String,
    pub table: String,
    pub reason: String,
    pub bytes: f64,
    /// Index maintenance saved over the window, in ms (writes x entry cost).
    pub write_ms_saved: f64,
}

fn same_shape(a: &Index, b: &Index) -> bool {
    a.method == b.method && !a.partial && !b.partial && !a.expression && !b.expression
}

/// What the workload would lose nothing by dropping.
pub fn drops(w: &Workload, b: &Budget) -> Vec<Drop> {
    let mut out = Vec::new();
    for a in &w.indexes {
        if a.constraint || a.unique {
            continue;
        }
        let others = w.indexes_of(&a.schema, &a.table).filter(|o| o.name != a.name && same_shape(a, o));
        let reason = others.into_iter().find_map(|o| {
            if o.columns == a.columns && (o.constraint || o.unique || o.name < a.name) {
                Some(format!("duplicate of {}", o.name))
            } else if a.method == "btree"
                && o.columns.len() > a.columns.len()
                && o.columns[..a.columns.len()] == a.columns[..]
            {
                Some(format!("{} leads with the same columns ({})", o.name, a.columns.join(", ")))
            } else {
                None
            }
        });
        let table = w.table(&a.schema, &a.table);
        // unused, unless it is the wider index another one is proposed
        // against (dropping both would leave the columns unindexed)
        let covers_a_dropped = || {
            w.indexes_of(&a.schema, &a.table).any(|o| {
                o.name != a.name
                    && !o.constraint
                    && !o.unique
                    && same_shape(a, o)
                    && o.columns.len() < a.columns.len()
                    && a.columns[..o.columns.len()] == o.columns[..]
            })
        };
        let reason = reason.or_else(|| {
            (a.scans == 0.0
                && table.is_some_and(|t| t.seq_scans > 0.0 || t.inserts + t.updates > 0.0)
                && !covers_a_dropped())
            .then(|| "not used since the statistics were reset".to_string())
        });
        let Some(reason) = reason else { continue };
        let writes = table.map_or(0.0, |t| t.inserts + t.deletes + (t.updates - t.hot_updates).max(0.0));
        out.push(Drop {
            index: format!("{}.{}", a.schema, a.name),
            ddl: format!("DROP INDEX CONCURRENTLY {}.{}", ident(&a.schema), ident(&a.name)),
            table: format!("{}.{}", a.schema, a.table),
            reason,
            bytes: a.bytes,
            write_ms_saved: writes * b.entry_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Table;

    fn ix(name: &str, cols: &[&str], scans: f64, constraint: bool) -> Index {
        Index {
            schema: "public".into(),
            table: "orders".into(),
            name: name.into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            method: "btree".into(),
            unique: constraint,
            constraint,
            partial: false,
            expression: false,
            scans,
            bytes: 8192.0,
            definition: String::new(),
        }
    }

    #[test]
    fn duplicates_prefixes_and_unused_indexes_go() {
        let t =
            Table { schema: "public".into(), name: "orders".into(), seq_scans: 3.0, inserts: 10.0, ..Table::default() };
        let w = Workload {
            tables: vec![t],
            indexes: vec![
                ix("orders_pkey", &["id"], 5.0, true),
                ix("orders_id_again", &["id"], 5.0, false),
                ix("orders_customer", &["customer_id"], 9.0, false),
                ix("orders_customer_created", &["customer_id", "created_at"], 9.0, false),
                ix("orders_note", &["note"], 0.0, false),
            ],
            ..Workload::default()
        };
        let d = drops(&w, &Budget { bytes: 0.0, entry_ms: 0.01 });
        let names: Vec<&str> = d.iter().map(|d| d.index.as_str()).collect();
        assert_eq!(names, vec!["public.orders_id_again", "public.orders_customer", "public.orders_note"]);
        assert!(d[0].reason.contains("orders_pkey"));
        assert!(d[2].reason.contains("not used"));
        // the wider index the narrower one is dropped for stays, used or not
        let mut unused_wide = w.clone();
        unused_wide.indexes[3].scans = 0.0;
        let names: Vec<String> =
            drops(&unused_wide, &Budget { bytes: 0.0, entry_ms: 0.01 }).into_iter().map(|d| d.index).collect();
        assert!(names.contains(&"public.orders_customer".to_string()));
        assert!(!names.contains(&"public.orders_customer_created".to_string()), "{names:?}");
    }
}

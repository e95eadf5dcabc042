//! Analyse: what each costly statement's plan spends its time on, named,
//! with a rewrite hint where one applies. Nothing is rewritten: the hints
//! are for the statement's owner.

use serde::Serialize;

use crate::capture::Workload;
use crate::plan::{Kind, Node, conjuncts, param_count, predicate};

/// Tables smaller than this are read whole cheaply: no bottleneck named.
pub const LARGE_ROWS: f64 = 10_000.0;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Bottleneck {
    pub kind: &'static str,
    pub detail: String,
    pub hint: Option<String>,
}

/// The bottlenecks of `query`, whose generic plan is `plan`.
pub fn bottlenecks(query: &str, plan: &Node, w: &Workload) -> Vec<Bottleneck> {
    let mut out = Vec::new();
    for n in plan.walk() {
        scan(n, w, &mut out);
        if n.node_type == "Sort" && n.rows >= LARGE_ROWS {
            out.push(Bottleneck {
                kind: "sort",
                detail: format!("sorts about {:.0} rows by {}", n.rows, n.sort_key.join(", ")),
                hint: Some("an index whose columns end with the sort key returns the rows in order".into()),
            });
        }
        if n.node_type == "Nested Loop"
            && let Some(inner) = n.children.get(1)
            && inner.walk().iter().any(|c| c.node_type == "Seq Scan" && large(c, w))
        {
            out.push(Bottleneck {
                kind: "nested loop over a sequential scan",
                detail: format!("each outer row ({:.0} expected) scans the inner table again", n.children[0].rows),
                hint: Some("an index on the inner table's join column".into()),
            });
        }
    }
    text_patterns(query, &mut out);
    out
}

fn large(n: &Node, w: &Workload) -> bool {
    let (Some(s), Some(r)) = (&n.schema, &n.relation) else { return false };
    w.table(s, r).is_some_and(|t| t.live_rows >= LARGE_ROWS)
}

fn scan(n: &Node, w: &Workload, out: &mut Vec<Bottleneck>) {
    let (Some(schema), Some(rel)) = (&n.schema, &n.relation) else { return };
    let rows = w.table(schema, rel).map_or(0.0, |t| t.live_rows);
    for p in n.conditions.iter().flat_map(|c| conjuncts(c)).filter_map(|c| predicate(&c)) {
        if p.kind == Kind::Function {
            out.push(Bottleneck {
                kind: "non-sargable predicate",
                detail: format!("a function of {rel}.{} is compared: no index on the column serves it", p.column),
                hint: Some(format!(
                    "an index on the same expression, or store {} already normalised and compare it as is",
                    p.column
                )),
            });
        }
    }
    if n.node_type == "Seq Scan" && rows >= LARGE_ROWS && !n.conditions.is_empty() {
        out.push(Bottleneck {
            kind: "sequential scan",
            detail: format!(
                "reads all of {schema}.{rel} (about {rows:.0} rows) to keep about {:.0}: {}",
                n.rows,
                n.conditions.join(" AND ")
            ),
            hint: None,
        });
    }
}

/// What the statement's text shows: OFFSET pagination, long IN lists.
fn text_patterns(query: &str, out: &mut Vec<Bottleneck>) {
    let q = query.to_ascii_lowercase();
    if q.contains(" offset ") {
        out.push(Bottleneck {
            kind: "OFFSET pagination",
            detail: "each page reads and throws away every row before it".into(),
            hint: Some("keyset pagination: WHERE (sort key) > (the last row's) ORDER BY sort key LIMIT n".into()),
        });
    }
    let params = param_count(query);
    if params >= 100 && q.contains(" in (") {
        out.push(Bottleneck {
            kind: "long IN list",
            detail: format!("{params} parameters: every list length is a statement and a plan of its own"),
            hint: Some("one array parameter: = ANY($1)".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Table;

    fn workload() -> Workload {
        let t = Table { schema: "public".into(), name: "orders".into(), live_rows: 50_000.0, ..Table::default() };
        Workload { tables: vec![t], ..Workload::default() }
    }

    fn seq(filter: &str) -> Node {
        Node {
            node_type: "Seq Scan".into(),
            schema: Some("public".into()),
            relation: Some("orders".into()),
            rows: 5.0,
            conditions: vec![filter.into()],
            ..Node::default()
        }
    }

    #[test]
    fn costly_shapes_are_named() {
        let w = workload();
        let b = bottlenecks("SELECT * FROM orders WHERE customer_id = $1", &seq("(customer_id = $1)"), &w);
        assert_eq!(b.iter().map(|b| b.kind).collect::<Vec<_>>(), vec!["sequential scan"]);
        let b = bottlenecks("SELECT * FROM orders WHERE lower(email) = $1", &seq("(lower(email) = $1)"), &w);
        assert!(b.iter().any(|b| b.kind == "non-sargable predicate"));
        let b = bottlenecks("SELECT * FROM orders ORDER BY id LIMIT $1 OFFSET $2", &Node::default(), &w);
        assert_eq!(b[0].kind, "OFFSET pagination");
        let list: Vec<String> = (1..=150).map(|i| format!("${i}")).collect();
        let q = format!("SELECT * FROM orders WHERE id IN ({})", list.join(", "));
        assert!(bottlenecks(&q, &Node::default(), &w).iter().any(|b| b.kind == "long IN list"));
        let small = Workload::default();
        assert!(bottlenecks("SELECT 1", &seq("(customer_id = $1)"), &small).is_empty(), "a small table");
    }
}

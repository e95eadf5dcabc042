//! Candidate indexes from what the plans filter, join and sort on: per
//! table, equality columns first, then one range column, then the sort
//! key (the order a B-tree serves them in); at most three columns. A
//! candidate an existing B-tree already leads with is not proposed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::capture::Workload;
use crate::db::ident;
use crate::plan::{Kind, Node, Predicate, conjuncts, predicate};

/// Tables smaller than this get no candidates: reading them whole is cheap.
pub const MIN_ROWS: f64 = 1_000.0;
/// Columns in a candidate at most.
pub const MAX_COLUMNS: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Candidate {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
    /// Columns carried in the index's leaves (`INCLUDE`): the statement's
    /// other outputs, so that an index-only scan can answer it.
    pub include: Vec<String>,
}

impl Candidate {
    pub fn ddl(&self, name: Option<&str>) -> String {
        let list = |cols: &[String]| cols.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let name = name.map(|n| format!("{} ", ident(n))).unwrap_or_default();
        let include =
            if self.include.is_empty() { String::new() } else { format!(" INCLUDE ({})", list(&self.include)) };
        format!(
            "CREATE INDEX {name}ON {}.{} ({}){include}",
            ident(&self.schema),
            ident(&self.table),
            list(&self.columns)
        )
    }
}

/// Columns a covering index carries at most.
pub const MAX_INCLUDE: usize = 3;

/// What one statement asks of one table.
#[derive(Debug, Default)]
struct Asks {
    equality: Vec<String>,
    range: Vec<String>,
    sort: Vec<String>,
}

fn push_unique(v: &mut Vec<String>, c: &str) {
    if !v.iter().any(|x| x == c) {
        v.push(c.to_string());
    }
}

/// The predicates of a plan's scans, by the (schema, table) they are on:
/// a qualified one goes to the scan its alias names, an unqualified one to
/// the scan it is a condition of.
pub fn predicates_by_table(plan: &Node) -> BTreeMap<(String, String), Vec<Predicate>> {
    let nodes = plan.walk();
    let aliases: BTreeMap<&str, (String, String)> =
        nodes.iter().filter_map(|n| Some((n.alias.as_deref()?, (n.schema.clone()?, n.relation.clone()?)))).collect();
    let mut out: BTreeMap<(String, String), Vec<Predicate>> = BTreeMap::new();
    for n in &nodes {
        let own = n.schema.clone().zip(n.relation.clone());
        for p in n.conditions.iter().flat_map(|c| conjuncts(c)).filter_map(|c| predicate(&c)) {
            let table = match &p.qualifier {
                Some(q) => aliases.get(q.as_str()).cloned(),
                None => own.clone(),
            };
            if let Some(t) = table {
                out.entry(t).or_default().push(p);
            }
        }
        // the other side of a join condition (a = b.c) is a column too
        for c in n.conditions.iter().flat_map(|c| conjuncts(c)) {
            if let Some((_, rhs)) = c.split_once(" = ")
                && let Some(p) = predicate(&format!("{} = $0", rhs.trim()))
                && let Some(t) = p.qualifier.as_deref().and_then(|q| aliases.get(q))
            {
                out.entry(t.clone()).or_default().push(Predicate { param: None, ..p });
            }
        }
    }
    out
}

/// The single table a Sort's input reads, and its sort columns.
fn sorts(plan: &Node) -> Vec<((String, String), Vec<String>)> {
    let mut out = Vec::new();
    for n in plan.walk().into_iter().filter(|n| n.node_type == "Sort") {
        let scans: Vec<&Node> = n.walk().into_iter().filter(|c| c.relation.is_some()).collect();
        if let [scan] = scans.as_slice()
            && let (Some(s), Some(r)) = (&scan.schema, &scan.relation)
        {
            let cols = n
                .sort_key
                .iter()
                .filter_map(|k| {
                    // `x DESC NULLS LAST`, `x COLLATE "C"`: the column
                    let k = k.split(" COLLATE ").next().unwrap_or(k);
                    let k = k.trim_end_matches(" NULLS LAST").trim_end_matches(" NULLS FIRST");
                    let k = k.trim_end_matches(" DESC").trim_end_matches(" ASC");
                    predicate(&format!("{k} = $0")).filter(|p| p.kind == Kind::Equality).map(|p| p.column)
                })
                .collect();
            out.push(((s.clone(), r.clone()), cols));
        }
    }
    out
}

/// The candidate indexes of one statement's plan.
pub fn candidates(plan: &Node, w: &Workload) -> Vec<Candidate> {
    let mut asks: BTreeMap<(String, String), Asks> = BTreeMap::new();
    for (t, preds) in predicates_by_table(plan) {
        let a = asks.entry(t).or_default();
        for p in preds {
            match p.kind {
                Kind::Equality => push_unique(&mut a.equality, &p.column),
                Kind::Range | Kind::Pattern => push_unique(&mut a.range, &p.column),
                Kind::Function => {}
            }
        }
    }
    for (t, cols) in sorts(plan) {
        let a = asks.entry(t).or_default();
        for c in cols {
            push_unique(&mut a.sort, &c);
        }
    }
    let outputs = outputs_by_table(plan);
    let mut out = Vec::new();
    for ((schema, table), mut a) in asks {
        if w.table(&schema, &table).is_none_or(|t| t.live_rows < MIN_ROWS) {
            continue;
        }
        // the most selective equality column first: the index serves more statements so
        let d = |c: &String| w.distinct(&schema, &table, c);
        a.equality.sort_by(|x, y| d(y).total_cmp(&d(x)));
        let shapes = shapes(&a);
        for cols in &shapes {
            let c = Candidate { schema: schema.clone(), table: table.clone(), columns: cols.clone(), include: vec![] };
            if !c.columns.is_empty() && !covered(&c, w) && !out.contains(&c) {
                out.push(c);
            }
        }
        // the fullest shape, covering what the statement returns
        if let (Some(cols), Some(outs)) = (shapes.last(), outputs.get(&(schema.clone(), table.clone()))) {
            let include: Vec<String> = outs.iter().filter(|o| !cols.contains(o)).cloned().collect();
            if (1..=MAX_INCLUDE).contains(&include.len()) {
                let c = Candidate { schema: schema.clone(), table: table.clone(), columns: cols.clone(), include };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The plain columns each table's scans return (EXPLAIN VERBOSE's Output;
/// `None`-like for a scan that returns an expression: not coverable).
fn outputs_by_table(plan: &Node) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for n in plan.walk() {
        let (Some(s), Some(r)) = (&n.schema, &n.relation) else { continue };
        let cols: Option<Vec<String>> = n
            .output
            .iter()
            .map(|o| {
                let c = o.rsplit('.').next()?.trim_matches('"');
                (!c.is_empty() && c.chars().all(|ch| ch.is_alphanumeric() || ch == '_')).then(|| c.to_string())
            })
            .collect();
        let Some(cols) = cols else { continue };
        let e = out.entry((s.clone(), r.clone())).or_default();
        for c in cols {
            push_unique(e, &c);
        }
    }
    out
}

/// The column lists worth trying for what a statement asks of a table.
fn shapes(a: &Asks) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let eq: Vec<String> = a.equality.iter().take(MAX_COLUMNS).cloned().collect();
    for c in a.equality.iter().chain(&a.range) {
        out.push(vec![c.clone()]);
    }
    if eq.len() > 1 {
        out.push(eq.clone());
    }
    if let Some(r) = a.range.iter().find(|r| !eq.contains(r))
        && !eq.is_empty()
    {
        out.push(eq.iter().chain(std::iter::once(r)).take(MAX_COLUMNS).cloned().collect());
    }
    if !a.sort.is_empty() && a.range.is_empty() {
        let cols: Vec<String> = eq.iter().chain(a.sort.iter().filter(|s| !eq.contains(s))).cloned().collect();
        out.push(cols.into_iter().take(MAX_COLUMNS).collect());
    }
    out
}

/// Whether an existing B-tree leads with the candidate's columns.
fn covered(c: &Candidate, w: &Workload) -> bool {
    w.indexes_of(&c.schema, &c.table).any(|i| {
        i.method == "btree"
            && !i.partial
            && !i.expression
            && i.columns.len() >= c.columns.len()
            && i.columns[..c.columns.len()] == c.columns[..]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Index, Table};

    fn w() -> Workload {
        let t = |n: &str| Table { schema: "public".into(), name: n.into(), live_rows: 100_000.0, ..Table::default() };
        let pk = Index {
            schema: "public".into(),
            table: "orders".into(),
            name: "orders_pkey".into(),
            columns: vec!["id".into()],
            method: "btree".into(),
            unique: true,
            constraint: true,
            partial: false,
            expression: false,
            scans: 0.0,
            bytes: 0.0,
            definition: String::new(),
        };
        Workload { tables: vec![t("orders"), t("customers")], indexes: vec![pk], ..Workload::default() }
    }

    fn scan(rel: &str, alias: &str, cond: &str) -> Node {
        Node {
            node_type: "Seq Scan".into(),
            schema: Some("public".into()),
            relation: Some(rel.into()),
            alias: Some(alias.into()),
            conditions: if cond.is_empty() { vec![] } else { vec![cond.into()] },
            ..Node::default()
        }
    }

    fn cols(c: &[Candidate]) -> Vec<String> {
        c.iter()
            .map(|c| {
                let inc =
                    if c.include.is_empty() { String::new() } else { format!(" include {}", c.include.join(",")) };
                format!("{}({}){inc}", c.table, c.columns.join(","))
            })
            .collect()
    }

    #[test]
    fn equality_then_range_then_sort() {
        let plan = scan("orders", "orders", "((customer_id = $1) AND (status = $2) AND (created_at >= $3))");
        assert_eq!(
            cols(&candidates(&plan, &w())),
            vec![
                "orders(customer_id)",
                "orders(status)",
                "orders(created_at)",
                "orders(customer_id,status)",
                "orders(customer_id,status,created_at)"
            ]
        );
        let sorted = Node {
            node_type: "Sort".into(),
            sort_key: vec!["orders.created_at DESC".into()],
            children: vec![scan("orders", "orders", "(customer_id = $1)")],
            ..Node::default()
        };
        assert_eq!(cols(&candidates(&sorted, &w())), vec!["orders(customer_id)", "orders(customer_id,created_at)"]);
    }

    #[test]
    fn the_most_selective_equality_first_and_a_covering_variant() {
        let mut w = w();
        let k = |c: &str| ("public".to_string(), "orders".to_string(), c.to_string());
        w.distinct = vec![(k("status"), 4.0), (k("customer_id"), 20_000.0)];
        let mut plan = scan("orders", "orders", "((orders.status = $1) AND (orders.customer_id = $2))");
        plan.output = vec!["orders.id".into(), "orders.total".into()];
        assert_eq!(
            cols(&candidates(&plan, &w)),
            vec![
                "orders(customer_id)",
                "orders(status)",
                "orders(customer_id,status)",
                "orders(customer_id,status) include id,total"
            ]
        );
        let c = &candidates(&plan, &w)[3];
        assert_eq!(
            c.ddl(None),
            "CREATE INDEX ON \"public\".\"orders\" (\"customer_id\", \"status\") INCLUDE (\"id\", \"total\")"
        );
        plan.output = vec!["orders.id".into(), "(orders.total * 2)".into()];
        assert_eq!(candidates(&plan, &w).len(), 3, "an expression output: nothing to cover");
    }

    #[test]
    fn sort_keys_spelled_in_full_and_expression_indexes() {
        let sorted = Node {
            node_type: "Sort".into(),
            sort_key: vec!["orders.created_at DESC NULLS LAST".into(), "orders.note COLLATE \"C\"".into()],
            children: vec![scan("orders", "orders", "(customer_id = $1)")],
            ..Node::default()
        };
        assert_eq!(
            cols(&candidates(&sorted, &w())),
            vec!["orders(customer_id)", "orders(customer_id,created_at,note)"]
        );
        // an index on (lower(email), customer_id) does not lead with customer_id
        let mut w = w();
        w.indexes.push(Index {
            schema: "public".into(),
            table: "orders".into(),
            name: "orders_expr".into(),
            columns: vec!["customer_id".into()],
            method: "btree".into(),
            unique: false,
            constraint: false,
            partial: false,
            expression: true,
            scans: 1.0,
            bytes: 0.0,
            definition: String::new(),
        });
        assert_eq!(cols(&candidates(&scan("orders", "orders", "(customer_id = $1)"), &w)), vec!["orders(customer_id)"]);
    }

    #[test]
    fn joins_name_both_sides_and_existing_indexes_cover() {
        let join = Node {
            node_type: "Hash Join".into(),
            conditions: vec!["(o.customer_id = c.id)".into()],
            children: vec![scan("orders", "o", ""), scan("customers", "c", "(c.region = $1)")],
            ..Node::default()
        };
        assert_eq!(
            cols(&candidates(&join, &w())),
            vec!["customers(id)", "customers(region)", "customers(id,region)", "orders(customer_id)"]
        );
        let by_pk = scan("orders", "orders", "(id = $1)");
        assert!(candidates(&by_pk, &w()).is_empty(), "the primary key leads with id");
    }
}

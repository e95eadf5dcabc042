//! Key access: which primary-key values a statement reads or writes, as
//! references to its arguments (parameters and literals), found once per
//! shape in the parsed statement.

use sqlparser::ast::{
    self, Expr, FromTable, OnConflictAction, OnInsert, Query, SetExpr, Statement, TableFactor, TableObject, Value,
};

use super::catalog::Catalog;
use super::facts::{last_part, table_factor_name};
use super::lexer::Lexed;
use super::{ArgRef, KeyAccess, TableId};

/// Keyed tables of a SELECT: each table of the FROM clause (joins included)
/// whose primary key the WHERE conjunction pins to arguments. Only when every
/// relation of the statement is in the FROM clause (no subqueries), each once.
pub(crate) fn read_keys(sel: &ast::Select, relation_count: usize, lexed: &Lexed, catalog: &Catalog) -> Vec<KeyAccess> {
    let Some(selection) = &sel.selection else { return Vec::new() };
    let mut factors: Vec<(String, Option<String>)> = Vec::new();
    for twj in &sel.from {
        for tf in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
            match tf {
                TableFactor::Table { name, alias, .. } => {
                    factors.push((last_part(name), alias.as_ref().map(|a| a.name.value.to_ascii_lowercase())));
                }
                _ => return Vec::new(),
            }
        }
    }
    if factors.len() != relation_count {
        return Vec::new();
    }
    let mut names: Vec<&str> = factors.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    if names.len() != factors.len() {
        return Vec::new();
    }
    let single = factors.len() == 1;
    let mut out = Vec::new();
    for (name, alias) in &factors {
        let Some(id) = catalog.get(name) else { continue };
        let Some(pk) = catalog.primary_key(id) else { continue };
        let col = ColumnRef { pk, table: name, alias: alias.as_deref(), unqualified_ok: single };
        if let Some(args) = point_keys(selection, &col, lexed) {
            out.push(KeyAccess { table: id, args, range: false, key_type: catalog.key_type(id) });
        } else if catalog.integer_key(id)
            && let Some((lo, hi)) = range_keys(selection, &col, lexed)
        {
            out.push(KeyAccess { table: id, args: vec![lo, hi], range: true, key_type: catalog.key_type(id) });
        }
    }
    out
}

/// `SELECT plain columns FROM one table WHERE pk = arg`: nothing else that
/// could make the result depend on more than that row's columns.
pub(crate) fn is_row_projection(q: &Query, sel: &ast::Select, pk: &str) -> bool {
    use ast::SelectItem as I;
    let plain_columns = sel.projection.iter().all(|item| match item {
        I::UnnamedExpr(e) | I::ExprWithAlias { expr: e, .. } => {
            matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
        }
        I::Wildcard(_) | I::QualifiedWildcard(..) => true,
        _ => false,
    });
    let where_is_pk_only = match &sel.selection {
        Some(Expr::BinaryOp { left, op: ast::BinaryOperator::Eq, right }) => {
            let is_pk = |e: &Expr| match e {
                Expr::Identifier(id) => id.value.eq_ignore_ascii_case(pk),
                Expr::CompoundIdentifier(ids) => ids.last().is_some_and(|id| id.value.eq_ignore_ascii_case(pk)),
                _ => false,
            };
            let is_arg = |e: &Expr| matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_)));
            (is_pk(left) && is_arg(right)) || (is_pk(right) && is_arg(left))
        }
        _ => false,
    };
    plain_columns
        && where_is_pk_only
        && sel.from.len() == 1
        && sel.from[0].joins.is_empty()
        && sel.distinct.is_none()
        && sel.having.is_none()
        && matches!(&sel.group_by, ast::GroupByExpr::Expressions(e, _) if e.is_empty())
        && q.limit_clause.is_none()
        && q.fetch.is_none()
        && q.with.is_none()
}

/// A primary-key column as it may be written in a WHERE clause.
struct ColumnRef<'a> {
    pk: &'a str,
    table: &'a str,
    alias: Option<&'a str>,
    /// An unqualified name refers to this table (the only one in FROM).
    unqualified_ok: bool,
}

impl ColumnRef<'_> {
    fn matches(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Identifier(id) => self.unqualified_ok && id.value.eq_ignore_ascii_case(self.pk),
            Expr::CompoundIdentifier(ids) => {
                let [.., q, c] = ids.as_slice() else { return false };
                let q = q.value.to_ascii_lowercase();
                c.value.eq_ignore_ascii_case(self.pk)
                    && (self.alias == Some(q.as_str())
                        || (self.alias.is_none() && q == self.table)
                        || self.unqualified_ok && q == self.table)
            }
            Expr::Nested(e) => self.matches(e),
            _ => false,
        }
    }
}

/// `pk BETWEEN lo AND hi`, or `pk >= lo AND pk <= hi`, in the WHERE conjunction.
fn range_keys(expr: &Expr, col: &ColumnRef<'_>, lexed: &Lexed) -> Option<(ArgRef, ArgRef)> {
    let mut lo = None;
    let mut hi = None;
    collect_bounds(expr, col, lexed, &mut lo, &mut hi);
    Some((lo?, hi?))
}

fn collect_bounds(expr: &Expr, col: &ColumnRef<'_>, lexed: &Lexed, lo: &mut Option<ArgRef>, hi: &mut Option<ArgRef>) {
    use ast::BinaryOperator as B;
    match expr {
        Expr::Nested(e) => collect_bounds(e, col, lexed, lo, hi),
        Expr::BinaryOp { left, op: B::And, right } => {
            collect_bounds(left, col, lexed, lo, hi);
            collect_bounds(right, col, lexed, lo, hi);
        }
        Expr::Between { expr, negated: false, low, high } if col.matches(expr) => {
            if let (Some(l), Some(h)) = (arg_ref(low, lexed), arg_ref(high, lexed)) {
                *lo = Some(l);
                *hi = Some(h);
            }
        }
        Expr::BinaryOp { left, op: B::GtEq, right } if col.matches(left) => *lo = arg_ref(right, lexed).or(*lo),
        Expr::BinaryOp { left, op: B::LtEq, right } if col.matches(left) => *hi = arg_ref(right, lexed).or(*hi),
        _ => {}
    }
}

pub(crate) type Resolve<'a> = dyn Fn(&str, &Catalog) -> Option<(TableId, String)> + 'a;

pub(crate) fn write_keys(
    statement: &Statement,
    lexed: &Lexed,
    catalog: &Catalog,
    resolve: &Resolve<'_>,
) -> Option<KeyAccess> {
    match statement {
        Statement::Update(u) => {
            if u.from.is_some() || !u.table.joins.is_empty() {
                return None;
            }
            let table = table_factor_name(&u.table.relation)?;
            let (id, pk) = resolve(&table, catalog)?;
            let assigns_pk = u.assignments.iter().any(|a| match &a.target {
                ast::AssignmentTarget::ColumnName(n) => last_part(n) == pk,
                ast::AssignmentTarget::Tuple(ns) => ns.iter().any(|n| last_part(n) == pk),
            });
            if assigns_pk {
                return None;
            }
            let col = ColumnRef { pk: &pk, table: &table, alias: None, unqualified_ok: true };
            let args = point_keys(u.selection.as_ref()?, &col, lexed)?;
            Some(KeyAccess { table: id, args, range: false, key_type: catalog.key_type(id) })
        }
        Statement::Delete(d) => {
            let from = match &d.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
            };
            let [twj] = from.as_slice() else { return None };
            if d.using.is_some() || !twj.joins.is_empty() {
                return None;
            }
            let table = table_factor_name(&twj.relation)?;
            let (id, pk) = resolve(&table, catalog)?;
            let col = ColumnRef { pk: &pk, table: &table, alias: None, unqualified_ok: true };
            let args = point_keys(d.selection.as_ref()?, &col, lexed)?;
            Some(KeyAccess { table: id, args, range: false, key_type: catalog.key_type(id) })
        }
        Statement::Insert(ins) => {
            let TableObject::TableName(name) = &ins.table else {
                return None;
            };
            let (id, pk) = resolve(&last_part(name), catalog)?;
            if let Some(OnInsert::OnConflict(oc)) = &ins.on
                && matches!(oc.action, OnConflictAction::DoUpdate(_))
            {
                return None;
            }
            if matches!(ins.on, Some(OnInsert::DuplicateKeyUpdate(_))) {
                return None;
            }
            let pos = ins.columns.iter().position(|c| last_part(c) == pk)?;
            let source = ins.source.as_ref()?;
            let SetExpr::Values(values) = source.body.as_ref() else {
                return None;
            };
            let mut args = Vec::with_capacity(values.rows.len());
            for row in &values.rows {
                args.push(arg_ref(row.content.get(pos)?, lexed)?);
            }
            Some(KeyAccess { table: id, args, range: false, key_type: catalog.key_type(id) })
        }
        _ => None,
    }
}

/// Keys from a WHERE clause that is a conjunction containing `pk = arg` or
/// `pk IN (args)`.
fn point_keys(expr: &Expr, col: &ColumnRef<'_>, lexed: &Lexed) -> Option<Vec<ArgRef>> {
    match expr {
        Expr::Nested(e) => point_keys(e, col, lexed),
        Expr::BinaryOp { left, op: ast::BinaryOperator::And, right } => {
            point_keys(left, col, lexed).or_else(|| point_keys(right, col, lexed))
        }
        Expr::BinaryOp { left, op: ast::BinaryOperator::Eq, right } => {
            if col.matches(left) {
                arg_ref(right, lexed).map(|a| vec![a])
            } else if col.matches(right) {
                arg_ref(left, lexed).map(|a| vec![a])
            } else {
                None
            }
        }
        Expr::In { expr, target: ast::InTarget::List(list), negated: false, .. } if col.matches(expr) => {
            list.iter().map(|e| arg_ref(e, lexed)).collect()
        }
        _ => None,
    }
}

/// A placeholder (possibly cast) as a parameter or literal reference. Literals of
/// kind `Other` (escape strings, dollar quotes) are not keys.
fn arg_ref(expr: &Expr, lexed: &Lexed) -> Option<ArgRef> {
    match expr {
        Expr::Nested(e) => arg_ref(e, lexed),
        // one cast to a type that keeps the value (`$1::int`, `'x'::text`);
        // others change it (`5::bool::int` is 1, `'a '::char(2)` loses a space)
        Expr::Cast { expr: inner, data_type, .. } if !matches!(inner.as_ref(), Expr::Cast { .. }) => {
            let t = data_type.to_string().to_ascii_lowercase();
            let keeps = matches!(
                t.as_str(),
                "int" | "int2" | "int4" | "int8" | "integer" | "smallint" | "bigint" | "text" | "varchar" | "uuid"
            ) || t.starts_with("character varying");
            if keeps { arg_ref(inner, lexed) } else { None }
        }
        Expr::Value(v) => {
            let Value::Placeholder(p) = &v.value else {
                return None;
            };
            let n: u32 = p.strip_prefix('$')?.parse().ok()?;
            if n == 0 {
                return None;
            }
            if n <= lexed.param_max {
                Some(ArgRef::Param(n - 1))
            } else {
                let i = n - lexed.param_max - 1;
                let lit = lexed.literals.get(i as usize)?;
                (lit.kind != super::LiteralKind::Other).then_some(ArgRef::Literal(i))
            }
        }
        _ => None,
    }
}

//! What a parsed statement touches, gathered by one walk of its syntax
//! tree (`FactVisitor`): the relations it reads and writes, its CTEs, the
//! functions it calls and what they mean for caching, locking clauses,
//! `SELECT INTO`, a cascading TRUNCATE, dates read from computed strings.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, Expr, FromTable, Insert, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, TableObject,
    Visitor,
};

use super::NotCacheable;
use super::catalog::{Catalog, Effects};
use super::effects::{call_effects, hidden_call_effects};

#[derive(Default)]
pub(super) struct Facts {
    /// Every relation occurrence: (name, is system catalog).
    pub(super) relations: Vec<(String, bool)>,
    pub(super) cte_names: Vec<String>,
    /// Write targets, one per DML statement (top level or inside a CTE).
    pub(super) targets: Vec<String>,
    /// What the functions it calls mean for caching.
    pub(super) calls: Effects,
    pub(super) locking: bool,
    pub(super) select_into: Option<String>,
    /// `TRUNCATE ... CASCADE`: it empties tables it does not name.
    pub(super) cascade: bool,
    /// A date or time type is read from something (a cast, a function-style
    /// cast), and a string is computed somewhere (`||`, a string function):
    /// together, the computed string may be `'now'` read as the time.
    pub(super) datetime_read: bool,
    pub(super) string_computed: bool,
}

pub(super) struct FactVisitor<'a> {
    pub(super) facts: Facts,
    pub(super) catalog: &'a Catalog,
    pub(super) extra_volatile: &'a [String],
    /// The next relation visited is a function in FROM (`FROM f(1)`).
    pub(super) function_in_from: bool,
}

impl FactVisitor<'_> {
    /// `x.name`: a call of `name` when it is a user function.
    fn attribute(&mut self, name: &str) {
        if self.catalog.function(name).is_some_and(|f| f.user) {
            let e = call_effects(name, self.catalog, self.extra_volatile);
            self.facts.calls.merge(&e);
        }
    }

    fn call(&mut self, name: &ObjectName) {
        let Some(last) = name.0.last() else { return };
        let name = match last {
            ObjectNamePart::Identifier(id) => id.value.as_str(),
            ObjectNamePart::Function(f) => f.name.value.as_str(),
        };
        let e = call_effects(name, self.catalog, self.extra_volatile);
        self.facts.calls.merge(&e);
    }
}

/// Date and time types, also callable as functions (`timestamptz(x)`).
const DATETIME_NAMES: &[&str] = &["date", "time", "timetz", "timestamp", "timestamptz"];

/// Functions that build strings from other values: with a date or time
/// read in the same statement, the built string may be `'now'`.
const STRING_BUILDERS: &[&str] = &[
    "concat",
    "concat_ws",
    "format",
    "lower",
    "upper",
    "initcap",
    "replace",
    "reverse",
    "substr",
    "substring",
    "chr",
    "translate",
    "repeat",
    "lpad",
    "rpad",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "left",
    "right",
    "split_part",
    "convert_from",
    "decode",
    "encode",
    "string_agg",
    "array_to_string",
    "regexp_replace",
    "regexp_substr",
    "overlay",
    "quote_literal",
    "quote_nullable",
    "jsonb_build_object",
    "json_build_object",
    "jsonb_build_array",
    "json_build_array",
    "to_json",
    "to_jsonb",
    "jsonb_object",
    "json_object",
    "jsonb_set",
    "jsonb_insert",
    "row_to_json",
    "xmlelement",
    "string_to_array",
    "unistr",
];

/// An operator's symbol as `pg_operator.oprname` spells it.
fn operator_symbol(op: &ast::BinaryOperator) -> String {
    match op {
        ast::BinaryOperator::PGCustomBinaryOperator(parts) => parts.last().cloned().unwrap_or_default(),
        ast::BinaryOperator::Custom(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A type's unqualified name, as `pg_type.typname` spells it.
fn type_name(data_type: &ast::DataType) -> String {
    let full = data_type.to_string();
    let base = full.split(['(', '[']).next().unwrap_or(&full).trim();
    let last = base.rsplit('.').next().unwrap_or(base).trim();
    if last.starts_with('"') { last.trim_matches('"').to_string() } else { last.to_ascii_lowercase() }
}

/// A date or time type: its input reads `'now'`, `'today'`, ... as the
/// current time.
fn is_datetime(data_type: &ast::DataType) -> bool {
    let name = data_type.to_string().to_ascii_lowercase();
    (name.contains("date") || name.contains("time")) && !name.contains("interval")
}

/// An expression whose value is computed (not a literal, a parameter or a
/// column: a column of text holding 'now' is a limitation README states).
fn computed(expr: &Expr) -> bool {
    match expr {
        Expr::Nested(e) => computed(e),
        Expr::Value(_) | Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::TypedString { .. } => false,
        Expr::Cast { expr, .. } => computed(expr),
        _ => true,
    }
}

pub(crate) fn last_part(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => id.value.to_ascii_lowercase(),
        Some(ObjectNamePart::Function(f)) => f.name.value.to_ascii_lowercase(),
        None => String::new(),
    }
}

pub(super) fn is_system(name: &ObjectName) -> bool {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => id.value.to_ascii_lowercase(),
            ObjectNamePart::Function(f) => f.name.value.to_ascii_lowercase(),
        })
        .collect();
    let schema_system =
        parts.len() >= 2 && matches!(parts[parts.len() - 2].as_str(), "pg_catalog" | "information_schema");
    schema_system || parts.last().is_some_and(|t| t.starts_with("pg_"))
}

pub(crate) fn table_factor_name(tf: &TableFactor) -> Option<String> {
    match tf {
        TableFactor::Table { name, .. } => Some(last_part(name)),
        _ => None,
    }
}

impl Visitor for FactVisitor<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.facts.cte_names.push(cte.alias.name.value.to_ascii_lowercase());
            }
        }
        if !query.locks.is_empty() {
            self.facts.locking = true;
        }
        if let SetExpr::Select(select) = query.body.as_ref()
            && let Some(into) = &select.into
        {
            let name = match into.targets.first() {
                Some(Expr::Identifier(id)) => id.value.to_ascii_lowercase(),
                Some(Expr::CompoundIdentifier(ids)) => {
                    ids.last().map(|i| i.value.to_ascii_lowercase()).unwrap_or_default()
                }
                _ => String::new(),
            };
            self.facts.select_into = Some(name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        // a sample without REPEATABLE is drawn anew each time
        if let TableFactor::Table { sample: Some(kind), .. } = tf {
            let (ast::TableSampleKind::BeforeTableAlias(s) | ast::TableSampleKind::AfterTableAlias(s)) = kind;
            if s.seed.is_none() {
                let why = NotCacheable::Volatile("tablesample".into());
                self.facts.calls.merge(&Effects { uncacheable: Some(why), ..Effects::default() });
            }
        }
        match tf {
            TableFactor::Table { args: Some(_), .. } => self.function_in_from = true,
            TableFactor::Function { name, .. } => self.call(name),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.function_in_from) {
            self.call(relation);
        } else {
            self.facts.relations.push((last_part(relation), is_system(relation)));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(f) => {
                self.call(&f.name);
                let name = last_part(&f.name);
                self.facts.datetime_read |=
                    DATETIME_NAMES.contains(&name.as_str()) || self.catalog.is_datetime_type(&name);
                self.facts.string_computed |= STRING_BUILDERS.contains(&name.as_str());
            }
            Expr::BinaryOp { op: ast::BinaryOperator::StringConcat, .. } => self.facts.string_computed = true,
            Expr::Cast { data_type, .. } | Expr::TypedString(ast::TypedString { data_type, .. })
                if is_datetime(data_type) || self.catalog.is_datetime_type(&type_name(data_type)) =>
            {
                self.facts.datetime_read = true;
            }
            _ => {}
        }
        match expr {
            // attribute notation: `t.f` and `(t).f` are `f(t)` when f is a function
            Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
                self.attribute(ids.last().map_or("", |i| i.value.as_str()));
            }
            Expr::CompoundFieldAccess { access_chain, .. } => {
                for access in access_chain {
                    if let ast::AccessExpr::Dot(Expr::Identifier(id)) = access {
                        self.attribute(&id.value);
                    }
                }
            }
            // a date/time read from a computed string may be 'now'
            Expr::Cast { expr: operand, data_type, .. }
                if (is_datetime(data_type) || self.catalog.is_datetime_type(&type_name(data_type)))
                    && computed(operand) =>
            {
                let why = NotCacheable::Volatile(format!("a string computed and cast to {data_type}"));
                self.facts.calls.merge(&Effects { uncacheable: Some(why), ..Effects::default() });
            }
            _ => {}
        }
        // operators and casts call functions too: a user's may do anything
        let hidden = match expr {
            Expr::BinaryOp { op, .. } => Some((operator_symbol(op), true)),
            Expr::UnaryOp { op, .. } => Some((op.to_string(), true)),
            Expr::AnyOp { compare_op, .. } | Expr::AllOp { compare_op, .. } => {
                Some((operator_symbol(compare_op), true))
            }
            Expr::Cast { data_type, .. } | Expr::TypedString(ast::TypedString { data_type, .. }) => {
                Some((type_name(data_type), false))
            }
            _ => None,
        };
        if let Some((name, operator)) = hidden {
            let info = if operator { self.catalog.operator(&name) } else { self.catalog.type_functions(&name) };
            if info.is_some() {
                self.facts.calls.merge(&hidden_call_effects(&name, info));
            }
            if let Some(checks) = self.catalog.type_effects.get(&name).filter(|_| !operator) {
                // a domain's checks run on the cast
                self.facts.calls.merge(checks);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        let target = match statement {
            Statement::Insert(Insert { table: TableObject::TableName(name), .. }) => Some(last_part(name)),
            Statement::Update(u) => table_factor_name(&u.table.relation),
            Statement::Delete(d) => {
                let from = match &d.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
                };
                from.first().and_then(|t| table_factor_name(&t.relation))
            }
            Statement::Merge(m) => table_factor_name(&m.table),
            Statement::Truncate(t) => {
                self.facts.cascade |= matches!(t.cascade, Some(ast::CascadeOption::Cascade));
                None
            }
            _ => None,
        };
        if let Some(t) = target {
            self.facts.targets.push(t);
        }
        ControlFlow::Continue(())
    }
}

//! First-sight analysis of a shape with `sqlparser`, and the shape registry
//! that makes every later sight a hash lookup.

use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    self, Expr, FromTable, Insert, ObjectName, ObjectNamePart, OnConflictAction, OnInsert, Query, SetExpr, Statement,
    TableFactor, TableObject, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::lexer::{LexError, Lexed, Lexer, shape_with_placeholders};
use super::{ArgRef, KeyAccess, NotCacheable, Shape, ShapeId, StatementKind, TableId, TxnControl};
use crate::hash::FixedMap;

/// Built-in functions whose result changes between calls with the same arguments.
const VOLATILE_FUNCTIONS: &[&str] = &[
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "localtime",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "setseed",
    "nextval",
    "currval",
    "lastval",
    "setval",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "pg_sleep",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_last_wal_replay_lsn",
    "set_config",
    "pg_notify",
    "dblink",
    "dblink_exec",
    "lo_import",
    "lo_export",
];

/// Tables by name with their primary keys. Names are lower-case and unqualified:
/// `public.users` and `users` are one table (conservative: a write to either
/// invalidates both; the cache key carries `search_path`).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    ids: FixedMap<String, TableId>,
    names: Vec<String>,
    primary_keys: Vec<Option<String>>,
    integer_keys: Vec<bool>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares `table`'s single-column primary key.
    pub fn set_primary_key(&mut self, table: &str, column: &str) -> TableId {
        let id = self.intern(table);
        self.primary_keys[id.0 as usize] = Some(column.to_ascii_lowercase());
        id
    }

    pub fn intern(&mut self, table: &str) -> TableId {
        let name = table.to_ascii_lowercase();
        if let Some(id) = self.ids.get(&name) {
            return *id;
        }
        let id = TableId(u32::try_from(self.names.len()).expect("fewer than 2^32 tables"));
        self.ids.insert(name.clone(), id);
        self.names.push(name);
        self.primary_keys.push(None);
        self.integer_keys.push(false);
        id
    }

    /// Declares that `table`'s primary key is an integer: small key ranges
    /// (`id BETWEEN 5 AND 15`) then depend on their keys, not the whole table.
    pub fn set_integer_key(&mut self, table: &str) {
        let id = self.intern(table);
        self.integer_keys[id.0 as usize] = true;
    }

    pub fn integer_key(&self, id: TableId) -> bool {
        self.integer_keys.get(id.0 as usize).copied().unwrap_or(false)
    }

    pub fn get(&self, table: &str) -> Option<TableId> {
        self.ids.get(&table.to_ascii_lowercase()).copied()
    }

    pub fn name(&self, id: TableId) -> &str {
        &self.names[id.0 as usize]
    }

    pub fn primary_key(&self, id: TableId) -> Option<&str> {
        self.primary_keys.get(id.0 as usize).and_then(|p| p.as_deref())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct AnalyzerConfig {
    /// Upper bound on registered shapes; past it, new shapes are analysed on
    /// every sight (slow, never wrong).
    pub shapes_max: usize,
    /// User-defined functions that must be treated as volatile.
    pub volatile_functions: Vec<String>,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig { shapes_max: 100_000, volatile_functions: Vec::new() }
    }
}

/// The shape registry: text shape -> analysed [`Shape`].
#[derive(Debug)]
pub struct Analyzer {
    config: AnalyzerConfig,
    catalog: Catalog,
    lexer: Lexer,
    by_shape: FixedMap<Box<str>, ShapeId>,
    shapes: Vec<Arc<Shape>>,
    /// Shapes analysed but not registered because the registry was full.
    pub shapes_over_limit: u64,
}

impl Analyzer {
    pub fn new(config: AnalyzerConfig, catalog: Catalog) -> Self {
        Analyzer {
            config,
            catalog,
            lexer: Lexer::new(),
            by_shape: FixedMap::default(),
            shapes: Vec::new(),
            shapes_over_limit: 0,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn shape(&self, id: ShapeId) -> Option<&Arc<Shape>> {
        self.shapes.get(id.0 as usize)
    }

    pub fn shape_count(&self) -> usize {
        self.shapes.len()
    }

    /// Lexes `sql` and returns its shape (analysed on first sight) with the lexed
    /// literals. Unlexable text (an unterminated quote) is an error: the caller
    /// sends it to the primary, which answers with PostgreSQL's own error.
    pub fn lookup(&mut self, sql: &str) -> Result<(Arc<Shape>, &Lexed), LexError> {
        let lexed = self.lexer.lex(sql)?;
        if let Some(id) = self.by_shape.get(lexed.shape.as_str()) {
            return Ok((self.shapes[id.0 as usize].clone(), lexed));
        }
        let next_id = ShapeId(u32::try_from(self.shapes.len()).unwrap_or(u32::MAX));
        let mut shape = analyze(lexed, sql, &mut self.catalog, &self.config);
        shape.session_private = changes_session_invisibly(&shape.text);
        if self.shapes.len() < self.config.shapes_max {
            shape.id = next_id;
            let shape = Arc::new(shape);
            self.by_shape.insert(lexed.shape.clone().into_boxed_str(), next_id);
            self.shapes.push(shape.clone());
            Ok((shape, lexed))
        } else {
            self.shapes_over_limit += 1;
            shape.id = ShapeId(u32::MAX);
            Ok((Arc::new(shape), lexed))
        }
    }

    /// Analyses without registering: for prepared statements, whose shape the
    /// caller keeps by statement name.
    pub fn analyze_text(&mut self, sql: &str) -> Result<Shape, LexError> {
        let (shape, _) = self.lookup(sql)?;
        Ok((*shape).clone())
    }
}

fn basic(kind: StatementKind, text: String, lexed: &Lexed) -> Shape {
    Shape {
        id: ShapeId(u32::MAX),
        fingerprint: crate::hash::hash_bytes(text.as_bytes()),
        text,
        kind,
        txn: None,
        reads: Vec::new(),
        writes: Vec::new(),
        writes_unknown: false,
        cacheable: Err(NotCacheable::NotARead(kind)),
        read_keys: Vec::new(),
        refreshable: false,
        write_keys: None,
        literal_count: u32::try_from(lexed.literals.len()).unwrap_or(u32::MAX),
        param_count: lexed.param_max,
        session_private: false,
    }
}

/// Whether a statement (normalised text: lower case, literals as `$n`) may
/// change what later queries of the session return in a way no SET shows:
/// `set_config(...)`, a temporary table, view or sequence (it shadows a table
/// of the same name), anything naming `pg_temp`.
pub fn changes_session_invisibly(text: &str) -> bool {
    if text.contains("set_config") || text.contains("pg_temp") {
        return true;
    }
    let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == '(').filter(|w| !w.is_empty()).collect();
    words.windows(2).any(|w| {
        matches!(w[1], "temp" | "temporary") && matches!(w[0], "create" | "global" | "local" | "replace" | "into")
    })
}

/// Analyses one shape. Never panics on any input.
fn analyze(lexed: &Lexed, original: &str, catalog: &mut Catalog, config: &AnalyzerConfig) -> Shape {
    let text = shape_with_placeholders(lexed);
    if lexed.statements == 0 {
        let mut s = basic(StatementKind::Other, text, lexed);
        s.cacheable = Err(NotCacheable::Empty);
        return s;
    }
    if lexed.statements > 1 {
        let mut s = basic(StatementKind::Other, text, lexed);
        s.cacheable = Err(NotCacheable::MultiStatement);
        s.writes_unknown = true;
        return s;
    }
    let words: Vec<&str> = text.split(' ').take(3).collect();
    let w = |i: usize| words.get(i).copied().unwrap_or("");
    let first = lexed.first_word.as_str();
    let txn = match (first, w(1)) {
        ("begin", _) | ("start", "transaction") => Some(TxnControl::Begin),
        ("commit" | "end", second) if second != "prepared" => Some(TxnControl::Commit),
        ("rollback" | "abort", "to") => Some(TxnControl::RollbackTo),
        ("rollback" | "abort", second) if second != "prepared" => Some(TxnControl::Rollback),
        ("savepoint", _) => Some(TxnControl::Savepoint),
        ("release", _) => Some(TxnControl::Release),
        _ => None,
    };
    if let Some(t) = txn {
        let mut s = basic(StatementKind::Transaction, text, lexed);
        s.txn = Some(t);
        return s;
    }
    match first {
        "set" | "reset" | "discard" => return basic(StatementKind::Session, text, lexed),
        "show" => {
            let mut s = basic(StatementKind::Read, text, lexed);
            s.cacheable = Err(NotCacheable::NotAQuery);
            return s;
        }
        "create" | "alter" | "drop" | "grant" | "revoke" | "comment" | "reindex" | "cluster" | "security" => {
            let mut s = basic(StatementKind::Ddl, text, lexed);
            s.writes_unknown = true;
            return s;
        }
        "explain"
            if matches!(w(1), "analyze" | "analyse") || (w(1) == "(" && matches!(w(2), "analyze" | "analyse")) =>
        {
            let mut s = basic(StatementKind::Other, text, lexed);
            s.writes_unknown = true;
            return s;
        }
        "select" | "with" | "values" | "table" | "insert" | "update" | "delete" | "merge" | "copy" | "explain"
        | "truncate" | "(" => {}
        _ => {
            // LISTEN, NOTIFY, DO, CALL, VACUUM, ANALYZE, LOCK, PREPARE, EXECUTE, ...
            let mut s = basic(StatementKind::Other, text, lexed);
            s.writes_unknown = matches!(first, "do" | "call" | "execute" | "import" | "load" | "refresh");
            return s;
        }
    }
    let dialect = PostgreSqlDialect {};
    // PostgreSQL syntax sqlparser lacks, rewritten to an equivalent it knows:
    // the classification is the same.
    let mut parse_text = text.clone();
    if first == "table" {
        parse_text = format!("select * from {}", &text["table".len()..]);
    }
    for (from, to) in [(" for no key update", " for update"), (" for key share", " for share")] {
        parse_text = parse_text.replace(from, to);
    }
    // Literals as placeholders first (so keys can point at arguments); the
    // original text if sqlparser refuses a placeholder somewhere (`INTERVAL $1`).
    let (statements, keys_usable) = match Parser::parse_sql(&dialect, &parse_text) {
        Ok(st) => (st, true),
        Err(_) => match Parser::parse_sql(&dialect, original) {
            Ok(st) => (st, false),
            Err(_) if first == "copy" => return copy_by_keywords(text, lexed, catalog),
            Err(e) => {
                let mut s = basic(StatementKind::Other, text, lexed);
                s.cacheable = Err(NotCacheable::Unparsable(e.to_string()));
                s.writes_unknown = !matches!(first, "select" | "values" | "table" | "explain" | "(");
                return s;
            }
        },
    };
    let [statement] = statements.as_slice() else {
        let mut s = basic(StatementKind::Other, text, lexed);
        s.cacheable = Err(NotCacheable::MultiStatement);
        s.writes_unknown = true;
        return s;
    };
    analyze_statement(statement, text, lexed, keys_usable, catalog, config)
}

/// COPY options sqlparser does not know (`WITH (FREEZE ON)`): the table follows
/// COPY, the direction is FROM or TO.
fn copy_by_keywords(text: String, lexed: &Lexed, catalog: &mut Catalog) -> Shape {
    let words: Vec<&str> = text.split(' ').collect();
    let from = words.contains(&"from");
    let mut s = basic(if from { StatementKind::Write } else { StatementKind::Read }, text.clone(), lexed);
    match words.get(1) {
        Some(&"(") | None => s.writes_unknown = from,
        Some(name) => {
            let table = name.trim_matches('"').rsplit('.').next().unwrap_or(name).to_ascii_lowercase();
            let id = catalog.intern(&table);
            if from {
                s.writes.push(id)
            } else {
                s.reads.push(id)
            }
            // a name followed by `.`: schema-qualified, the table is the last part
            if words.get(2) == Some(&".")
                && let Some(t) = words.get(3)
            {
                let id = catalog.intern(&t.trim_matches('"').to_ascii_lowercase());
                if from { s.writes = vec![id] } else { s.reads = vec![id] }
            }
        }
    }
    if !from {
        s.cacheable = Err(NotCacheable::NotAQuery);
    }
    s
}

#[derive(Default)]
struct Facts {
    /// Every relation occurrence: (name, is system catalog).
    relations: Vec<(String, bool)>,
    cte_names: Vec<String>,
    /// Write targets, one per DML statement (top level or inside a CTE).
    targets: Vec<String>,
    volatile: Option<String>,
    locking: bool,
    select_into: Option<String>,
}

struct FactVisitor<'a> {
    facts: Facts,
    extra_volatile: &'a [String],
}

fn last_part(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(id)) => id.value.to_ascii_lowercase(),
        Some(ObjectNamePart::Function(f)) => f.name.value.to_ascii_lowercase(),
        None => String::new(),
    }
}

fn is_system(name: &ObjectName) -> bool {
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

fn table_factor_name(tf: &TableFactor) -> Option<String> {
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

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.facts.relations.push((last_part(relation), is_system(relation)));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = last_part(&f.name);
            if self.facts.volatile.is_none()
                && (VOLATILE_FUNCTIONS.contains(&name.as_str())
                    || name.starts_with("pg_advisory")
                    || name.starts_with("pg_try_advisory")
                    || self.extra_volatile.iter().any(|v| v.eq_ignore_ascii_case(&name)))
            {
                self.facts.volatile = Some(name);
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
            _ => None,
        };
        if let Some(t) = target {
            self.facts.targets.push(t);
        }
        ControlFlow::Continue(())
    }
}

fn analyze_statement(
    statement: &Statement,
    text: String,
    lexed: &Lexed,
    keys_usable: bool,
    catalog: &mut Catalog,
    config: &AnalyzerConfig,
) -> Shape {
    let mut v = FactVisitor { facts: Facts::default(), extra_volatile: &config.volatile_functions };
    let _ = statement.visit(&mut v);
    let mut facts = v.facts;

    let mut s = basic(StatementKind::Read, text, lexed);
    // kind and explicit targets by statement type
    let mut extra_targets: Vec<String> = Vec::new();
    let mut plain_query = false;
    match statement {
        Statement::Query(_) => {
            if let Some(into) = facts.select_into.take() {
                s.kind = StatementKind::Write;
                extra_targets.push(into);
            } else if !facts.targets.is_empty() {
                s.kind = StatementKind::Write;
            } else {
                plain_query = true;
            }
        }
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => {
            s.kind = StatementKind::Write;
        }
        Statement::Truncate(t) => {
            s.kind = StatementKind::Write;
            // TRUNCATE's names are relations, not reads
            extra_targets.extend(t.table_names.iter().map(|n| last_part(&n.name)));
        }
        Statement::Copy { source, to, .. } => {
            if *to {
                s.kind = StatementKind::Read;
                if let ast::CopySource::Table { table_name, .. } = source {
                    facts.relations.push((last_part(table_name), is_system(table_name)));
                }
            } else {
                s.kind = StatementKind::Write;
                if let ast::CopySource::Table { table_name, .. } = source {
                    extra_targets.push(last_part(table_name));
                }
            }
        }
        Statement::Explain { .. } => s.kind = StatementKind::Read,
        _ => {
            s.kind = StatementKind::Other;
            s.writes_unknown = true;
        }
    }

    // reads = relation occurrences, minus CTE references, minus one occurrence per target
    let mut remaining: Vec<(String, bool)> =
        facts.relations.iter().filter(|(n, _)| !facts.cte_names.contains(n)).cloned().collect();
    let all_targets: Vec<String> = facts.targets.iter().chain(extra_targets.iter()).cloned().collect();
    for t in &all_targets {
        if let Some(pos) = remaining.iter().position(|(n, _)| n == t) {
            remaining.remove(pos);
        }
    }
    let mut reads: Vec<TableId> = remaining.iter().map(|(n, _)| catalog.intern(n)).collect();
    reads.sort();
    reads.dedup();
    let mut writes: Vec<TableId> = all_targets.iter().map(|n| catalog.intern(n)).collect();
    writes.sort();
    writes.dedup();
    s.reads = reads;
    s.writes = writes;

    // cacheability
    s.cacheable = if s.kind != StatementKind::Read {
        Err(NotCacheable::NotARead(s.kind))
    } else if !plain_query {
        Err(NotCacheable::NotAQuery)
    } else if let Some(f) = facts.volatile.clone() {
        Err(NotCacheable::Volatile(f))
    } else if facts.locking {
        Err(NotCacheable::Locking)
    } else if let Some((n, _)) = facts.relations.iter().find(|(_, sys)| *sys) {
        Err(NotCacheable::SystemCatalog(n.clone()))
    } else {
        Ok(())
    };
    if facts.volatile.is_some() && s.kind == StatementKind::Read {
        // a volatile function may be nextval() or a user function that writes
        s.writes_unknown |= facts.volatile.as_deref().is_some_and(|f| matches!(f, "nextval" | "setval" | "set_config"));
    }

    if keys_usable && facts.cte_names.is_empty() {
        let resolve = |table: &str, catalog: &Catalog| {
            catalog.get(table).and_then(|id| catalog.primary_key(id).map(|pk| (id, pk.to_string())))
        };
        if s.kind == StatementKind::Read && plain_query {
            if let Statement::Query(q) = statement
                && let SetExpr::Select(sel) = q.body.as_ref()
            {
                s.read_keys = read_keys(sel, facts.relations.len(), lexed, catalog);
                s.refreshable = s.read_keys.len() == 1
                    && !s.read_keys[0].range
                    && s.read_keys[0].args.len() == 1
                    && is_row_projection(q, sel, catalog.primary_key(s.read_keys[0].table).unwrap_or(""));
            }
        } else if s.kind == StatementKind::Write && facts.relations.len() == 1 {
            s.write_keys = write_keys(statement, lexed, catalog, &resolve);
        }
    }
    s
}

/// Keyed tables of a SELECT: each table of the FROM clause (joins included)
/// whose primary key the WHERE conjunction pins to arguments. Only when every
/// relation of the statement is in the FROM clause (no subqueries), each once.
fn read_keys(sel: &ast::Select, relation_count: usize, lexed: &Lexed, catalog: &Catalog) -> Vec<KeyAccess> {
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
            out.push(KeyAccess { table: id, args, range: false });
        } else if catalog.integer_key(id)
            && let Some((lo, hi)) = range_keys(selection, &col, lexed)
        {
            out.push(KeyAccess { table: id, args: vec![lo, hi], range: true });
        }
    }
    out
}

/// `SELECT plain columns FROM one table WHERE pk = arg`: nothing else that
/// could make the result depend on more than that row's columns.
fn is_row_projection(q: &Query, sel: &ast::Select, pk: &str) -> bool {
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

type Resolve<'a> = dyn Fn(&str, &Catalog) -> Option<(TableId, String)> + 'a;

fn write_keys(statement: &Statement, lexed: &Lexed, catalog: &Catalog, resolve: &Resolve<'_>) -> Option<KeyAccess> {
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
            Some(KeyAccess { table: id, args, range: false })
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
            Some(KeyAccess { table: id, args, range: false })
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
            Some(KeyAccess { table: id, args, range: false })
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
        Expr::Cast { expr, .. } => arg_ref(expr, lexed),
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

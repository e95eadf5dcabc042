//! First-sight analysis of a shape with `sqlparser`, and the shape registry
//! that makes every later sight a hash lookup.

use std::sync::Arc;

use sqlparser::ast::{self, SetExpr, Statement, Visit};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::access::{is_row_projection, read_keys, write_keys};
use super::catalog::{Catalog, Effects, RelKind};
use super::effects::{call_effects, hidden_call_effects, relation_effects};
use super::facts::{FactVisitor, Facts, is_system, last_part};
use super::lexer::{LexError, Lexed, Lexer, shape_with_placeholders};
use super::{NotCacheable, Shape, ShapeId, StatementKind, TableId, TxnControl};
use crate::hash::FixedMap;

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

    /// Changes the catalog (a reload from the database): every shape is
    /// analysed anew from here on; shapes analysed before carry an older
    /// [`Shape::generation`].
    pub fn update_catalog(&mut self, update: impl FnOnce(&mut Catalog)) {
        update(&mut self.catalog);
        self.catalog.bump_generation();
        self.by_shape.clear();
        self.shapes.clear();
        // what casts to types and writes to relations evaluate, analysed once
        let checks: Vec<(String, Vec<String>)> =
            self.catalog.type_checks().map(|(t, c)| (t.clone(), c.clone())).collect();
        let writes: Vec<(TableId, Vec<String>)> = self.catalog.relation_writes().map(|(t, w)| (t, w.clone())).collect();
        let mut type_effects = FixedMap::default();
        for (name, exprs) in checks {
            let mut e = Effects::default();
            exprs.iter().for_each(|sql| e.merge(&definition_effects(sql, &mut self.catalog, &self.config)));
            type_effects.insert(name, e);
        }
        let mut write_effects = FixedMap::default();
        for (table, exprs) in writes {
            let mut e = Effects::default();
            exprs.iter().for_each(|sql| e.merge(&definition_effects(sql, &mut self.catalog, &self.config)));
            write_effects.insert(table, e);
        }
        self.catalog.type_effects = type_effects;
        self.catalog.write_effects = write_effects;
    }

    pub fn generation(&self) -> u64 {
        self.catalog.generation()
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
        shape.generation = self.catalog.generation();
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
        session_opaque: false,
        writes_opaque: false,
        reads_any: false,
        reads_settings: false,
        user_code: None,
        generation: 0,
    }
}

/// A statement whose effects cannot be known: it may change the session's
/// state and write anything.
fn opaque(mut s: Shape) -> Shape {
    s.session_opaque = true;
    s.writes_opaque = true;
    s
}

/// Whether a statement (normalised text: lower case, literals as `$n`) may
/// change what later queries of the session return in a way no SET shows:
/// a temporary table, view or sequence (it shadows a table of the same
/// name), anything naming `pg_temp` (`set_config` and functions that may
/// call it: [`Shape::session_opaque`]).
pub fn changes_session_invisibly(text: &str) -> bool {
    if text.contains("pg_temp") {
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
        return multi_statement(text, lexed);
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
        _ if is_ddl_word(first) => {
            let mut s = basic(StatementKind::Ddl, text, lexed);
            s.writes_unknown = true;
            // the query of `CREATE TABLE ... AS` (or of a materialized view)
            // runs now: a function it calls may change the session
            let query = s
                .text
                .split_once(" as ")
                .map(|(_, q)| q)
                .filter(|q| ["select ", "with ", "values ", "table ", "( "].iter().any(|k| q.starts_with(k)));
            if query.is_some_and(|q| !calls_harmless(q, catalog, config)) {
                s = opaque(s);
            }
            return s;
        }
        // runs the statement it explains, whatever it is
        "explain"
            if matches!(w(1), "analyze" | "analyse") || (w(1) == "(" && matches!(w(2), "analyze" | "analyse")) =>
        {
            return opaque(basic(StatementKind::Other, text, lexed));
        }
        "select" | "with" | "values" | "table" | "insert" | "update" | "delete" | "merge" | "copy" | "explain"
        | "truncate" | "(" => {}
        // code the analyzer cannot see into: any effect on data and session
        "do" | "call" | "execute" | "load" => return opaque(basic(StatementKind::Other, text, lexed)),
        _ => {
            // LISTEN, NOTIFY, VACUUM, ANALYZE, LOCK, PREPARE, DECLARE, IMPORT, REFRESH, ...
            let mut s = basic(StatementKind::Other, text, lexed);
            s.writes_unknown = matches!(first, "import" | "refresh");
            // a cursor's query, run by FETCH in the cursor's transaction (or
            // at once, WITH HOLD outside one): a function it calls may change
            // the session or write
            let cursor = (first == "declare").then(|| s.text.split_once(" for ").map(|(_, q)| q)).flatten();
            if cursor.is_some_and(|q| !calls_harmless(q, catalog, config)) {
                s = opaque(s);
            }
            return s;
        }
    }
    if operators(&text) > OPERATORS_MAX {
        // a chain of operators parses to a tree as deep as it is long, which
        // analysing (and dropping) would walk recursively: past this, a
        // thread's stack could overflow, which aborts the whole process
        return unparsable(text, lexed, "too many operators to analyse", catalog, config);
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
            Err(e) => return unparsable(text, lexed, &e.to_string(), catalog, config),
        },
    };
    let [statement] = statements.as_slice() else {
        return multi_statement(text, lexed);
    };
    analyze_statement(statement, text, lexed, keys_usable, catalog, config)
}

/// Operators a statement may chain before it is no longer analysed (a
/// chain of 50 000 overflowed a 2 MB stack).
const OPERATORS_MAX: usize = 2000;

/// How deep the expression trees of a normalised statement can be: the
/// longest chain of operators (`+`, `=`, `AND`, `::`, ...) between commas,
/// where a parenthesised part counts for the chain inside it (a list of
/// 5 000 negative values is flat; `((1+1+...)+1+...)` is as deep as all
/// its operators).
fn operators(shape: &str) -> usize {
    // per open parenthesis: the chain so far, the longest chain inside
    let mut levels = vec![(0usize, 0usize)];
    let mut longest = 0;
    for t in shape.split(' ') {
        match t {
            "(" | "[" => levels.push((0, 0)),
            ")" | "]" if levels.len() > 1 => {
                let (chain, inside) = levels.pop().unwrap_or_default();
                if let Some(outer) = levels.last_mut() {
                    outer.0 += chain.max(inside);
                    outer.1 = outer.1.max(outer.0);
                    longest = longest.max(outer.0);
                }
            }
            "," => {
                if let Some(level) = levels.last_mut() {
                    level.1 = level.1.max(level.0);
                    level.0 = 0;
                }
            }
            _ if matches!(t, "and" | "or" | "not")
                || (!t.is_empty() && t.bytes().all(|b| b"+-*/<>=~!@#%^&|`?:".contains(&b))) =>
            {
                if let Some(level) = levels.last_mut() {
                    level.0 += 1;
                    longest = longest.max(level.0);
                }
            }
            _ => {}
        }
    }
    longest
}

/// Statements that change the schema: what any cached result means may
/// have changed.
fn is_ddl_word(word: &str) -> bool {
    matches!(word, "create" | "alter" | "drop" | "grant" | "revoke" | "comment" | "reindex" | "cluster" | "security")
}

/// Several statements in one string: each may change the session, write,
/// or (DDL) change what everything cached means.
fn multi_statement(text: String, lexed: &Lexed) -> Shape {
    let ddl = std::iter::once(text.as_str())
        .chain(text.split(" ; ").skip(1))
        .any(|st| is_ddl_word(st.split(' ').next().unwrap_or("")));
    let mut s = opaque(basic(StatementKind::Other, text, lexed));
    s.cacheable = Err(NotCacheable::MultiStatement);
    s.writes_unknown = ddl;
    s
}

/// A statement sqlparser cannot parse: a read whose every call (a word
/// followed by `(`) is a function the catalog knows to be harmless keeps
/// the session's context; anything else may do anything.
fn unparsable(text: String, lexed: &Lexed, error: &str, catalog: &Catalog, config: &AnalyzerConfig) -> Shape {
    let first = lexed.first_word.as_str();
    let mut s = basic(StatementKind::Other, text, lexed);
    s.cacheable = Err(NotCacheable::Unparsable(error.to_string()));
    // (what it calls is not known as the parser knows a parsed one's)
    s.user_code = Some(format!("a text the analysis cannot parse ({error})"));
    let read = matches!(first, "select" | "values" | "table" | "explain" | "(");
    if !(read && calls_harmless(&s.text, catalog, config) && catalog.comparisons().is_none()) {
        s = opaque(s);
    }
    s
}

/// Whether every function a normalised text calls (and every operator it
/// uses) is known to change neither the session nor any row: what is said
/// of a statement whose text the parser does not see into (an unparsable
/// one, a cursor's query, `CREATE TABLE ... AS`).
fn calls_harmless(text: &str, catalog: &Catalog, config: &AnalyzerConfig) -> bool {
    let words: Vec<&str> = text.split(' ').collect();
    let calls = words.windows(2).filter(|w| w[1] == "(").all(|w| {
        let name = w[0].trim_matches('"');
        let keyword = matches!(
            w[0],
            "in" | "exists"
                | "values"
                | "any"
                | "all"
                | "some"
                | "cast"
                | "array"
                | "row"
                | "as"
                | "from"
                | "join"
                | "on"
                | "using"
                | "where"
                | "and"
                | "or"
                | "not"
                | "select"
                | "over"
                | "filter"
                | "within"
                | "group"
                | "by"
                | "lateral"
                | "then"
                | "else"
                | "when"
                | "case"
                | "is"
                | "distinct"
                | "="
                | ","
                | "("
                | "["
                | "+"
                | "-"
                | "*"
                | "/"
                | "<"
                | ">"
                | "<="
                | ">="
                | "<>"
                | "!="
                | "||"
                | "::"
        );
        keyword || {
            let e = call_effects(name, catalog, &config.volatile_functions);
            !e.session_opaque && !e.writes_opaque
        }
    });
    // operator tokens whose functions are a user's
    let operators_harmless = words.iter().filter(|w| w.bytes().all(|c| b"+-*/<>=~!@#%^&|`?".contains(&c))).all(|w| {
        let e = hidden_call_effects(w, catalog.operator(w));
        !e.session_opaque && !e.writes_opaque
    });
    calls && operators_harmless
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

fn analyze_statement(
    statement: &Statement,
    text: String,
    lexed: &Lexed,
    keys_usable: bool,
    catalog: &mut Catalog,
    config: &AnalyzerConfig,
) -> Shape {
    let mut facts = {
        let mut v = FactVisitor {
            facts: Facts::default(),
            catalog,
            extra_volatile: &config.volatile_functions,
            function_in_from: false,
        };
        let _ = statement.visit(&mut v);
        v.facts
    };

    let mut s = basic(StatementKind::Read, text, lexed);
    let (extra_targets, plain_query) = classify(statement, &mut s, &mut facts);

    // reads = relation occurrences, minus CTE references, minus one occurrence per target
    let mut remaining: Vec<(String, bool)> =
        facts.relations.iter().filter(|(n, _)| !facts.cte_names.contains(n)).cloned().collect();
    let all_targets: Vec<String> = facts.targets.iter().chain(extra_targets.iter()).cloned().collect();
    for t in &all_targets {
        if let Some(pos) = remaining.iter().position(|(n, _)| n == t) {
            remaining.remove(pos);
        }
    }
    // what reading each relation means: a view is its definition's tables
    let mut effects = std::mem::take(&mut facts.calls);
    // a user's comparison operator is used implicitly (IN, CASE, DISTINCT,
    // GROUP BY, ORDER BY, joins): every statement may call it
    if let Some(f) = catalog.comparisons() {
        effects.merge(&hidden_call_effects("a comparison operator", Some(f)));
    }
    let mut unknown: Option<String> = None;
    let mut reads: Vec<TableId> = Vec::with_capacity(remaining.len());
    for (name, system) in &remaining {
        if !system && !catalog.knows(name) {
            unknown.get_or_insert_with(|| name.clone());
        }
        let id = catalog.intern(name);
        match relation_effects(id, catalog, &mut |sql, c| definition_effects(sql, c, config)) {
            Some(e) => effects.merge(&e),
            None => reads.push(id),
        }
    }
    reads.append(&mut effects.reads);
    reads.sort();
    reads.dedup();
    let mut writes: Vec<TableId> = all_targets.iter().map(|n| catalog.intern(n)).collect();
    writes.sort();
    writes.dedup();
    // what the targets' defaults, checks and domains do, the write does
    for t in &writes {
        if let Some(w) = catalog.write_effects.get(t) {
            effects.session_opaque |= w.session_opaque;
            effects.writes_opaque |= w.writes_opaque;
            if effects.user_code.is_none() {
                effects.user_code.clone_from(&w.user_code);
            }
        }
    }
    // a write that reaches rows it does not name
    let targets_opaque =
        writes.iter().any(|t| catalog.relation(*t).is_some_and(|r| r.writes_opaque || r.kind != RelKind::Table))
            || all_targets.iter().any(|t| !catalog.knows(t));
    s.reads = reads;
    s.writes = writes;
    s.reads_any = effects.reads_any;
    s.user_code.clone_from(&effects.user_code);
    s.reads_settings = effects.reads_settings;
    s.session_opaque = effects.session_opaque;
    s.writes_opaque = effects.writes_opaque || facts.cascade || (targets_opaque && s.kind == StatementKind::Write);

    s.cacheable = cacheability(&s, plain_query, &effects, &facts, unknown);
    if keys_usable && facts.cte_names.is_empty() {
        attach_keys(&mut s, statement, plain_query, facts.relations.len(), lexed, catalog);
    }
    s
}

/// The statement's kind, and the targets its type names besides those
/// the visitor found (`SELECT INTO`, TRUNCATE, COPY FROM); whether it is
/// a plain query.
fn classify(statement: &Statement, s: &mut Shape, facts: &mut Facts) -> (Vec<String>, bool) {
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
    (extra_targets, plain_query)
}

/// Whether a read may be cached, and the first reason it may not.
fn cacheability(
    s: &Shape,
    plain_query: bool,
    effects: &Effects,
    facts: &Facts,
    unknown: Option<String>,
) -> Result<(), NotCacheable> {
    if s.kind != StatementKind::Read {
        Err(NotCacheable::NotARead(s.kind))
    } else if !plain_query {
        Err(NotCacheable::NotAQuery)
    } else if let Some(why) = effects.uncacheable.clone() {
        Err(why)
    } else if facts.datetime_read && facts.string_computed {
        Err(NotCacheable::Volatile("a computed string read as a date or time (it may be 'now')".into()))
    } else if facts.locking {
        Err(NotCacheable::Locking)
    } else if let Some((n, _)) = facts.relations.iter().find(|(_, sys)| *sys) {
        Err(NotCacheable::SystemCatalog(n.clone()))
    } else if let Some(n) = unknown {
        Err(NotCacheable::UnknownRelation(n))
    } else {
        Ok(())
    }
}

/// The keys a read looks up or a write reaches, where the catalog
/// names the tables' keys.
fn attach_keys(
    s: &mut Shape,
    statement: &Statement,
    plain_query: bool,
    relations: usize,
    lexed: &Lexed,
    catalog: &mut Catalog,
) {
    let resolve = |table: &str, catalog: &Catalog| {
        catalog.get(table).and_then(|id| catalog.primary_key(id).map(|pk| (id, pk.to_string())))
    };
    if s.kind == StatementKind::Read && plain_query {
        if let Statement::Query(q) = statement
            && let SetExpr::Select(sel) = q.body.as_ref()
        {
            s.read_keys = read_keys(sel, relations, lexed, catalog);
            s.refreshable = s.read_keys.len() == 1
                && !s.read_keys[0].range
                && s.read_keys[0].args.len() == 1
                && s.reads == [s.read_keys[0].table]
                && is_row_projection(q, sel, catalog.primary_key(s.read_keys[0].table).unwrap_or(""));
        }
    } else if s.kind == StatementKind::Write && relations == 1 {
        s.write_keys = write_keys(statement, lexed, catalog, &resolve);
    }
}

/// The effects of a view's definition or a policy's expression (SQL the
/// catalog holds), analysed as a statement of its own.
fn definition_effects(sql: &str, catalog: &mut Catalog, config: &AnalyzerConfig) -> Effects {
    let mut lexer = Lexer::new();
    let shape = match lexer.lex(sql) {
        Ok(lexed) => analyze(lexed, sql, catalog, config),
        Err(e) => {
            let why = NotCacheable::Unparsable(e.to_string());
            let user_code = Some(format!("a definition the analysis cannot read ({e})"));
            return Effects {
                uncacheable: Some(why),
                session_opaque: true,
                writes_opaque: true,
                user_code,
                ..Effects::default()
            };
        }
    };
    Effects {
        reads: shape.reads,
        reads_any: shape.reads_any,
        reads_settings: shape.reads_settings,
        uncacheable: shape.cacheable.err(),
        session_opaque: shape.session_opaque,
        writes_opaque: shape.writes_opaque,
        user_code: shape.user_code,
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    fn shape(sql: &str) -> Shape {
        let mut catalog = Catalog::new();
        catalog.set_primary_key("items", "id");
        Analyzer::new(AnalyzerConfig::default(), catalog).analyze_text(sql).expect("lexes")
    }

    /// A cursor's query and the query of `CREATE TABLE ... AS` run functions
    /// the statement's first word does not show: one that changes the
    /// session (or may write) makes the statement opaque.
    #[test]
    fn queries_inside_cursors_and_create_as_are_seen_into() {
        for sql in [
            "DECLARE c CURSOR WITH HOLD FOR SELECT set_config('app.tenant', 'x', false)",
            "DECLARE c NO SCROLL CURSOR FOR SELECT v FROM items WHERE id = my_writer(1)",
            "CREATE TABLE t AS SELECT set_config('search_path', 'evil', false)",
            "CREATE MATERIALIZED VIEW m AS SELECT set_config('role', 'admin', false)",
            "CREATE TEMP TABLE t AS WITH x AS (SELECT set_config('a.b', 'c', false)) SELECT * FROM x",
        ] {
            let s = shape(sql);
            assert!(s.session_opaque && s.writes_opaque, "{sql}");
        }
        for sql in [
            &*format!("SELECT v FROM items WHERE id IN ({}-1)", "-1, ".repeat(5000)),
            &*format!("SELECT {}1", "1 + 1, ".repeat(3000)),
            "DECLARE c CURSOR FOR SELECT v FROM items WHERE id IN (1, 2)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT lower(v) FROM items",
            "CREATE TABLE t (id int PRIMARY KEY, v varchar(10) CHECK (length(v) > 0))",
            "CREATE TABLE t AS SELECT lower(v) FROM items",
            "FETCH 10 FROM c",
        ] {
            let s = shape(sql);
            assert!(
                !s.session_opaque && s.is_cacheable() == sql.starts_with("SELECT"),
                "{}",
                &sql[..40.min(sql.len())]
            );
        }
    }
}

//! Plans of normalised statements. pg_stat_statements keeps `$n` where the
//! application's values were; PostgreSQL 15 has no `EXPLAIN (GENERIC_PLAN)`,
//! so the statement is prepared and its generic plan (`plan_cache_mode =
//! force_generic_plan`, which does not look at the values) explained with
//! NULL for every parameter. The plan's conditions name the columns the
//! statement filters, joins and sorts on.

use serde_json::Value;
use tokio_postgres::Client;

use crate::capture::Statement;
use crate::db::{AdvisorError, exec, rows, short};

/// One plan node, as EXPLAIN (FORMAT JSON) gives it.
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub node_type: String,
    pub schema: Option<String>,
    pub relation: Option<String>,
    pub alias: Option<String>,
    pub index: Option<String>,
    pub total_cost: f64,
    pub rows: f64,
    /// Conditions: Filter, Index Cond, Recheck Cond, Join Filter, Hash Cond, Merge Cond.
    pub conditions: Vec<String>,
    pub sort_key: Vec<String>,
    /// The columns the node returns (EXPLAIN VERBOSE).
    pub output: Vec<String>,
    pub children: Vec<Node>,
}

impl Node {
    fn from_json(v: &Value) -> Node {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let conditions = ["Filter", "Index Cond", "Recheck Cond", "Join Filter", "Hash Cond", "Merge Cond"]
            .iter()
            .filter_map(|k| s(k))
            .collect();
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default()
        };
        let (sort_key, output) = (list("Sort Key"), list("Output"));
        let children = v
            .get("Plans")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Node::from_json).collect())
            .unwrap_or_default();
        Node {
            node_type: s("Node Type").unwrap_or_default(),
            schema: s("Schema"),
            relation: s("Relation Name"),
            alias: s("Alias"),
            index: s("Index Name"),
            total_cost: f("Total Cost"),
            rows: f("Plan Rows"),
            conditions,
            sort_key,
            output,
            children,
        }
    }

    /// This node and every node below it, depth first.
    pub fn walk(&self) -> Vec<&Node> {
        let mut out = vec![self];
        for c in &self.children {
            out.extend(c.walk());
        }
        out
    }
}

/// The plan of a statement: its root, as EXPLAIN (FORMAT JSON) text parses.
pub fn parse_plan(json: &str) -> Option<Node> {
    let v: Value = serde_json::from_str(json).ok()?;
    Some(Node::from_json(v.get(0)?.get("Plan")?))
}

/// Parameters a statement may take at most (the protocol's count is 16 bits).
pub const PARAMS_MAX: usize = 65_535;

/// The highest `$n` in `query` outside quoted text and comments (how many
/// parameters its normalised form takes), as PostgreSQL's lexer reads it;
/// text that does not lex (an unterminated quote) takes none.
pub fn param_count(query: &str) -> usize {
    postai_core::sql::Lexer::new().lex(query).map_or(0, |l| l.param_max as usize)
}

/// The statement inside an SQL-level `PREPARE name [(types)] AS statement`
/// (how pg_stat_statements shows what `EXECUTE` ran), else `query`.
pub fn inner_statement(query: &str) -> &str {
    match prepare_parts(query) {
        Some((_, inner)) => inner,
        None => query,
    }
}

/// `PREPARE name [(types)] AS inner`: (the parameter types, with their
/// parentheses, or "", and the inner statement). Only the plain form is
/// read: a name of letters, digits and underscores, types with no comment
/// or quote (a comment there could make the text read otherwise here than
/// in PostgreSQL).
fn prepare_parts(query: &str) -> Option<(&str, &str)> {
    let q = query.trim_start();
    if !q.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("prepare ")) {
        return None;
    }
    let rest = q[8..].trim_start();
    let name_end = rest.find(|c: char| c.is_whitespace() || c == '(').unwrap_or(rest.len());
    let name = &rest[..name_end];
    let plain_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain_name {
        return None;
    }
    let rest = rest[name_end..].trim_start();
    let (types, rest) = if rest.starts_with('(') {
        let close = rest.find(')')?;
        (&rest[..=close], rest[close + 1..].trim_start())
    } else {
        ("", rest)
    };
    if ["--", "/*", "'", "\"", "$"].iter().any(|t| types.contains(t)) {
        return None;
    }
    let inner = rest.get(..3).filter(|a| a.eq_ignore_ascii_case("as ")).map(|_| rest[3..].trim_start())?;
    Some((types, inner))
}

/// Whether `query` is an SQL-level PREPARE the advisor does not read (see
/// [`prepare_parts`]): it is not planned.
pub fn unread_prepare(query: &str) -> bool {
    let q = query.trim_start();
    q.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("prepare ")) && prepare_parts(query).is_none()
}

/// `PREPARE name AS query`, keeping the parameter types of a captured
/// SQL-level PREPARE.
pub fn prepare_as(name: &str, query: &str) -> String {
    match prepare_parts(query) {
        Some((types, inner)) => format!("PREPARE {name} {types} AS {inner}"),
        None => format!("PREPARE {name} AS {query}"),
    }
}

/// Prepares `st` (a captured statement) as `name`: through the extended
/// protocol, whose Parse refuses a second command, and only a statement
/// whose planning reaches no user code (`guard`). Its parameter count.
pub async fn prepare(client: &Client, name: &str, st: &Statement) -> Result<usize, AdvisorError> {
    let refuse = |why: String| Err(AdvisorError::Missing(format!("not planned: {why}")));
    if let Some(why) = &st.user_code {
        return refuse(why.clone());
    }
    if unread_prepare(&st.query) {
        return refuse("a PREPARE whose name or parameter types the advisor does not read".into());
    }
    let n = param_count(&st.query);
    if n > PARAMS_MAX {
        return refuse(format!("it names ${n}, past the {PARAMS_MAX} parameters a statement takes"));
    }
    let sql = prepare_as(name, &st.query);
    client.execute(sql.as_str(), &[]).await.map_err(|source| AdvisorError::Query { sql: short(&sql), source })?;
    Ok(n)
}

/// Bounds on planning a captured statement: a read-only transaction,
/// rolled back (no write to a table; not a sandbox: code a superuser's
/// session runs may still do what reads allow, which is why `guard` keeps
/// user code out of planning), no wait on a lock for long, no plan for long.
const BOUNDED: &str = "BEGIN READ ONLY; SET LOCAL statement_timeout = '10s'; SET LOCAL lock_timeout = '2s'";

/// The generic plan of `st` (a normalised statement), or why there is none.
pub async fn generic_plan(client: &Client, st: &Statement) -> Result<Node, AdvisorError> {
    let _ = exec(client, "DEALLOCATE postai_advise").await;
    let explained = async {
        exec(client, &format!("{BOUNDED}; SET LOCAL plan_cache_mode = force_generic_plan")).await?;
        let n = prepare(client, "postai_advise", st).await?;
        let args = if n == 0 { String::new() } else { format!("({})", vec!["NULL"; n].join(", ")) };
        // (VERBOSE: the scans name their schema, the conditions their aliases)
        rows(client, &format!("EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE postai_advise{args}")).await
    }
    .await;
    // (a prepared statement outlives the transaction)
    let _ = exec(client, "ROLLBACK").await;
    let _ = exec(client, "DEALLOCATE postai_advise").await;
    let text = explained?.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
    parse_plan(&text).ok_or_else(|| AdvisorError::Missing(format!("no plan in EXPLAIN's answer: {text}")))
}

/// The parameters `query` takes as LIMIT and OFFSET: `(n, value)` with a
/// value representative of pagination (20 rows, from the start).
pub fn paging_params(query: &str) -> Vec<(usize, &'static str)> {
    let words: Vec<String> = query.split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
    let mut out = Vec::new();
    for pair in words.windows(2) {
        let value = match pair[0].as_str() {
            "limit" => "20",
            "offset" => "0",
            _ => continue,
        };
        if let Some(n) = pair[1].trim_end_matches([')', ';']).strip_prefix('$').and_then(|n| n.parse().ok()) {
            out.push((n, value));
        }
    }
    out
}

/// The parameters a write stores into columns: `UPDATE t SET a = $1` and
/// `INSERT INTO t (a, b) VALUES ($1, $2)`, as `(n, column)`.
pub fn stored_params(query: &str) -> Vec<(usize, String)> {
    let q = inner_statement(query).to_ascii_lowercase();
    let q = q.trim_start();
    let param = |v: &str| v.trim().trim_matches(['(', ')']).split("::").next()?.trim().strip_prefix('$')?.parse().ok();
    let col = |c: &str| c.trim().trim_matches('"').to_string();
    let mut out = Vec::new();
    if q.starts_with("update ")
        && let Some((_, set)) = q.split_once(" set ")
    {
        for part in set.split(" where ").next().unwrap_or(set).split(',') {
            if let Some((c, v)) = part.split_once('=')
                && let Some(n) = param(v)
            {
                out.push((n, col(c)));
            }
        }
    } else if q.starts_with("insert ")
        && let Some((head, values)) = q.split_once(" values ")
    {
        let values = values.trim().trim_start_matches('(');
        // without a column list, the values go to the table's columns in
        // order: `#<position>` (1-based), for the caller to name
        let cols: Vec<String> = match head.split_once('(') {
            Some((_, cols)) => cols.trim_end().trim_end_matches(')').split(',').map(col).collect(),
            None => (1..=split_top(values, ',').len()).map(|i| format!("#{i}")).collect(),
        };
        for (c, v) in cols.into_iter().zip(split_top(values, ',')) {
            if let Some(n) = param(v) {
                out.push((n, c));
            }
        }
    }
    out
}

/// A condition's comparison of a column with something else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Predicate {
    /// The column (its alias or table qualifier stripped).
    pub column: String,
    pub qualifier: Option<String>,
    pub kind: Kind,
    /// The parameter compared with, when it is one (`$n`).
    pub param: Option<usize>,
    /// The parameter is an array (`= ANY ($n)`).
    pub array: bool,
    /// A range's side: `Some(true)` for a lower bound (`>`, `>=`), `Some(false)` for an upper one.
    pub lower: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Equality,
    Range,
    /// LIKE 'prefix%' and the like: an index helps only with the right opclass.
    Pattern,
    /// A function of the column (`lower(email) = $1`): no index on the
    /// column serves it.
    Function,
}

/// The conjuncts of a condition: `((a = $1) AND (b > $2))` as `a = $1`, `b > $2`.
pub fn conjuncts(cond: &str) -> Vec<String> {
    let c = strip_parens(cond.trim());
    let mut out = Vec::new();
    let (mut depth, mut start, mut quote) = (0i32, 0usize, false);
    let bytes = c.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => quote = !quote,
            b'(' if !quote => depth += 1,
            b')' if !quote => depth -= 1,
            b' ' if !quote && depth == 0 && c[i..].starts_with(" AND ") => {
                out.push(strip_parens(c[start..i].trim()).to_string());
                start = i + 5;
                i += 4;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(strip_parens(c[start..].trim()).to_string());
    out
}

/// `s` without parentheses that enclose all of it.
fn strip_parens(mut s: &str) -> &str {
    while s.starts_with('(') && s.ends_with(')') && encloses(s) {
        s = s[1..s.len() - 1].trim();
    }
    s
}

fn encloses(s: &str) -> bool {
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth == 0 && i < s.len() - 1 {
            return false;
        }
    }
    true
}

/// A conjunct as a predicate on a column, when it is one.
pub fn predicate(conjunct: &str) -> Option<Predicate> {
    const OPS: [(&str, Kind); 9] = [
        (" = ANY ", Kind::Equality),
        (" >= ", Kind::Range),
        (" <= ", Kind::Range),
        (" <> ", Kind::Range),
        (" ~~ ", Kind::Pattern),
        (" ~~* ", Kind::Pattern),
        (" = ", Kind::Equality),
        (" > ", Kind::Range),
        (" < ", Kind::Range),
    ];
    let (op, kind, at) = OPS.iter().filter_map(|(op, k)| Some((*op, *k, conjunct.find(op)?))).min_by_key(|x| x.2)?;
    let (lhs, rhs) = (conjunct[..at].trim(), conjunct[at + op.len()..].trim());
    let (qualifier, column, is_function) = operand(lhs)?;
    let param = param_of(rhs);
    let kind = if is_function {
        Kind::Function
    } else if op == " <> " {
        return None;
    } else {
        kind
    };
    let lower = match op {
        " >= " | " > " => Some(true),
        " <= " | " < " => Some(false),
        _ => None,
    };
    Some(Predicate { column, qualifier, kind, param, array: op == " = ANY ", lower })
}

/// A side of a comparison: (qualifier, column, whether a function wraps it).
fn operand(side: &str) -> Option<(Option<String>, String, bool)> {
    let mut s = strip_parens(side);
    // casts: (status)::text
    if let Some(i) = top_level(s, "::") {
        s = strip_parens(s[..i].trim());
    }
    let function = s.contains('(');
    if function {
        // the innermost identifier: lower((email)::text)
        let (open, close) = (s.find('(')? + 1, s.rfind(')')?);
        let inner = s.get(open..close)?.trim();
        let (q, c, _) = operand(inner)?;
        return Some((q, c, true));
    }
    if s.is_empty() || s.starts_with('$') || s.starts_with('\'') || s.chars().next()?.is_ascii_digit() {
        return None;
    }
    let unquote = |x: &str| x.trim_matches('"').to_string();
    match s.rsplit_once('.') {
        Some((q, c)) => Some((Some(unquote(q)), unquote(c), false)),
        None => Some((None, unquote(s), false)),
    }
}

/// `s` split at `sep` outside parentheses and quotes, up to the first
/// unbalanced `)` (the end of a VALUES list).
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut depth, mut quote, mut start) = (Vec::new(), 0i32, false, 0);
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote && depth == 0 => {
                out.push(&s[start..i]);
                return out;
            }
            ')' if !quote => depth -= 1,
            c if c == sep && !quote && depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Where `pat` first occurs in `s` outside parentheses and quotes.
fn top_level(s: &str, pat: &str) -> Option<usize> {
    let (mut depth, mut quote) = (0i32, false);
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote => depth -= 1,
            _ if !quote && depth == 0 && s[i..].starts_with(pat) => return Some(i),
            _ => {}
        }
    }
    None
}

fn param_of(side: &str) -> Option<usize> {
    let s = strip_parens(side);
    let s = s.split("::").next()?.trim();
    let s = strip_parens(s);
    s.strip_prefix('$')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_counted_outside_quotes() {
        assert_eq!(param_count("SELECT * FROM t WHERE a = $1 AND b = $12"), 12);
        assert_eq!(param_count("SELECT '$5' FROM t WHERE a = $2"), 2);
        assert_eq!(param_count("SELECT 1"), 0);
    }

    #[test]
    fn conditions_split_into_predicates() {
        let c = conjuncts("((customer_id = $1) AND ((status)::text = $2) AND (created_at >= $3))");
        assert_eq!(c, vec!["customer_id = $1", "(status)::text = $2", "created_at >= $3"]);
        let p: Vec<Predicate> = c.iter().filter_map(|x| predicate(x)).collect();
        assert_eq!(
            p[0],
            Predicate {
                column: "customer_id".into(),
                qualifier: None,
                kind: Kind::Equality,
                param: Some(1),
                array: false,
                lower: None
            }
        );
        assert_eq!(p[1].column, "status");
        assert_eq!((p[2].kind, p[2].param), (Kind::Range, Some(3)));
        let f = predicate("lower((email)::text) = $1").expect("a predicate");
        assert_eq!((f.column.as_str(), f.kind), ("email", Kind::Function));
        let j = predicate("o.customer_id = c.id").expect("a join");
        assert_eq!((j.qualifier.as_deref(), j.column.as_str(), j.param), (Some("o"), "customer_id", None));
        let any = predicate("id = ANY ($1)").expect("an IN list");
        assert_eq!((any.kind, any.param), (Kind::Equality, Some(1)));
        assert!(predicate("$1 = 2").is_none());
        assert_eq!(conjuncts("(a = 'x AND y')"), vec!["a = 'x AND y'"]);
        // odd text is no predicate, and no panic
        assert!(predicate("f)x( = $1").is_none());
        assert_eq!(conjuncts("(name = 'café') AND (b = $1)").len(), 2);
    }

    proptest::proptest! {
        /// Text from the database (conditions, statements) is never trusted
        /// to be well formed: odd or multi-byte text parses to nothing, never a panic.
        #[test]
        fn any_text_parses_without_panicking(s in "[(),'$a-z0-9 =<>:.\"é∑_]{0,60}") {
            for c in conjuncts(&s) {
                let _ = predicate(&c);
            }
            let _ = (param_count(&s), stored_params(&s), paging_params(&s), inner_statement(&s), prepare_as("p", &s));
        }

        /// The same, from the words these parsers look for, in any order.
        #[test]
        fn any_sequence_of_keywords_parses_without_panicking(words in proptest::collection::vec(
            proptest::sample::select(vec![
                " AND ", " = ANY ", "(", ")", "::", "$1", "$12", "'", "\"", "x.y", "lower(", " >= ", " <= ", " < ",
                " ~~ ", "PREPARE ", " AS ", "INSERT INTO t ", " VALUES ", "UPDATE t", " SET ", " WHERE ", ",",
                " LIMIT ", " OFFSET ", "é", "=", " ",
            ]),
            0..24,
        )) {
            let s: String = words.concat();
            for c in conjuncts(&s) {
                let _ = predicate(&c);
            }
            let _ = (param_count(&s), stored_params(&s), paging_params(&s), inner_statement(&s), prepare_as("p", &s));
        }
    }

    #[test]
    fn sql_level_prepares_are_read_through() {
        let q = "PREPARE bench (int, text) AS SELECT * FROM t WHERE a = $1 AND b = $2";
        assert_eq!(inner_statement(q), "SELECT * FROM t WHERE a = $1 AND b = $2");
        assert_eq!(prepare_as("p", q), "PREPARE p (int, text) AS SELECT * FROM t WHERE a = $1 AND b = $2");
        assert_eq!(prepare_as("p", "prepare x as select 1"), "PREPARE p  AS select 1");
        assert_eq!(inner_statement("SELECT 1"), "SELECT 1");
        assert_eq!(prepare_as("p", "SELECT 1"), "PREPARE p AS SELECT 1");
    }

    #[test]
    fn stored_parameters_are_found() {
        assert_eq!(
            stored_params("UPDATE orders SET note = $1, \"total\" = $2::numeric WHERE id = $3"),
            vec![(1, "note".to_string()), (2, "total".to_string())]
        );
        assert_eq!(
            stored_params("INSERT INTO t (a, b, c) VALUES ($1, now(), $2)"),
            vec![(1, "a".to_string()), (2, "c".to_string())]
        );
        assert!(stored_params("SELECT * FROM t WHERE a = $1").is_empty());
        assert_eq!(
            stored_params("INSERT INTO t VALUES ($1::int, 5 + $2, $3::date)"),
            vec![(1, "#1".to_string()), (3, "#3".to_string())]
        );
    }

    #[test]
    fn paging_parameters_are_found() {
        let q = "SELECT * FROM t WHERE a = $1 ORDER BY b LIMIT $2 OFFSET $3";
        assert_eq!(paging_params(q), vec![(2, "20"), (3, "0")]);
        assert!(paging_params("SELECT * FROM t WHERE a = $1").is_empty());
    }

    #[test]
    fn plans_parse_from_explain_json() {
        let json = r#"[{"Plan": {"Node Type": "Sort", "Total Cost": 10.5, "Plan Rows": 3, "Sort Key": ["created_at DESC"],
            "Plans": [{"Node Type": "Seq Scan", "Schema": "public", "Relation Name": "orders", "Alias": "orders",
            "Total Cost": 9.0, "Plan Rows": 3, "Filter": "(customer_id = $1)"}]}}]"#;
        let plan = parse_plan(json).expect("a plan");
        assert_eq!(plan.sort_key, vec!["created_at DESC"]);
        let scan = &plan.children[0];
        assert_eq!((scan.relation.as_deref(), scan.conditions.len()), (Some("orders"), 1));
        assert_eq!(plan.walk().len(), 2);
    }
}

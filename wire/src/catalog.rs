//! The database's own catalog, read from the primary for the core's
//! analyzer: functions' volatility (`pg_proc`), what each relation is
//! (`pg_class`: tables, views and their definitions, sequences, foreign
//! tables), what a write to a table may reach beyond the rows it names
//! (triggers, rules, foreign keys with actions, partitions and inheritance
//! children), row-level security policies' expressions, and primary keys with
//! their types. The queries and what is made of their rows, sans IO: the
//! caller runs the queries ([`Rows`]): the native proxy over its upstream
//! connection, the Worker over its socket.
//!
//! Roles change without DDL events (`GRANT role`, `ALTER ROLE`, per-role
//! settings): [`ROLES_DIGEST`] is compared instead.

use std::collections::BTreeMap;
use std::future::Future;

use postai_core::hash::Digest128;
use postai_core::sql::{Catalog, KeyType, RelKind, RelationSpec, Volatility};

/// Runs a catalog query: its rows as text columns, an error answer an error.
pub trait Rows {
    fn rows(&mut self, sql: &str) -> impl Future<Output = std::io::Result<Vec<Vec<Option<String>>>>>;
}

/// Schemas whose relations are PostgreSQL's own.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// A function (`pg_proc` row `f`) that is not PostgreSQL's own: outside
/// its schemas, or a member of an extension.
macro_rules! user_proc {
    ($f:literal) => {
        concat!(
            "(",
            $f,
            ".pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) ",
            "OR EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = ",
            $f,
            ".oid AND e.deptype = 'e'))"
        )
    };
}

/// A function (`pg_proc` row `f`) that belongs to an extension.
macro_rules! extension_member {
    ($f:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = ",
            $f,
            ".oid AND e.deptype = 'e')"
        )
    };
}

/// `provolatile` as a rank, most volatile highest.
macro_rules! volatility_rank {
    ($f:literal) => {
        concat!("(CASE ", $f, ".provolatile WHEN 'v' THEN 2 WHEN 's' THEN 1 ELSE 0 END)")
    };
}

/// Functions by name: the most volatile overload (an aggregate as its most
/// volatile support function), and whether all are PostgreSQL's own.
const FUNCTIONS: &str = concat!(
    "SELECT p.proname, max(greatest(",
    volatility_rank!("p"),
    ", coalesce(a.rank, 0)))::text, bool_and(NOT ",
    user_proc!("p"),
    " AND coalesce(a.builtin, true))::text FROM pg_proc p LEFT JOIN LATERAL (SELECT max(",
    volatility_rank!("f"),
    ") AS rank, bool_and(NOT ",
    user_proc!("f"),
    ") AS builtin FROM pg_aggregate g JOIN pg_proc f ON f.oid IN (g.aggtransfn, g.aggfinalfn, g.aggcombinefn, \
      g.aggserialfn, g.aggdeserialfn, g.aggmtransfn, g.aggminvtransfn, g.aggmfinalfn) \
      WHERE g.aggfnoid = p.oid) a ON true GROUP BY p.proname"
);

/// Operators whose functions are not PostgreSQL's own, by symbol.
const OPERATORS: &str = concat!(
    "SELECT o.oprname, max(",
    volatility_rank!("p"),
    ")::text, bool_or(NOT ",
    extension_member!("p"),
    ")::text FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode WHERE ",
    user_proc!("p"),
    " GROUP BY o.oprname"
);

/// Types a cast to which calls a function that is not PostgreSQL's own: a
/// cast function, the type's input function, a domain's check.
const TYPES: &str = concat!(
    "SELECT t.typname, max(x.rank)::text, bool_or(x.user_code)::text FROM (",
    "SELECT c.casttarget AS typ, ",
    volatility_rank!("p"),
    " AS rank, NOT ",
    extension_member!("p"),
    " AS user_code FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc WHERE ",
    user_proc!("p"),
    " UNION ALL SELECT t.oid, ",
    volatility_rank!("p"),
    ", NOT ",
    extension_member!("p"),
    " FROM pg_type t JOIN pg_proc p ON p.oid = t.typinput WHERE ",
    user_proc!("p"),
    " UNION ALL SELECT k.contypid, ",
    volatility_rank!("p"),
    ", NOT ",
    extension_member!("p"),
    " FROM pg_constraint k JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = k.oid \
      AND d.refclassid = 'pg_proc'::regclass JOIN pg_proc p ON p.oid = d.refobjid WHERE k.contypid <> 0 AND ",
    user_proc!("p"),
    ") x JOIN pg_type t ON t.oid = x.typ GROUP BY t.typname"
);

/// Tables a write to which runs functions that are not PostgreSQL's own:
/// column defaults, generated columns, CHECK constraints, domain checks.
const WRITES_CALL_USER_CODE: &str = concat!(
    "EXISTS (SELECT 1 FROM pg_depend d JOIN pg_proc p ON p.oid = d.refobjid WHERE d.refclassid = 'pg_proc'::regclass \
     AND ((d.classid = 'pg_attrdef'::regclass AND d.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = c.oid)) \
       OR (d.classid = 'pg_constraint'::regclass AND d.objid IN \
           (SELECT oid FROM pg_constraint WHERE conrelid = c.oid AND contype = 'c'))) AND ",
    user_proc!("p"),
    ") OR EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_constraint k ON k.contypid = a.atttypid \
       JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = k.oid \
       AND d.refclassid = 'pg_proc'::regclass JOIN pg_proc p ON p.oid = d.refobjid \
       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND ",
    user_proc!("p"),
    ")"
);

/// Relations: name, kind, whether a write may reach rows it does not name,
/// a view's definition, row-level security.
fn relations_query() -> String {
    format!(
        "SELECT c.relname, (CASE WHEN c.relpersistence = 'u' THEN 'u' ELSE c.relkind::text END), \
        (c.relkind IN ('p', 'v', 'f') OR c.relhasrules OR {WRITES_CALL_USER_CODE} \
         OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) \
         OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.contype = 'f' AND k.confrelid = c.oid \
                    AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))) \
         OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid))::text, \
        CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END, \
        c.relrowsecurity::text \
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {SYSTEM_SCHEMAS}"
    )
}

/// What a type is made of: a domain's base, an array's element, a
/// composite type's fields (`CREATE TYPE ... AS`).
const TYPE_GRAPH: &str = "SELECT t.typname, b.typname FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype \
    WHERE t.typtype = 'd' \
    UNION ALL SELECT t.typname, e.typname FROM pg_type t JOIN pg_type e ON e.oid = t.typelem \
    WHERE t.typcategory = 'A' AND t.typelem <> 0 \
    UNION ALL SELECT t.typname, f.typname FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'c' \
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
    JOIN pg_type f ON f.oid = a.atttypid";

/// Date and time types (their input reads 'now').
const DATETIME_TYPES: &str = "SELECT typname FROM pg_type WHERE typcategory = 'D'";

/// Domain checks, as expressions over VALUE.
const DOMAIN_CHECKS: &str = "SELECT t.typname, pg_get_expr(k.conbin, 0) FROM pg_constraint k \
    JOIN pg_type t ON t.oid = k.contypid WHERE k.contype = 'c' AND k.conbin IS NOT NULL";

/// What a write to a table evaluates: column defaults and generated
/// columns, CHECK constraints; and the types of its columns (their domain
/// checks run too).
fn table_writes_query() -> String {
    format!(
        "SELECT c.relname, 'e', pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d \
        JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {SYSTEM_SCHEMAS} \
        UNION ALL SELECT c.relname, 'e', pg_get_expr(k.conbin, k.conrelid) FROM pg_constraint k \
        JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE k.contype = 'c' AND {SYSTEM_SCHEMAS} \
        UNION ALL SELECT c.relname, 't', t.typname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
        JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid \
        WHERE a.attnum > 0 AND NOT a.attisdropped AND t.typtype IN ('d', 'c') AND c.relkind IN ('r', 'p') \
        AND {SYSTEM_SCHEMAS}"
    )
}

/// Parent of each partition or inheritance child.
const INHERITS: &str = "SELECT c.relname, p.relname FROM pg_inherits i \
    JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent";

/// Row-level security policies' USING expressions, on tables that enforce them.
const POLICIES: &str = "SELECT c.relname, pg_get_expr(p.polqual, p.polrelid) \
    FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid WHERE c.relrowsecurity AND p.polqual IS NOT NULL";

/// Single-column primary keys and their types: whether the key compares
/// by a nondeterministic collation (case-insensitive: no key), and whether
/// the change stream shows a changed key's old value (REPLICA IDENTITY
/// NOTHING or USING INDEX do not: no key).
fn keys_query() -> String {
    format!(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), \
        (c.relreplident IN ('n', 'i') OR coalesce((SELECT NOT l.collisdeterministic FROM pg_collation l \
                                                  WHERE l.oid = a.attcollation), false))::text \
        FROM pg_index i \
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] \
        WHERE i.indisprimary AND i.indnatts = 1 AND {SYSTEM_SCHEMAS}"
    )
}

/// One digest of everything about roles that decides what a session may
/// read and which settings it logs in with: attributes, memberships,
/// per-role and per-database settings, and the server's configuration.
pub const ROLES_DIGEST: &str = "SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM ( \
    SELECT format('r:%s:%s:%s:%s:%s:%s', r.oid, r.rolname, r.rolsuper, r.rolinherit, r.rolbypassrls, r.rolconfig) AS x \
    FROM pg_roles r \
    UNION ALL SELECT format('m:%s:%s:%s', m.roleid, m.member, m.admin_option) FROM pg_auth_members m \
    UNION ALL SELECT format('s:%s:%s:%s', s.setdatabase, s.setrole, s.setconfig) FROM pg_db_role_setting s \
    UNION ALL SELECT 'c:' || pg_conf_load_time()::text) t";

/// The database's catalog as the analyzer needs it.
#[derive(Debug, Default)]
pub struct LiveCatalog {
    functions: Vec<(String, Volatility, bool)>,
    operators: Vec<(String, Volatility, bool)>,
    types: Vec<(String, Volatility, bool)>,
    /// Domain checks a cast to each type evaluates (closed over what types
    /// are made of), and the types made of dates and times.
    type_checks: BTreeMap<String, Vec<String>>,
    datetime_types: Vec<String>,
    relations: BTreeMap<String, RelationSpec>,
    keys: BTreeMap<String, Option<(String, KeyType)>>,
}

impl LiveCatalog {
    /// Replaces the analyzer's view of the database with this one (ids of
    /// tables already interned stay).
    pub fn apply(&self, c: &mut Catalog) {
        c.set_functions(self.functions.iter().map(|(n, v, b)| (n.as_str(), *v, *b)));
        c.set_operators(self.operators.iter().map(|(n, v, u)| (n.as_str(), *v, *u)));
        c.set_types(self.types.iter().map(|(n, v, u)| (n.as_str(), *v, *u)));
        c.set_type_checks(self.type_checks.iter().map(|(t, e)| (t.clone(), e.clone())));
        c.set_datetime_types(self.datetime_types.iter().cloned());
        c.clear_relations();
        for (name, spec) in &self.relations {
            c.set_relation(name, spec.clone());
        }
        for (name, key) in &self.keys {
            match key {
                Some((column, key_type)) => {
                    c.set_primary_key(name, column);
                    c.set_key_type(name, *key_type);
                }
                // two tables of that name with different keys: table-level
                None => c.clear_primary_key(name),
            }
        }
        c.set_complete(true);
    }

    /// A digest of everything the analyzer takes from it.
    pub fn digest(&self) -> u128 {
        let mut d = Digest128::new();
        for (name, v, builtin) in &self.functions {
            d.bytes(name.as_bytes());
            d.u64(*v as u64 * 2 + u64::from(*builtin));
        }
        for (name, v, user) in self.operators.iter().chain(&self.types) {
            d.bytes(name.as_bytes());
            d.u64(*v as u64 * 2 + u64::from(*user));
        }
        for (name, checks) in &self.type_checks {
            d.bytes(name.as_bytes());
            checks.iter().for_each(|c| d.bytes(c.as_bytes()));
        }
        self.datetime_types.iter().for_each(|t| d.bytes(t.as_bytes()));
        for (name, spec) in &self.relations {
            d.bytes(name.as_bytes());
            d.bytes(format!("{:?}{}{:?}", spec.kind, spec.writes_opaque, spec.ancestors).as_bytes());
            spec.reads.iter().chain(&spec.writes).for_each(|r| d.bytes(r.as_bytes()));
        }
        for (name, key) in &self.keys {
            d.bytes(name.as_bytes());
            d.bytes(format!("{key:?}").as_bytes());
        }
        d.finish()
    }

    pub fn summary(&self) -> String {
        let views = self.relations.values().filter(|r| r.kind == RelKind::View).count();
        let opaque = self.relations.values().filter(|r| r.writes_opaque).count();
        format!(
            "{} functions, {} relations ({} views, {} whose writes reach further), {} keys",
            self.functions.len(),
            self.relations.len(),
            views,
            opaque,
            self.keys.values().flatten().count()
        )
    }
}

/// Reads the catalog with `conn`'s queries.
pub async fn load<R: Rows>(conn: &mut R) -> std::io::Result<LiveCatalog> {
    let mut live = LiveCatalog::default();
    for row in conn.rows(FUNCTIONS).await? {
        let [Some(name), Some(v), Some(builtin)] = &row[..] else { continue };
        live.functions.push((name.clone(), rank_volatility(v), builtin == "true"));
    }
    live.functions.sort();
    for (query, into) in [(OPERATORS, &mut live.operators), (TYPES, &mut live.types)] {
        for row in conn.rows(query).await? {
            let [Some(name), Some(v), Some(user)] = &row[..] else { continue };
            into.push((name.clone(), rank_volatility(v), user == "true"));
        }
        into.sort();
    }
    for row in conn.rows(&relations_query()).await? {
        let [Some(name), Some(kind), Some(opaque), definition, Some(_rls)] = &row[..] else { continue };
        let kind = match kind.as_str() {
            "v" => RelKind::View,
            "S" => RelKind::Sequence,
            // an unlogged table's changes are not in the WAL, nor in the stream
            "f" | "u" => RelKind::Foreign,
            _ => RelKind::Table,
        };
        let spec = RelationSpec {
            kind,
            writes_opaque: opaque == "true",
            ancestors: Vec::new(),
            reads: definition.iter().cloned().collect(),
            writes: Vec::new(),
        };
        match live.relations.get_mut(name) {
            Some(into) => merge(into, spec),
            None => {
                live.relations.insert(name.clone(), spec);
            }
        }
    }
    let parents: Vec<(String, String)> = conn
        .rows(INHERITS)
        .await?
        .into_iter()
        .filter_map(|r| match &r[..] {
            [Some(c), Some(p)] => Some((c.clone(), p.clone())),
            _ => None,
        })
        .collect();
    for (child, spec) in live.relations.iter_mut() {
        spec.ancestors = ancestors(child, &parents);
    }
    // a parent of an unlogged table reads rows the stream never shows
    let unfollowed: Vec<String> =
        live.relations.values().filter(|r| r.kind == RelKind::Foreign).flat_map(|r| r.ancestors.clone()).collect();
    for a in unfollowed {
        if let Some(spec) = live.relations.get_mut(&a) {
            spec.kind = RelKind::Foreign;
        }
    }
    load_types(conn, &mut live).await?;
    for row in conn.rows(POLICIES).await? {
        let [Some(name), Some(qual)] = &row[..] else { continue };
        if let Some(spec) = live.relations.get_mut(name) {
            // the expression's own relations and calls (its columns are the table's)
            spec.reads.push(format!("SELECT 1 WHERE {qual}"));
        }
    }
    for row in conn.rows(&keys_query()).await? {
        let [Some(table), Some(column), Some(type_name), Some(unusable)] = &row[..] else { continue };
        if unusable == "true" {
            live.keys.insert(table.clone(), None);
            continue;
        }
        let key = (column.clone(), KeyType::from_type_name(type_name));
        match live.keys.get(table) {
            None => {
                live.keys.insert(table.clone(), Some(key));
            }
            Some(Some(k)) if *k == key => {}
            Some(_) => {
                live.keys.insert(table.clone(), None);
            }
        }
    }
    // the digest must not depend on the order rows came in
    for spec in live.relations.values_mut() {
        spec.ancestors.sort();
        spec.reads.sort();
        spec.writes.sort();
        spec.writes.dedup();
    }
    Ok(live)
}

/// The type graph: what a cast to each type evaluates (its domain checks and
/// those of the types it is made of, transitively), the types made of
/// dates and times, and what writes to tables evaluate.
async fn load_types<R: Rows>(conn: &mut R, live: &mut LiveCatalog) -> std::io::Result<()> {
    let pairs = |rows: Vec<Vec<Option<String>>>| -> Vec<(String, String)> {
        rows.into_iter()
            .filter_map(|r| match &r[..] {
                [Some(a), Some(b)] => Some((a.clone(), b.clone())),
                _ => None,
            })
            .collect()
    };
    let edges = pairs(conn.rows(TYPE_GRAPH).await?);
    let own_checks = pairs(conn.rows(DOMAIN_CHECKS).await?);
    let datetime: Vec<String> =
        conn.rows(DATETIME_TYPES).await?.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
    // every type with an edge or a check: what it reaches
    let mut names: Vec<&String> = edges.iter().map(|(a, _)| a).chain(own_checks.iter().map(|(t, _)| t)).collect();
    names.sort();
    names.dedup();
    for name in names {
        let reach = reachable(name, &edges);
        let checks: Vec<String> =
            own_checks.iter().filter(|(t, _)| reach.contains(t)).map(|(_, e)| format!("SELECT ({e})")).collect();
        if !checks.is_empty() {
            live.type_checks.insert(name.clone(), checks);
        }
        if reach.iter().any(|t| t != name && datetime.contains(t)) {
            live.datetime_types.push(name.clone());
        }
    }
    // a type made of a type whose casts call user code calls it too
    let direct: Vec<(String, Volatility, bool)> = live.types.clone();
    for (name, _) in &edges {
        for (t, v, u) in &direct {
            if t != name && reachable(name, &edges).contains(t) {
                live.types.push((name.clone(), *v, *u));
            }
        }
    }
    live.types.sort();
    live.types.dedup();
    // what writes to tables evaluate
    for row in conn.rows(&table_writes_query()).await? {
        let [Some(table), Some(kind), Some(what)] = &row[..] else { continue };
        let Some(spec) = live.relations.get_mut(table) else { continue };
        match kind.as_str() {
            "e" => spec.writes.push(format!("SELECT ({what})")),
            _ => spec.writes.extend(live.type_checks.get(what).into_iter().flatten().cloned()),
        }
    }
    Ok(())
}

/// `name` and every type it is made of.
fn reachable(name: &str, edges: &[(String, String)]) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut i = 0;
    while i < out.len() && out.len() < 10_000 {
        let current = out[i].clone();
        for (_, to) in edges.iter().filter(|(from, _)| *from == current) {
            if !out.contains(to) {
                out.push(to.clone());
            }
        }
        i += 1;
    }
    out
}

/// A volatility rank (`0` immutable, `1` stable, else volatile).
fn rank_volatility(rank: &str) -> Volatility {
    match rank {
        "0" => Volatility::Immutable,
        "1" => Volatility::Stable,
        _ => Volatility::Volatile,
    }
}

/// Two relations of one name (in different schemas): the analyzer cannot
/// tell which a query means, so it assumes both.
fn merge(into: &mut RelationSpec, other: RelationSpec) {
    // a table of the name has rows of its own (a view's rows are its
    // definition's); a sequence or foreign table is never cached
    let rank = |k: RelKind| match k {
        RelKind::View => 0,
        RelKind::Table => 1,
        RelKind::Sequence | RelKind::Foreign => 2,
    };
    if rank(other.kind) > rank(into.kind) {
        into.kind = other.kind;
    }
    into.writes_opaque |= other.writes_opaque;
    into.reads.extend(other.reads);
}

/// Every ancestor of `child`, nearest first (cycles are not followed).
fn ancestors(child: &str, parents: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut frontier = vec![child.to_string()];
    while let Some(c) = frontier.pop() {
        for (_, p) in parents.iter().filter(|(ch, _)| *ch == c) {
            if p != child && !out.contains(p) {
                out.push(p.clone());
                frontier.push(p.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_are_transitive_and_cycle_free() {
        let p = |c: &str, p: &str| (c.to_string(), p.to_string());
        let parents = vec![p("e_2026_01", "e_2026"), p("e_2026", "events"), p("a", "b"), p("b", "a")];
        assert_eq!(ancestors("e_2026_01", &parents), ["e_2026", "events"]);
        assert_eq!(ancestors("events", &parents), Vec::<String>::new());
        assert_eq!(ancestors("a", &parents), ["b"]);
    }

    #[test]
    fn relations_of_one_name_merge_to_the_worst() {
        let mut into = RelationSpec { kind: RelKind::View, reads: vec!["SELECT 1".into()], ..Default::default() };
        merge(&mut into, RelationSpec::default());
        assert_eq!(into.kind, RelKind::Table, "a table of that name too: its rows and the view's");
        assert_eq!(into.reads.len(), 1);
        merge(&mut into, RelationSpec { kind: RelKind::Sequence, ..Default::default() });
        assert_eq!(into.kind, RelKind::Sequence);
    }
}

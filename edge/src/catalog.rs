//! The database's own catalog, read from the primary for the core's
//! analyzer: functions' volatility (`pg_proc`), what each relation is
//! (`pg_class`: tables, views and their definitions, sequences, foreign
//! tables), what a write to a table may reach beyond the rows it names
//! (triggers, rules, foreign keys with actions, partitions and inheritance
//! children), row-level security policies' expressions, and primary keys with
//! their types. Loaded when the change-stream reader starts and again after
//! every DDL (the event triggers' messages, or DDL through the proxy).
//!
//! Roles change without DDL events (`GRANT role`, `ALTER ROLE`, per-role
//! settings): [`roles_digest`] is compared on every poll instead.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use postai_core::Lsn;
use postai_core::hash::Digest128;
use postai_core::sql::{Catalog, KeyType, RelKind, RelationSpec, Volatility};

use crate::protocol::{self, Message};
use crate::proxy::Proxy;
use crate::upstream::{Conn, error_message};

/// Schemas whose relations are PostgreSQL's own.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Functions by name: the most volatile overload, and whether every
/// overload is PostgreSQL's own.
const FUNCTIONS: &str = "SELECT p.proname, \
    max(CASE p.provolatile WHEN 'v' THEN 2 WHEN 's' THEN 1 ELSE 0 END)::text, \
    bool_and(n.nspname IN ('pg_catalog', 'information_schema') \
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass \
                             AND d.objid = p.oid AND d.deptype = 'e'))::text \
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace GROUP BY p.proname";

/// Relations: name, kind, whether a write may reach rows it does not name,
/// a view's definition, row-level security.
fn relations_query() -> String {
    format!(
        "SELECT c.relname, c.relkind::text, \
        (c.relkind IN ('p', 'v', 'f') OR c.relhasrules \
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

/// Parent of each partition or inheritance child.
const INHERITS: &str = "SELECT c.relname, p.relname FROM pg_inherits i \
    JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent";

/// Row-level security policies' USING expressions, on tables that enforce them.
const POLICIES: &str = "SELECT c.relname, pg_get_expr(p.polqual, p.polrelid) \
    FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid WHERE c.relrowsecurity AND p.polqual IS NOT NULL";

/// Single-column primary keys and their types.
fn keys_query() -> String {
    format!(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i \
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
    relations: BTreeMap<String, RelationSpec>,
    keys: BTreeMap<String, Option<(String, KeyType)>>,
}

impl LiveCatalog {
    /// Replaces the analyzer's view of the database with this one (ids of
    /// tables already interned stay).
    pub fn apply(&self, c: &mut Catalog) {
        c.set_functions(self.functions.iter().map(|(n, v, b)| (n.as_str(), *v, *b)));
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
        for (name, spec) in &self.relations {
            d.bytes(name.as_bytes());
            d.bytes(format!("{:?}{}{:?}", spec.kind, spec.writes_opaque, spec.ancestors).as_bytes());
            spec.reads.iter().for_each(|r| d.bytes(r.as_bytes()));
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

/// Reads the catalog over `conn`.
pub async fn load(conn: &mut Conn) -> std::io::Result<LiveCatalog> {
    let mut live = LiveCatalog::default();
    for row in rows(conn, FUNCTIONS).await? {
        let [Some(name), Some(v), Some(builtin)] = &row[..] else { continue };
        let v = match v.as_str() {
            "0" => Volatility::Immutable,
            "1" => Volatility::Stable,
            _ => Volatility::Volatile,
        };
        live.functions.push((name.clone(), v, builtin == "true"));
    }
    live.functions.sort();
    for row in rows(conn, &relations_query()).await? {
        let [Some(name), Some(kind), Some(opaque), definition, Some(_rls)] = &row[..] else { continue };
        let kind = match kind.as_str() {
            "v" => RelKind::View,
            "S" => RelKind::Sequence,
            "f" => RelKind::Foreign,
            _ => RelKind::Table,
        };
        let spec = RelationSpec {
            kind,
            writes_opaque: opaque == "true",
            ancestors: Vec::new(),
            reads: definition.iter().cloned().collect(),
        };
        match live.relations.get_mut(name) {
            Some(into) => merge(into, spec),
            None => {
                live.relations.insert(name.clone(), spec);
            }
        }
    }
    let parents: Vec<(String, String)> = rows(conn, INHERITS)
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
    for row in rows(conn, POLICIES).await? {
        let [Some(name), Some(qual)] = &row[..] else { continue };
        if let Some(spec) = live.relations.get_mut(name) {
            // the expression's own relations and calls (its columns are the table's)
            spec.reads.push(format!("SELECT 1 WHERE {qual}"));
        }
    }
    for row in rows(conn, &keys_query()).await? {
        let [Some(table), Some(column), Some(type_name)] = &row[..] else { continue };
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
    Ok(live)
}

/// What the change-stream reader knows of the database beyond the stream,
/// across its reconnections: the catalog and the roles it last saw.
#[derive(Debug, Default)]
pub struct Watch {
    catalog: Option<u128>,
    roles: Option<String>,
}

impl Watch {
    /// Loads the catalog and gives it to the node when it changed: the
    /// first time before the stream opens (nothing cached was analysed by
    /// another catalog), later by dropping what was cached (DDL changed
    /// what it means). Returns the catalog's digest.
    pub async fn sync_catalog(&mut self, proxy: &Proxy, conn: &mut Conn) -> std::io::Result<u128> {
        proxy.catalog_stale.store(false, Ordering::Relaxed);
        let live = load(conn).await?;
        let digest = live.digest();
        if self.catalog != Some(digest) {
            let mut node = proxy.node.lock().unwrap_or_else(|p| p.into_inner());
            if self.catalog.is_none() {
                node.load_catalog(|c| live.apply(c));
            } else {
                node.update_catalog(|c| live.apply(c));
                if let Some(f) = &proxy.l2_file {
                    f.clear("the database's catalog changed");
                }
            }
            drop(node);
            eprintln!("postai-edge: catalog loaded: {}", live.summary());
            self.catalog = Some(digest);
        }
        Ok(digest)
    }

    /// Compares the roles' digest with the last one: a change (a
    /// membership, an attribute, a per-role setting, a reloaded
    /// configuration) drops what was cached under the old privileges.
    pub async fn check_roles(&mut self, proxy: &Proxy, conn: &mut Conn) -> std::io::Result<()> {
        let digest = rows(conn, ROLES_DIGEST).await?.into_iter().next().and_then(|r| r.into_iter().next().flatten());
        let Some(digest) = digest else { return Ok(()) };
        if self.roles.as_ref().is_some_and(|old| *old != digest) {
            // every read that ran under the old roles has an older snapshot
            let at = rows(conn, "SELECT pg_current_wal_lsn()::text").await?;
            let at = at.first().and_then(|r| r.first().cloned().flatten()).and_then(|s| protocol::parse_lsn(&s));
            let Some(at) = at.map(Lsn) else {
                return Err(std::io::Error::other("roles changed, and the primary gave no WAL position"));
            };
            proxy.node.lock().unwrap_or_else(|p| p.into_inner()).roles_changed(at);
            if let Some(f) = &proxy.l2_file {
                f.clear("the database's roles changed");
            }
            eprintln!("postai-edge: roles changed: cached entries dropped");
        }
        self.roles = Some(digest);
        Ok(())
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

/// The rows of a query, text columns; an error answer is an error.
async fn rows(conn: &mut Conn, sql: &str) -> std::io::Result<Vec<Vec<Option<String>>>> {
    let msgs: Vec<Message> = conn.simple(sql).await?;
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        return Err(std::io::Error::other(format!("reading the catalog: {}", error_message(e))));
    }
    Ok(msgs.iter().filter(|m| m.tag == b'D').filter_map(protocol::text_columns).collect())
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

//! What the analyzer knows of the database's schema: tables by name with
//! their primary keys and key types, relations that are not plain tables
//! (views, sequences, foreign tables), what a write to a table may reach
//! beyond the rows it names (triggers, rules, foreign-key actions,
//! partitions), and the volatility of functions.
//!
//! Filled from the configuration and, by a driver that can ask the
//! database, from its own catalog (`pg_proc`, `pg_class`, `pg_trigger`, ...:
//! see [`Catalog::set_functions`], [`Catalog::set_relation`]). Until then a
//! compiled-in table of PostgreSQL 15's built-in functions classifies
//! function calls; a function in neither is a volatile user function.

use std::sync::Arc;

use super::builtins::BUILTIN_FUNCTIONS;
use super::{NotCacheable, TableId};
use crate::hash::FixedMap;

/// `pg_proc.provolatile`, ordered from the most to the least predictable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

/// A function name as the catalog knows it: the most volatile class among
/// its overloads, and whether any overload is not built in (a user's or an
/// extension's: its body is not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionInfo {
    pub volatility: Volatility,
    pub user: bool,
}

/// The type of a primary key column, which decides when two spellings name
/// the same key (`'070'`, `70.0` and `' 70'` are row 70 of an integer key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// Not known: only spellings that are canonical for every type a key
    /// commonly has are keys; others depend on the whole table.
    #[default]
    Unknown,
    /// `smallint`, `integer`, `bigint`, `oid`.
    Integer,
    /// `text`, `varchar`, `name`: equal only when byte-identical.
    Text,
    /// `character(n)`: trailing spaces do not count.
    PaddedText,
    Uuid,
    /// Anything else (numeric, dates, citext, ...): never a key.
    Other,
}

impl KeyType {
    /// The key type of a column of this type, by its name as `format_type`
    /// prints it (`integer`, `character varying(20)`, `uuid`, ...).
    pub fn from_type_name(name: &str) -> KeyType {
        let base = name.split('(').next().unwrap_or(name).trim();
        match base {
            "smallint" | "integer" | "bigint" | "oid" | "int2" | "int4" | "int8" => KeyType::Integer,
            "text" | "character varying" | "varchar" | "name" => KeyType::Text,
            "character" | "bpchar" | "char" => KeyType::PaddedText,
            "uuid" => KeyType::Uuid,
            _ => KeyType::Other,
        }
    }
}

/// What a relation is, beyond a plain table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelKind {
    /// A table (partitioned or not): its changes are in the change stream.
    #[default]
    Table,
    /// A view: its rows are its definition's.
    View,
    /// Never cached: a sequence moves without a change event, a foreign
    /// table's rows live elsewhere, a materialized view is refreshed by DDL
    /// only (cached like a table).
    Sequence,
    Foreign,
}

/// A relation as a driver describes it from the database's catalog.
#[derive(Clone, Debug, Default)]
pub struct RelationSpec {
    pub kind: RelKind,
    /// A write to it may change rows it does not name: triggers, rules,
    /// foreign keys whose actions (CASCADE, SET NULL, SET DEFAULT) reach
    /// other tables, a partitioned or inheritance parent, a view.
    pub writes_opaque: bool,
    /// Partitioned or inheritance parents, nearest first: a change to this
    /// table is a change to each of them.
    pub ancestors: Vec<String>,
    /// SQL whose effects a read of this relation also has: a view's
    /// definition (`pg_get_viewdef`), a row-level security policy's
    /// expression as `SELECT 1 WHERE <qual>`.
    pub reads: Vec<String>,
    /// Expressions a write to it evaluates (column defaults, generated
    /// columns, CHECK constraints, its columns' domain checks), as
    /// `SELECT <expr>`: what they do, the write does.
    pub writes: Vec<String>,
}

/// What a statement, a function call or reading a relation means for
/// caching, beyond the rows it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// Tables whose changes change what it returns (no views).
    pub reads: Vec<TableId>,
    pub reads_any: bool,
    /// It reads settings (`current_setting`), those that cannot change a
    /// result otherwise included.
    pub reads_settings: bool,
    /// The first reason it may not be cached.
    pub uncacheable: Option<NotCacheable>,
    pub session_opaque: bool,
    pub writes_opaque: bool,
    /// The first user code it may run (a user's function, operator or
    /// cast, or a function the catalog does not know), by name.
    pub user_code: Option<String>,
}

impl Effects {
    pub fn merge(&mut self, other: &Effects) {
        self.reads.extend_from_slice(&other.reads);
        self.reads_any |= other.reads_any;
        self.reads_settings |= other.reads_settings;
        if self.uncacheable.is_none() {
            self.uncacheable.clone_from(&other.uncacheable);
        }
        self.session_opaque |= other.session_opaque;
        self.writes_opaque |= other.writes_opaque;
        if self.user_code.is_none() {
            self.user_code.clone_from(&other.user_code);
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Relation {
    /// Described by [`Catalog::set_relation`] (not only interned).
    pub described: bool,
    pub kind: RelKind,
    pub writes_opaque: bool,
    pub ancestors: Vec<TableId>,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
}

/// Tables by name with their primary keys, relations and functions. Names
/// are lower-case and unqualified: `public.users` and `users` are one table
/// (conservative: a write to either invalidates both; the cache key carries
/// `search_path`).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    ids: FixedMap<String, TableId>,
    names: Vec<String>,
    primary_keys: Vec<Option<String>>,
    key_types: Vec<KeyType>,
    relations: Vec<Relation>,
    /// The live catalog's functions; `None`: the compiled-in built-ins.
    functions: Option<FixedMap<String, FunctionInfo>>,
    /// Operators, by symbol, whose functions are not built in: what using
    /// the symbol may call.
    operators: FixedMap<String, FunctionInfo>,
    /// Types, by name, whose casts, input functions or domain checks call
    /// functions that are not built in: what a cast to them may call.
    types: FixedMap<String, FunctionInfo>,
    /// Domain checks a cast to a type evaluates (its own and those of the
    /// types it is made of), as `SELECT <expr>`.
    type_checks: FixedMap<String, Vec<String>>,
    /// Date and time types, and the domains, arrays and composites made of
    /// them: their input reads `'now'`.
    datetime_types: FixedMap<String, ()>,
    /// What casting to a type, or writing a relation, evaluates: resolved
    /// by the analyzer when the catalog is loaded.
    pub(crate) type_effects: FixedMap<String, Effects>,
    pub(crate) write_effects: FixedMap<TableId, Effects>,
    /// Every relation of the database is described: an unknown name is
    /// something not to cache (created since, or not a relation).
    complete: bool,
    generation: u64,
    /// Resolved effects of reading relations that have any (memo).
    pub(crate) effects: FixedMap<TableId, Arc<Effects>>,
    /// Relations being resolved (views through views): a cycle guard.
    pub(crate) resolving: Vec<TableId>,
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

    /// Forgets `table`'s primary key: its reads and writes are table-level.
    pub fn clear_primary_key(&mut self, table: &str) {
        let id = self.intern(table);
        self.primary_keys[id.0 as usize] = None;
        self.key_types[id.0 as usize] = KeyType::Unknown;
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
        self.key_types.push(KeyType::Unknown);
        self.relations.push(Relation::default());
        id
    }

    /// Declares that `table`'s primary key is an integer: small key ranges
    /// (`id BETWEEN 5 AND 15`) then depend on their keys, not the whole table.
    pub fn set_integer_key(&mut self, table: &str) {
        self.set_key_type(table, KeyType::Integer);
    }

    pub fn set_key_type(&mut self, table: &str, key_type: KeyType) {
        let id = self.intern(table);
        self.key_types[id.0 as usize] = key_type;
    }

    pub fn integer_key(&self, id: TableId) -> bool {
        self.key_type(id) == KeyType::Integer
    }

    pub fn key_type(&self, id: TableId) -> KeyType {
        self.key_types.get(id.0 as usize).copied().unwrap_or_default()
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

    /// Describes a relation (from the database's catalog). Ids stay: a
    /// table keeps the id it was interned with.
    pub fn set_relation(&mut self, table: &str, spec: RelationSpec) -> TableId {
        let id = self.intern(table);
        let ancestors = spec.ancestors.iter().map(|a| self.intern(a)).filter(|a| *a != id).collect();
        self.relations[id.0 as usize] = Relation {
            described: true,
            kind: spec.kind,
            writes_opaque: spec.writes_opaque,
            ancestors,
            reads: spec.reads,
            writes: spec.writes,
        };
        self.effects.clear();
        id
    }

    /// Forgets every relation description (before a reload), keeping ids,
    /// keys and key types.
    pub fn clear_relations(&mut self) {
        self.relations.iter_mut().for_each(|r| *r = Relation::default());
        self.effects.clear();
    }

    /// Replaces the function table with the live catalog's: `(name,
    /// volatility, built in)` per overload; a name takes its most volatile
    /// overload, and is a user function if any overload is.
    pub fn set_functions<'a>(&mut self, functions: impl IntoIterator<Item = (&'a str, Volatility, bool)>) {
        let mut map: FixedMap<String, FunctionInfo> = FixedMap::default();
        for (name, volatility, builtin) in functions {
            let info = map.entry(name.to_string()).or_insert(FunctionInfo { volatility, user: false });
            info.volatility = info.volatility.max(volatility);
            info.user |= !builtin;
        }
        self.functions = Some(map);
        self.effects.clear();
    }

    /// Operators whose functions are not built in: `(symbol, volatility,
    /// user)`, `user` false when every such function is an extension's
    /// (trusted C code such as `citext`'s: immutable means pure).
    pub fn set_operators<'a>(&mut self, operators: impl IntoIterator<Item = (&'a str, Volatility, bool)>) {
        self.operators.clear();
        for (symbol, volatility, user) in operators {
            let info = self.operators.entry(symbol.to_string()).or_insert(FunctionInfo { volatility, user });
            info.volatility = info.volatility.max(volatility);
            info.user |= user;
        }
        self.effects.clear();
    }

    /// Types whose casts, input or domain checks call functions that are not
    /// built in: `(type name, volatility, user)` as for operators.
    pub fn set_types<'a>(&mut self, types: impl IntoIterator<Item = (&'a str, Volatility, bool)>) {
        self.types.clear();
        for (name, volatility, user) in types {
            let info = self.types.entry(name.to_string()).or_insert(FunctionInfo { volatility, user });
            info.volatility = info.volatility.max(volatility);
            info.user |= user;
        }
        self.effects.clear();
    }

    /// Domain checks a cast to each type evaluates: `(type, expressions)`.
    pub fn set_type_checks(&mut self, checks: impl IntoIterator<Item = (String, Vec<String>)>) {
        self.type_checks = checks.into_iter().collect();
        self.effects.clear();
    }

    /// Types whose input reads `'now'` beyond the built-in date/time types.
    pub fn set_datetime_types(&mut self, names: impl IntoIterator<Item = String>) {
        self.datetime_types = names.into_iter().map(|n| (n, ())).collect();
    }

    pub fn is_datetime_type(&self, name: &str) -> bool {
        self.datetime_types.contains_key(name)
    }

    pub(crate) fn type_checks(&self) -> impl Iterator<Item = (&String, &Vec<String>)> {
        self.type_checks.iter()
    }

    pub(crate) fn relation_writes(&self) -> impl Iterator<Item = (TableId, &Vec<String>)> {
        self.relations
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.writes.is_empty())
            .map(|(i, r)| (TableId(i as u32), &r.writes))
    }

    pub fn operator(&self, symbol: &str) -> Option<FunctionInfo> {
        self.operators.get(symbol).copied()
    }

    /// The worst of the user comparison operators (`=`, `<>`, `<`, ...)
    /// that may do more than compare (volatile or stable, or a user's
    /// immutable function that may read tables): used implicitly by IN,
    /// CASE, DISTINCT, GROUP BY, ORDER BY and joins.
    pub fn comparisons(&self) -> Option<FunctionInfo> {
        ["=", "<>", "!=", "<", ">", "<=", ">="]
            .iter()
            .filter_map(|s| self.operator(s))
            .filter(|f| f.volatility != Volatility::Immutable || f.user)
            .max_by_key(|f| f.volatility)
    }

    pub fn type_functions(&self, name: &str) -> Option<FunctionInfo> {
        self.types.get(name).copied()
    }

    /// Every relation of the database has been described: a name the
    /// catalog does not know is not cached.
    pub fn set_complete(&mut self, complete: bool) {
        self.complete = complete;
        self.effects.clear();
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Bumped by the owner on every reload: shapes analysed before are stale.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn bump_generation(&mut self) {
        self.generation += 1;
        self.effects.clear();
    }

    /// A function by name (as written: unquoted names lower-cased), `None`
    /// when the catalog does not know it.
    pub fn function(&self, name: &str) -> Option<FunctionInfo> {
        match &self.functions {
            Some(map) => map.get(name).copied(),
            None => BUILTIN_FUNCTIONS.binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes())).ok().map(|i| {
                let volatility = match BUILTIN_FUNCTIONS[i].1 {
                    0 => Volatility::Immutable,
                    1 => Volatility::Stable,
                    _ => Volatility::Volatile,
                };
                FunctionInfo { volatility, user: false }
            }),
        }
    }

    pub(crate) fn relation(&self, id: TableId) -> Option<&Relation> {
        self.relations.get(id.0 as usize)
    }

    /// Whether the catalog describes `name` (always, until it is complete).
    pub(crate) fn knows(&self, name: &str) -> bool {
        !self.complete || self.get(name).is_some_and(|id| self.relation_described(id))
    }

    fn relation_described(&self, id: TableId) -> bool {
        self.relations.get(id.0 as usize).is_some_and(|r| r.described)
    }

    /// Partitioned or inheritance parents of `id`: a change to `id` is a
    /// change to each.
    pub fn ancestors(&self, id: TableId) -> &[TableId] {
        self.relations.get(id.0 as usize).map_or(&[], |r| &r.ancestors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_sorted_and_found() {
        assert!(BUILTIN_FUNCTIONS.windows(2).all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()));
        let c = Catalog::new();
        assert_eq!(c.function("lower").map(|f| f.volatility), Some(Volatility::Immutable));
        assert_eq!(c.function("now").map(|f| f.volatility), Some(Volatility::Stable));
        assert_eq!(c.function("nextval").map(|f| f.volatility), Some(Volatility::Volatile));
        assert_eq!(c.function("my_function"), None);
    }

    #[test]
    fn live_functions_replace_the_builtins() {
        let mut c = Catalog::new();
        c.set_functions([
            ("lower", Volatility::Immutable, true),
            ("f", Volatility::Immutable, false),
            ("f", Volatility::Volatile, false),
            ("lower", Volatility::Stable, false),
        ]);
        assert_eq!(c.function("f"), Some(FunctionInfo { volatility: Volatility::Volatile, user: true }));
        assert_eq!(c.function("lower"), Some(FunctionInfo { volatility: Volatility::Stable, user: true }));
        assert_eq!(c.function("upper"), None, "the live catalog is the whole truth");
    }

    #[test]
    fn key_types_from_type_names() {
        assert_eq!(KeyType::from_type_name("integer"), KeyType::Integer);
        assert_eq!(KeyType::from_type_name("character varying(20)"), KeyType::Text);
        assert_eq!(KeyType::from_type_name("character(5)"), KeyType::PaddedText);
        assert_eq!(KeyType::from_type_name("uuid"), KeyType::Uuid);
        assert_eq!(KeyType::from_type_name("numeric(10,2)"), KeyType::Other);
        assert_eq!(KeyType::from_type_name("citext"), KeyType::Other);
    }
}

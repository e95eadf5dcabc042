//! `test_decoding`'s output read by its grammar, not by searching for
//! substrings: a table line is `table <names>: <OP>:` followed by columns
//! ` <name>[<type>]:<value>`, where names are `quote_identifier`'s output
//! (quoted with `""` doubled whenever they are not plain lower-case words),
//! types are `format_type_be`'s (quoted the same way), and values are
//! `print_literal`'s: numbers, booleans, `null` and `unchanged-toast-datum`
//! bare, bit strings as `B'…'`, everything else single-quoted with `''`
//! doubled. So a value that contains `id[integer]:5`, a table named
//! `"a: b"` or a column named `"new-tuple"` cannot be mistaken for
//! structure. An UPDATE may carry ` old-key:` and ` new-tuple:` markers
//! (bare words: no quoted name can equal them); a TRUNCATE lists every
//! table it emptied.

use crate::invalidation::{ChangeTarget, key_hash};
use crate::sql::{Catalog, TableId, canonical_key};

/// A value as `print_literal` wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// Unquoted: numbers, booleans, `NaN`, `Infinity`.
    Bare(String),
    /// Single-quoted (or a bit string), unescaped.
    Quoted(String),
    Null,
    /// A toasted value an UPDATE did not change (never a key column's).
    UnchangedToast,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_name: String,
    pub value: Value,
}

/// One line of a table change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableChange {
    /// `(schema, table)` as the server named them (unquoted).
    pub tables: Vec<(String, String)>,
    pub op: String,
    /// An UPDATE's old key, a DELETE's old key (replica identity).
    pub old: Vec<Column>,
    pub new: Vec<Column>,
}

/// Parses a `table ...` line; `None` if it is not one this grammar reads
/// (the caller then invalidates everything).
pub fn parse_table_line(line: &str) -> Option<TableChange> {
    let mut p = Parser { s: line.as_bytes(), at: 0, text: line };
    p.expect("table ")?;
    let mut tables = vec![p.qualified_name()?];
    while p.eat(", ") {
        tables.push(p.qualified_name()?);
    }
    p.expect(": ")?;
    let op_start = p.at;
    while p.peek().is_some_and(|c| c.is_ascii_uppercase()) {
        p.at += 1;
    }
    let op = line.get(op_start..p.at)?.to_string();
    p.expect(":")?;
    let mut change = TableChange { tables, op, old: Vec::new(), new: Vec::new() };
    match change.op.as_str() {
        "TRUNCATE" => return Some(change),
        "INSERT" | "UPDATE" | "DELETE" => {}
        _ => return None,
    }
    if p.eat(" (no-tuple-data)") {
        return p.at_end().then_some(change);
    }
    let mut into_old = change.op == "DELETE";
    if p.eat(" old-key:") {
        into_old = true;
    }
    loop {
        if p.at_end() {
            return Some(change);
        }
        if p.eat(" new-tuple:") {
            into_old = false;
            if p.eat(" (no-tuple-data)") {
                return p.at_end().then_some(change);
            }
            continue;
        }
        p.expect(" ")?;
        let column = p.column()?;
        if into_old { change.old.push(column) } else { change.new.push(column) }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at >= self.s.len()
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.at.min(self.s.len())..].starts_with(lit.as_bytes()) {
            self.at += lit.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, lit: &str) -> Option<()> {
        self.eat(lit).then_some(())
    }

    /// `quote_identifier`'s output: a plain word, or `"…"` with `""` doubled.
    fn identifier(&mut self) -> Option<String> {
        if self.peek() == Some(b'"') {
            return self.quoted(b'"');
        }
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_') {
            self.at += 1;
        }
        (self.at > start).then(|| self.text[start..self.at].to_string())
    }

    /// A quoted string starting at the current byte, `q` doubled inside.
    fn quoted(&mut self, q: u8) -> Option<String> {
        debug_assert_eq!(self.peek(), Some(q));
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.at += 1;
            if c == q {
                if self.peek() == Some(q) {
                    self.at += 1;
                    out.push(q);
                } else {
                    return String::from_utf8(out).ok();
                }
            } else {
                out.push(c);
            }
        }
    }

    fn qualified_name(&mut self) -> Option<(String, String)> {
        let first = self.identifier()?;
        if self.eat(".") { Some((first, self.identifier()?)) } else { Some((String::new(), first)) }
    }

    /// `name[type]:value`.
    fn column(&mut self) -> Option<Column> {
        let name = self.identifier()?;
        self.expect("[")?;
        let type_start = self.at;
        let mut depth = 1;
        while depth > 0 {
            match self.peek()? {
                b'"' => {
                    self.quoted(b'"')?;
                    continue;
                }
                b'[' => depth += 1,
                b']' => depth -= 1,
                _ => {}
            }
            self.at += 1;
        }
        let type_name = self.text.get(type_start..self.at - 1)?.to_string();
        self.expect(":")?;
        let value = match self.peek()? {
            b'\'' => Value::Quoted(self.quoted(b'\'')?),
            b'B' if self.s.get(self.at + 1) == Some(&b'\'') => {
                self.at += 1;
                Value::Quoted(self.quoted(b'\'')?)
            }
            _ => {
                let start = self.at;
                while self.peek().is_some_and(|c| c != b' ') {
                    self.at += 1;
                }
                match &self.text[start..self.at] {
                    "null" => Value::Null,
                    "unchanged-toast-datum" => Value::UnchangedToast,
                    bare => Value::Bare(bare.to_string()),
                }
            }
        };
        Some(Column { name, type_name, value })
    }
}

/// What a table line changed, for the invalidation of entries that read
/// the tables it names: their rows by primary key where the key column is
/// in the line and its value has a canonical form, the whole table
/// otherwise; partitions' parents too. `None` when nothing cached can
/// depend on it (tables the catalog does not know); an unreadable line
/// changes everything.
pub fn change_targets(line: &str, catalog: &Catalog) -> Option<Vec<ChangeTarget>> {
    let Some(change) = parse_table_line(line) else {
        return Some(vec![ChangeTarget::All]);
    };
    let mut targets = Vec::new();
    for (_, name) in &change.tables {
        let Some(table) = catalog.get(name) else { continue };
        let keys = if change.op == "TRUNCATE" { None } else { key_values(&change, table, catalog) };
        push_with_ancestors(&mut targets, table, keys.as_deref(), catalog);
    }
    (!targets.is_empty()).then_some(targets)
}

/// The canonical key values a change names (old key and new tuple), `None`
/// if any is missing or has no canonical form.
fn key_values(change: &TableChange, table: TableId, catalog: &Catalog) -> Option<Vec<String>> {
    let pk = catalog.primary_key(table)?;
    let key_type = catalog.key_type(table);
    let mut out = Vec::new();
    for column in change.old.iter().chain(&change.new).filter(|c| c.name == pk) {
        let raw = match &column.value {
            Value::Bare(v) | Value::Quoted(v) => v,
            Value::Null | Value::UnchangedToast => return None,
        };
        out.push(canonical_key(key_type, raw)?.into_owned());
    }
    (!out.is_empty()).then_some(out)
}

/// `table`'s target, and its ancestors' (keyed alike when they share the key).
fn push_with_ancestors(targets: &mut Vec<ChangeTarget>, table: TableId, keys: Option<&[String]>, catalog: &Catalog) {
    let target = |t: TableId, keys: Option<&[String]>| match keys {
        Some(ks) => ChangeTarget::Keys(t, ks.iter().map(|k| key_hash(t, k.as_bytes())).collect()),
        None => ChangeTarget::Table(t),
    };
    targets.push(target(table, keys));
    for a in catalog.ancestors(table) {
        let same =
            catalog.primary_key(*a) == catalog.primary_key(table) && catalog.key_type(*a) == catalog.key_type(table);
        targets.push(target(*a, keys.filter(|_| same)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{KeyType, RelationSpec};

    fn catalog() -> (Catalog, TableId, TableId) {
        let mut c = Catalog::new();
        let items = c.set_primary_key("items", "id");
        c.set_integer_key("items");
        let users = c.set_primary_key("users", "email");
        c.set_key_type("users", KeyType::Text);
        (c, items, users)
    }

    fn keys(t: TableId, ks: &[&str]) -> ChangeTarget {
        ChangeTarget::Keys(t, ks.iter().map(|k| key_hash(t, k.as_bytes())).collect())
    }

    #[test]
    fn lines_by_their_grammar() {
        let (c, items, users) = catalog();
        let t = |l: &str| change_targets(l, &c);
        assert_eq!(t("table public.items: UPDATE: id[integer]:5 v[integer]:7"), Some(vec![keys(items, &["5"])]));
        assert_eq!(
            t("table public.items: UPDATE: old-key: id[integer]:5 new-tuple: id[integer]:6 v[integer]:1"),
            Some(vec![keys(items, &["5", "6"])])
        );
        assert_eq!(
            t("table public.users: INSERT: email[text]:'o''neil@x' grid[integer]:1"),
            Some(vec![keys(users, &["o'neil@x"])])
        );
        assert_eq!(t("table public.items: DELETE: id[integer]:9"), Some(vec![keys(items, &["9"])]));
        assert_eq!(t("table public.items: DELETE: (no-tuple-data)"), Some(vec![ChangeTarget::Table(items)]));
        assert_eq!(t("table public.items: TRUNCATE: (no-flags)"), Some(vec![ChangeTarget::Table(items)]));
        assert_eq!(
            t("table public.items, public.users: TRUNCATE: cascade"),
            Some(vec![ChangeTarget::Table(items), ChangeTarget::Table(users)]),
            "every table a TRUNCATE names"
        );
        assert_eq!(t("table public.other: INSERT: id[integer]:1"), None, "nothing cached reads it");
        assert_eq!(t("table public.items: INSERT: xid[integer]:3"), Some(vec![ChangeTarget::Table(items)]));
        assert_eq!(t("table public.items: INSERT garbage"), Some(vec![ChangeTarget::All]));
    }

    #[test]
    fn values_and_names_that_look_like_structure() {
        let (mut c, items, _) = catalog();
        let odd = c.set_primary_key("a: b", "id");
        c.set_integer_key("a: b");
        let t = |l: &str, c: &Catalog| change_targets(l, c);
        // a text column before the key whose value spells a key column
        assert_eq!(
            t("table public.items: UPDATE: note[text]:'x id[integer]:99 y' id[integer]:5", &c),
            Some(vec![keys(items, &["5"])])
        );
        assert_eq!(
            t("table public.items: UPDATE: note[text]:' new-tuple: id[integer]:99' id[integer]:5", &c),
            Some(vec![keys(items, &["5"])])
        );
        assert_eq!(t("table public.\"a: b\": INSERT: id[integer]:3", &c), Some(vec![keys(odd, &["3"])]));
        // a quoted column named like a marker, a type with brackets and quotes
        assert_eq!(
            t(
                "table public.items: INSERT: \"new-tuple\"[text]:'a' tags[text[]]:'{a,b}' \
                 t[public.\"my]:type\"]:'z' id[integer]:4",
                &c
            ),
            Some(vec![keys(items, &["4"])])
        );
        // newlines and quotes inside a value
        assert_eq!(
            t("table public.items: INSERT: v[text]:'line\nid[integer]:1 ''q''' id[integer]:8", &c),
            Some(vec![keys(items, &["8"])])
        );
        // a key that is null, toasted or not canonical: the table
        assert_eq!(t("table public.items: INSERT: id[integer]:null", &c), Some(vec![ChangeTarget::Table(items)]));
        assert_eq!(t("table public.items: INSERT: id[bigint]:007", &c), Some(vec![keys(items, &["7"])]));
    }

    #[test]
    fn partitions_change_their_parents() {
        let (mut c, _, _) = catalog();
        let events = c.set_primary_key("events", "id");
        c.set_integer_key("events");
        let part = c.set_primary_key("events_2026", "id");
        c.set_integer_key("events_2026");
        c.set_relation("events_2026", RelationSpec { ancestors: vec!["events".into()], ..RelationSpec::default() });
        assert_eq!(
            change_targets("table public.events_2026: INSERT: id[integer]:1", &c),
            Some(vec![keys(part, &["1"]), keys(events, &["1"])])
        );
    }

    #[test]
    fn uuid_keys_are_canonical() {
        let mut c = Catalog::new();
        let docs = c.set_primary_key("docs", "id");
        c.set_key_type("docs", KeyType::Uuid);
        assert_eq!(
            change_targets("table public.docs: INSERT: id[uuid]:'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", &c),
            Some(vec![keys(docs, &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])])
        );
    }
}

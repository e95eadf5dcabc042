//! What calling a function, or reading a view, means for caching: whether
//! the result may be cached, on which connection it must run, and whether it
//! may change the session's state or write rows the statement does not name.
//! Volatility comes from the catalog ([`Catalog::function`]); a few built-in
//! STABLE functions depend on the clock, the backend or the statistics
//! rather than on the data and the session's settings, and are listed here.

use std::sync::Arc;

use super::NotCacheable;
use super::TableId;
use super::catalog::{Catalog, Effects, FunctionInfo, RelKind, Volatility};

/// SQL constructs that parse as function calls but are not functions in
/// `pg_proc`, whose result depends only on their arguments or on the
/// session's role, database and `search_path` (all in the cache context).
const SQL_CONSTRUCTS: &[&str] = &[
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "grouping",
    "user",
    "current_user",
    "session_user",
    "current_role",
    "current_catalog",
    "current_schema",
    "system_user",
    "xmlconcat",
    "xmlelement",
    "xmlforest",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmlexists",
];

/// Functions whose result changes while the data does not: the clock, the
/// backend, the transaction, the server, statistics. Most are STABLE in the
/// catalog (PostgreSQL may call them once per statement), which is not
/// enough for a cache that answers later statements.
const CHANGING_FUNCTIONS: &[&str] = &[
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "now",
    "statement_timestamp",
    "transaction_timestamp",
    "age",
    "mxid_age",
    "pg_backend_pid",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_trigger_depth",
    "pg_my_temp_schema",
    "pg_is_other_temp_schema",
    "pg_listening_channels",
    "pg_cursor",
    "pg_prepared_statement",
    "pg_get_replication_slots",
    "pg_show_all_settings",
    "pg_tablespace_databases",
    "pg_tablespace_location",
    "pg_relation_filenode",
    "pg_relation_filepath",
    "pg_filenode_relation",
    "pg_available_extensions",
    "pg_available_extension_versions",
    "pg_extension_update_paths",
    "pg_config",
    "pg_timezone_names",
    "pg_timezone_abbrevs",
    "pg_get_publication_tables",
    "pg_relation_is_publishable",
    "pg_replication_origin_oid",
    "pg_event_trigger_ddl_commands",
    "pg_event_trigger_dropped_objects",
    "pg_event_trigger_table_rewrite_oid",
    "pg_event_trigger_table_rewrite_reason",
];

/// Built-in functions that change the session's state in ways no `SET` shows.
const SESSION_CHANGING: &[&str] = &["set_config"];

/// Built-in functions that run SQL given as text, or read tables named by
/// their arguments (STABLE in the catalog): what they read or do is not in
/// the statement, so they are as opaque as a volatile user function.
const SQL_RUNNING: &[&str] = &[
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "table_to_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "schema_to_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
    "database_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
];

/// What calling `name` (as written: unquoted names lower-cased) means.
pub(crate) fn call_effects(name: &str, catalog: &Catalog, user_volatile: &[String]) -> Effects {
    let lower = name.to_ascii_lowercase();
    let mut e = Effects::default();
    let opaque = |e: &mut Effects, why: NotCacheable| {
        e.uncacheable = Some(why);
        e.session_opaque = true;
        e.writes_opaque = true;
    };
    // (a user's function of a built-in's name too: `mallory.now()`)
    let info = catalog.function(name);
    let declared_volatile = user_volatile.iter().any(|v| v.eq_ignore_ascii_case(name));
    if info.is_some_and(|f| f.user) || declared_volatile {
        e.user_code = Some(name.to_string());
    }
    if declared_volatile {
        opaque(&mut e, NotCacheable::Volatile(lower));
        return e;
    }
    if SQL_RUNNING.contains(&lower.as_str()) {
        // (the SQL it runs is any code)
        e.user_code = Some(lower.clone());
        opaque(&mut e, NotCacheable::Volatile(lower));
        return e;
    }
    if SESSION_CHANGING.contains(&lower.as_str()) {
        e.uncacheable = Some(NotCacheable::Volatile(lower));
        e.session_opaque = true;
        return e;
    }
    if CHANGING_FUNCTIONS.contains(&lower.as_str()) || lower.starts_with("pg_stat_") {
        e.uncacheable = Some(NotCacheable::Volatile(lower));
        return e;
    }
    if lower == "current_setting" {
        e.reads_settings = true;
    }
    match info {
        None if SQL_CONSTRUCTS.contains(&lower.as_str()) => {}
        // unknown: a user function of any kind
        None => {
            e.user_code = Some(name.to_string());
            opaque(&mut e, NotCacheable::Volatile(name.to_string()));
        }
        Some(f) => match (f.user, f.volatility) {
            (true, Volatility::Volatile) => opaque(&mut e, NotCacheable::Volatile(name.to_string())),
            (true, Volatility::Stable) => {
                e.uncacheable = Some(NotCacheable::StableUserFunction(name.to_string()));
            }
            // trusted not to change (PostgreSQL folds it at plan time), but
            // it may read any table
            (true, Volatility::Immutable) => e.reads_any = true,
            (false, Volatility::Volatile) => {
                e.uncacheable = Some(NotCacheable::Volatile(name.to_string()));
            }
            (false, _) => {}
        },
    }
    e
}

/// What using an operator, or casting to a type, whose function is not
/// built in means: a volatile one may do anything, a stable one is not
/// cached, an immutable user's one may read any table, an immutable
/// extension's one (`citext`'s `=`) is trusted.
pub(crate) fn hidden_call_effects(what: &str, info: Option<FunctionInfo>) -> Effects {
    let mut e = Effects::default();
    match info {
        Some(FunctionInfo { volatility: Volatility::Volatile, .. }) => {
            e.uncacheable = Some(NotCacheable::Volatile(what.to_string()));
            e.session_opaque = true;
            e.writes_opaque = true;
        }
        Some(FunctionInfo { volatility: Volatility::Stable, .. }) => {
            e.uncacheable = Some(NotCacheable::StableUserFunction(what.to_string()))
        }
        Some(FunctionInfo { volatility: Volatility::Immutable, user: true }) => e.reads_any = true,
        Some(FunctionInfo { volatility: Volatility::Immutable, user: false }) | None => {}
    }
    if info.is_some_and(|f| f.user) {
        e.user_code = Some(what.to_string());
    }
    e
}

/// The effects of reading relation `id` beyond its own rows: a view's
/// definition (its tables replace it), a sequence or foreign table (never
/// cached), row-level security policies' reads. `resolve` analyses one SQL
/// text (recursively, with this memo); views nest at most `DEPTH_MAX` deep.
pub(crate) fn relation_effects(
    id: TableId,
    catalog: &mut Catalog,
    resolve: &mut dyn FnMut(&str, &mut Catalog) -> Effects,
) -> Option<Arc<Effects>> {
    if let Some(e) = catalog.effects.get(&id) {
        return Some(e.clone());
    }
    let rel = catalog.relation(id)?.clone();
    let name = catalog.name(id).to_string();
    let mut e = Effects::default();
    match rel.kind {
        RelKind::Sequence | RelKind::Foreign => {
            e.uncacheable = Some(NotCacheable::Unfollowed(name.clone()));
        }
        RelKind::Table => e.reads.push(id),
        RelKind::View => {}
    }
    if rel.reads.is_empty() && rel.kind == RelKind::Table {
        return None;
    }
    if catalog.resolving.contains(&id) && rel.kind == RelKind::Table {
        // a policy that reads its own table: the table's rows, no further
        return Some(Arc::new(e));
    }
    if catalog.resolving.contains(&id) || catalog.resolving.len() >= DEPTH_MAX {
        e.user_code = Some(format!("views nested past {DEPTH_MAX} at {name}"));
        e.uncacheable = Some(NotCacheable::TooDeep(name));
    } else {
        catalog.resolving.push(id);
        for sql in &rel.reads {
            let inner = resolve(sql, catalog);
            e.merge(&inner);
        }
        catalog.resolving.pop();
    }
    e.reads.sort();
    e.reads.dedup();
    let e = Arc::new(e);
    catalog.effects.insert(id, e.clone());
    Some(e)
}

/// How deep views (and policies) may nest.
pub(crate) const DEPTH_MAX: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_by_class() {
        let c = Catalog::new();
        let e = |n: &str| call_effects(n, &c, &["my_volatile".to_string()]);
        assert!(e("lower").uncacheable.is_none());
        assert!(e("coalesce").uncacheable.is_none(), "a construct, not a function");
        assert!(e("current_user").uncacheable.is_none(), "the role is in the context");
        for changing in ["now", "pg_backend_pid", "pg_current_snapshot", "pg_stat_get_numscans", "current_date"] {
            let x = e(changing);
            assert!(x.uncacheable.is_some() && !x.session_opaque, "{changing}");
        }
        let x = e("random");
        assert!(x.uncacheable.is_some() && !x.writes_opaque);
        let x = e("set_config");
        assert!(x.session_opaque && !x.writes_opaque);
        for opaque in ["my_volatile", "unknown_fn", "\"MixedCase\"", "query_to_xml", "table_to_xml", "ts_stat"] {
            let x = e(opaque);
            assert!(x.uncacheable.is_some() && x.session_opaque && x.writes_opaque, "{opaque}");
        }
    }
}

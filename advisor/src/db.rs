//! The few ways the advisor talks to PostgreSQL: simple-protocol text rows
//! (no type mapping to get wrong), and quoting.

use tokio_postgres::{Client, SimpleQueryMessage};

/// What went wrong talking to PostgreSQL, with the statement that failed.
#[derive(Debug, thiserror::Error)]
pub enum AdvisorError {
    #[error("{sql}: {}", reason(source))]
    Query { sql: String, source: tokio_postgres::Error },
    #[error("{0}")]
    Missing(String),
}

/// PostgreSQL's own words when it answered with an error, with its SQLSTATE.
fn reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Text rows of `sql` (simple protocol: every value as PostgreSQL prints it).
pub async fn rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, AdvisorError> {
    let msgs = client.simple_query(sql).await.map_err(|source| AdvisorError::Query { sql: short(sql), source })?;
    let mut out = Vec::new();
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(out)
}

/// Makes the advisor's own SQL mean what it says on this connection,
/// whatever the database's or role's defaults: standard strings (the
/// quoting of `literal` depends on it) and the catalog first on the search
/// path (a function of the database owner's named like a catalog one must
/// not run as the advisor's role; the application's schemas follow, for its
/// statements' names).
pub async fn harden(client: &Client) -> Result<(), AdvisorError> {
    exec(
        client,
        "SET standard_conforming_strings = on; \
         SELECT pg_catalog.set_config('search_path', 'pg_catalog, ' OPERATOR(pg_catalog.||) \
         pg_catalog.current_setting('search_path'), false)",
    )
    .await
}

/// Runs `sql`, ignoring its rows.
pub async fn exec(client: &Client, sql: &str) -> Result<(), AdvisorError> {
    client.batch_execute(sql).await.map_err(|source| AdvisorError::Query { sql: short(sql), source })
}

pub(crate) fn short(sql: &str) -> String {
    let s: String = sql.chars().take(200).collect();
    if s.len() < sql.len() { format!("{s}...") } else { s }
}

/// A value of a text row: `None` (SQL NULL, or no such column) as empty.
pub fn text(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

pub fn num(row: &[Option<String>], i: usize) -> f64 {
    row.get(i).and_then(|v| v.as_deref()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

pub fn flag(row: &[Option<String>], i: usize) -> bool {
    row.get(i).and_then(|v| v.as_deref()) == Some("t")
}

/// `name` as a quoted identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `value` as a quoted literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A PostgreSQL text array (`{a,b,"c d"}`) as its elements.
pub fn text_array(v: &str) -> Vec<String> {
    let inner = v.trim().trim_start_matches('{').trim_end_matches('}');
    if inner.is_empty() {
        return Vec::new();
    }
    let (mut out, mut cur, mut quoted, mut esc) = (Vec::new(), String::new(), false, false);
    for c in inner.chars() {
        match (esc, quoted, c) {
            (true, _, c) => {
                cur.push(c);
                esc = false;
            }
            (false, true, '\\') => esc = true,
            (false, _, '"') => quoted = !quoted,
            (false, false, ',') => out.push(std::mem::take(&mut cur)),
            (false, _, c) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_quoting() {
        assert_eq!(text_array("{a,b,\"c d\",\"e\\\"f\"}"), vec!["a", "b", "c d", "e\"f"]);
        assert!(text_array("{}").is_empty());
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("o'k"), "'o''k'");
    }
}

//! The proxy's side of the workload: `SHOW POSTAI QUERIES` counts each
//! statement shape's calls and what its cache answered, which
//! `pg_stat_statements` never sees. Merged by the normalised text (the
//! proxy's is lowercased; spacing and a final `;` do not count).

use serde::Serialize;
use tokio_postgres::Client;

use crate::Report;
use crate::db::{AdvisorError, num, rows, text};

/// One shape as the proxy counted it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CacheShare {
    pub query: String,
    pub calls: f64,
    pub l1_hits: f64,
    pub l2_hits: f64,
    pub upstream: f64,
    /// Answered by the cache, in % of calls.
    pub hit_pct: f64,
}

/// The statement text as both sides can compare it.
pub fn normalise(q: &str) -> String {
    q.trim().trim_end_matches(';').split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Every shape the proxy at `proxy` counted (a superuser or a member of
/// `pg_read_all_stats` may ask).
pub async fn shapes(proxy: &Client) -> Result<Vec<CacheShare>, AdvisorError> {
    Ok(rows(proxy, "SHOW POSTAI QUERIES")
        .await?
        .iter()
        .map(|r| CacheShare {
            query: text(r, 1),
            calls: num(r, 2),
            l1_hits: num(r, 3),
            l2_hits: num(r, 4),
            upstream: num(r, 5),
            hit_pct: num(r, 7),
        })
        .collect())
}

/// Each statement of the report gets what the proxy counted of it; the
/// shapes PostgreSQL did not see among the statements weighed (the cache
/// answered them, or they cost it little) are listed apart, most calls first.
pub fn merge(report: &mut Report, shapes: Vec<CacheShare>) {
    let mut rest = Vec::new();
    for s in shapes {
        let key = normalise(&s.query);
        match report.statements.iter_mut().find(|a| normalise(&a.query) == key) {
            Some(a) => a.cache = Some(s),
            None => rest.push(s),
        }
    }
    rest.sort_by(|a, b| b.calls.total_cmp(&a.calls));
    report.cache_only = rest;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_compare_as_normalised() {
        assert_eq!(normalise("SELECT  v\n FROM items WHERE id = $1;"), "select v from items where id = $1");
        assert_eq!(normalise("select v from items where id = $1"), normalise("SELECT v FROM items WHERE id = $1"));
    }
}

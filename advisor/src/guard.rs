//! What planning a captured statement would run. PostgreSQL's planner
//! evaluates user functions while it plans: an IMMUTABLE one with constant
//! arguments (or none) is folded, a STABLE one is evaluated for estimates,
//! and a view's, a policy's or a column default's calls are planned with the
//! statement. Any role that can create a function could then have its code
//! run with the advisor's privileges (and a non-volatile function may call a
//! volatile one that writes). The advisor explains no statement that may
//! reach user code, unless told to trust the database's functions
//! (`--trust-functions`); what it reaches is found by the proxy's own
//! analysis (`postai_core::sql`), over the live catalog.

use postai_core::sql::{Analyzer, AnalyzerConfig, Catalog};
use postai_wire::catalog::{Rows, load};
use tokio_postgres::Client;

use crate::db::{AdvisorError, rows};

/// The catalog read over the advisor's connection.
struct Reader<'a>(&'a Client);

impl Rows for Reader<'_> {
    async fn rows(&mut self, sql: &str) -> std::io::Result<Vec<Vec<Option<String>>>> {
        rows(self.0, sql).await.map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The statements' analysis against the database's catalog.
pub struct Guard {
    analyzer: Analyzer,
}

impl Guard {
    /// Reads the database's catalog (functions, relations, views, policies,
    /// defaults) over `client`.
    pub async fn load(client: &Client) -> Result<Guard, AdvisorError> {
        let live = load(&mut Reader(client))
            .await
            .map_err(|e| AdvisorError::Missing(format!("reading the catalog to analyse the statements: {e}")))?;
        let mut analyzer = Analyzer::new(AnalyzerConfig::default(), Catalog::new());
        // (the effects of defaults, checks and casts are worked out here)
        analyzer.update_catalog(|c| live.apply(c));
        Ok(Guard { analyzer })
    }

    /// Why planning `query` (a normalised statement) may run user code, or
    /// `None` when it calls only PostgreSQL's own functions.
    pub fn user_code(&mut self, query: &str) -> Option<String> {
        let inner = crate::plan::inner_statement(query);
        let shape = match self.analyzer.lookup(inner) {
            Ok((shape, _)) => shape,
            Err(e) => return Some(format!("the advisor cannot read it ({e}), so not what planning it would run")),
        };
        if let Some(f) = &shape.user_code {
            return Some(format!(
                "it calls user code ({f}), which planning may run with the advisor's privileges \
                 (--trust-functions to plan it anyway)"
            ));
        }
        if shape.session_opaque {
            return Some(
                "the advisor cannot tell what it calls, so not what planning it would run \
                 (--trust-functions to plan it anyway)"
                    .into(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use postai_core::sql::Volatility;

    use super::*;

    fn guard(functions: &[(&str, Volatility)]) -> Guard {
        // (PostgreSQL's own: built in)
        let builtins = [("now", Volatility::Stable), ("lower", Volatility::Immutable)];
        let all: Vec<(&str, Volatility, bool)> = functions
            .iter()
            .map(|(n, v)| (*n, *v, false))
            .chain(builtins.iter().map(|(n, v)| (*n, *v, true)))
            .collect();
        let mut analyzer = Analyzer::new(AnalyzerConfig::default(), Catalog::new());
        analyzer.update_catalog(|c| c.set_functions(all));
        Guard { analyzer }
    }

    #[test]
    fn user_functions_of_every_volatility_are_user_code() {
        let mut g =
            guard(&[("folded", Volatility::Immutable), ("estimated", Volatility::Stable), ("f", Volatility::Volatile)]);
        assert!(g.user_code("SELECT * FROM t WHERE a = folded()").is_some_and(|w| w.contains("folded")));
        assert!(g.user_code("SELECT * FROM t WHERE a > estimated()").is_some_and(|w| w.contains("estimated")));
        assert!(g.user_code("UPDATE t SET a = f($1) WHERE id = $2").is_some());
        assert!(g.user_code("SELECT * FROM t WHERE a = unknown_fn($1)").is_some(), "a function the catalog lacks");
        assert!(g.user_code("PREPARE q (int) AS SELECT folded() FROM t WHERE a = $1").is_some());
        assert_eq!(g.user_code("SELECT * FROM t WHERE a = $1 AND b > now() - $2::interval ORDER BY lower(c)"), None);
        assert_eq!(g.user_code("INSERT INTO t (a, b) VALUES ($1, $2)"), None);
    }
}

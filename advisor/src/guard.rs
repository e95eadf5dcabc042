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

/// Relations whose planning evaluates user code the statement's analysis
/// does not see, with why: an index's expression or predicate, a
/// constraint (constraint exclusion), an extended statistics object, a
/// partition key or a domain's default calling a user's function or
/// operator (on the relation, or on a partition or child of it); and
/// tables with rewrite rules on their writes (planned with the write).
const PLANNED_USER_CODE: &str = "\
WITH RECURSIVE user_fn AS ( \
  SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')), \
dep AS ( \
  SELECT d.classid, d.objid FROM pg_catalog.pg_depend d \
  WHERE (d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.refobjid IN (SELECT oid FROM user_fn)) \
     OR (d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass AND d.refobjid IN \
         (SELECT o.oid FROM pg_catalog.pg_operator o WHERE o.oprcode IN (SELECT oid FROM user_fn)))), \
rel AS ( \
  SELECT i.indrelid AS oid FROM dep JOIN pg_catalog.pg_index i \
    ON dep.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND dep.objid = i.indexrelid \
  UNION SELECT k.conrelid FROM dep JOIN pg_catalog.pg_constraint k \
    ON dep.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND dep.objid = k.oid WHERE k.conrelid <> 0 \
  UNION SELECT s.stxrelid FROM dep JOIN pg_catalog.pg_statistic_ext s \
    ON dep.classid = 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass AND dep.objid = s.oid \
  UNION SELECT dep.objid FROM dep WHERE dep.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
    AND dep.objid IN (SELECT partrelid FROM pg_catalog.pg_partitioned_table) \
  UNION SELECT a.attrelid FROM dep JOIN pg_catalog.pg_attribute a \
    ON dep.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND dep.objid = a.atttypid \
    WHERE a.attnum > 0 AND NOT a.attisdropped), \
up AS (SELECT oid FROM rel UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid) \
SELECT c.relname, 'planning it evaluates user code (an index, constraint, statistics object, partition key or \
domain default of it or of a partition)' FROM up JOIN pg_catalog.pg_class c ON c.oid = up.oid \
UNION SELECT c.relname, 'a rewrite rule on its writes is planned with them' \
FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class WHERE r.ev_type <> '1'";

/// The statements' analysis against the database's catalog.
pub struct Guard {
    analyzer: Analyzer,
    /// [`PLANNED_USER_CODE`]: relation name, why.
    relations: Vec<(String, String)>,
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
        let relations = rows(client, PLANNED_USER_CODE)
            .await?
            .into_iter()
            .map(|r| (crate::db::text(&r, 0).to_ascii_lowercase(), crate::db::text(&r, 1)))
            .collect();
        Ok(Guard { analyzer, relations })
    }

    /// Why planning `query` (a normalised statement) may run user code, or
    /// `None` when it calls only PostgreSQL's own functions.
    pub fn user_code(&mut self, query: &str) -> Option<String> {
        let inner = crate::plan::inner_statement(query);
        let shape = match self.analyzer.lookup(inner) {
            Ok((shape, _)) => shape,
            Err(e) => return Some(format!("the advisor cannot read it ({e}), so not what planning it would run")),
        };
        let catalog = self.analyzer.catalog();
        let touched = shape.reads.iter().chain(&shape.writes).map(|t| catalog.name(*t).to_ascii_lowercase());
        for name in touched {
            if let Some((_, why)) = self.relations.iter().find(|(r, _)| *r == name) {
                return Some(format!("{name}: {why} (--trust-functions to plan it anyway)"));
            }
        }
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
        Guard { analyzer, relations: Vec::new() }
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
        assert!(g.user_code("SELECT * FROM t WHERE a BETWEEN SYMMETRIC $1 AND $2").is_some(), "unparsable");
    }

    #[test]
    fn a_user_function_named_like_a_built_in_is_user_code() {
        let mut g = guard(&[("now", Volatility::Immutable)]);
        assert!(g.user_code("SELECT * FROM t WHERE a > now()").is_some_and(|w| w.contains("(now)")));
    }
}

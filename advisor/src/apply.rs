//! Apply and measure: the recommended indexes built on the advised database
//! with `CREATE INDEX CONCURRENTLY` (writes go on meanwhile), the
//! statements' statistics noted at that moment; later, the real change in
//! each affected statement's mean time since then, from the same
//! statistics, and a `DROP INDEX CONCURRENTLY` proposed for an index whose
//! gain did not appear.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::Report;
use crate::db::{AdvisorError, exec, ident, num, rows, text};

/// An index built, and the statements it was expected to speed up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Built {
    pub schema: String,
    pub name: String,
    pub ddl: String,
    /// pg_stat_statements query ids.
    pub statements: Vec<String>,
}

/// What was applied, and the statistics when it was: kept (as JSON) for
/// [`measure`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applied {
    pub built: Vec<Built>,
    /// Per query id: (calls, total ms) when the indexes were built.
    pub before: Vec<(String, f64, f64)>,
}

/// One statement's measured change.
#[derive(Clone, Debug, Serialize)]
pub struct Impact {
    pub index: String,
    pub queryid: String,
    pub query: String,
    /// Mean time per call before the index, and over the calls since.
    pub before_ms: f64,
    pub after_ms: Option<f64>,
    pub calls_since: f64,
}

/// The verdict on one built index.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub index: String,
    pub impacts: Vec<Impact>,
    /// The statements it was built for ran since, none faster by 10 %:
    /// `DROP INDEX CONCURRENTLY` proposed.
    pub drop: Option<String>,
}

/// A statement got faster: its mean since is under 90 % of its mean before.
pub fn gained(i: &Impact) -> bool {
    i.after_ms.is_some_and(|a| a < i.before_ms * 0.9)
}

async fn statistics(client: &Client) -> Result<Vec<(String, String, f64, f64)>, AdvisorError> {
    let sql = "SELECT s.queryid, min(s.query), sum(s.calls), sum(s.total_exec_time) FROM pg_stat_statements s \
               JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() AND s.toplevel \
               GROUP BY s.queryid";
    Ok(rows(client, sql).await?.iter().map(|r| (text(r, 0), text(r, 1), num(r, 2), num(r, 3))).collect())
}

/// Builds every recommended index of `report` on the advised database
/// (CONCURRENTLY: not inside a transaction, writes go on) under a name of
/// its own, and notes the statistics of that moment.
/// What was built is returned with the error that stopped the rest, if one
/// did (the caller keeps it either way); a build that failed is dropped
/// (`CREATE INDEX CONCURRENTLY` leaves an invalid index behind).
pub async fn apply(client: &Client, report: &Report) -> (Applied, Option<AdvisorError>) {
    let mut applied = Applied { built: Vec::new(), before: Vec::new() };
    if let Err(e) = crate::db::harden(client).await {
        return (applied, Some(e));
    }
    match statistics(client).await {
        Ok(s) => applied.before = s.into_iter().map(|(id, _, calls, ms)| (id, calls, ms)).collect(),
        Err(e) => return (applied, Some(e)),
    }
    for (n, rec) in report.recommended.iter().enumerate() {
        let c = &rec.choice.candidate;
        // a short name of its own (63 bytes at most, whatever the table's)
        let name = format!("postai_{n}_{:016x}", postai_hash(&rec.choice.ddl));
        let ddl = c.ddl(Some(&name)).replacen("CREATE INDEX", "CREATE INDEX CONCURRENTLY IF NOT EXISTS", 1);
        if let Err(e) = exec(client, &ddl).await {
            let _ =
                exec(client, &format!("DROP INDEX CONCURRENTLY IF EXISTS {}.{}", ident(&c.schema), ident(&name))).await;
            return (applied, Some(e));
        }
        let statements = rec.choice.helps.iter().filter_map(|h| report.statements.get(h.0)).map(|s| s.queryid.clone());
        applied.built.push(Built { schema: c.schema.clone(), name, ddl, statements: statements.collect() });
    }
    (applied, None)
}

/// FNV-1a of `s`: a stable suffix for an index's name.
fn postai_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The real change since [`apply`]: per built index, each statement's mean
/// time before and over the calls since; an index none of whose statements
/// got faster (once they ran) is proposed for removal.
pub async fn measure(client: &Client, applied: &Applied) -> Result<Vec<Measured>, AdvisorError> {
    crate::db::harden(client).await?;
    let now = statistics(client).await?;
    let mut out = Vec::new();
    for b in &applied.built {
        let mut impacts = Vec::new();
        for id in &b.statements {
            let Some((calls0, ms0)) = applied.before.iter().find(|(q, _, _)| q == id).map(|(_, c, m)| (*c, *m)) else {
                continue;
            };
            let (query, calls1, ms1) =
                now.iter().find(|(q, ..)| q == id).map(|(_, t, c, m)| (t.clone(), *c, *m)).unwrap_or_default();
            // (statistics reset since: what is there is all since)
            let (calls, ms) = if calls1 >= calls0 { (calls1 - calls0, ms1 - ms0) } else { (calls1, ms1) };
            impacts.push(Impact {
                index: b.name.clone(),
                queryid: id.clone(),
                query,
                before_ms: if calls0 > 0.0 { ms0 / calls0 } else { 0.0 },
                after_ms: (calls > 0.0).then(|| ms / calls),
                calls_since: calls,
            });
        }
        let ran = impacts.iter().any(|i| i.after_ms.is_some());
        let drop = (ran && !impacts.iter().any(gained))
            .then(|| format!("DROP INDEX CONCURRENTLY {}.{}", ident(&b.schema), ident(&b.name)));
        out.push(Measured { index: b.name.clone(), impacts, drop });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gain_is_ten_percent_faster_over_calls_since() {
        let i = |after_ms| Impact {
            index: String::new(),
            queryid: String::new(),
            query: String::new(),
            before_ms: 10.0,
            after_ms,
            calls_since: 5.0,
        };
        assert!(gained(&i(Some(0.2))));
        assert!(!gained(&i(Some(9.5))), "within 10 %");
        assert!(!gained(&i(None)), "not run since");
    }
}

//! POST AI's optimization engine: capture (pg_stat_statements, table and
//! index statistics), analyse (generic plans, bottlenecks named with
//! rewrite hints), recommend across the whole workload (candidates tried
//! as HypoPG hypothetical indexes, chosen by read time saved against write
//! cost under a storage budget), verify by real execution on a scratch copy
//! (withdrawn if any statement gets slower), and indexes to drop.

pub mod analyze;
pub mod apply;
pub mod bench;
pub mod candidates;
pub mod capture;
pub mod db;
pub mod dexter;
pub mod guard;
pub mod plan;
pub mod proxy;
pub mod redundant;
pub mod report;
pub mod schema;
pub mod select;
pub mod verify;

use serde::Serialize;
use tokio_postgres::Client;

pub use db::AdvisorError;

use crate::analyze::Bottleneck;
use crate::capture::Workload;
use crate::select::{Budget, Choice, Costed};
use crate::verify::Verdict;

/// Rounds of selection and verification at most.
pub const ROUNDS: usize = 3;

#[derive(Clone, Debug)]
pub struct Options {
    /// Statements weighed: the ones that cost the database the most time.
    pub statements: usize,
    pub budget: Budget,
    pub schema: schema::Thresholds,
    /// Plans statements whose planning may run user code too (`guard`):
    /// the database's functions are trusted with the advisor's privileges.
    pub trust_functions: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            statements: 50,
            budget: Budget { bytes: 1e9, entry_ms: 0.01 },
            schema: schema::Thresholds::default(),
            trust_functions: false,
        }
    }
}

/// The workload, with each statement whose planning may run user code
/// marked (it is not planned) unless the options trust the functions.
async fn capture_guarded(client: &Client, opts: &Options) -> Result<Workload, AdvisorError> {
    let mut w = capture::capture(client, opts.statements).await?;
    if !opts.trust_functions {
        let mut guard = guard::Guard::load(client).await?;
        for s in &mut w.statements {
            s.user_code = guard.user_code(&s.query);
        }
    }
    Ok(w)
}

/// One statement as the advisor saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Analysed {
    /// pg_stat_statements' id of the statement.
    pub queryid: String,
    pub query: String,
    pub calls: f64,
    pub total_ms: f64,
    pub cost: Option<f64>,
    /// Why it has no plan (its parameters' types cannot be inferred, say).
    pub unplanned: Option<String>,
    pub bottlenecks: Vec<Bottleneck>,
    /// What the proxy counted of it ([`proxy::merge`]).
    pub cache: Option<proxy::CacheShare>,
}

/// A recommendation and its verification.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    pub choice: Choice,
    /// `None`: not verified (no scratch database given).
    pub verdict: Option<Verdict>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What the advice could not rest on (an empty workload, say).
    pub notes: Vec<String>,
    pub statements: Vec<Analysed>,
    /// Verified (or, without a scratch database, estimated) and kept.
    pub recommended: Vec<Recommendation>,
    /// Withdrawn by real execution: an affected statement got slower, or
    /// none could be run.
    pub withdrawn: Vec<Recommendation>,
    /// Candidates that help some statement but cost more in index upkeep
    /// (writes, HOT updates lost) than they save, or did not fit the budget.
    pub declined: Vec<Choice>,
    pub drops: Vec<redundant::Drop>,
    pub hints: Vec<schema::Hint>,
    /// Shapes the proxy counted that are not among the statements weighed
    /// (its cache answered them, or they cost PostgreSQL little).
    pub cache_only: Vec<proxy::CacheShare>,
}

/// The whole advice for the database `client` is connected to. `scratch`:
/// a connection to a copy of it (same schema and data) where indexes may be
/// built to verify them; without one, recommendations are HypoPG's estimates.
pub async fn advise(client: &Client, scratch: Option<&Client>, opts: &Options) -> Result<Report, AdvisorError> {
    db::harden(client).await?;
    if let Some(s) = scratch {
        db::harden(s).await?;
    }
    let w = capture_guarded(client, opts).await?;
    if db::rows(client, "SELECT 1 FROM pg_extension WHERE extname = 'hypopg'").await?.is_empty() {
        // (the advisor changes nothing in the database it advises: its
        // hypothetical indexes live in its own session)
        return Err(AdvisorError::Missing(
            "HypoPG is not installed in this database: CREATE EXTENSION hypopg (its hypothetical indexes \
             are private to the advisor's session)"
                .into(),
        ));
    }
    // (hypothetical indexes a failed earlier run left in this session out
    // of the plans the advice starts from)
    db::exec(client, "SELECT hypopg_reset()").await?;
    let (statements, plans, costed) = analyse(client, &w).await;
    let mut cands = Vec::new();
    for p in plans.iter().flatten() {
        for c in candidates::candidates(p, &w) {
            if !cands.contains(&c) {
                cands.push(c);
            }
        }
    }
    let mut built = Vec::new();
    let chosen = rounds(client, scratch, &w, &plans, &costed, &cands, opts, &mut built).await;
    // the scratch copy is left as it was, whatever happened
    if let Some(s) = scratch {
        for (schema, name) in built {
            verify::drop_built(s, &schema, &name).await?;
        }
    }
    let (recommended, withdrawn, declined) = chosen?;
    let mut notes = Vec::new();
    if w.statements.is_empty() {
        notes.push(
            "pg_stat_statements holds no statement of this database yet (or they were reset): run the workload, \
             then advise; no index is recommended without one"
                .to_string(),
        );
    }
    let drops = redundant::drops(&w, &opts.budget);
    let hints = schema::hints(client, &w, &plans, &opts.schema).await?;
    Ok(Report { notes, statements, recommended, withdrawn, declined, drops, hints, cache_only: Vec::new() })
}

type Rounds = (Vec<Recommendation>, Vec<Recommendation>, Vec<Choice>);

/// Selection and verification in rounds: an index verification withdraws
/// leaves its statements to the candidates it had crowded out. What it
/// builds on the scratch copy is noted in `built` (for the caller to drop,
/// whatever happens): (recommended, withdrawn, declined).
#[allow(clippy::too_many_arguments)]
async fn rounds(
    client: &Client,
    scratch: Option<&Client>,
    w: &Workload,
    plans: &[Option<plan::Node>],
    costed: &[Costed],
    cands: &[candidates::Candidate],
    opts: &Options,
    built: &mut Vec<(String, String)>,
) -> Result<Rounds, AdvisorError> {
    let (mut recommended, mut withdrawn, mut declined) = (Vec::new(), Vec::<Recommendation>::new(), Vec::new());
    for _round in 0..ROUNDS {
        let kept: Vec<Choice> = recommended.iter().map(|r: &Recommendation| r.choice.clone()).collect();
        // (a withdrawn index's covering variant walks the same keys: out too)
        let same_keys = |c: &candidates::Candidate, x: &Recommendation| {
            let x = &x.choice.candidate;
            x.schema == c.schema && x.table == c.table && x.columns == c.columns
        };
        let open: Vec<candidates::Candidate> = cands
            .iter()
            .filter(|c| !kept.iter().any(|k| k.candidate == **c) && !withdrawn.iter().any(|x| same_keys(c, x)))
            .cloned()
            .collect();
        let selection = select::select(client, w, costed, &open, &opts.budget, &kept).await?;
        declined = selection.declined;
        let mut withdrew = false;
        for choice in selection.chosen {
            // each verified beside the ones kept before it (the configuration
            // the DBA would have), in the order chosen
            let name = format!("postai_verify_{}", built.len());
            let verdict = match scratch {
                Some(s) => {
                    built.push((choice.candidate.schema.clone(), name.clone()));
                    Some(verify::verify(s, w, plans, &choice, &name).await?)
                }
                None => None,
            };
            let keep = verdict.as_ref().is_none_or(Verdict::kept);
            if !keep && let Some(s) = scratch {
                verify::drop_built(s, &choice.candidate.schema, &name).await?;
            }
            withdrew |= !keep;
            let r = Recommendation { choice, verdict };
            if keep { recommended.push(r) } else { withdrawn.push(r) }
        }
        if !withdrew {
            break;
        }
    }
    Ok((recommended, withdrawn, declined))
}

/// The captured workload and its statements' generic plans (what the
/// Dexter-style reference works from in the benchmark).
pub async fn workload_plans(
    client: &Client,
    opts: &Options,
) -> Result<(Workload, Vec<Option<plan::Node>>), AdvisorError> {
    let w = capture_guarded(client, opts).await?;
    let (_, plans, _) = analyse(client, &w).await;
    Ok((w, plans))
}

/// Every statement's generic plan and bottlenecks.
async fn analyse(client: &Client, w: &Workload) -> (Vec<Analysed>, Vec<Option<plan::Node>>, Vec<Costed>) {
    let (mut out, mut plans, mut costed) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in w.statements.iter().enumerate() {
        let mut a = Analysed {
            queryid: s.queryid.clone(),
            query: s.query.clone(),
            calls: s.calls,
            total_ms: s.total_ms,
            cost: None,
            unplanned: None,
            bottlenecks: Vec::new(),
            cache: None,
        };
        match plan::generic_plan(client, s).await {
            Ok(p) => {
                a.cost = Some(p.total_cost);
                a.bottlenecks = analyze::bottlenecks(&s.query, &p, w);
                let mut tables: Vec<(String, String)> =
                    p.walk().iter().filter_map(|n| Some((n.schema.clone()?, n.relation.clone()?))).collect();
                tables.dedup();
                costed.push(Costed { index: i, tables, cost: p.total_cost });
                plans.push(Some(p));
            }
            Err(e) => {
                a.unplanned = Some(e.to_string());
                plans.push(None);
            }
        }
        out.push(a);
    }
    (out, plans, costed)
}

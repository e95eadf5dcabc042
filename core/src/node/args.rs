//! What one execution of a shape depends on and changes: its cache key,
//! the keys it reads and writes (canonical by the key column's type), and
//! its dependencies.

use crate::hash::{Digest128, hash_bytes};
use crate::invalidation::{ChangeTarget, Dep, Deps, key_hash};
use crate::sql::{ArgRef, Catalog, KeyAccess, LexError, NotCacheable, Shape, StatementKind, TableId, canonical_key};

use super::InvalidationMode;

/// Cache-key ingredients of one query.
pub(super) struct Args<'a> {
    pub params: &'a [Option<&'a [u8]>],
    /// The text of each literal (a string's unquoted, unescaped content; a
    /// number as written), `None` for literals that are never keys.
    pub literal_keys: &'a [Option<String>],
    pub literal_digest: u128,
}

pub(super) fn unlexable_shape(sql: &str, e: &LexError) -> Shape {
    Shape {
        id: crate::sql::ShapeId(u32::MAX),
        fingerprint: hash_bytes(sql.as_bytes()),
        text: sql.to_string(),
        kind: StatementKind::Other,
        txn: None,
        reads: Vec::new(),
        writes: Vec::new(),
        writes_unknown: false,
        cacheable: Err(NotCacheable::Unparsable(e.to_string())),
        read_keys: Vec::new(),
        refreshable: false,
        write_keys: None,
        literal_count: 0,
        param_count: 0,
        session_private: false,
        // PostgreSQL will refuse it, but nothing here can tell
        session_opaque: true,
        writes_opaque: true,
        reads_any: false,
        reads_settings: false,
        user_code: None,
        generation: 0,
    }
}

/// The raw text of an argument.
fn arg_text<'a>(arg: ArgRef, args: &'a Args<'_>) -> Option<&'a str> {
    match arg {
        ArgRef::Param(i) => std::str::from_utf8(args.params.get(i as usize).copied().flatten()?).ok(),
        ArgRef::Literal(i) => args.literal_keys.get(i as usize)?.as_deref(),
    }
}

/// Integer key ranges up to this many keys depend on each key; wider ones on the table.
pub const RANGE_KEYS_MAX: i64 = 64;

/// Calls `each` with the canonical text of every key `access` names;
/// `false` if an argument is not a usable key (then the table as a whole
/// is the dependency, or the target).
fn for_each_key(access: &KeyAccess, args: &Args<'_>, mut each: impl FnMut(&[u8])) -> bool {
    let canonical = |a: &ArgRef| arg_text(*a, args).and_then(|t| canonical_key(access.key_type, t));
    if access.range {
        let bound = |i: usize| access.args.get(i).and_then(canonical).and_then(|c| c.parse::<i64>().ok());
        let (Some(lo), Some(hi)) = (bound(0), bound(1)) else { return false };
        if hi >= lo && hi.saturating_sub(lo) >= RANGE_KEYS_MAX {
            return false;
        }
        (lo..=hi).for_each(|k| each(k.to_string().as_bytes()));
        return true;
    }
    for a in &access.args {
        match canonical(a) {
            Some(c) => each(c.as_bytes()),
            None => return false,
        }
    }
    true
}

/// Key hashes in `table` of the keys `access` names, `None` if any
/// argument is unusable.
fn key_hashes(access: &KeyAccess, args: &Args<'_>, table: TableId) -> Option<Vec<u64>> {
    let mut out = Vec::with_capacity(access.args.len());
    for_each_key(access, args, |k| out.push(key_hash(table, k))).then_some(out)
}

pub(super) fn read_deps(shape: &Shape, args: &Args<'_>, mode: InvalidationMode) -> Deps {
    if mode == InvalidationMode::TtlOnly {
        return Deps::default();
    }
    // pushed straight into `Deps`: a point read's one dependency needs no
    // allocation (this runs for every read, hits included)
    let mut deps = Deps::default();
    for t in &shape.reads {
        let keyed = if mode.key_level() { shape.read_keys.iter().find(|a| a.table == *t) } else { None };
        let mut keys = Deps::default();
        match keyed {
            Some(a) if for_each_key(a, args, |k| keys.push(Dep::Key(*t, key_hash(*t, k)))) => {
                keys.iter().for_each(|d| deps.push(*d));
            }
            _ => deps.push(Dep::Table(*t)),
        }
    }
    if shape.reads_any {
        deps.push(Dep::Any);
    }
    deps
}

pub(super) fn write_targets(
    shape: &Shape,
    args: &Args<'_>,
    mode: InvalidationMode,
    catalog: &Catalog,
) -> Vec<ChangeTarget> {
    if mode == InvalidationMode::TtlOnly {
        return Vec::new();
    }
    if shape.writes_unknown {
        return vec![ChangeTarget::All];
    }
    if shape.writes.is_empty() {
        return Vec::new();
    }
    let mut targets = Vec::new();
    if mode.key_level()
        && let Some(access) = &shape.write_keys
        && shape.writes == [access.table]
        && let Some(hashes) = key_hashes(access, args, access.table)
    {
        targets.push(ChangeTarget::Keys(access.table, hashes));
        // a partition's row is its parents' row too
        for a in catalog.ancestors(access.table) {
            let same_key =
                catalog.primary_key(*a) == catalog.primary_key(access.table) && catalog.key_type(*a) == access.key_type;
            match key_hashes(access, args, *a).filter(|_| same_key) {
                Some(h) => targets.push(ChangeTarget::Keys(*a, h)),
                None => targets.push(ChangeTarget::Table(*a)),
            }
        }
        return targets;
    }
    for t in &shape.writes {
        targets.push(ChangeTarget::Table(*t));
        targets.extend(catalog.ancestors(*t).iter().map(|a| ChangeTarget::Table(*a)));
    }
    targets
}

/// The cache key: shape fingerprint, session context, parameters, literals.
pub(super) fn cache_key(shape: &Shape, context: u64, args: &Args<'_>) -> u128 {
    let mut d = Digest128::new();
    d.u64(shape.fingerprint);
    d.u64(context);
    d.u64(args.literal_digest as u64);
    d.u64((args.literal_digest >> 64) as u64);
    d.u64(args.params.len() as u64);
    for p in args.params {
        match p {
            None => d.u64(u64::MAX),
            Some(b) => d.bytes(b),
        }
    }
    d.finish()
}

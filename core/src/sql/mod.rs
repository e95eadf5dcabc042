//! SQL analysis: classify a statement, find the tables it reads and writes,
//! decide whether its result may be cached, fingerprint its shape and find the
//! point keys it touches. Full parsing happens once per shape ([`Analyzer`]);
//! the hot path lexes, hashes and looks the shape up.

mod access;
mod analyze;
mod builtins;
mod catalog;
mod effects;
mod facts;
mod keys;
mod lexer;
mod session;

pub use analyze::{Analyzer, AnalyzerConfig};
pub use catalog::{Catalog, FunctionInfo, KeyType, RelKind, RelationSpec, Volatility};
pub use keys::{canonical_key, literal_text, mentions_relative_time};
pub use lexer::{
    LITERAL_MARK, LexError, Lexed, Lexer, Literal, LiteralKind, canonical_literal, canonical_number,
    shape_with_placeholders,
};
pub use session::{RESULT_NEUTRAL_SETTINGS, SessionCommand, parse_session_command};

use std::fmt;

/// What kind of statement, for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementKind {
    /// SELECT, VALUES, TABLE, SHOW, EXPLAIN, COPY ... TO.
    Read,
    /// INSERT, UPDATE, DELETE, MERGE, COPY ... FROM, SELECT INTO, TRUNCATE,
    /// and queries with data-modifying CTEs.
    Write,
    /// CREATE, ALTER, DROP, GRANT, REVOKE, COMMENT.
    Ddl,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE.
    Transaction,
    /// SET, RESET, DISCARD.
    Session,
    /// Everything else, including multi-statement strings and unparsable text.
    Other,
}

impl fmt::Display for StatementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            StatementKind::Read => "read",
            StatementKind::Write => "write",
            StatementKind::Ddl => "ddl",
            StatementKind::Transaction => "transaction",
            StatementKind::Session => "session",
            StatementKind::Other => "other",
        };
        f.write_str(s)
    }
}

/// Transaction control, for the session's transaction state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnControl {
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Release,
    RollbackTo,
}

/// Why a statement's result may not be cached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotCacheable {
    #[error("not a read ({0})")]
    NotARead(StatementKind),
    #[error("read that is not a plain query (SHOW, EXPLAIN, COPY)")]
    NotAQuery,
    #[error("calls volatile function {0}()")]
    Volatile(String),
    #[error("takes row locks (FOR UPDATE/SHARE)")]
    Locking,
    #[error("reads a system catalog ({0})")]
    SystemCatalog(String),
    #[error("multi-statement string")]
    MultiStatement,
    #[error("empty query")]
    Empty,
    #[error("cannot be parsed: {0}")]
    Unparsable(String),
    #[error("reads {0}, which the change stream does not follow (a sequence, a foreign or an unlogged table)")]
    Unfollowed(String),
    #[error("reads {0}, which the catalog does not know")]
    UnknownRelation(String),
    #[error("calls {0}(), a user function whose result may change between calls (STABLE)")]
    StableUserFunction(String),
    #[error("a view or policy nests too deeply or in a cycle ({0})")]
    TooDeep(String),
}

/// A table, interned by the [`Catalog`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId(pub u32);

/// Identifies a shape registered with an [`Analyzer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShapeId(pub u32);

/// Where a key value comes from: a bound parameter (`$n`, 0-based here) or the
/// n-th literal of the text (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgRef {
    Param(u32),
    Literal(u32),
}

/// Access to one table by its primary key: one argument per key, or, when
/// `range` is set, an inclusive integer range `[args[0], args[1]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAccess {
    pub table: TableId,
    pub args: Vec<ArgRef>,
    pub range: bool,
    /// The key column's type: which spellings of a value are the same key.
    pub key_type: KeyType,
}

/// Everything known about a statement shape, computed once.
#[derive(Clone, Debug)]
pub struct Shape {
    pub id: ShapeId,
    /// Hash of the normalised text: the same on every node (cache keys use it).
    pub fingerprint: u64,
    /// The normalised text with literals as `$n` (as `pg_stat_statements` shows it).
    pub text: String,
    pub kind: StatementKind,
    pub txn: Option<TxnControl>,
    pub reads: Vec<TableId>,
    pub writes: Vec<TableId>,
    /// Its effect on data cannot be bounded (DO, CALL, DDL, multi-statement,
    /// unparsable writes): when it succeeds, everything cached is invalid.
    pub writes_unknown: bool,
    pub cacheable: Result<(), NotCacheable>,
    /// Tables read only at these keys (a key predicate in the WHERE clause);
    /// every other table in `reads` is read as a whole.
    pub read_keys: Vec<KeyAccess>,
    /// A point read whose result is a function of one row (see `refresh`).
    pub refreshable: bool,
    /// Point keys written, when the write touches only those rows of one table.
    pub write_keys: Option<KeyAccess>,
    /// Number of literals in the text (arguments after the parameters).
    pub literal_count: u32,
    /// Highest `$n` in the text.
    pub param_count: u32,
    /// Running it may change session state the cache context cannot follow
    /// (temporary objects that shadow tables, `pg_temp`): the session's
    /// cache entries become private to it.
    pub session_private: bool,
    /// Its effect on the session's state cannot be known (`set_config`, a
    /// volatile user function, `DO`, `CALL`, several statements): the
    /// session's context becomes a new private one, and its reads run on its
    /// own connection, until `DISCARD ALL`.
    pub session_opaque: bool,
    /// What it wrote may reach rows or tables it does not name (triggers,
    /// rules, foreign-key actions, partitions, views, functions): the
    /// session's reads wait for the change stream to pass its commit.
    pub writes_opaque: bool,
    /// Its result may depend on any table (a user function that claims to
    /// be IMMUTABLE may still read one).
    pub reads_any: bool,
    /// It reads the session's settings (`current_setting`): its cache key
    /// includes every setting, the result-neutral ones too.
    pub reads_settings: bool,
    /// The first user code running it may call (a user's function,
    /// operator or cast, also through a view, a policy, a default or a
    /// check; a function the catalog does not know): what planning it may
    /// run (the optimization engine explains no such statement).
    pub user_code: Option<String>,
    /// The catalog generation it was analysed in (see [`Catalog::generation`]).
    pub generation: u64,
}

impl Shape {
    pub fn is_cacheable(&self) -> bool {
        self.cacheable.is_ok()
    }
}

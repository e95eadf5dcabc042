//! The proxy's configuration file (TOML).

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, Box<toml::de::Error>),
    #[error("{0}: {1}")]
    Invalid(String, String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    pub listen: String,
    /// The primary PostgreSQL (host:port).
    pub upstream: String,
    #[serde(default = "d_max_message")]
    pub max_message_bytes: usize,
    /// Bytes buffered at most, across every client, for client messages not
    /// yet complete (each reserves its declared length once its header is
    /// read): a client whose message does not fit is refused (53200).
    #[serde(default = "d_buffer_bytes_max")]
    pub buffer_bytes_max: usize,
    /// Client connections at most (PgBouncer's name); past it a new client is
    /// refused with 53300 "too many clients already".
    #[serde(default = "d_max_client_conn")]
    pub max_client_conn: usize,
    /// On SIGTERM/SIGINT the proxy stops accepting and waits this long at
    /// most for clients to finish their transactions, then exits.
    #[serde(default = "d_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Primary keys of the tables, for key-level invalidation.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub cdc: CdcConfig,
    /// The users the proxy authenticates (SCRAM-SHA-256) and logs in upstream
    /// as. None: no client authentication (any user name, like trust), and
    /// the upstream login has no password.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Users who may run every proxy command (`POSTAI RELOAD` too), as
    /// PgBouncer's `admin_users`; a superuser upstream may as well.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users who may run the proxy's `SHOW POSTAI ...` commands, as
    /// PgBouncer's `stats_users`; a superuser or a member of
    /// `pg_read_all_stats` upstream may as well.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// TLS for clients, terminated at the proxy. None: SSLRequest gets 'N'.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// TLS to the upstream (the primary, replicas, a regional proxy), like
    /// libpq's `sslmode`. Default: `prefer`.
    #[serde(default)]
    pub upstream_tls: UpstreamTlsConfig,
    /// Event loops, a thread each (default: one per core; 1: a single
    /// thread, no cross-thread wakeups, like PgBouncer).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Where `GET /metrics` (Prometheus text format) is served; off when unset.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Streaming replicas of the primary (host:port): cache misses that may
    /// read a snapshot go to one that has replayed past the session's floor.
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default)]
    pub failover: FailoverSettings,
    /// `edge` (default): in front of PostgreSQL or of a regional proxy.
    /// `regional`: what edges connect to; transaction pooling by default.
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub pool: PoolSettings,
    /// Where the configuration came from and what it said (filled by
    /// `Config::parse` and `Config::load`), for reloads.
    #[serde(skip)]
    pub source: Source,
}

/// The file a configuration was read from, and its settings as TOML values
/// (what a reload compares the file with).
#[derive(Clone, Default)]
pub struct Source {
    /// `None`: parsed from a text (nothing to reload).
    pub path: Option<String>,
    pub table: toml::Table,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the values: they hold passwords
        f.debug_struct("Source").field("path", &self.path).finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Edge,
    Regional,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// One server connection per client, for its whole session.
    Session,
    /// Clients share `size` server connections; one is lent per transaction.
    Transaction,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Default: `transaction` for the regional role, `session` otherwise.
    pub mode: Option<PoolMode>,
    /// Server connections per (user, database, startup parameters).
    pub size: usize,
    /// A client waits this long for a free server connection, then gets an error.
    pub wait_ms: u64,
    /// Distinct (user, database, parameters) pools at most.
    pub keys_max: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { mode: None, size: 20, wait_ms: 5_000, keys_max: 1_000 }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSettings {
    /// Promote the most caught-up replica when the primary is silent.
    pub enabled: bool,
    /// Every node is checked this often.
    pub health_interval_ms: u64,
    /// A health check slower than this failed.
    pub check_timeout_ms: u64,
    /// The primary silent this long is declared failed.
    pub timeout_ms: u64,
    /// A promotion not confirmed within this is abandoned for the next candidate.
    pub promote_timeout_ms: u64,
    /// The user and database health checks and promotion use (trust auth).
    pub user: String,
    pub database: String,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        FailoverSettings {
            enabled: true,
            health_interval_ms: 500,
            check_timeout_ms: 1_000,
            timeout_ms: 5_000,
            promote_timeout_ms: 30_000,
            user: "postgres".into(),
            database: "postgres".into(),
        }
    }
}

fn d_max_message() -> usize {
    64 << 20
}

fn d_buffer_bytes_max() -> usize {
    256 << 20
}

fn d_max_client_conn() -> usize {
    10_000
}

fn d_shutdown_timeout_ms() -> u64 {
    30_000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub l1_entries: usize,
    pub l1_bytes: u64,
    pub l2_entries: usize,
    pub l2_bytes: u64,
    pub ttl_s: u64,
    /// Fresh, not expired: with the change stream on, an entry whose every
    /// dependency is a row the stream names by key (a point read by primary
    /// key) is kept valid by the stream and lives up to this long, evicted
    /// by the budget; others keep `ttl_s`. 0: every entry has `ttl_s`.
    pub fresh_ttl_s: u64,
    /// Results larger than this are relayed, not cached.
    pub entry_bytes_max: usize,
    /// `false`: a pass-through proxy (every query relayed, nothing cached).
    pub enabled: bool,
    /// L2 also in this SQLite file, so that a restarted edge starts warm
    /// (`l2.rs`). Unset: L2 in memory only. Needs `[cdc] enabled`.
    pub l2_path: Option<String>,
    /// What a read may be answered from (README "Cache safety"): `proxy`
    /// (default: every write this proxy acknowledged before the read),
    /// `read-your-writes` (the session's own writes), `eventual`, `strong`
    /// (the primary, never cached). A client chooses its own with the
    /// startup option `-c postai.consistency=...`.
    pub consistency: postai_core::consistency::Consistency,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_entries: 10_000,
            l1_bytes: 64 << 20,
            l2_entries: 100_000,
            l2_bytes: 512 << 20,
            ttl_s: 300,
            fresh_ttl_s: 86_400,
            entry_bytes_max: 1 << 20,
            enabled: true,
            l2_path: None,
            consistency: postai_core::consistency::Consistency::Proxy,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    pub primary_key: String,
    #[serde(default)]
    pub integer_key: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcConfig {
    /// Read the primary's logical decoding stream (test_decoding) to
    /// invalidate what writes that bypass the proxy changed.
    pub enabled: bool,
    pub slot: String,
    /// The user and database the CDC connection uses.
    pub user: String,
    pub database: String,
    pub poll_ms: u64,
    /// Serve nothing from the cache when the stream has been silent this long.
    pub silence_max_ms: u64,
    /// Install event triggers on the primary (schema `postai`, needs a
    /// superuser) that put DDL in the stream, so that DDL made directly on
    /// the primary invalidates too (temporary objects excepted).
    pub ddl: bool,
    /// Where the slot is (host:port): by default the primary the proxy
    /// routes to. An edge behind a regional proxy may name the primary here
    /// (its answers are filed at what the regional says they reflect), but
    /// subscribing (`source = "regional"`) takes one slot per region
    /// instead of one per edge.
    pub upstream: Option<String>,
    /// `slot` (default): read a logical decoding slot of this proxy's own.
    /// `regional`: subscribe to the stream the regional proxy named by
    /// `upstream` reads from its slot (`POSTAI SUBSCRIBE`): one slot per
    /// region instead of one per edge.
    pub source: CdcSource,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CdcSource {
    #[default]
    Slot,
    Regional,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            enabled: true,
            slot: "postai".into(),
            user: "postgres".into(),
            database: "postgres".into(),
            poll_ms: 100,
            silence_max_ms: 5_000,
            ddl: true,
            upstream: None,
            source: CdcSource::Slot,
        }
    }
}

impl Config {
    pub fn pool_mode(&self) -> PoolMode {
        self.pool.mode.unwrap_or(if self.role == Role::Regional { PoolMode::Transaction } else { PoolMode::Session })
    }

    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let mut c = Config::parse(path, &text)?;
        c.source.path = Some(path.to_string());
        Ok(c)
    }

    pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
        let parse_error = |e| ConfigError::Parse(path.into(), Box::new(e));
        let mut c: Config = toml::from_str(text).map_err(parse_error)?;
        c.source.table = toml::from_str(text).map_err(parse_error)?;
        let bad = |m: &str| Err(ConfigError::Invalid(path.into(), m.into()));
        if c.buffer_bytes_max < c.max_message_bytes {
            return bad(
                "buffer_bytes_max must be at least max_message_bytes (one message of the largest size must fit)",
            );
        }
        if c.max_client_conn == 0 {
            return bad("max_client_conn must be at least 1");
        }
        if c.cache.l1_entries == 0 || c.cache.l2_entries == 0 || c.cache.ttl_s == 0 {
            return bad("cache sizes and ttl_s must be positive");
        }
        let f = &c.failover;
        if f.health_interval_ms == 0 || f.check_timeout_ms == 0 || f.timeout_ms < f.health_interval_ms {
            return bad("failover: intervals must be positive and timeout_ms at least health_interval_ms");
        }
        if c.replicas.iter().any(|r| r == &c.upstream) {
            return bad("a replica cannot be the upstream primary");
        }
        if c.cache.l2_path.is_some() && !c.cdc.enabled {
            return bad(
                "cache.l2_path needs [cdc] enabled: restored entries are checked against the changes the slot kept",
            );
        }
        if c.cache.l2_path.as_deref().is_some_and(str::is_empty) {
            return bad("cache.l2_path must be a file path");
        }
        if c.pool.size == 0 || c.pool.keys_max == 0 || c.pool.wait_ms == 0 {
            return bad("pool: size, keys_max and wait_ms must be positive");
        }
        if c.threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            return bad("threads must be between 1 and 1024");
        }
        if c.pool.size > 100_000 {
            return bad("pool.size must be at most 100000");
        }
        // (a poll once a day at most: the change stream's waits are multiples of it)
        if !(1..=86_400_000).contains(&c.cdc.poll_ms) || c.cdc.silence_max_ms == 0 {
            return bad("cdc.poll_ms must be between 1 and 86400000, cdc.silence_max_ms positive");
        }
        if c.max_message_bytes < 1024 {
            return bad("max_message_bytes must be at least 1024");
        }
        if !c.cdc.slot.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            || c.cdc.slot.is_empty()
        {
            return bad("cdc.slot must be lower-case letters, digits and _");
        }
        c.prepare_auth().map_err(|m| ConfigError::Invalid(path.into(), m))?;
        Ok(c)
    }

    /// The `[[users]]` entry of `name`.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The password the proxy logs in upstream with as `user` (for its own
    /// connections too: CDC, health checks, replicas).
    pub fn upstream_password(&self, user: &str) -> Option<&str> {
        self.user(user).and_then(|u| u.upstream_password.as_deref())
    }

    /// Checks `[[users]]` and `[tls]`, derives the SCRAM secrets and loads the
    /// certificate.
    fn prepare_auth(&mut self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.users.iter_mut().enumerate() {
            let at = format!("users[{i}] ({:?})", u.name);
            if u.name.is_empty() || u.name.contains('\0') {
                return Err(format!("users[{i}]: name must be a non-empty user name"));
            }
            if !seen.insert(u.name.clone()) {
                return Err(format!("{at}: the user is listed twice"));
            }
            if u.password.is_empty() {
                return Err(format!("{at}: password is empty"));
            }
            if crate::auth::is_md5_hash(&u.password) {
                return Err(format!(
                    "{at}: password is an MD5 hash, which SCRAM cannot use: give the plaintext password or a SCRAM-SHA-256 verifier"
                ));
            }
            let secret = if crate::auth::is_verifier(&u.password) {
                crate::auth::ScramSecret::parse_verifier(&u.password).map_err(|e| format!("{at}: password: {e}"))?
            } else {
                if u.upstream_password.is_none() {
                    u.upstream_password = Some(u.password.clone());
                }
                crate::auth::ScramSecret::from_password(&u.password)
            };
            if u.upstream_password.as_deref().is_some_and(|p| p.is_empty() || p.contains('\0')) {
                return Err(format!("{at}: upstream_password must be a non-empty plaintext password"));
            }
            u.secret = Some(secret);
        }
        self.upstream_tls.load().map_err(|e| format!("upstream_tls: {e}"))?;
        if let Some(t) = &mut self.tls {
            if t.cert.is_empty() || t.key.is_empty() {
                return Err("tls: cert and key must be PEM file paths".into());
            }
            t.loaded = Some(crate::tls::Tls::load(&t.cert, &t.key).map_err(|e| format!("tls: {e}"))?);
        }
        Ok(())
    }
}

/// A user the proxy authenticates.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, or a SCRAM verifier as in `pg_authid`:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub password: String,
    /// Plaintext: what the proxy logs in upstream with as this user. Default:
    /// `password` when it is plaintext, else none (filled by `Config::parse`).
    #[serde(default)]
    pub upstream_password: Option<String>,
    /// The SCRAM secret of `password` (derived by `Config::parse`).
    #[serde(skip)]
    pub secret: Option<crate::auth::ScramSecret>,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the passwords
        f.debug_struct("UserConfig").field("name", &self.name).finish_non_exhaustive()
    }
}

/// TLS for clients: PEM files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Loaded by `Config::parse`.
    #[serde(skip)]
    pub loaded: Option<crate::tls::Tls>,
}

pub use crate::tls::SslMode;

/// `[upstream_tls]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    pub mode: SslMode,
    /// PEM file of the certificate authorities the upstream's certificate
    /// must chain to (needed by `verify-ca` and `verify-full`).
    pub root_cert: Option<String>,
    /// The name the certificate must carry (`verify-full`); default: the host
    /// part of each upstream address.
    pub server_name: Option<String>,
    /// Loaded by `Config::parse`.
    #[serde(skip)]
    pub loaded: crate::tls::UpstreamTls,
}

impl UpstreamTlsConfig {
    fn load(&mut self) -> Result<(), crate::tls::TlsError> {
        self.loaded = crate::tls::UpstreamTls::load(self.mode, self.root_cert.as_deref(), self.server_name.as_deref())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../edge.example.toml");
        let c = Config::parse("edge/edge.example.toml", text).expect("the example is valid");
        assert_eq!(c.replicas, vec!["127.0.0.1:15433".to_string()]);
        assert!(c.failover.enabled && c.metrics_listen.is_some());
        let with_file = text.replace("# l2_path", "l2_path");
        let c = Config::parse("edge/edge.example.toml", &with_file).expect("the example with l2_path is valid");
        assert_eq!(c.cache.l2_path.as_deref(), Some("/var/lib/postai/l2.sqlite"));
    }

    #[test]
    fn bad_failover_settings_are_errors() {
        let base = "listen = 'a:1'\nupstream = 'b:2'\n";
        let e = Config::parse("x.toml", &format!("{base}[failover]\ntimeout_ms = 10\nhealth_interval_ms = 100\n"));
        assert!(e.is_err_and(|e| e.to_string().contains("timeout_ms")));
        let e = Config::parse("x.toml", &format!("{base}replicas = ['b:2']\n"));
        assert!(e.is_err_and(|e| e.to_string().contains("replica")));
        let e = Config::parse("x.toml", &format!("{base}[failover]\nbogus = 1\n"));
        assert!(e.is_err_and(|e| e.to_string().contains("bogus")));
        let e = Config::parse("x.toml", &format!("{base}[cache]\nl2_path = '/tmp/l2'\n[cdc]\nenabled = false\n"));
        assert!(e.is_err_and(|e| e.to_string().contains("l2_path")));
    }
}

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
    #[serde(default)]
    pub cache: CacheConfig,
    /// Primary keys of the tables, for key-level invalidation.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub cdc: CdcConfig,
}

fn d_max_message() -> usize {
    64 << 20
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub l1_entries: usize,
    pub l1_bytes: u64,
    pub l2_entries: usize,
    pub l2_bytes: u64,
    pub ttl_s: u64,
    /// Results larger than this are relayed, not cached.
    pub entry_bytes_max: usize,
    /// `false`: a pass-through proxy (every query relayed, nothing cached).
    pub enabled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1_entries: 10_000,
            l1_bytes: 64 << 20,
            l2_entries: 100_000,
            l2_bytes: 512 << 20,
            ttl_s: 300,
            entry_bytes_max: 1 << 20,
            enabled: true,
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
        }
    }
}

impl Config {
    pub fn load(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(path.into(), Box::new(e)))?;
        let bad = |m: &str| Err(ConfigError::Invalid(path.into(), m.into()));
        if c.cache.l1_entries == 0 || c.cache.l2_entries == 0 || c.cache.ttl_s == 0 {
            return bad("cache sizes and ttl_s must be positive");
        }
        if c.max_message_bytes < 1024 {
            return bad("max_message_bytes must be at least 1024");
        }
        if !c.cdc.slot.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            || c.cdc.slot.is_empty()
        {
            return bad("cdc.slot must be lower-case letters, digits and _");
        }
        Ok(c)
    }
}

//! Configuration reloads, on SIGHUP or `POSTAI RELOAD`, without a restart
//! (the cache stays): the file is read and checked again; `[[users]]`
//! (names, passwords, verifiers, upstream passwords) is replaced for new
//! logins, and `max_client_conn`, `buffer_bytes_max` and
//! `shutdown_timeout_ms` take their new values. Every other setting that
//! changed in the file is reported as needing a restart and left as it
//! runs. A file that does not read, parse or check is refused and the
//! running configuration stays.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, UserConfig};
use crate::limits::Limits;
use crate::signals::Shutdown;

/// Settings a reload applies.
const LIVE: &[&str] = &["users", "max_client_conn", "buffer_bytes_max", "shutdown_timeout_ms"];

/// What a reload can replace in a running proxy.
pub struct Live {
    users: RwLock<Arc<Vec<UserConfig>>>,
    /// The running settings as the file said them at start, with the live
    /// settings as last reloaded: what a reload compares the file with.
    running: Mutex<toml::Table>,
}

impl Live {
    pub fn new(config: &Config) -> Live {
        Live { users: RwLock::new(Arc::new(config.users.clone())), running: Mutex::new(config.source.table.clone()) }
    }
}

impl Live {
    /// The users the proxy authenticates now (`[[users]]`, as last reloaded).
    pub fn users(&self) -> Arc<Vec<UserConfig>> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the configuration file of `config` (the one the proxy started
    /// with) again and applies what can change at runtime: the users here,
    /// `limits` and `shutdown`'s timeout. Returns (setting, what happened)
    /// rows; an error, with the running configuration untouched, when the
    /// file cannot be used.
    pub fn reload(
        &self,
        config: &Config,
        limits: &Limits,
        shutdown: &Shutdown,
    ) -> Result<Vec<(String, String)>, String> {
        let Some(path) = config.source.path.as_deref() else {
            return Err("postai-edge: this proxy's configuration was not read from a file: nothing to reload".into());
        };
        // one reload at a time
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let new = Config::load(path).map_err(|e| format!("postai-edge: {e}; the running configuration is kept"))?;
        if new.buffer_bytes_max < config.max_message_bytes {
            return Err(format!(
                "postai-edge: {path}: buffer_bytes_max ({}) is below the running max_message_bytes ({}); \
                 the running configuration is kept",
                new.buffer_bytes_max, config.max_message_bytes
            ));
        }
        let mut rows = Vec::new();
        let keys: BTreeSet<String> = running.keys().chain(new.source.table.keys()).cloned().collect();
        for key in keys.iter().filter(|k| !LIVE.contains(&k.as_str())) {
            restart_needed(key, running.get(key), new.source.table.get(key), &mut rows);
        }
        let old_users = self.users();
        rows.insert(0, ("users".into(), users_change(&old_users, &new.users)));
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new.users.clone());
        let mut set = |name: &str, old: u64, value: u64, apply: &dyn Fn(u64)| {
            if old != value {
                apply(value);
                rows.push((name.to_string(), format!("{old} -> {value}")));
            }
        };
        set("max_client_conn", limits.clients.max() as u64, new.max_client_conn as u64, &|v| {
            limits.clients.set_max(usize::try_from(v).unwrap_or(usize::MAX))
        });
        set("buffer_bytes_max", limits.buffers.max() as u64, new.buffer_bytes_max as u64, &|v| {
            limits.buffers.set_max(usize::try_from(v).unwrap_or(usize::MAX))
        });
        let timeout = u64::try_from(shutdown.timeout().as_millis()).unwrap_or(u64::MAX);
        set("shutdown_timeout_ms", timeout, new.shutdown_timeout_ms, &|v| shutdown.set_timeout_ms(v));
        for key in LIVE {
            match new.source.table.get(*key) {
                Some(v) => running.insert(key.to_string(), v.clone()),
                None => running.remove(*key),
            };
        }
        Ok(rows)
    }
}

/// Rows for the settings under `name` that differ between the running
/// configuration and the file (tables compared key by key).
fn restart_needed(name: &str, old: Option<&toml::Value>, new: Option<&toml::Value>, rows: &mut Vec<(String, String)>) {
    fn table<'a>(v: Option<&'a toml::Value>, empty: &'a toml::Table) -> Option<&'a toml::Table> {
        match v {
            Some(toml::Value::Table(t)) => Some(t),
            None => Some(empty),
            Some(_) => None,
        }
    }
    let empty = toml::Table::new();
    let sections = (table(old, &empty), table(new, &empty));
    match (old, new) {
        // a section added or removed counts as its settings
        (Some(toml::Value::Table(_)), _) | (_, Some(toml::Value::Table(_))) if let (Some(a), Some(b)) = sections => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                restart_needed(&format!("{name}.{k}"), a.get(k), b.get(k), rows);
            }
        }
        (a, b) if a != b => {
            rows.push((name.to_string(), "changed in the file: needs a restart (not applied)".to_string()))
        }
        _ => {}
    }
}

/// What a reload did to `[[users]]`, by name (never the passwords).
fn users_change(old: &[UserConfig], new: &[UserConfig]) -> String {
    let find = |list: &[UserConfig], name: &str| list.iter().find(|u| u.name == name).cloned();
    let names = |list: Vec<&UserConfig>| list.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", ");
    let added = names(new.iter().filter(|u| find(old, &u.name).is_none()).collect());
    let removed = names(old.iter().filter(|u| find(new, &u.name).is_none()).collect());
    let changed = names(
        new.iter()
            .filter(|u| {
                find(old, &u.name)
                    .is_some_and(|o| o.password != u.password || o.upstream_password != u.upstream_password)
            })
            .collect(),
    );
    let parts: Vec<String> = [("added", added), ("removed", removed), ("passwords changed", changed)]
        .into_iter()
        .filter(|(_, n)| !n.is_empty())
        .map(|(what, n)| format!("{what}: {n}"))
        .collect();
    if parts.is_empty() {
        format!("{} users, unchanged", new.len())
    } else {
        format!("{} users ({})", new.len(), parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(text: &str) -> Vec<UserConfig> {
        Config::parse("t.toml", &format!("listen = 'a:1'\nupstream = 'b:2'\n{text}")).expect("parses").users
    }

    #[test]
    fn user_changes_are_named() {
        let old = users("[[users]]\nname = 'a'\npassword = 'x'\n[[users]]\nname = 'b'\npassword = 'y'\n");
        let new = users("[[users]]\nname = 'a'\npassword = 'z'\n[[users]]\nname = 'c'\npassword = 'y'\n");
        assert_eq!(users_change(&old, &new), "2 users (added: c; removed: b; passwords changed: a)");
        assert_eq!(users_change(&new, &new), "2 users, unchanged");
    }

    #[test]
    fn changed_settings_are_listed_by_path() {
        let old: toml::Table = toml::from_str("upstream = 'a'\n[cache]\nl1_entries = 1\nttl_s = 5\n").expect("toml");
        let new: toml::Table = toml::from_str("upstream = 'b'\n[cache]\nl1_entries = 2\nttl_s = 5\n").expect("toml");
        let mut rows = Vec::new();
        for k in ["cache", "upstream"] {
            restart_needed(k, old.get(k), new.get(k), &mut rows);
        }
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["cache.l1_entries", "upstream"]);
        assert!(rows.iter().all(|r| r.1.contains("restart")));
        // a section only in the file: its settings by name
        let mut rows = Vec::new();
        restart_needed("pool", None, Some(&toml::Value::Table(new.clone())), &mut rows);
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["pool.cache.l1_entries", "pool.cache.ttl_s", "pool.upstream"]);
        let mut rows = Vec::new();
        restart_needed("same", Some(&toml::Value::Table(old.clone())), Some(&toml::Value::Table(old)), &mut rows);
        assert!(rows.is_empty());
    }
}

//! Session commands (`SET`, `RESET`, `DISCARD`) parsed from text, so the edge can
//! keep the settings that change query results in the cache key.

/// A session command, as far as caching cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET [SESSION] name {TO|=} value`, `SET ROLE`, `SET SESSION AUTHORIZATION`,
    /// `SET TIME ZONE`. Names are lower-case; the value is as written, unquoted.
    Set { name: String, value: String },
    /// `SET LOCAL ...`: lasts until the end of the transaction, whose reads are
    /// never cached, so it does not change the session's cache context.
    SetLocal,
    /// `RESET name`.
    Reset { name: String },
    /// `RESET ALL` (the role stays).
    ResetAll,
    /// `DISCARD ALL`: back to the login role, every setting reset.
    DiscardAll,
    /// Anything else of kind session (`DISCARD PLANS`, `SET TRANSACTION ...`).
    NoEffect,
}

/// Parses a session command. `None` if the text is not one.
pub fn parse_session_command(sql: &str) -> Option<SessionCommand> {
    let text = sql.trim().trim_end_matches(';').trim();
    let mut words = text.split_whitespace();
    let first = words.next()?.to_ascii_lowercase();
    let rest_of = |skip: usize| -> String {
        let mut it = text.splitn(skip + 1, char::is_whitespace).map(str::trim);
        for _ in 0..skip {
            it.next();
        }
        it.next().unwrap_or("").trim().to_string()
    };
    match first.as_str() {
        "discard" => {
            let what = words.next().unwrap_or("").to_ascii_lowercase();
            Some(if what == "all" { SessionCommand::DiscardAll } else { SessionCommand::NoEffect })
        }
        "reset" => {
            let name = words.next()?.to_ascii_lowercase();
            if name == "all" {
                Some(SessionCommand::ResetAll)
            } else if name == "session" {
                Some(SessionCommand::Reset { name: "session authorization".into() })
            } else {
                Some(SessionCommand::Reset { name })
            }
        }
        "set" => {
            let second = words.next()?.to_ascii_lowercase();
            let (name_word, skip) = match second.as_str() {
                "local" => return Some(SessionCommand::SetLocal),
                "session" => {
                    let third = words.next()?.to_ascii_lowercase();
                    if third == "authorization" {
                        return Some(SessionCommand::Set {
                            name: "session authorization".into(),
                            value: unquote(&rest_of(3)),
                        });
                    }
                    (third, 2)
                }
                "transaction" | "constraints" => return Some(SessionCommand::NoEffect),
                _ => (second, 1),
            };
            let after_name = rest_of(skip);
            match name_word.as_str() {
                "role" => {
                    return Some(SessionCommand::Set { name: "role".into(), value: unquote(after_name[4..].trim()) });
                }
                "time" => {
                    let v = after_name.splitn(3, char::is_whitespace).nth(2).unwrap_or("").trim();
                    return Some(SessionCommand::Set { name: "timezone".into(), value: unquote(v) });
                }
                _ => {}
            }
            // name may be glued to '=': SET a=1
            let (name, value) = match after_name.split_once('=') {
                Some((n, v)) if !n.trim().contains(char::is_whitespace) => (n.trim().to_string(), v.trim().to_string()),
                _ => {
                    let mut parts = after_name.splitn(2, char::is_whitespace);
                    let n = parts.next().unwrap_or("").to_string();
                    let v = parts.next().unwrap_or("").trim();
                    let v = v
                        .strip_prefix("TO")
                        .or_else(|| v.strip_prefix("to"))
                        .or_else(|| v.strip_prefix("To"))
                        .unwrap_or(v);
                    (n, v.trim().to_string())
                }
            };
            Some(SessionCommand::Set { name: name.to_ascii_lowercase(), value: unquote(&value) })
        }
        _ => None,
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_string()
    }
}

/// Settings that cannot change the rows or their text rendering; changing them
/// keeps a session's cache context. Everything else (search_path, role,
/// timezone, datestyle, extra_float_digits, bytea_output, ...) is part of the key.
pub const RESULT_NEUTRAL_SETTINGS: &[&str] = &[
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "client_min_messages",
    "work_mem",
    "maintenance_work_mem",
    "jit",
    "random_page_cost",
    "seq_page_cost",
    "effective_cache_size",
    "synchronous_commit",
    "log_statement",
    "log_min_duration_statement",
    "enable_seqscan",
    "enable_indexscan",
    "enable_bitmapscan",
    "enable_hashjoin",
    "enable_mergejoin",
    "enable_nestloop",
    "max_parallel_workers_per_gather",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> Option<SessionCommand> {
        Some(SessionCommand::Set { name: name.into(), value: value.into() })
    }

    #[test]
    fn set_forms() {
        assert_eq!(parse_session_command("SET search_path TO app, public"), set("search_path", "app, public"));
        assert_eq!(parse_session_command("set search_path = 'x'"), set("search_path", "x"));
        assert_eq!(parse_session_command("SET SESSION DateStyle=ISO"), set("datestyle", "ISO"));
        assert_eq!(parse_session_command("SET ROLE alice"), set("role", "alice"));
        assert_eq!(parse_session_command("SET TIME ZONE 'UTC'"), set("timezone", "UTC"));
        assert_eq!(parse_session_command("SET SESSION AUTHORIZATION bob"), set("session authorization", "bob"));
        assert_eq!(parse_session_command("SET LOCAL statement_timeout = 5"), Some(SessionCommand::SetLocal));
        assert_eq!(parse_session_command("RESET ALL"), Some(SessionCommand::ResetAll));
        assert_eq!(parse_session_command("DISCARD ALL;"), Some(SessionCommand::DiscardAll));
        assert_eq!(
            parse_session_command("RESET search_path"),
            Some(SessionCommand::Reset { name: "search_path".into() })
        );
        assert_eq!(
            parse_session_command("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Some(SessionCommand::NoEffect)
        );
        assert_eq!(parse_session_command("SELECT 1"), None);
        assert_eq!(parse_session_command("SET"), None);
    }
}

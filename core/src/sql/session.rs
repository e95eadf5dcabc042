//! Session commands (`SET`, `RESET`, `DISCARD`) parsed from text, so the edge can
//! keep the settings that change query results in the cache key.

/// A session command, as far as caching cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET [SESSION] name {TO|=} value`, `SET ROLE`, `SET SESSION AUTHORIZATION`,
    /// `SET TIME ZONE`, `SET NAMES`, `SET SCHEMA`. Names are lower-case; the
    /// value canonical as PostgreSQL reads it: unquoted words lower-cased,
    /// quoted ones (`'S2'`, `"S2"`) kept exactly and marked `"S2"`, list
    /// items joined with `, ` (so `'s2, public'`, one quoted item, is not
    /// `s2, public`, two).
    Set { name: String, value: String },
    /// `SET LOCAL name ...`: lasts until the end of the transaction, whose
    /// reads are never cached; a custom setting it names stays defined after.
    SetLocal { name: String },
    /// `RESET name`, `SET name TO DEFAULT`.
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
    let cleaned = strip_comments(sql);
    let text = cleaned.trim().trim_end_matches(';').trim();
    let (first, rest) = split_word(text);
    match first.to_ascii_lowercase().as_str() {
        "discard" => {
            let (what, _) = split_word(rest);
            Some(if what.eq_ignore_ascii_case("all") { SessionCommand::DiscardAll } else { SessionCommand::NoEffect })
        }
        "reset" => {
            let (what, after) = split_word(rest);
            let name = match what.to_ascii_lowercase().as_str() {
                "" => return None,
                "all" => return Some(SessionCommand::ResetAll),
                "session" if split_word(after).0.eq_ignore_ascii_case("authorization") => {
                    "session authorization".into()
                }
                "time" if split_word(after).0.eq_ignore_ascii_case("zone") => "timezone".into(),
                _ => setting_name(what),
            };
            Some(SessionCommand::Reset { name })
        }
        "set" => parse_set(rest),
        _ => None,
    }
}

/// `SET` after its keyword.
fn parse_set(rest: &str) -> Option<SessionCommand> {
    let (second, after) = split_word(rest);
    let (local, body) = match second.to_ascii_lowercase().as_str() {
        "" => return None,
        "local" => (true, after),
        "session" => {
            let (third, after3) = split_word(after);
            if third.eq_ignore_ascii_case("authorization") {
                return set(false, "session authorization", after3);
            }
            (false, after)
        }
        "transaction" | "constraints" => return Some(SessionCommand::NoEffect),
        _ => (false, rest),
    };
    let (word, after) = split_word(body);
    match word.to_ascii_lowercase().as_str() {
        "role" => return set(local, "role", after),
        "time" if split_word(after).0.eq_ignore_ascii_case("zone") => {
            return set(local, "timezone", split_word(after).1);
        }
        "names" => return set(local, "client_encoding", after),
        "schema" => return set(local, "search_path", after),
        "xml" if split_word(after).0.eq_ignore_ascii_case("option") => {
            return set(local, "xmloption", split_word(after).1);
        }
        _ => {}
    }
    // name {TO | =} value; the name may be glued to '=' (`SET a=1`)
    let (name, value) = match body.split_once('=') {
        Some((n, v)) if !n.trim().is_empty() && !n.trim().contains(char::is_whitespace) => (n.trim(), v),
        _ => {
            let (n, v) = split_word(body);
            let (to, after_to) = split_word(v);
            (n, if to.eq_ignore_ascii_case("to") { after_to } else { v })
        }
    };
    if name.is_empty() {
        return None;
    }
    set(local, &setting_name(name), value)
}

/// A setting's name as PostgreSQL looks it up: quotes removed, any case.
fn setting_name(raw: &str) -> String {
    raw.split('.').map(|part| part.trim().trim_matches('"').to_ascii_lowercase()).collect::<Vec<_>>().join(".")
}

fn set(local: bool, name: &str, value: &str) -> Option<SessionCommand> {
    let name = name.to_string();
    if local {
        return Some(SessionCommand::SetLocal { name });
    }
    match canonical_value(value) {
        Some(value) => Some(SessionCommand::Set { name, value }),
        None => Some(SessionCommand::Reset { name }),
    }
}

/// The first whitespace-separated word and the rest, trimmed.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim_start()),
        None => (text, ""),
    }
}

/// A SET value as PostgreSQL reads it (see [`SessionCommand::Set`]); `None`
/// for an unquoted `DEFAULT` (the setting goes back to its default).
fn canonical_value(value: &str) -> Option<String> {
    let mut items: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = value.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let mut quoted = String::new();
                while let Some(q) = chars.next() {
                    if q == c {
                        if chars.peek() == Some(&c) {
                            chars.next();
                            quoted.push(c);
                        } else {
                            break;
                        }
                    } else {
                        quoted.push(q);
                    }
                }
                cur.push('"');
                cur.push_str(&quoted.replace('"', "\"\""));
                cur.push('"');
            }
            ',' => items.push(std::mem::take(&mut cur).trim().to_string()),
            c if c.is_whitespace() => {
                if !cur.ends_with(' ') && !cur.is_empty() {
                    cur.push(' ');
                }
            }
            c => cur.push(c.to_ascii_lowercase()),
        }
    }
    items.push(cur.trim().to_string());
    if items.len() == 1 && items[0] == "default" {
        return None;
    }
    Some(items.join(", "))
}

/// `sql` with its comments replaced by a space (quotes respected).
fn strip_comments(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                out.push_str(&sql[copied..i]);
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                out.push(' ');
                copied = i;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                out.push_str(&sql[copied..i]);
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
                copied = i.min(b.len());
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    out
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
        assert_eq!(parse_session_command("set search_path = 'x'"), set("search_path", "\"x\""));
        assert_eq!(parse_session_command("SET SESSION DateStyle=ISO"), set("datestyle", "iso"));
        assert_eq!(parse_session_command("SET ROLE alice"), set("role", "alice"));
        assert_eq!(parse_session_command("SET TIME ZONE 'UTC'"), set("timezone", "\"UTC\""));
        assert_eq!(parse_session_command("SET SESSION AUTHORIZATION bob"), set("session authorization", "bob"));
        assert_eq!(
            parse_session_command("SET LOCAL statement_timeout = 5"),
            Some(SessionCommand::SetLocal { name: "statement_timeout".into() })
        );
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

    #[test]
    fn values_as_postgresql_reads_them() {
        let value = |sql: &str| match parse_session_command(sql) {
            Some(SessionCommand::Set { value, .. }) => value,
            other => panic!("{sql}: {other:?}"),
        };
        // unquoted words fold, quoted ones do not; one quoted item is not two
        assert_ne!(value("SET search_path = S2"), value("SET search_path = 'S2'"));
        assert_eq!(value("SET search_path = S2"), value("SET search_path = s2"));
        assert_eq!(value("SET search_path = 'S2'"), value("SET search_path = \"S2\""));
        assert_ne!(value("SET search_path = s2, public"), value("SET search_path = 's2, public'"));
        assert_eq!(value("SET search_path = s2,public"), value("SET search_path TO s2 , public"));
        assert_ne!(value("SET app.x = 'DEFAULT'"), value("SET app.x = 'default '"));
        assert_eq!(parse_session_command("SET app.x = DEFAULT"), Some(SessionCommand::Reset { name: "app.x".into() }));
        assert_eq!(
            parse_session_command("SET TIME ZONE DEFAULT"),
            Some(SessionCommand::Reset { name: "timezone".into() })
        );
        // comments anywhere
        assert_eq!(parse_session_command("SET/**/ROLE bob"), set("role", "bob"));
        assert_eq!(parse_session_command("SET -- c\n ROLE /* a /* nested */ b */ bob"), set("role", "bob"));
        assert_eq!(parse_session_command("SET app.x = '--not a comment'"), set("app.x", "\"--not a comment\""));
        assert_eq!(parse_session_command("SET SCHEMA 'a'"), set("search_path", "\"a\""));
        assert_eq!(parse_session_command("SET NAMES 'LATIN1'"), set("client_encoding", "\"LATIN1\""));
        assert_eq!(parse_session_command("SET \"Search_Path\" = a"), set("search_path", "a"));
        assert_eq!(parse_session_command("SET XML OPTION DOCUMENT"), set("xmloption", "document"));
        assert_eq!(
            parse_session_command("RESET \"search_path\""),
            Some(SessionCommand::Reset { name: "search_path".into() })
        );
    }
}

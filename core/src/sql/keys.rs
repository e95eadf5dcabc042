//! The canonical form of a primary-key value, so that every spelling
//! PostgreSQL reads as the same key gives the same key hash: `'070'`, `70.0`,
//! `' 70'` and `+70` are row 70 of an integer key; an upper-case uuid, one in
//! braces or without hyphens is the lower-case hyphenated one. A spelling
//! that has no canonical form (`7e1`, `0x46`, `70.5`, a numeric key) is no
//! key at all: the read depends on its whole table, the write changes it.
//! The same function canonicalises the values of the change stream, so both
//! sides meet.

use std::borrow::Cow;

use super::catalog::KeyType;

/// The canonical text of `raw` as a key of type `key_type`, `None` when the
/// value must not be used as a key (see the module's documentation).
pub fn canonical_key(key_type: KeyType, raw: &str) -> Option<Cow<'_, str>> {
    match key_type {
        KeyType::Integer => canonical_integer(raw),
        KeyType::Text => Some(Cow::Borrowed(raw)),
        KeyType::PaddedText => Some(Cow::Borrowed(raw.trim_end_matches(' '))),
        KeyType::Uuid => canonical_uuid(raw),
        KeyType::Other => None,
        KeyType::Unknown => {
            // canonical for every type it could be: an integer written as
            // PostgreSQL prints integers, a uuid as it prints uuids, or text
            // that reads as neither
            if let Some(i) = canonical_integer(raw) {
                return (i == raw).then_some(i);
            }
            if looks_numeric(raw) {
                return None;
            }
            if let Some(u) = canonical_uuid(raw) {
                return (u == raw).then_some(u);
            }
            Some(Cow::Borrowed(raw))
        }
    }
}

/// An integer as PostgreSQL's integer input reads it (surrounding
/// whitespace, a sign, leading zeros, `_` between digits), or a numeric
/// constant with a zero fraction (`70.0`): its digits without leading zeros.
fn canonical_integer(raw: &str) -> Option<Cow<'_, str>> {
    let plain = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit) && (d[0] != b'0' || d.len() == 1);
    let b = raw.as_bytes();
    if plain(b) || (b.first() == Some(&b'-') && plain(&b[1..]) && b[1] != b'0') {
        return Some(Cow::Borrowed(raw));
    }
    let t = raw.trim_matches(|c: char| c.is_ascii_whitespace());
    let (negative, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) if !i.contains('_') => (i, f),
        Some(_) => return None,
        None => (digits, ""),
    };
    let underscores_ok = !int.starts_with('_') && !int.ends_with('_') && !int.contains("__");
    if int.is_empty()
        || !int.bytes().all(|c| c.is_ascii_digit() || c == b'_')
        || !underscores_ok
        || !frac.bytes().all(|c| c == b'0')
    {
        return None;
    }
    let significant = int.trim_start_matches(['0', '_']);
    if significant.is_empty() {
        return Some(Cow::Borrowed("0"));
    }
    let mut out = String::with_capacity(significant.len() + 1);
    if negative {
        out.push('-');
    }
    out.extend(significant.chars().filter(|c| *c != '_'));
    Some(Cow::Owned(out))
}

/// Text PostgreSQL might read as a number: digits with any of a sign, a
/// point, an exponent, a base prefix or whitespace around.
fn looks_numeric(raw: &str) -> bool {
    let t = raw.trim_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    t.bytes().next().is_some_and(|c| c.is_ascii_digit() || c == b'.')
        && t.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'))
}

/// A uuid in any form `uuid_in` accepts (upper case, braces, hyphens or
/// none), as PostgreSQL prints it: lower case, hyphenated 8-4-4-4-12.
fn canonical_uuid(raw: &str) -> Option<Cow<'_, str>> {
    let b = raw.as_bytes();
    let canonical = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        });
    if canonical {
        return Some(Cow::Borrowed(raw));
    }
    let inner = match raw.strip_prefix('{') {
        Some(r) => r.strip_suffix('}')?,
        None => raw,
    };
    let hex: Vec<u8> = inner.bytes().filter(|c| *c != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) || inner.starts_with('-') || inner.contains("--") {
        return None;
    }
    let h = String::from_utf8(hex.to_ascii_lowercase()).ok()?;
    Some(Cow::Owned(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])))
}

/// The text of a literal of kind `Other`, as PostgreSQL reads it: `E'...'`
/// with its backslash escapes, `U&'...'` with its Unicode escapes, a
/// dollar-quoted string's body; anything else as written.
pub fn literal_text(raw: &str) -> String {
    if let Some(body) =
        raw.strip_prefix(['E', 'e']).and_then(|r| r.strip_prefix('\'')).and_then(|r| r.strip_suffix('\''))
    {
        return unescape_e(&body.replace("''", "'"));
    }
    if let Some(body) = raw.get(..3).filter(|p| p.eq_ignore_ascii_case("u&'")).and_then(|_| raw[3..].strip_suffix('\''))
    {
        return unescape_u(&body.replace("''", "'"));
    }
    if raw.starts_with('$')
        && let Some(end) = raw[1..].find('$')
    {
        let tag = &raw[..end + 2];
        if let Some(body) = raw[tag.len()..].strip_suffix(tag) {
            return body.to_string();
        }
    }
    raw.to_string()
}

fn unescape_e(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else { break };
        let mut number = |radix: u32, max: usize, first: Option<char>| {
            let mut v = first.and_then(|f| f.to_digit(radix)).unwrap_or(0);
            let mut n = usize::from(first.is_some());
            while n < max && chars.peek().is_some_and(|d| d.is_digit(radix)) {
                v = v * radix + chars.next().and_then(|d| d.to_digit(radix)).unwrap_or(0);
                n += 1;
            }
            char::from_u32(v).unwrap_or('\u{fffd}')
        };
        match e {
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '0'..='7' => out.push(number(8, 3, Some(e))),
            'x' => out.push(number(16, 2, None)),
            'u' => out.push(number(16, 4, None)),
            'U' => out.push(number(16, 8, None)),
            other => out.push(other),
        }
    }
    out
}

fn unescape_u(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let (digits, plus) = if chars.peek() == Some(&'+') {
            chars.next();
            (6, true)
        } else {
            (4, false)
        };
        if !plus && chars.peek() == Some(&'\\') {
            chars.next();
            out.push('\\');
            continue;
        }
        let hex: String = (0..digits).filter_map(|_| chars.next()).collect();
        out.push(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).unwrap_or('\u{fffd}'));
    }
    out
}

/// Whether a value names the time it is read at: `now`, `today`,
/// `tomorrow` or `yesterday` as a word, in any case (`'now'::timestamptz`,
/// `'tomorrow 10:00'`). A query with such a literal or parameter is never
/// cached: PostgreSQL reads it as the current time.
pub fn mentions_relative_time(value: &[u8]) -> bool {
    let words = |v: &[u8]| {
        v.split(|c| !c.is_ascii_alphabetic()).any(|w| {
            w.len() >= 3
                && ["now", "today", "tomorrow", "yesterday"].iter().any(|t| w.eq_ignore_ascii_case(t.as_bytes()))
        })
    };
    if value.contains(&b'\\') {
        // array, record and JSON input read escapes: `{n\ow}`, `"n\u006fw"`
        return words(value) || words(unescape_backslashes(value).as_bytes());
    }
    // quick reject: every word of interest contains an 'o' or a 'y'
    value.iter().any(|c| matches!(c | 0x20, b'o' | b'y')) && words(value)
}

/// `value` with `\uXXXX` decoded and every other backslash dropped (as
/// array, record and JSON input read them).
fn unescape_backslashes(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'u') {
            let mut probe = chars.clone();
            probe.next();
            let hex: String = probe.by_ref().take(4).collect();
            if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).filter(|_| hex.len() == 4) {
                out.push(ch);
                chars = probe;
                continue;
            }
        }
        if let Some(next) = chars.next() {
            out.push(next);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: KeyType, raw: &str) -> Option<String> {
        canonical_key(t, raw).map(Cow::into_owned)
    }

    #[test]
    fn integer_spellings_meet() {
        for s in ["70", "070", " 70", "70 ", "+70", "70.0", "70.", "0070.00", "\t70\n", "7_0"] {
            assert_eq!(key(KeyType::Integer, s).as_deref(), Some("70"), "{s:?}");
        }
        for s in ["-0", "0", "000", "+0"] {
            assert_eq!(key(KeyType::Integer, s).as_deref(), Some("0"), "{s:?}");
        }
        assert_eq!(key(KeyType::Integer, "-070").as_deref(), Some("-70"));
        for s in ["70.5", "7e1", "0x46", "", " ", "-", "abc", "7 0", "_70", "70_", "7__0", "1_0.0"] {
            assert_eq!(key(KeyType::Integer, s), None, "{s:?}");
        }
        assert!(matches!(canonical_key(KeyType::Integer, "70"), Some(Cow::Borrowed(_))), "no allocation");
    }

    #[test]
    fn uuid_spellings_meet() {
        let c = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for s in [
            c,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(key(KeyType::Uuid, s).as_deref(), Some(c), "{s:?}");
        }
        assert_eq!(key(KeyType::Uuid, "a0eebc99"), None);
        assert_eq!(key(KeyType::Uuid, "{a0eebc999c0b4ef8bb6d6bb9bd380a11"), None);
    }

    #[test]
    fn unknown_types_key_only_canonical_spellings() {
        assert_eq!(key(KeyType::Unknown, "70").as_deref(), Some("70"));
        assert_eq!(key(KeyType::Unknown, "alice@example.com").as_deref(), Some("alice@example.com"));
        for s in ["070", " 70", "70.0", "+70", "7e1", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "1.5"] {
            assert_eq!(key(KeyType::Unknown, s), None, "{s:?}");
        }
        assert_eq!(key(KeyType::PaddedText, "ab  ").as_deref(), Some("ab"));
        assert_eq!(key(KeyType::Text, " ab ").as_deref(), Some(" ab "));
        assert_eq!(key(KeyType::Other, "1"), None);
    }

    #[test]
    fn escaped_literals_read_as_postgresql_reads_them() {
        assert_eq!(literal_text("E'n\\157w'"), "now");
        assert_eq!(literal_text("e'\\x6eow'"), "now");
        assert_eq!(literal_text("E'\\u006Eow'"), "now");
        assert_eq!(literal_text("U&'n\\006Fw'"), "now");
        assert_eq!(literal_text("u&'\\+00006Eow'"), "now");
        assert_eq!(literal_text("$$now$$"), "now");
        assert_eq!(literal_text("$t$to''day$t$"), "to''day");
        assert_eq!(literal_text("E'it''s'"), "it's");
        assert_eq!(literal_text("B'1010'"), "B'1010'");
        for raw in ["E'\\", "U&'\\+'", "$", "$a", "E'\\777777777'"] {
            let _ = literal_text(raw);
        }
    }

    #[test]
    fn relative_time_words() {
        for s in ["now", "NOW", " Now ", "today", "tomorrow 10:00", "yesterday", "epoch now", "{n\\ow}", "(n\\ow)"] {
            assert!(mentions_relative_time(s.as_bytes()), "{s:?}");
        }
        assert!(mentions_relative_time(br#"{"t":"n\u006fw"}"#));
        for s in ["", "70", "snowden", "nowhere", "2026-01-01", "epoch", "infinity", "todays", "a\\b"] {
            assert!(!mentions_relative_time(s.as_bytes()), "{s:?}");
        }
    }
}

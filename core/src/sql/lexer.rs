//! A hand-written PostgreSQL lexer for the hot path: one pass over the text
//! that produces the normalised shape (literals replaced, keywords lower-cased,
//! comments and whitespace dropped) and the literal values, without allocating
//! once its buffers are warm. `sqlparser` runs only the first time a shape is seen.

use std::ops::Range;

/// Marker byte that stands for a literal in a normalised shape. It cannot occur in
/// lexed SQL output (control characters are not SQL tokens), unlike `?`, which is a
/// jsonb operator in PostgreSQL.
pub const LITERAL_MARK: u8 = 0x01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiteralKind {
    /// An unsigned numeric constant: `42`, `1.5`, `1e10`.
    Number,
    /// A plain `'...'` string constant.
    String,
    /// Any other constant (`E'..'`, `B'..'`, `X'..'`, `U&'..'`, dollar-quoted):
    /// cached by its exact text, never used as a point key.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Literal {
    /// Byte range in the original text, quotes included.
    pub span: Range<usize>,
    pub kind: LiteralKind,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated quoted string at byte {0}")]
    UnterminatedString(usize),
    #[error("unterminated quoted identifier at byte {0}")]
    UnterminatedIdentifier(usize),
    #[error("unterminated /* comment at byte {0}")]
    UnterminatedComment(usize),
    #[error("unterminated dollar-quoted string at byte {0}")]
    UnterminatedDollarQuote(usize),
    #[error("parameter number too large at byte {0}")]
    BadParameter(usize),
}

/// Marks two string literals with only whitespace between them.
const ADJACENT_STRINGS: &str = "\u{2} ";

/// What one pass of the lexer found. Buffers are reused across calls.
#[derive(Default, Debug, Clone)]
pub struct Lexed {
    /// Normalised shape: tokens separated by one space, unquoted words lower-cased,
    /// literals replaced by [`LITERAL_MARK`], trailing `;` dropped.
    pub shape: String,
    pub literals: Vec<Literal>,
    /// Highest `$n` parameter number used in the text (0 if none).
    pub param_max: u32,
    /// Number of statements (non-empty pieces between top-level `;`).
    pub statements: u32,
    /// First word of the first statement, lower-cased (`select`, `insert`, ...).
    pub first_word: String,
}

/// Lexer with reusable buffers.
#[derive(Default, Debug)]
pub struct Lexer {
    out: Lexed,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}
fn is_ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}
fn is_op_char(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

impl Lexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lex `sql`; the result borrows the lexer's buffers until the next call.
    pub fn lex(&mut self, sql: &str) -> Result<&Lexed, LexError> {
        let out = &mut self.out;
        out.shape.clear();
        out.literals.clear();
        out.param_max = 0;
        out.statements = 0;
        out.first_word.clear();
        let b = sql.as_bytes();
        let mut i = 0;
        // tokens seen in the current statement
        let mut in_statement = false;
        // a `;` was seen after the current statement's tokens
        let mut pending_semicolon = false;
        // the previous token was a quoted string
        let mut after_string = false;
        while i < b.len() {
            let c = b[i];
            if let Some(next) = skip_space(b, i)? {
                i = next;
                continue;
            }
            if c == b';' {
                if in_statement {
                    pending_semicolon = true;
                }
                i += 1;
                continue;
            }
            // a token starts here
            if pending_semicolon {
                // a second statement: keep lexing so its text is part of the shape
                pending_semicolon = false;
                out.shape.push_str(" ;");
                in_statement = false;
            }
            if !in_statement {
                out.statements += 1;
                in_statement = true;
            }
            if !out.shape.is_empty() {
                out.shape.push(' ');
            }
            // two strings in a row: one continued string after a newline, a
            // syntax error on one line; marked so that neither shares a
            // shape with the other (nor parses: never cached)
            let string_next = c == b'\'';
            if string_next && std::mem::take(&mut after_string) {
                out.shape.push_str(ADJACENT_STRINGS);
            }
            after_string = string_next;
            i = token(out, sql, i)?;
        }
        Ok(&self.out)
    }
}

/// Whitespace or a comment at `i`: the index past it (`None`: a token
/// or `;` starts at `i`).
#[inline]
fn skip_space(b: &[u8], mut i: usize) -> Result<Option<usize>, LexError> {
    let c = b[i];
    if c.is_ascii_whitespace() {
        return Ok(Some(i + 1));
    }
    if c == b'-' && b.get(i + 1) == Some(&b'-') {
        while i < b.len() && b[i] != b'\n' {
            i += 1;
        }
        return Ok(Some(i));
    }
    if c == b'/' && b.get(i + 1) == Some(&b'*') {
        let start = i;
        let mut depth = 1;
        i += 2;
        while depth > 0 {
            if i + 1 >= b.len() {
                return Err(LexError::UnterminatedComment(start));
            }
            if b[i] == b'*' && b[i + 1] == b'/' {
                depth -= 1;
                i += 2;
            } else if b[i] == b'/' && b[i + 1] == b'*' {
                depth += 1;
                i += 2;
            } else {
                i += 1;
            }
        }
        return Ok(Some(i));
    }
    Ok(None)
}

/// The token starting at `start` into `out`'s shape (a literal as its
/// mark); returns the index past it.
#[inline]
fn token(out: &mut Lexed, sql: &str, start: usize) -> Result<usize, LexError> {
    let b = sql.as_bytes();
    let c = b[start];
    let mut i = start;
    if c == b'\'' {
        i = scan_quoted(b, i, b'\'', false).ok_or(LexError::UnterminatedString(start))?;
        push_literal(out, start..i, LiteralKind::String);
    } else if c == b'"' {
        i = scan_quoted(b, i, b'"', false).ok_or(LexError::UnterminatedIdentifier(start))?;
        out.shape.push_str(&sql[start..i]);
    } else if c == b'$' {
        i = dollar(out, sql, start)?;
    } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
        i = scan_number(b, i);
        push_literal(out, start..i, LiteralKind::Number);
    } else if is_ident_start(c) {
        i = word(out, sql, start)?;
    } else if is_op_char(c) {
        while i < b.len() && is_op_char(b[i]) {
            // stop before a comment start inside an operator run
            if (b[i] == b'-' && b.get(i + 1) == Some(&b'-')) || (b[i] == b'/' && b.get(i + 1) == Some(&b'*')) {
                break;
            }
            i += 1;
        }
        if i == start {
            i += 1;
        }
        out.shape.push_str(&sql[start..i]);
    } else if c == b':' && b.get(i + 1) == Some(&b':') {
        i += 2;
        out.shape.push_str("::");
    } else {
        // punctuation and anything else: one character (UTF-8 aware)
        let len = sql[i..].chars().next().map_or(1, |ch| ch.len_utf8());
        i += len;
        out.shape.push_str(&sql[start..i]);
    }
    Ok(i)
}

/// A token starting with `$`: a parameter (`$1`), a dollar-quoted string
/// (`$tag$ ... $tag$`) or a lone `$`.
#[inline]
fn dollar(out: &mut Lexed, sql: &str, start: usize) -> Result<usize, LexError> {
    let b = sql.as_bytes();
    let mut i = start;
    if b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
        i += 1;
        let mut n: u32 = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add((b[i] - b'0') as u32))
                .filter(|n| *n <= 65_535)
                .ok_or(LexError::BadParameter(start))?;
            i += 1;
        }
        out.param_max = out.param_max.max(n);
        out.shape.push_str(&sql[start..i]);
        return Ok(i);
    }
    let tag_end = b[i + 1..].iter().position(|&d| !is_ident_cont(d) || d == b'$').map(|p| i + 1 + p);
    match tag_end {
        Some(e) if b[e] == b'$' => {
            let tag = &b[i..=e];
            let body = e + 1;
            let close = find(&b[body..], tag).ok_or(LexError::UnterminatedDollarQuote(start))?;
            i = body + close + tag.len();
            push_literal(out, start..i, LiteralKind::Other);
        }
        _ => {
            i += 1;
            out.shape.push('$');
        }
    }
    Ok(i)
}

/// A word: a keyword or identifier (lowercased into the shape), or the
/// prefix of a string (`E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`) or of
/// a Unicode identifier (`U&"..."`).
#[inline]
fn word(out: &mut Lexed, sql: &str, start: usize) -> Result<usize, LexError> {
    let b = sql.as_bytes();
    let c = b[start];
    let mut i = start;
    while i < b.len() && is_ident_cont(b[i]) {
        i += 1;
    }
    let word = &sql[start..i];
    let prefix = word.len() == 1 && matches!(c | 0x20, b'e' | b'b' | b'x' | b'n');
    let unicode = word.len() == 1 && (c | 0x20) == b'u' && b.get(i) == Some(&b'&');
    if prefix && b.get(i) == Some(&b'\'') {
        let escapes = c | 0x20 == b'e';
        i = scan_quoted(b, i, b'\'', escapes).ok_or(LexError::UnterminatedString(start))?;
        push_literal(out, start..i, LiteralKind::Other);
    } else if unicode && b.get(i + 1) == Some(&b'\'') {
        i = scan_quoted(b, i + 1, b'\'', false).ok_or(LexError::UnterminatedString(start))?;
        push_literal(out, start..i, LiteralKind::Other);
    } else if unicode && b.get(i + 1) == Some(&b'"') {
        // a Unicode identifier U&"..." is one token (`u &"x"` is u AND "x")
        i = scan_quoted(b, i + 1, b'"', false).ok_or(LexError::UnterminatedIdentifier(start))?;
        out.shape.push_str("u&");
        out.shape.push_str(&sql[start + 2..i]);
    } else {
        for ch in word.chars() {
            out.shape.push(ch.to_ascii_lowercase());
        }
        if out.statements == 1 && out.first_word.is_empty() {
            out.first_word.push_str(&out.shape[out.shape.len() - word.len()..]);
        }
    }
    Ok(i)
}

fn push_literal(out: &mut Lexed, span: Range<usize>, kind: LiteralKind) {
    out.shape.push(LITERAL_MARK as char);
    out.literals.push(Literal { span, kind });
}

/// Returns the index just past the closing quote. `''` (or `""`) is an escaped quote;
/// with `backslash`, `\x` escapes any character.
fn scan_quoted(b: &[u8], open: usize, quote: u8, backslash: bool) -> Option<usize> {
    let mut i = open + 1;
    while i < b.len() {
        let c = b[i];
        if backslash && c == b'\\' {
            i += 2;
            continue;
        }
        if c == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn scan_number(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if i < b.len() && b[i] == b'.' && b.get(i + 1) != Some(&b'.') {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < b.len() && (b[i] | 0x20) == b'e' {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The canonical text of a literal used as a point key: strings without quotes
/// (`''` unescaped), integers without leading zeros. `None` for literals that are
/// not canonicalised (they never become keys, so a key is never missed by spelling).
pub fn canonical_literal(sql: &str, lit: &Literal) -> Option<String> {
    let text = sql.get(lit.span.clone())?;
    match lit.kind {
        LiteralKind::String => {
            let inner = text.get(1..text.len().saturating_sub(1))?;
            Some(inner.replace("''", "'"))
        }
        LiteralKind::Number => Some(canonical_number(text)),
        LiteralKind::Other => None,
    }
}

/// Integers lose leading zeros and `_` separators; other numbers stay as written.
pub fn canonical_number(text: &str) -> String {
    if text.bytes().all(|c| c.is_ascii_digit() || c == b'_') {
        let digits: String = text.chars().filter(|c| *c != '_').collect();
        let trimmed = digits.trim_start_matches('0');
        if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() }
    } else {
        text.to_string()
    }
}

/// Renders a shape with its literals as numbered parameters `$k`, k after the
/// highest parameter of the text, so that `sqlparser` sees every literal as a
/// placeholder and the analysis can say "argument k" for keys.
pub fn shape_with_placeholders(lexed: &Lexed) -> String {
    let mut s = String::with_capacity(lexed.shape.len() + 4 * lexed.literals.len());
    let mut k = lexed.param_max;
    for ch in lexed.shape.chars() {
        if ch == LITERAL_MARK as char {
            k += 1;
            s.push('$');
            s.push_str(&k.to_string());
        } else {
            s.push(ch);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> String {
        let mut l = Lexer::new();
        shape_with_placeholders(l.lex(sql).expect("lexes"))
    }

    #[test]
    fn literals_and_case_are_normalised() {
        assert_eq!(shape("SELECT * FROM t WHERE id = 42"), shape("select *   from t where id=7"));
        assert_eq!(shape("SELECT * FROM t WHERE id = 42"), "select * from t where id = $1");
        assert_eq!(shape("select a from t where b = $1 and c = 'x'"), "select a from t where b = $1 and c = $2");
    }

    #[test]
    fn quoted_identifiers_keep_case() {
        assert_ne!(shape(r#"select * from "Users""#), shape("select * from users"));
    }

    #[test]
    fn adjacent_strings_are_marked() {
        let continued = shape("select 'a'\n'b'");
        assert_ne!(continued, shape("select 'ab'"));
        assert!(continued.contains('\u{2}'));
        assert_eq!(shape("select 'a', 'b'"), "select $1 , $2");
    }

    #[test]
    fn spacing_that_changes_the_tokens_is_kept() {
        // U&"x" is the column x; u &"x" and u & "x" are u AND x
        let unicode = shape(r#"select U&"x" from t"#);
        assert_ne!(unicode, shape(r#"select u &"x" from t"#));
        assert_ne!(unicode, shape(r#"select u & "x" from t"#));
        assert_eq!(shape(r#"select u &"x" from t"#), shape(r#"select u & "x" from t"#));
        assert_eq!(unicode, shape(r#"select u&"x" from t"#));
    }

    #[test]
    fn comments_are_dropped() {
        assert_eq!(shape("select 1 -- hi\n"), shape("/* a /* nested */ */ select 2"));
    }

    #[test]
    fn statements_are_counted() {
        let mut l = Lexer::new();
        assert_eq!(l.lex("select 1;").expect("lexes").statements, 1);
        assert_eq!(l.lex("select 1; select 2").expect("lexes").statements, 2);
        assert_eq!(l.lex(";;select 1;;").expect("lexes").statements, 1);
        assert_eq!(l.lex("select ';'").expect("lexes").statements, 1);
    }

    #[test]
    fn unterminated_input_is_an_error() {
        let mut l = Lexer::new();
        assert!(matches!(l.lex("select 'abc"), Err(LexError::UnterminatedString(7))));
        assert!(l.lex("select \"abc").is_err());
        assert!(l.lex("select /* abc").is_err());
        assert!(l.lex("select $x$ abc").is_err());
        assert!(l.lex("select $99999999999").is_err());
    }

    #[test]
    fn dollar_quotes_and_prefixed_strings_are_literals() {
        assert_eq!(shape("do $$ begin perform 1; end $$"), "do $1");
        assert_eq!(shape("select E'a\\'b', x'ff'"), "select $1 , $2");
        assert_eq!(shape("select a$b from t"), "select a$b from t");
    }

    #[test]
    fn canonical_keys() {
        let sql = "select * from t where id = 007 and n = 'it''s'";
        let mut l = Lexer::new();
        let lexed = l.lex(sql).expect("lexes").clone();
        assert_eq!(canonical_literal(sql, &lexed.literals[0]).as_deref(), Some("7"));
        assert_eq!(canonical_literal(sql, &lexed.literals[1]).as_deref(), Some("it's"));
    }

    #[test]
    fn numbers_and_operators() {
        assert_eq!(shape("select 1.5e3, -2, a->>'k', b::int from t"), "select $1 , - $2 , a ->> $3 , b :: int from t");
        assert_eq!(shape("select a--comment\nfrom t"), "select a from t");
    }

    #[test]
    fn first_word_is_lowercased() {
        let mut l = Lexer::new();
        assert_eq!(l.lex("  BEGIN").expect("lexes").first_word, "begin");
    }
}

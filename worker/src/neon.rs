//! `@neondatabase/serverless`'s HTTP protocol, sans IO: the request body
//! and headers in, the JSON the driver expects out (docs/worker-research.md
//! §1 has the driver's source lines this follows).
//!
//! A request is `POST /sql` with `{"query", "params"}` or, for a
//! transaction, `{"queries": [...]}`; every parameter travels as a string
//! or null (the driver serialises dates, arrays, buffers itself) and is
//! bound as text of unspecified type, so PostgreSQL infers it. Rows go back
//! as arrays of PostgreSQL's text output: the driver parses them by type
//! OID with node-postgres's parsers. A PostgreSQL error is HTTP 400 with
//! its fields at the top level, which is how the driver's `NeonDbError`
//! gets `code` (the SQLSTATE); anything else is another status and a text
//! body.

use serde_json::{Map, Value, json};

/// One statement and its parameters (`None`: SQL NULL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub query: String,
    pub params: Vec<Option<String>>,
}

/// A request body: one statement, or a transaction of several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    One(Query),
    Batch(Vec<Query>),
}

/// A request the Worker refuses before it reaches PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("request body must be a JSON object with \"query\" (and \"params\") or \"queries\"")]
    Shape,
    #[error("\"params\" must be an array")]
    Params,
    #[error("a transaction needs at least one query")]
    EmptyBatch,
    #[error("too many parameters: {0} (PostgreSQL binds at most 65535)")]
    TooManyParams(usize),
    #[error("unsupported isolation level {0:?}")]
    Isolation(String),
}

impl RequestError {
    /// The SQLSTATE the driver shows as `err.code`.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::TooManyParams(_) => "54000",
            RequestError::Isolation(_) => "22023",
            _ => "08P01",
        }
    }
}

/// Parses a request body (the driver sends it as text/plain: the content
/// type is not checked).
pub fn parse_body(bytes: &[u8]) -> Result<Body, RequestError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| RequestError::Json(e.to_string()))?;
    let Value::Object(o) = v else { return Err(RequestError::Shape) };
    if let Some(queries) = o.get("queries") {
        let Value::Array(qs) = queries else { return Err(RequestError::Shape) };
        if qs.is_empty() {
            return Err(RequestError::EmptyBatch);
        }
        let qs = qs.iter().map(query_of).collect::<Result<Vec<_>, _>>()?;
        return Ok(Body::Batch(qs));
    }
    query_of(&Value::Object(o)).map(Body::One)
}

fn query_of(v: &Value) -> Result<Query, RequestError> {
    let Value::Object(o) = v else { return Err(RequestError::Shape) };
    let Some(Value::String(query)) = o.get("query") else { return Err(RequestError::Shape) };
    let params = match o.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ps)) => ps.iter().map(param_text).collect(),
        Some(_) => return Err(RequestError::Params),
    };
    if params.len() > u16::MAX as usize {
        return Err(RequestError::TooManyParams(params.len()));
    }
    Ok(Query { query: query.clone(), params })
}

/// A JSON parameter as PostgreSQL text, as Neon's proxy reads it: null is
/// NULL, a string itself, an array a PostgreSQL array literal, anything
/// else its JSON text.
pub fn param_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(array_literal(items)),
        other => Some(other.to_string()),
    }
}

fn array_literal(items: &[Value]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => out.push_str(&array_literal(inner)),
            Value::String(s) => quote_element(&mut out, s),
            other => quote_element(&mut out, &other.to_string()),
        }
    }
    out.push('}');
    out
}

fn quote_element(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// What the request's headers ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Rows as arrays (the driver always asks, and converts itself).
    pub array_mode: bool,
    /// Every value as PostgreSQL's text (the driver always asks).
    pub raw_text: bool,
    /// A transaction's `BEGIN`, from the `Neon-Batch-*` headers.
    pub begin: String,
}

impl Options {
    /// Reads the options from a header lookup (names are case-insensitive
    /// in HTTP; the lookup is the caller's).
    pub fn from_headers(get: impl Fn(&str) -> Option<String>) -> Result<Options, RequestError> {
        let yes = |name: &str| get(name).is_some_and(|v| v == "true");
        let mut begin = String::from("BEGIN");
        if let Some(level) = get("neon-batch-isolation-level") {
            let sql = match level.as_str() {
                "ReadUncommitted" => "READ UNCOMMITTED",
                "ReadCommitted" => "READ COMMITTED",
                "RepeatableRead" => "REPEATABLE READ",
                "Serializable" => "SERIALIZABLE",
                _ => return Err(RequestError::Isolation(level)),
            };
            begin.push_str(" ISOLATION LEVEL ");
            begin.push_str(sql);
        }
        match get("neon-batch-read-only").as_deref() {
            Some("true") => begin.push_str(" READ ONLY"),
            Some(_) => begin.push_str(" READ WRITE"),
            None => {}
        }
        match get("neon-batch-deferrable").as_deref() {
            Some("true") => begin.push_str(" DEFERRABLE"),
            Some(_) => begin.push_str(" NOT DEFERRABLE"),
            None => {}
        }
        Ok(Options { array_mode: yes("neon-array-mode"), raw_text: yes("neon-raw-text-output"), begin })
    }
}

/// A column of a result (PostgreSQL's RowDescription field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
}

/// One statement's outcome: its columns, its rows as text, its command tag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryResult {
    pub tag: String,
    pub fields: Vec<Field>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// `command` and `rowCount` from the tag, as Neon splits it: the first
    /// word, and the last word when it is a number (`INSERT 0 3` is 3;
    /// `CREATE TABLE` has none).
    pub fn command(&self) -> (&str, Option<u64>) {
        let command = self.tag.split(' ').next().unwrap_or("");
        let count = self.tag.rsplit(' ').next().filter(|_| self.tag.contains(' ')).and_then(|n| n.parse().ok());
        (command, count)
    }

    /// The JSON the driver reads for one statement.
    pub fn to_json(&self, options: &Options) -> Value {
        let (command, count) = self.command();
        let fields: Vec<Value> = self
            .fields
            .iter()
            .map(|f| {
                json!({
                    "name": f.name, "tableID": f.table_oid, "columnID": f.column, "dataTypeID": f.type_oid,
                    "dataTypeSize": f.type_size, "dataTypeModifier": f.type_modifier, "format": "text",
                })
            })
            .collect();
        let rows: Vec<Value> = self.rows.iter().map(|r| self.row_json(r, options)).collect();
        json!({
            "command": command, "rowCount": count, "rowAsArray": options.array_mode,
            "fields": fields, "rows": rows,
        })
    }

    fn row_json(&self, row: &[Option<String>], options: &Options) -> Value {
        let cell = |i: usize, v: &Option<String>| match v {
            None => Value::Null,
            Some(s) if options.raw_text => Value::String(s.clone()),
            Some(s) => typed(self.fields.get(i).map_or(0, |f| f.type_oid), s),
        };
        if options.array_mode {
            return Value::Array(row.iter().enumerate().map(|(i, v)| cell(i, v)).collect());
        }
        let mut o = Map::new();
        for (i, v) in row.iter().enumerate() {
            let name = self.fields.get(i).map_or_else(|| format!("?column{i}?"), |f| f.name.clone());
            o.insert(name, cell(i, v));
        }
        Value::Object(o)
    }
}

/// A text value as Neon's proxy types it without raw text output: booleans,
/// small integers, floats and JSON as JSON; everything else a string.
fn typed(oid: u32, s: &str) -> Value {
    match oid {
        16 => Value::Bool(s == "t"),
        21 | 23 => s.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(s.into())),
        700 | 701 => match s.parse::<f64>() {
            Ok(f) if f.is_finite() => Value::from(f),
            _ => Value::String(s.into()),
        },
        114 | 3802 => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.into())),
        _ => Value::String(s.into()),
    }
}

/// The body of a transaction's answer: one result per statement.
pub fn batch_json(results: &[QueryResult], options: &Options) -> Value {
    json!({ "results": results.iter().map(|r| r.to_json(options)).collect::<Vec<_>>() })
}

/// A PostgreSQL ErrorResponse, field by field (codes as in the protocol:
/// `C` SQLSTATE, `M` message, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbError {
    pub fields: Vec<(u8, String)>,
}

/// The driver's error fields and the ErrorResponse codes they come from.
const ERROR_FIELDS: [(&str, u8); 16] = [
    ("code", b'C'),
    ("detail", b'D'),
    ("hint", b'H'),
    ("position", b'P'),
    ("internalPosition", b'p'),
    ("internalQuery", b'q'),
    ("where", b'W'),
    ("schema", b's'),
    ("table", b't'),
    ("column", b'c'),
    ("dataType", b'd'),
    ("constraint", b'n'),
    ("file", b'F'),
    ("line", b'L'),
    ("routine", b'R'),
    ("severity", b'V'),
];

impl DbError {
    /// An error the Worker itself raises, shaped like PostgreSQL's.
    pub fn new(code: &str, message: &str) -> DbError {
        DbError {
            fields: vec![(b'S', "ERROR".into()), (b'V', "ERROR".into()), (b'C', code.into()), (b'M', message.into())],
        }
    }

    /// The fields of an ErrorResponse body.
    pub fn parse(body: &[u8]) -> DbError {
        let mut fields = Vec::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            fields.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        DbError { fields }
    }

    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> &str {
        self.get(b'C').unwrap_or("XX000")
    }

    pub fn message(&self) -> &str {
        self.get(b'M').unwrap_or("unknown error")
    }

    /// Neon's error body: every field at the top level, absent ones null
    /// (`severity` the unlocalised one when the server sent it).
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("message".into(), Value::String(self.message().into()));
        for (name, code) in ERROR_FIELDS {
            let v = self.get(code).or_else(|| if code == b'V' { self.get(b'S') } else { None });
            o.insert(name.into(), v.map_or(Value::Null, |s| Value::String(s.into())));
        }
        Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_and_bad_ones_are_refused() {
        let one = parse_body(br#"{"query":"SELECT $1","params":["1",null]}"#).unwrap();
        assert_eq!(one, Body::One(Query { query: "SELECT $1".into(), params: vec![Some("1".into()), None] }));
        let batch = parse_body(br#"{"queries":[{"query":"SELECT 1"},{"query":"SELECT 2","params":[]}]}"#).unwrap();
        assert!(matches!(batch, Body::Batch(q) if q.len() == 2));
        assert!(matches!(parse_body(b"{nope"), Err(RequestError::Json(_))));
        assert_eq!(parse_body(b"[]"), Err(RequestError::Shape));
        assert_eq!(parse_body(br#"{"query":1}"#), Err(RequestError::Shape));
        assert_eq!(parse_body(br#"{"query":"x","params":"1"}"#), Err(RequestError::Params));
        assert_eq!(parse_body(br#"{"queries":[]}"#), Err(RequestError::EmptyBatch));
        assert_eq!(parse_body(br#"{"queries":[1]}"#), Err(RequestError::Shape));
    }

    #[test]
    fn parameters_read_as_neon_reads_them() {
        let v: Value = serde_json::from_str(r#"[true, 4, {"a":1}, ["x\"y", null, ["b\\"], 2]]"#).unwrap();
        let texts: Vec<_> = v.as_array().unwrap().iter().map(param_text).collect();
        assert_eq!(texts[0].as_deref(), Some("true"));
        assert_eq!(texts[1].as_deref(), Some("4"));
        assert_eq!(texts[2].as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(texts[3].as_deref(), Some(r#"{"x\"y",NULL,{"b\\"},"2"}"#));
    }

    #[test]
    fn command_tags_split_as_neon_splits_them() {
        let tag = |t: &str| QueryResult { tag: t.into(), ..Default::default() };
        assert_eq!(tag("INSERT 0 3").command(), ("INSERT", Some(3)));
        assert_eq!(tag("SELECT 2").command(), ("SELECT", Some(2)));
        assert_eq!(tag("CREATE TABLE").command(), ("CREATE", None));
        assert_eq!(tag("BEGIN").command(), ("BEGIN", None));
        assert_eq!(tag("").command(), ("", None));
    }

    #[test]
    fn rows_are_arrays_or_objects_and_typed_only_when_asked() {
        let field = |name: &str, oid| Field {
            name: name.into(),
            table_oid: 0,
            column: 0,
            type_oid: oid,
            type_size: -1,
            type_modifier: -1,
        };
        let r = QueryResult {
            tag: "SELECT 1".into(),
            fields: vec![field("b", 16), field("n", 23), field("j", 3802), field("t", 25)],
            rows: vec![vec![Some("t".into()), Some("7".into()), Some(r#"{"k":[1]}"#.into()), None]],
        };
        let raw = Options { array_mode: true, raw_text: true, begin: "BEGIN".into() };
        assert_eq!(r.to_json(&raw)["rows"], json!([["t", "7", "{\"k\":[1]}", null]]));
        assert_eq!(r.to_json(&raw)["rowCount"], json!(1));
        let typed = Options { array_mode: false, raw_text: false, begin: "BEGIN".into() };
        assert_eq!(r.to_json(&typed)["rows"], json!([{"b": true, "n": 7, "j": {"k": [1]}, "t": null}]));
    }

    #[test]
    fn headers_make_the_transaction_begin() {
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string())
        };
        let o = Options::from_headers(h(&[
            ("neon-batch-isolation-level", "Serializable"),
            ("neon-batch-read-only", "true"),
            ("neon-batch-deferrable", "true"),
            ("neon-array-mode", "true"),
        ]))
        .unwrap();
        assert_eq!(o.begin, "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE");
        assert!(o.array_mode && !o.raw_text);
        let bad = Options::from_headers(h(&[("neon-batch-isolation-level", "Chaos; DROP TABLE t")]));
        assert!(matches!(bad, Err(RequestError::Isolation(_))));
    }

    #[test]
    fn errors_carry_every_field_the_driver_copies() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0P15\0Fparse_relation.c\0L1392\0\0";
        let e = DbError::parse(body);
        assert_eq!(e.code(), "42P01");
        let j = e.to_json();
        assert_eq!(j["message"], json!("relation \"nope\" does not exist"));
        assert_eq!(j["position"], json!("15"));
        assert_eq!(j["line"], json!("1392"));
        assert_eq!(j["severity"], json!("ERROR"));
        assert_eq!(j["hint"], Value::Null);
        // a truncated body never panics
        assert_eq!(DbError::parse(b"C42").code(), "42");
        assert_eq!(DbError::parse(b"").code(), "XX000");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_and_errors_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_body(&bytes);
            let _ = DbError::parse(&bytes).to_json();
        }

        #[test]
        fn strings_pass_as_is_and_quote_every_special_in_arrays(text in "[a-z\"\\\\{},]{0,32}") {
            proptest::prop_assert_eq!(param_text(&Value::String(text.clone())), Some(text.clone()));
            let literal = param_text(&json!([text.clone()])).unwrap_or_default();
            let specials = text.chars().filter(|c| *c == '"' || *c == '\\').count();
            proptest::prop_assert_eq!(literal.len(), text.len() + specials + 4, "{}", literal);
        }
    }
}

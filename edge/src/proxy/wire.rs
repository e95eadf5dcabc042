//! Wire details of the client side: Bind, Parse and ParameterDescription
//! fields, binary parameters as text, startup settings, greeting and result
//! framing.

use super::*;

pub(super) const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];

pub(super) const BIND_COMPLETE: [u8; 5] = [b'2', 0, 0, 0, 4];

pub(super) struct Bind {
    pub(super) portal: String,
    pub(super) statement: String,
    /// Per parameter: 0 text, 1 binary (Bind's format codes, expanded).
    pub(super) param_formats: Vec<i16>,
    pub(super) params: Vec<Option<Vec<u8>>>,
    pub(super) result_formats: Vec<u8>,
}

/// Bind: portal, statement, parameter formats, parameters, result formats.
pub(super) fn parse_bind(m: &Message) -> Option<Bind> {
    let b = m.body();
    let mut at = 0usize;
    let cstr = |at: &mut usize| -> Option<String> {
        let end = b.get(*at..)?.iter().position(|c| *c == 0)?;
        let s = String::from_utf8(b[*at..*at + end].to_vec()).ok()?;
        *at += end + 1;
        Some(s)
    };
    let i16_at = |at: &mut usize| -> Option<i16> {
        let v = i16::from_be_bytes(b.get(*at..*at + 2)?.try_into().ok()?);
        *at += 2;
        Some(v)
    };
    let portal = cstr(&mut at)?;
    let statement = cstr(&mut at)?;
    let nformats = i16_at(&mut at)?;
    let mut formats = Vec::with_capacity(nformats.max(0) as usize);
    for _ in 0..nformats.max(0) {
        formats.push(i16_at(&mut at)?);
    }
    let nparams = i16_at(&mut at)?;
    let param_formats: Vec<i16> = match formats.len() {
        0 => vec![0; nparams.max(0) as usize],
        1 => vec![formats[0]; nparams.max(0) as usize],
        _ => formats,
    };
    let mut params = Vec::with_capacity(nparams.max(0) as usize);
    for _ in 0..nparams.max(0) {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            params.push(None);
        } else {
            params.push(Some(b.get(at..at + len as usize)?.to_vec()));
            at += len as usize;
        }
    }
    let nresults = i16_at(&mut at)?;
    let result_formats = b.get(at..at + 2 * nresults.max(0) as usize)?.to_vec();
    Some(Bind { portal, statement, param_formats, params, result_formats })
}

/// The `application_name` among startup parameters (`""` without one, as
/// PostgreSQL's default).
pub(super) fn application_name(params: &[(String, String)]) -> &str {
    params.iter().find(|(k, _)| k == "application_name").map_or("", |(_, v)| v.as_str())
}

/// A login greeting with its BackendKeyData replaced by `(pid, secret)`,
/// and its `application_name` report by the client's own `app`.
pub(super) fn with_backend_key(greeting: &[u8], pid: i32, secret: i32, app: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(greeting.len() + 13);
    let mut rest = BytesMut::from(greeting);
    while let Ok(Some(m)) = protocol::decode(&mut rest, usize::MAX, protocol::BACKEND_TAGS) {
        match m.tag {
            b'K' => {}
            b'S' if upstream::parameter_name(&m) == Some(b"application_name") => {
                out.extend_from_slice(&protocol::parameter_status("application_name", app));
            }
            _ => out.extend_from_slice(&m.raw),
        }
    }
    let mut k = BytesMut::with_capacity(8);
    k.put_i32(pid);
    k.put_i32(secret);
    frame_into(&mut out, b'K', &k);
    out
}

/// The settings a client's startup parameters make (names lower-case), and
/// whether `options` held something else (the session is then private).
pub(super) fn startup_settings(params: &[(String, String)]) -> (Vec<(String, String)>, bool) {
    let mut out = Vec::new();
    let mut opaque = false;
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                // space-separated arguments, `\ ` an escaped space
                let mut words: Vec<String> = vec![String::new()];
                let mut chars = v.chars();
                while let Some(ch) = chars.next() {
                    match ch {
                        '\\' => words.last_mut().into_iter().for_each(|w| w.extend(chars.next())),
                        c if c.is_whitespace() => words.push(String::new()),
                        c => words.last_mut().into_iter().for_each(|w| w.push(c)),
                    }
                }
                let mut it = words.into_iter().filter(|w| !w.is_empty());
                while let Some(w) = it.next() {
                    let setting = if w == "-c" {
                        it.next()
                    } else {
                        w.strip_prefix("-c").or_else(|| w.strip_prefix("--")).map(str::to_string)
                    };
                    match setting.as_deref().and_then(|s| s.split_once('=')) {
                        Some((name, value)) => {
                            out.push((name.replace('-', "_").to_ascii_lowercase(), value.to_string()))
                        }
                        None => opaque = true,
                    }
                }
            }
            _ => out.push((k.to_ascii_lowercase(), v.clone())),
        }
    }
    (out, opaque)
}

/// What the answers being relayed reflect (every commit up to an LSN, for the
/// rows they read): what a fill is filed at, and what a client that asked
/// is told (`protocol::ANSWER_LSN`: a postai proxy downstream, which must
/// file an answer from this proxy's cache at what that entry reflects, not
/// at the primary's current position).
#[derive(Debug, Default)]
pub(super) struct Answers {
    /// The client asked to be told.
    pub tell: bool,
    /// If PostgreSQL itself answers: a lower bound of its snapshot, taken
    /// before the request was sent (the primary's LSN seen, a replica's replay).
    pub floor: Option<Lsn>,
    /// The upstream is a postai proxy: only its word counts.
    upstream_tells: bool,
    /// What it told for the answer being relayed.
    told: Option<Lsn>,
    /// What the last relayed answer reflects; `None`: unknown (not filed).
    pub at: Option<Lsn>,
}

impl Answers {
    /// `tell`: the client asked to be told.
    pub fn new(tell: bool) -> Answers {
        Answers { tell, ..Answers::default() }
    }

    /// A relay starts, on a connection to a postai proxy (`tells`) or not.
    pub fn start(&mut self, tells: bool) {
        self.upstream_tells = tells;
        self.told = None;
        self.at = None;
    }

    /// The upstream's word on the answer being relayed (`None`: unreadable).
    pub fn told(&mut self, lsn: Option<Lsn>) {
        self.told = lsn;
    }

    /// The relay's ReadyForQuery: what its answers reflect.
    pub fn end(&mut self) -> Option<Lsn> {
        let floor = self.floor.take();
        self.at = if self.upstream_tells { self.told.take() } else { floor };
        self.at
    }

    /// Tells `at` to a client that asked, in `out` (before a ReadyForQuery).
    pub fn tell(&self, out: &mut BytesMut, at: Option<Lsn>) {
        if self.tell
            && let Some(l) = at
        {
            out.extend_from_slice(&protocol::parameter_status(protocol::ANSWER_LSN, &postai_core::stream::fmt_lsn(l)));
        }
    }
}

/// What the primary answered, for the node: the encoded messages it sent.
pub(super) fn primary_reply(value: Value, snapshot: Lsn, commit_lsn: Option<Lsn>) -> UpstreamReply<Value> {
    let size_bytes = u32::try_from(value.len()).unwrap_or(u32::MAX);
    UpstreamReply { value, size_bytes, served: Served::Primary, snapshot_lsn: snapshot, commit_lsn, ttl: None }
}

/// A ParameterStatus message's name and value.
pub(super) fn parameter_status(m: &Message) -> Option<(String, String)> {
    let b = m.body();
    let end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(end + 1..)?;
    let vend = rest.iter().position(|c| *c == 0)?;
    Some((String::from_utf8(b[..end].to_vec()).ok()?, String::from_utf8(rest[..vend].to_vec()).ok()?))
}

/// The statement a Bind message binds.
pub(super) fn bind_statement(m: &Message) -> Option<&str> {
    let b = m.body();
    let portal_end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(portal_end + 1..)?;
    std::str::from_utf8(&rest[..rest.iter().position(|c| *c == 0)?]).ok()
}

/// The parameter type OIDs a Parse declares (0: unspecified).
pub(super) fn parse_param_types(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let name_end = b.iter().position(|c| *c == 0)?;
    let q = b.get(name_end + 1..)?;
    let at = name_end + 1 + q.iter().position(|c| *c == 0)? + 1;
    let n = i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?);
    (0..n.max(0) as usize)
        .map(|i| Some(u32::from_be_bytes(b.get(at + 2 + 4 * i..at + 6 + 4 * i)?.try_into().ok()?)))
        .collect()
}

/// The type OIDs of a ParameterDescription.
pub(super) fn parameter_description(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let n = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    (0..n.max(0) as usize).map(|i| Some(u32::from_be_bytes(b.get(2 + 4 * i..6 + 4 * i)?.try_into().ok()?))).collect()
}

/// A binary-format parameter in PostgreSQL's text output form, for the types
/// whose text form is what the CDC stream prints for keys (integers, text,
/// uuid, bool); `None` for the others (the batch is relayed, not cached).
pub(super) fn binary_param_as_text(oid: u32, v: &[u8]) -> Option<Vec<u8>> {
    const BOOL: u32 = 16;
    const NAME: u32 = 19;
    const INT8: u32 = 20;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const OID: u32 = 26;
    const VARCHAR: u32 = 1043;
    const UUID: u32 = 2950;
    Some(match oid {
        INT2 => i16::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        INT4 => i32::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        INT8 => i64::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        OID => u32::from_be_bytes(v.try_into().ok()?).to_string().into_bytes(),
        TEXT | VARCHAR | NAME => {
            std::str::from_utf8(v).ok()?;
            v.to_vec()
        }
        BOOL => match v {
            [0] => b"false".to_vec(),
            [1] => b"true".to_vec(),
            _ => return None,
        },
        UUID => {
            let b: [u8; 16] = v.try_into().ok()?;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]).into_bytes()
        }
        _ => return None,
    })
}

/// The statement name and query text of a Parse message.
pub(super) fn parse_message(m: &Message) -> Option<(String, String)> {
    let body = m.body();
    let name_end = body.iter().position(|b| *b == 0)?;
    let name = String::from_utf8(body[..name_end].to_vec()).ok()?;
    let rest = body.get(name_end + 1..)?;
    let q_end = rest.iter().position(|b| *b == 0)?;
    Some((name, String::from_utf8(rest[..q_end].to_vec()).ok()?))
}

/// RowDescription + DataRows + CommandComplete for a two-column text result.
pub fn text_result(columns: &[&str], rows: &[Vec<String>], tag: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let mut body = BytesMut::new();
    body.put_i16(columns.len() as i16);
    for c in columns {
        body.put_slice(c.as_bytes());
        body.put_u8(0);
        body.put_i32(0); // table oid
        body.put_i16(0); // column
        body.put_i32(25); // text
        body.put_i16(-1);
        body.put_i32(-1);
        body.put_i16(0); // text format
    }
    frame_into(&mut out, b'T', &body);
    for row in rows {
        let mut body = BytesMut::new();
        body.put_i16(row.len() as i16);
        for v in row {
            body.put_i32(v.len() as i32);
            body.put_slice(v.as_bytes());
        }
        frame_into(&mut out, b'D', &body);
    }
    let mut cc = BytesMut::new();
    cc.put_slice(tag.as_bytes());
    cc.put_u8(0);
    frame_into(&mut out, b'C', &cc);
    out
}

pub(super) fn frame_into(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

//! Fields of the messages the proxy reads rather than relays: Parse, Bind,
//! ParameterDescription, ParameterStatus; binary parameters as text; the
//! settings a StartupMessage makes.

use crate::protocol::Message;

pub const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];

pub const BIND_COMPLETE: [u8; 5] = [b'2', 0, 0, 0, 4];

pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// Per parameter: 0 text, 1 binary (Bind's format codes, expanded).
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Vec<u8>>>,
    pub result_formats: Vec<u8>,
}

/// Bind: portal, statement, parameter formats, parameters, result formats.
pub fn parse_bind(m: &Message) -> Option<Bind> {
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
    // counts are unsigned, as PostgreSQL reads them (up to 65535 parameters)
    let count_at = |at: &mut usize| i16_at(at).map(|n| usize::from(n as u16));
    let portal = cstr(&mut at)?;
    let statement = cstr(&mut at)?;
    let nformats = count_at(&mut at)?;
    let mut formats = Vec::with_capacity(nformats);
    for _ in 0..nformats {
        formats.push(i16_at(&mut at)?);
    }
    let nparams = count_at(&mut at)?;
    let param_formats: Vec<i16> = match formats.len() {
        0 => vec![0; nparams],
        1 => vec![formats[0]; nparams],
        n if n == nparams => formats,
        // as PostgreSQL refuses it: the formats name another count
        _ => return None,
    };
    let mut params = Vec::with_capacity(nparams);
    for _ in 0..nparams {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len == -1 {
            params.push(None);
        } else if len < 0 {
            // PostgreSQL refuses any other negative length
            return None;
        } else {
            params.push(Some(b.get(at..at + len as usize)?.to_vec()));
            at += len as usize;
        }
    }
    let nresults = count_at(&mut at)?;
    if b.len() != at + 2 * nresults {
        // PostgreSQL refuses a Bind with bytes missing or left over
        return None;
    }
    let result_formats = b.get(at..)?.to_vec();
    Some(Bind { portal, statement, param_formats, params, result_formats })
}

/// The `application_name` among startup parameters (`""` without one, as
/// PostgreSQL's default).
pub fn application_name(params: &[(String, String)]) -> &str {
    params.iter().find(|(k, _)| k == "application_name").map_or("", |(_, v)| v.as_str())
}

/// The settings a client's startup parameters make (names lower-case), and
/// whether `options` held something else (the session is then private).
pub fn startup_settings(params: &[(String, String)]) -> (Vec<(String, String)>, bool) {
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

/// A ParameterStatus message's name and value.
pub fn parameter_status(m: &Message) -> Option<(String, String)> {
    let b = m.body();
    let end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(end + 1..)?;
    let vend = rest.iter().position(|c| *c == 0)?;
    Some((String::from_utf8(b[..end].to_vec()).ok()?, String::from_utf8(rest[..vend].to_vec()).ok()?))
}

/// The statement a Bind message binds.
pub fn bind_statement(m: &Message) -> Option<&str> {
    let b = m.body();
    let portal_end = b.iter().position(|c| *c == 0)?;
    let rest = b.get(portal_end + 1..)?;
    std::str::from_utf8(&rest[..rest.iter().position(|c| *c == 0)?]).ok()
}

/// The parameter type OIDs a Parse declares (0: unspecified).
pub fn parse_param_types(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let name_end = b.iter().position(|c| *c == 0)?;
    let q = b.get(name_end + 1..)?;
    let at = name_end + 1 + q.iter().position(|c| *c == 0)? + 1;
    let n = u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?);
    (0..usize::from(n))
        .map(|i| Some(u32::from_be_bytes(b.get(at + 2 + 4 * i..at + 6 + 4 * i)?.try_into().ok()?)))
        .collect()
}

/// The type OIDs of a ParameterDescription.
pub fn parameter_description(m: &Message) -> Option<Vec<u32>> {
    let b = m.body();
    let n = u16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    (0..usize::from(n)).map(|i| Some(u32::from_be_bytes(b.get(2 + 4 * i..6 + 4 * i)?.try_into().ok()?))).collect()
}

/// A binary-format parameter in PostgreSQL's text output form, for the types
/// whose text form is what the CDC stream prints for keys (integers, text,
/// uuid, bool); `None` for the others (the batch is relayed, not cached).
pub fn binary_param_as_text(oid: u32, v: &[u8]) -> Option<Vec<u8>> {
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
pub fn parse_message(m: &Message) -> Option<(String, String)> {
    let body = m.body();
    let name_end = body.iter().position(|b| *b == 0)?;
    let name = String::from_utf8(body[..name_end].to_vec()).ok()?;
    let rest = body.get(name_end + 1..)?;
    let q_end = rest.iter().position(|b| *b == 0)?;
    Some((name, String::from_utf8(rest[..q_end].to_vec()).ok()?))
}

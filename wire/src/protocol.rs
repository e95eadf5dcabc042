//! PostgreSQL wire protocol framing, by hand: the proxy relays upstream
//! messages byte for byte and caches them encoded, so it needs framing and a
//! few fields, not a full codec. Every decoder returns an error on bad input;
//! none panics (a proptest feeds it arbitrary bytes).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
pub const PROTOCOL_3: i32 = 196_608;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("unsupported protocol version {0}")]
    Version(i32),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("unknown message type {0:?}")]
    UnknownType(char),
}

/// The first message of a connection (untyped).
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Params(Vec<(String, String)>),
}

/// One typed message: its tag and its whole encoding (tag, length, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub raw: Bytes,
}

impl Message {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Decodes a startup-phase message from `buf`, if complete.
pub fn decode_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Startup>, ProtocolError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::BadLength(len));
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge(len, max));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut msg = buf.split_to(len);
    msg.advance(4);
    let code = msg.get_i32();
    match code {
        SSL_REQUEST => Ok(Some(Startup::Ssl)),
        GSSENC_REQUEST => Ok(Some(Startup::GssEnc)),
        CANCEL_REQUEST => {
            if msg.len() < 8 {
                return Err(ProtocolError::Malformed("CancelRequest"));
            }
            Ok(Some(Startup::Cancel { pid: msg.get_i32(), key: msg.get_i32() }))
        }
        PROTOCOL_3 => {
            let mut params = Vec::new();
            let mut rest = &msg[..];
            loop {
                let name = cstr(&mut rest).ok_or(ProtocolError::Malformed("StartupMessage"))?;
                if name.is_empty() {
                    break;
                }
                let value = cstr(&mut rest).ok_or(ProtocolError::Malformed("StartupMessage"))?;
                params.push((name, value));
            }
            Ok(Some(Startup::Params(params)))
        }
        v => Err(ProtocolError::Version(v)),
    }
}

/// Frontend (client) message tags the proxy understands.
pub const FRONTEND_TAGS: &[u8] = b"QPBDESHCXpfdc";
/// Backend message tags a PostgreSQL 15 server sends.
pub const BACKEND_TAGS: &[u8] = b"RSKZTDCEINAtn123sGHWdcv";

/// Decodes one typed message from `buf`, if complete. `tags` lists the
/// accepted message types.
pub fn decode(buf: &mut BytesMut, max: usize, tags: &[u8]) -> Result<Option<Message>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    if !tags.contains(&tag) {
        return Err(ProtocolError::UnknownType(tag as char));
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(ProtocolError::TooLarge(total, max));
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Message { tag, raw: buf.split_to(total).freeze() }))
}

fn cstr(rest: &mut &[u8]) -> Option<String> {
    let end = rest.iter().position(|b| *b == 0)?;
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    *rest = &rest[end + 1..];
    Some(s)
}

/// The SQL text of a Query message.
pub fn query_text(m: &Message) -> Result<String, ProtocolError> {
    let mut body = m.body();
    cstr(&mut body).ok_or(ProtocolError::Malformed("Query"))
}

/// Whether a Query message's text is UTF-8 (another client encoding may send
/// bytes that are not; read lossily they would look like other text).
pub fn query_is_utf8(m: &Message) -> bool {
    let body = m.body();
    body.iter().position(|b| *b == 0).is_some_and(|end| std::str::from_utf8(&body[..end]).is_ok())
}

/// The transaction status of a ReadyForQuery message (`I`, `T` or `E`).
pub fn ready_status(m: &Message) -> Option<u8> {
    (m.tag == b'Z').then(|| m.body().first().copied()).flatten()
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b.freeze()
}

pub fn ready_for_query(status: u8) -> Bytes {
    frame(b'Z', &[status])
}

/// An ErrorResponse with severity, SQLSTATE and message.
/// A ParameterStatus message.
pub fn parameter_status(name: &str, value: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(name.len() + value.len() + 7);
    b.put_u8(b'S');
    b.put_i32((name.len() + value.len() + 6) as i32);
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(value.as_bytes());
    b.put_u8(0);
    b.freeze()
}

/// The protocol option a postai proxy sends in its StartupMessage: "tell me
/// what each answer reflects". PostgreSQL answers an option it does not know
/// (`_pq_.*`) with NegotiateProtocolVersion and goes on without it; a postai
/// proxy answers with a ParameterStatus [`ANSWER_LSN`] = `on`.
pub const ANSWER_LSN_OPTION: &str = "_pq_.postai_answer_lsn";

/// The ParameterStatus a postai proxy sends before each ReadyForQuery to a
/// client that asked ([`ANSWER_LSN_OPTION`]): every commit up to this LSN
/// is reflected in the answers since the last ReadyForQuery (for the rows
/// they read). No such message: the proxy cannot vouch for them, and they
/// are not cached downstream.
pub const ANSWER_LSN: &str = "postai.answer_lsn";

pub fn error_response(severity: &str, code: &str, message: &str) -> Bytes {
    let mut body = Vec::new();
    for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    frame(b'E', &body)
}

/// A simple query message for `sql`.
pub fn query(sql: &str) -> Bytes {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    frame(b'Q', &body)
}

/// A startup message with protocol 3.0 and `params`.
pub fn startup(params: &[(String, String)]) -> Result<Bytes, ProtocolError> {
    // a NUL inside a key or value (or an empty key) would end the list
    // early or add parameters of the writer's choosing (`database` again)
    if params.iter().any(|(k, v)| k.is_empty() || k.contains('\0') || v.contains('\0')) {
        return Err(ProtocolError::Malformed("startup (a parameter holds a NUL)"));
    }
    let mut body = BytesMut::new();
    body.put_i32(0);
    body.put_i32(PROTOCOL_3);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let len = body.len() as i32;
    body[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(body.freeze())
}

/// The text of the first column of the first DataRow in `msgs`.
pub fn first_value(msgs: &[Message]) -> Option<String> {
    let row = msgs.iter().find(|m| m.tag == b'D')?;
    let mut b = row.body();
    if b.len() < 6 {
        return None;
    }
    b.advance(2);
    let len = b.get_i32();
    if len < 0 || b.len() < len as usize {
        return None;
    }
    String::from_utf8(b[..len as usize].to_vec()).ok()
}

/// Every column of a DataRow as text (`None` for NULL); `None` if malformed.
pub fn text_columns(row: &Message) -> Option<Vec<Option<String>>> {
    let b = row.body();
    let n = i16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut at = 2usize;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = b.get(at..at + len as usize)?;
        at += len as usize;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Some(out)
}

/// A ParameterStatus message's name.
pub fn parameter_name(m: &Message) -> Option<&[u8]> {
    let b = m.body();
    b.get(..b.iter().position(|c| *c == 0)?)
}

/// The M (message) field of an ErrorResponse.
pub fn error_message(m: &Message) -> String {
    let mut fields = m.body();
    while let Some((&field, rest)) = fields.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        if field == b'M' {
            return String::from_utf8_lossy(&rest[..end]).into_owned();
        }
        fields = rest.get(end + 1..).unwrap_or(&[]);
    }
    "error".into()
}

/// Appends one typed message (`tag`, length, `body`) to `out`.
pub fn frame_into(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    postai_core::stream::parse_lsn(s).map(|l| l.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn startup_round_trip() {
        let params = vec![("user".to_string(), "app".to_string()), ("database".to_string(), "db".to_string())];
        let mut buf = BytesMut::from(&startup(&params).expect("valid")[..]);
        assert_eq!(decode_startup(&mut buf, 1 << 20), Ok(Some(Startup::Params(params))));
        assert!(buf.is_empty());
    }

    /// A value with a NUL would smuggle in parameters (a second `database`,
    /// which PostgreSQL takes over the first); an empty key ends the list.
    #[test]
    fn startup_parameters_cannot_smuggle_others() {
        let p = |k: &str, v: &str| vec![("user".to_string(), "app".to_string()), (k.to_string(), v.to_string())];
        assert!(startup(&p("application_name", "x\0database\0other")).is_err());
        assert!(startup(&p("a\0b", "x")).is_err());
        assert!(startup(&p("", "x")).is_err());
        assert!(startup(&p("application_name", "ok")).is_ok());
    }

    #[test]
    fn typed_messages() {
        let mut buf = BytesMut::from(&query("select 1")[..]);
        buf.extend_from_slice(&ready_for_query(b'T'));
        let q = decode(&mut buf, 1024, FRONTEND_TAGS).expect("valid").expect("complete");
        assert_eq!(query_text(&q).as_deref(), Ok("select 1"));
        let z = decode(&mut buf, 1024, BACKEND_TAGS).expect("valid").expect("complete");
        assert_eq!(ready_status(&z), Some(b'T'));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut buf = BytesMut::from(&b"\x00\x00\x00\x02xxxx"[..]);
        assert_eq!(decode_startup(&mut buf, 1024), Err(ProtocolError::BadLength(2)));
        let mut buf = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(decode(&mut buf, 1024, FRONTEND_TAGS), Err(ProtocolError::TooLarge(..))));
        let mut buf = BytesMut::from(&b"?\x00\x00\x00\x04"[..]);
        assert_eq!(decode(&mut buf, 1024, FRONTEND_TAGS), Err(ProtocolError::UnknownType('?')));
        let mut buf = BytesMut::from(&b"\x00\x00\x00\x08\x00\x02\x00\x00"[..]);
        assert_eq!(decode_startup(&mut buf, 1024), Err(ProtocolError::Version(131072)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::from(&bytes[..]);
            let _ = decode_startup(&mut b, 1 << 16);
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(m)) = decode(&mut b, 1 << 16, FRONTEND_TAGS) {
                let _ = query_text(&m);
            }
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(m)) = decode(&mut b, 1 << 16, BACKEND_TAGS) {
                let _ = first_value(std::slice::from_ref(&m));
                let _ = ready_status(&m);
            }
        }
    }
}

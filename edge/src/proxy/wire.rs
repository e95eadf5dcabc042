//! Wire details of the client side: Bind, Parse and ParameterDescription
//! fields, binary parameters as text, startup settings, greeting and result
//! framing.

use super::*;

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

/// What the primary answered, for the node: the encoded messages it sent.
pub(super) fn primary_reply(value: Value, snapshot: Lsn, commit_lsn: Option<Lsn>) -> UpstreamReply<Value> {
    let size_bytes = u32::try_from(value.len()).unwrap_or(u32::MAX);
    UpstreamReply { value, size_bytes, served: Served::Primary, snapshot_lsn: snapshot, commit_lsn, ttl: None }
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

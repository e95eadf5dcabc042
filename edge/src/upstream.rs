//! A message-level connection to PostgreSQL: raw frames in, raw frames out.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{self, BACKEND_TAGS, Message};

pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    max: usize,
}

impl Conn {
    pub async fn connect(addr: &str, max: usize) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: BytesMut::with_capacity(16 << 10), max })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next backend message; an error on EOF or a protocol violation.
    pub async fn recv(&mut self) -> std::io::Result<Message> {
        loop {
            match protocol::decode(&mut self.buf, self.max, BACKEND_TAGS) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "upstream closed the connection"));
            }
        }
    }

    /// Runs a simple query and returns every message up to ReadyForQuery.
    pub async fn simple(&mut self, sql: &str) -> std::io::Result<Vec<Message>> {
        self.send(&protocol::query(sql)).await?;
        let mut out = Vec::new();
        loop {
            let m = self.recv().await?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Logs in with trust authentication (the CDC connection).
    pub async fn login(addr: &str, user: &str, database: &str, max: usize) -> std::io::Result<Conn> {
        let mut c = Conn::connect(addr, max).await?;
        let params = vec![("user".to_string(), user.to_string()), ("database".to_string(), database.to_string())];
        c.send(&protocol::startup(&params)).await?;
        loop {
            let m = c.recv().await?;
            match m.tag {
                b'Z' => return Ok(c),
                b'E' => return Err(std::io::Error::other(format!("login refused: {}", error_message(&m)))),
                b'R' if m.body().get(..4) != Some(&[0, 0, 0, 0]) => {
                    return Err(std::io::Error::other("the CDC connection needs trust authentication"));
                }
                _ => {}
            }
        }
    }
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

pub type Raw = Bytes;

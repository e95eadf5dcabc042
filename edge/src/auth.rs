//! Client authentication at the proxy: the server side of SCRAM-SHA-256
//! (RFC 5802, RFC 7677) as PostgreSQL speaks it, with `tls-server-end-point`
//! channel binding (SCRAM-SHA-256-PLUS) on TLS connections.
//!
//! Sans-IO: [`ScramServer`] turns the client's SASL messages into the server's
//! answers; the driver in `frontend.rs` moves the bytes. Every parser returns
//! an error on bad input; none panics (a proptest feeds them arbitrary bytes).

use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The prefix of a PostgreSQL SCRAM verifier (`pg_authid.rolpassword`).
pub const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
/// PostgreSQL's limit on one SASL message (`PG_MAX_AUTH_TOKEN_LENGTH`).
pub const MAX_AUTH_MESSAGE: usize = 65_535;
/// The iteration count of verifiers made from plaintext passwords (PostgreSQL's default).
pub const DEFAULT_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;
/// Random bytes of the server's nonce (PostgreSQL uses 18).
const NONCE_LEN: usize = 18;
/// Iteration counts above this are refused in verifiers (a CPU bomb per login).
const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The client broke the protocol (SQLSTATE 08P01).
    #[error("malformed SCRAM exchange: {0}")]
    Malformed(&'static str),
    /// Channel binding does not match what was negotiated (SQLSTATE 08P01).
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelBinding(&'static str),
    /// Wrong password or unknown user: the same answer (SQLSTATE 28P01).
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    /// A verifier in the configuration does not parse.
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    Verifier(&'static str),
}

impl AuthError {
    /// The SQLSTATE of the ErrorResponse the client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            AuthError::Verifier(_) => "28000",
            AuthError::Malformed(_) | AuthError::ChannelBinding(_) => "08P01",
        }
    }
}

/// What the server keeps of a password: salt, iterations, StoredKey, ServerKey.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length: the error case cannot happen
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { return [0; 32] };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PBKDF2-HMAC-SHA-256 with one block (SCRAM's `Hi`).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut prev = hmac(password, &[salt, &[0, 0, 0, 1]]);
    let mut out = prev;
    for _ in 1..iterations {
        prev = hmac(password, &[&prev]);
        for (o, p) in out.iter_mut().zip(prev) {
            *o ^= p;
        }
    }
    out
}

/// SASLprep as PostgreSQL applies it: a password that is not UTF-8 or that
/// SASLprep refuses is used as its bytes.
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

impl ScramSecret {
    /// The secret of a plaintext password, with a random salt.
    pub fn from_password(password: &str) -> ScramSecret {
        ScramSecret::from_password_salt(password, &random_bytes::<SALT_LEN>(), DEFAULT_ITERATIONS)
    }

    pub fn from_password_salt(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = hi(&normalize(password), salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (base64), the form of `pg_authid.rolpassword`.
    pub fn parse_verifier(s: &str) -> Result<ScramSecret, AuthError> {
        let rest = s.strip_prefix(VERIFIER_PREFIX).ok_or(AuthError::Verifier("it must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(AuthError::Verifier("expected <iterations>:<salt>$<keys>"))?;
        let (iter, salt) = params.split_once(':').ok_or(AuthError::Verifier("expected <iterations>:<salt>"))?;
        let (stored, server) = keys.split_once(':').ok_or(AuthError::Verifier("expected <StoredKey>:<ServerKey>"))?;
        let iterations: u32 = iter.parse().map_err(|_| AuthError::Verifier("the iteration count is not a number"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(AuthError::Verifier("the iteration count is out of range"));
        }
        let salt = STANDARD.decode(salt).map_err(|_| AuthError::Verifier("the salt is not base64"))?;
        if salt.is_empty() {
            return Err(AuthError::Verifier("the salt is empty"));
        }
        let key = |k: &str| -> Result<[u8; 32], AuthError> {
            let v = STANDARD.decode(k).map_err(|_| AuthError::Verifier("a key is not base64"))?;
            v.try_into().map_err(|_| AuthError::Verifier("a key is not 32 bytes"))
        };
        Ok(ScramSecret { iterations, salt, stored_key: key(stored)?, server_key: key(server)? })
    }

    /// A secret no password matches, the same for the same user name across
    /// attempts: unknown users get an exchange that looks like a real one.
    pub fn mock(user: &str) -> ScramSecret {
        static KEY: OnceLock<[u8; 32]> = OnceLock::new();
        let key = KEY.get_or_init(random_bytes::<32>);
        let salt = hmac(key, &[b"salt", user.as_bytes()]);
        ScramSecret {
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..SALT_LEN].to_vec(),
            stored_key: hmac(key, &[b"stored", user.as_bytes()]),
            server_key: hmac(key, &[b"server", user.as_bytes()]),
        }
    }
}

/// Whether a configured password is a SCRAM verifier (else plaintext).
pub fn is_verifier(password: &str) -> bool {
    password.starts_with(VERIFIER_PREFIX)
}

/// Whether a configured password looks like an MD5 hash (`md5` + 32 hex).
pub fn is_md5_hash(password: &str) -> bool {
    password.len() == 35 && password.starts_with("md5") && password[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

enum State {
    Initial,
    SentFirst {
        client_first_bare: String,
        server_first: String,
        /// The full nonce (client's then server's).
        nonce: String,
        /// What `c=` must decode to: the GS2 header, then the channel-binding data.
        cbind_input: Vec<u8>,
    },
    Done,
}

/// One SCRAM-SHA-256 exchange, server side.
pub struct ScramServer {
    user: String,
    secret: ScramSecret,
    /// `false`: an unknown user; the exchange runs and fails at the proof.
    known: bool,
    /// `tls-server-end-point` data: the connection is TLS and offers -PLUS.
    channel_binding: Option<Vec<u8>>,
    state: State,
}

impl ScramServer {
    /// `secret`: the user's, or `None` for an unknown user. `channel_binding`:
    /// the certificate hash on a TLS connection (offers SCRAM-SHA-256-PLUS);
    /// `None` on plaintext connections (libpq refuses -PLUS there).
    pub fn new(user: &str, secret: Option<&ScramSecret>, channel_binding: Option<&[u8]>) -> ScramServer {
        ScramServer {
            user: user.to_string(),
            secret: secret.cloned().unwrap_or_else(|| ScramSecret::mock(user)),
            known: secret.is_some(),
            channel_binding: channel_binding.map(<[u8]>::to_vec),
            state: State::Initial,
        }
    }

    /// The mechanisms to offer, preferred first.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() { &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256] } else { &[SCRAM_SHA_256] }
    }

    /// The AuthenticationSASL message for [`Self::mechanisms`].
    pub fn sasl_request(&self) -> Bytes {
        let mut body = BytesMut::new();
        body.put_i32(10);
        for m in self.mechanisms() {
            body.put_slice(m.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        frame(b'R', &body)
    }

    /// The client-first-message (from SASLInitialResponse): returns the
    /// server-first-message.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<String, AuthError> {
        if !matches!(self.state, State::Initial) {
            return Err(AuthError::Malformed("unexpected SASLInitialResponse"));
        }
        self.state = State::Done;
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if self.channel_binding.is_some() => true,
            _ => return Err(AuthError::Malformed("the client selected an invalid SASL authentication mechanism")),
        };
        let text = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("client-first-message is not UTF-8"))?;
        // gs2-header: gs2-cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or(AuthError::Malformed("missing GS2 header"))?;
        match flag {
            "n" if plus => {
                return Err(AuthError::ChannelBinding("SCRAM-SHA-256-PLUS selected without channel binding"));
            }
            "n" => {}
            // the client supports channel binding and thinks the server does not
            "y" if self.channel_binding.is_some() => {
                return Err(AuthError::ChannelBinding("the client thinks the server does not support channel binding"));
            }
            "y" if plus => {
                return Err(AuthError::ChannelBinding("SCRAM-SHA-256-PLUS selected without channel binding"));
            }
            "y" => {}
            "p=tls-server-end-point" if plus => {}
            _ if flag.starts_with("p=") && !plus => {
                return Err(AuthError::ChannelBinding("channel binding data sent with SCRAM-SHA-256 (not -PLUS)"));
            }
            _ if flag.starts_with("p=") => return Err(AuthError::ChannelBinding("unsupported channel binding type")),
            _ => return Err(AuthError::Malformed("unexpected channel-binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(AuthError::Malformed("missing GS2 header"))?;
        if !authzid.is_empty() {
            return Err(AuthError::Malformed("authorization identities are not supported"));
        }
        let gs2_header = &text[..text.len() - bare.len()];
        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(AuthError::Malformed("mandatory SCRAM extensions are not supported"));
        }
        if !user.starts_with("n=") {
            return Err(AuthError::Malformed("expected the user name attribute"));
        }
        // the user name is the startup packet's, as in PostgreSQL
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(AuthError::Malformed("expected the nonce attribute"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(AuthError::Malformed("invalid nonce"));
        }
        let mut cbind_input = gs2_header.as_bytes().to_vec();
        if plus {
            cbind_input.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
        }
        let nonce = format!("{client_nonce}{}", STANDARD.encode(random_bytes::<NONCE_LEN>()));
        let server_first = format!("r={nonce},s={},i={}", STANDARD.encode(&self.secret.salt), self.secret.iterations);
        self.state = State::SentFirst {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            cbind_input,
        };
        Ok(server_first)
    }

    /// The client-final-message (from SASLResponse): checks the proof and
    /// returns the server-final-message (`v=` signature).
    pub fn client_final(&mut self, data: &[u8]) -> Result<String, AuthError> {
        let State::SentFirst { client_first_bare, server_first, nonce, cbind_input } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(AuthError::Malformed("unexpected SASLResponse"));
        };
        let text = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("client-final-message is not UTF-8"))?;
        // c=<cbind>,r=<nonce>[,extensions],p=<proof>: the proof is last
        let (without_proof, proof) =
            text.rsplit_once(",p=").ok_or(AuthError::Malformed("expected the proof attribute"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(AuthError::Malformed("expected the channel binding attribute"))?;
        let cbind = STANDARD.decode(cbind).map_err(|_| AuthError::Malformed("channel binding is not base64"))?;
        if !bool::from(cbind[..].ct_eq(&cbind_input[..])) {
            return Err(AuthError::ChannelBinding("the channel binding data does not match"));
        }
        let r = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(AuthError::Malformed("expected the nonce"))?;
        if r != nonce {
            return Err(AuthError::Malformed("the nonce does not match"));
        }
        let proof = STANDARD.decode(proof).map_err(|_| AuthError::Malformed("the proof is not base64"))?;
        let proof: [u8; 32] = proof.try_into().map_err(|_| AuthError::Malformed("the proof is not 32 bytes"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let matches: bool = sha256(&client_key)[..].ct_eq(&self.secret.stored_key[..]).into();
        if !(matches && self.known) {
            return Err(AuthError::Failed(self.user.clone()));
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

/// SASLInitialResponse body: the mechanism and the client-first-message.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), AuthError> {
    let end = body.iter().position(|b| *b == 0).ok_or(AuthError::Malformed("SASLInitialResponse"))?;
    let mechanism = std::str::from_utf8(&body[..end]).map_err(|_| AuthError::Malformed("SASLInitialResponse"))?;
    let rest = &body[end + 1..];
    let len = rest.get(..4).ok_or(AuthError::Malformed("SASLInitialResponse"))?;
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let data = &rest[4..];
    if usize::try_from(len).ok() != Some(data.len()) {
        return Err(AuthError::Malformed("SASLInitialResponse length"));
    }
    Ok((mechanism, data))
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    b.put_slice(body);
    b.freeze()
}

fn authentication(code: i32, data: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(data.len() + 4);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(data);
    frame(b'R', &body)
}

pub fn authentication_ok() -> Bytes {
    authentication(0, &[])
}

pub fn sasl_continue(server_first: &str) -> Bytes {
    authentication(11, server_first.as_bytes())
}

pub fn sasl_final(server_final: &str) -> Bytes {
    authentication(12, server_final.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use proptest::prelude::*;

    /// postgres-protocol's client against this server: the final result.
    fn exchange(secret: Option<&ScramSecret>, password: &str, cb: Option<&[u8]>) -> Result<(), AuthError> {
        let mut server = ScramServer::new("app", secret, cb);
        let (mechanism, binding) = match cb {
            Some(data) => (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(data.to_vec())),
            None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
        };
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let first = server.client_first(mechanism, client.message())?;
        client.update(first.as_bytes()).expect("client accepts server-first");
        let last = server.client_final(client.message())?;
        client.finish(last.as_bytes()).expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn right_password_succeeds_wrong_fails() {
        let secret = ScramSecret::from_password("s3cret");
        assert_eq!(exchange(Some(&secret), "s3cret", None), Ok(()));
        assert_eq!(exchange(Some(&secret), "wrong", None), Err(AuthError::Failed("app".into())));
        // unknown user: the same error, even with the "right" password
        assert_eq!(exchange(None, "s3cret", None), Err(AuthError::Failed("app".into())));
        // channel binding (SCRAM-SHA-256-PLUS)
        assert_eq!(exchange(Some(&secret), "s3cret", Some(&[7; 32])), Ok(()));
        assert_eq!(exchange(Some(&secret), "nope", Some(&[7; 32])), Err(AuthError::Failed("app".into())));
    }

    #[test]
    fn verifiers_from_postgres_protocol_parse_and_work() {
        let v = postgres_protocol::password::scram_sha_256(b"pa ss");
        let secret = ScramSecret::parse_verifier(&v).expect("a verifier parses");
        assert_eq!(secret.iterations, 4096);
        assert_eq!(exchange(Some(&secret), "pa ss", None), Ok(()));
        assert!(exchange(Some(&secret), "pass", None).is_err());
        // the same salt gives the same keys as a plaintext password
        let same = ScramSecret::from_password_salt("pa ss", &secret.salt, secret.iterations);
        assert_eq!(same, secret);
        assert!(is_verifier(&v));
        assert!(!is_verifier("plain"));
        assert!(is_md5_hash("md5d41d8cd98f00b204e9800998ecf8427e"));
    }

    #[test]
    fn garbage_verifiers_are_errors() {
        for bad in [
            "",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$x:c2FsdA==$a:b",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-1$4096:c2FsdA==$AAAA:AAAA",
        ] {
            assert!(matches!(ScramSecret::parse_verifier(bad), Err(AuthError::Verifier(_))), "{bad:?}");
        }
    }

    #[test]
    fn negotiation_errors() {
        let secret = ScramSecret::from_password("pw");
        // -PLUS is offered only with channel binding data
        let mut s = ScramServer::new("app", Some(&secret), None);
        assert_eq!(s.mechanisms(), &[SCRAM_SHA_256]);
        assert!(s.client_first(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=abc").is_err());
        // 'y' when the server offers channel binding: a downgrade
        let mut s = ScramServer::new("app", Some(&secret), Some(&[1; 32]));
        assert!(matches!(s.client_first(SCRAM_SHA_256, b"y,,n=,r=abc"), Err(AuthError::ChannelBinding(_))));
        // 'y' without channel binding on offer is fine
        let mut s = ScramServer::new("app", Some(&secret), None);
        assert!(s.client_first(SCRAM_SHA_256, b"y,,n=,r=abc").is_ok());
        // messages out of order
        assert!(s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());
        let mut s = ScramServer::new("app", Some(&secret), None);
        assert!(s.client_final(b"c=biws,r=abc,p=AAAA").is_err());
        // wrong nonce in the final message
        let mut s = ScramServer::new("app", Some(&secret), None);
        s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").expect("first");
        let proof = STANDARD.encode([0u8; 32]);
        assert_eq!(
            s.client_final(format!("c=biws,r=abcX,p={proof}").as_bytes()),
            Err(AuthError::Malformed("the nonce does not match"))
        );
    }

    #[test]
    fn sasl_initial_response_parses() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(parse_sasl_initial(&body), Ok((SCRAM_SHA_256, &b"abc"[..])));
        body.push(b'x');
        assert!(parse_sasl_initial(&body).is_err());
        assert!(parse_sasl_initial(b"SCRAM").is_err());
        assert!(parse_sasl_initial(b"SCRAM\0\xff\xff\xff\xff").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_sasl_messages_never_panic(
            initial in proptest::collection::vec(any::<u8>(), 0..96),
            first in proptest::collection::vec(any::<u8>(), 0..96),
            last in "(c=[a-zA-Z0-9=]{0,8},)?(r=[!-~]{0,12},)?(p=[a-zA-Z0-9+/=]{0,50})?[ -~]{0,8}",
            cb in any::<bool>(),
        ) {
            let _ = parse_sasl_initial(&initial);
            let _ = ScramSecret::parse_verifier(&String::from_utf8_lossy(&initial));
            let secret = ScramSecret::from_password_salt("pw", b"salt", 2);
            let binding = [3u8; 32];
            let mut s = ScramServer::new("app", Some(&secret), cb.then_some(&binding[..]));
            let mech = if cb { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
            let _ = s.client_first(mech, &first);
            let _ = s.client_final(last.as_bytes());
            // a well-formed first message, then arbitrary finals
            let mut s = ScramServer::new("app", Some(&secret), None);
            prop_assert!(s.client_first(SCRAM_SHA_256, b"n,,n=,r=nonce").is_ok());
            let _ = s.client_final(&first);
            let mut s = ScramServer::new("app", Some(&secret), None);
            let _ = s.client_first(SCRAM_SHA_256, b"n,,n=,r=nonce");
            prop_assert!(s.client_final(last.as_bytes()).is_err());
        }
    }
}

//! TLS for clients, terminated at the proxy (rustls with the ring provider),
//! and the `tls-server-end-point` channel-binding data of its certificate
//! (RFC 5929) for SCRAM-SHA-256-PLUS; TLS from the proxy to its upstreams
//! with libpq's `sslmode` choices ([`UpstreamTls`]).

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How the proxy's connections upstream use TLS: libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never: plaintext.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; the certificate is
    /// not checked.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is checked against `root_cert`
    /// when one is given (as libpq does with a root certificate file).
    Require,
    /// TLS with a certificate that chains to `root_cert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the server (`server_name`,
    /// by default the host of the address).
    VerifyFull,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: no PEM certificate in it ({1:?})")]
    Cert(String, tokio_rustls::rustls::pki_types::pem::Error),
    #[error("{0}: no PEM private key in it ({1:?})")]
    Key(String, tokio_rustls::rustls::pki_types::pem::Error),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
    #[error("mode = \"{0}\" needs root_cert: the certificate authorities the server's certificate must chain to")]
    NoRoot(&'static str),
    #[error("root_cert {0}: {1}")]
    Root(String, String),
    #[error("server_name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
}

/// The proxy's TLS server: the acceptor and the channel-binding data.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// The certificate's hash for `tls-server-end-point`; `None` when its
    /// signature algorithm names no usable hash (then -PLUS is not offered).
    pub end_point: Option<Arc<[u8]>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("channel_binding", &self.end_point.is_some()).finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads a PEM certificate chain and private key.
    pub fn load(cert_path: &str, key_path: &str) -> Result<Tls, TlsError> {
        let cert_pem = std::fs::read(cert_path).map_err(|e| TlsError::Read(cert_path.into(), e))?;
        let key_pem = std::fs::read(key_path).map_err(|e| TlsError::Read(key_path.into(), e))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Cert(cert_path.into(), e))?;
        let Some(leaf) = certs.first() else {
            return Err(TlsError::Cert(cert_path.into(), tokio_rustls::rustls::pki_types::pem::Error::NoItemsFound));
        };
        let end_point = certificate_hash(leaf).map(Arc::from);
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key(key_path.into(), e))?;
        let config = ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), end_point })
    }
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// TLS to the upstream: the `sslmode` and, unless it is `disable`, the
/// rustls client that checks what the mode says. The default is plaintext
/// (the configuration's default, `prefer`, is made by `Config::parse`).
#[derive(Clone)]
pub struct UpstreamTls {
    pub mode: SslMode,
    connector: Option<TlsConnector>,
    server_name: Option<ServerName<'static>>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls { mode: SslMode::Disable, connector: None, server_name: None }
    }
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls").field("mode", &self.mode).field("server_name", &self.server_name).finish()
    }
}

impl UpstreamTls {
    /// The client for `mode`, trusting the certificate authorities of the
    /// PEM file `root_cert`.
    pub fn load(mode: SslMode, root_cert: Option<&str>, server_name: Option<&str>) -> Result<UpstreamTls, TlsError> {
        let server_name = server_name
            .map(|n| ServerName::try_from(n.to_string()).map_err(|_| TlsError::ServerName(n.to_string())))
            .transpose()?;
        if mode == SslMode::Disable {
            return Ok(UpstreamTls { mode, connector: None, server_name });
        }
        let provider = ring();
        let roots = match root_cert {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| TlsError::Read(path.into(), e))?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| TlsError::Root(path.into(), format!("{e:?}")))?;
                    roots.add(cert).map_err(|e| TlsError::Root(path.into(), e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(TlsError::Root(path.into(), "no PEM certificate in it".into()));
                }
                Some(Arc::new(roots))
            }
        };
        let webpki = |roots: Arc<RootCertStore>| {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Root(root_cert.unwrap_or_default().into(), e.to_string()))
        };
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => webpki(roots)?,
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => {
                Arc::new(NameUnchecked { chain: Some(webpki(roots)?), algorithms })
            }
            (SslMode::VerifyFull, None) => return Err(TlsError::NoRoot("verify-full")),
            (SslMode::VerifyCa, None) => return Err(TlsError::NoRoot("verify-ca")),
            // prefer, and require without root_cert: encrypted, not authenticated (libpq's)
            _ => Arc::new(NameUnchecked { chain: None, algorithms }),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(UpstreamTls { mode, connector: Some(TlsConnector::from(Arc::new(config))), server_name })
    }

    /// The client, unless the mode is `disable`.
    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }

    /// The name the certificate of the server at `addr` (host:port) must
    /// carry: `server_name`, or the host.
    pub fn server_name(&self, addr: &str) -> Option<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Some(n.clone());
        }
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => addr,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).ok()
    }
}

/// `verify-ca` (a chain to check) and `prefer` / `require` without a root
/// certificate (none): the server's name is never checked; the handshake
/// signatures always are (they bind the session to the certificate).
#[derive(Debug)]
struct NameUnchecked {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(tokio_rustls::rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), &rest[n..])
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The `tls-server-end-point` channel-binding data of a certificate: its
/// hash with the hash of its signature algorithm, SHA-256 for MD5 and SHA-1
/// (RFC 5929 section 4.1, as PostgreSQL computes it). `None` for algorithms
/// without one (Ed25519, RSA-PSS): libpq cannot bind to those either.
pub fn certificate_hash(cert: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (tag, body, _) = der(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _tbs, rest) = der(body)?;
    let (tag, algorithm, _) = der(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, oid, _) = der(algorithm)?;
    if tag != OID {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03]; // 1.2.840.10045.4.3
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
    enum H {
        S224,
        S256,
        S384,
        S512,
    }
    let h = if let Some(n) = oid.strip_prefix(RSA) {
        match n {
            [4 | 5 | 11] => H::S256, // md5, sha1, sha256
            [14] => H::S224,
            [12] => H::S384,
            [13] => H::S512,
            _ => return None,
        }
    } else if let Some(n) = oid.strip_prefix(ECDSA_SHA2) {
        match n {
            [1] => H::S224,
            [2] => H::S256,
            [3] => H::S384,
            [4] => H::S512,
            _ => return None,
        }
    } else if oid == ECDSA_SHA1 {
        H::S256
    } else {
        return None;
    };
    Some(match h {
        H::S224 => Sha224::digest(cert).to_vec(),
        H::S256 => Sha256::digest(cert).to_vec(),
        H::S384 => Sha384::digest(cert).to_vec(),
        H::S512 => Sha512::digest(cert).to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_of_an_ecdsa_sha256_certificate() {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let der: &[u8] = c.cert.der();
        assert_eq!(certificate_hash(der), Some(Sha256::digest(der).to_vec()));
        assert_eq!(certificate_hash(&der[..der.len() / 2]), None);
        assert_eq!(certificate_hash(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(certificate_hash(b""), None);
    }

    #[test]
    fn loads_pem_files_with_clear_errors() {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let dir = std::env::temp_dir().join(format!("postai-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, c.cert.pem()).expect("cert");
        std::fs::write(&key, c.signing_key.serialize_pem()).expect("key");
        let (cert, key) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
        let tls = Tls::load(&cert, &key).expect("loads");
        assert!(tls.end_point.is_some());
        assert!(matches!(Tls::load("/no/such/cert.pem", &key), Err(TlsError::Read(..))));
        assert!(matches!(Tls::load(&key, &key), Err(TlsError::Cert(..))));
        assert!(matches!(Tls::load(&cert, &cert), Err(TlsError::Key(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

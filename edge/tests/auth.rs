//! Authentication and TLS end at the proxy: psql with SCRAM-SHA-256 over TLS
//! and plaintext, wrong passwords and unknown users refused alike, garbage in
//! the SASL exchange survived; the proxy logs in upstream with SCRAM (a role
//! whose pg_hba.conf line says scram-sha-256) or trust; cancel requests reach
//! the primary; TLS to the primary with every checking mode.

mod pg;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pg::{Pg, psql};
use postai_edge::Config;
use postai_edge::protocol::{self, BACKEND_TAGS, Message};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;

/// Starts a proxy in front of `pg` with `extra` configuration (no CDC); returns its port.
fn start_proxy_with(pg: &Pg, extra: &str) -> (u16, pg::Proxy) {
    pg::start_proxy_with(pg, &format!("[cdc]\nenabled = false\n{extra}"))
}

/// psql with a connection string and a password: (success, stdout + stderr).
fn psql_as(conninfo: &str, password: Option<&str>, sql: &str) -> (bool, String) {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-At", "-w", "-d", conninfo, "-v", "ON_ERROR_STOP=1", "-c", sql]);
    for var in ["PGPASSWORD", "PGSSLMODE", "PGCHANNELBINDING", "PGUSER", "PGDATABASE", "PGPASSFILE"] {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSFILE", "/nonexistent");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = cmd.output().expect("psql runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim_end().to_string())
}

fn conninfo(port: u16, user: &str, extra: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname=postgres {extra}")
}

/// A self-signed certificate for localhost (ECDSA P-256, SHA-256), as PEM files.
fn certificate(dir: &Path) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("certificate");
    let (cert, key) = (dir.join("proxy-cert.pem"), dir.join("proxy-key.pem"));
    std::fs::write(&cert, c.cert.pem()).expect("write cert");
    std::fs::write(&key, c.signing_key.serialize_pem()).expect("write key");
    (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned())
}

/// Roles on the primary: `app` and `carol` need SCRAM (pg_hba.conf), `postgres` is trusted.
fn setup_primary(pg: &Pg) {
    let out = psql(
        pg.port,
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE app LOGIN PASSWORD 'app-secret'; CREATE ROLE carol LOGIN PASSWORD 'carol-secret'; \
         CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c'); \
         GRANT SELECT ON t TO app, carol;",
    );
    assert!(!out.contains("ERROR"), "{out}");
    let hba = pg.dir.join("data").join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    // first match wins: these roles must authenticate with SCRAM over TCP
    std::fs::write(&hba, format!("host all app,carol 127.0.0.1/32 scram-sha-256\n{text}")).expect("write pg_hba.conf");
    assert_eq!(psql(pg.port, "SELECT pg_reload_conf()"), "t");
    // the primary itself now refuses app without its password
    let (ok, out) = psql_as(&conninfo(pg.port, "app", ""), None, "SELECT 1");
    assert!(!ok && out.contains("password"), "{out}");
    let (ok, out) = psql_as(&conninfo(pg.port, "app", ""), Some("app-secret"), "SELECT count(*) FROM t");
    assert!(ok && out == "3", "{out}");
}

// --- a raw client, for what psql cannot do ------------------------------

struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Raw { s, buf: BytesMut::new() }
    }

    fn startup(&mut self, user: &str) {
        let params = vec![("user".to_string(), user.to_string()), ("database".to_string(), "postgres".to_string())];
        self.s.write_all(&protocol::startup(&params).expect("startup")).expect("startup");
    }

    /// The next backend message; `None` at EOF.
    fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = protocol::decode(&mut self.buf, 1 << 20, BACKEND_TAGS).expect("valid backend message") {
                return Some(m);
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn auth_code(m: &Message) -> i32 {
        assert_eq!(m.tag, b'R', "an authentication request, got {:?}", m.tag as char);
        i32::from_be_bytes(m.body()[..4].try_into().expect("4 bytes"))
    }

    /// SCRAM login with postgres-protocol's client; returns BackendKeyData.
    fn login(&mut self, user: &str, password: &str) -> (i32, i32) {
        self.startup(user);
        let m = self.recv().expect("AuthenticationSASL");
        assert_eq!(Raw::auth_code(&m), 10);
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut out).expect("encode");
        self.s.write_all(&out).expect("send");
        let m = self.recv().expect("SASLContinue");
        assert_eq!(Raw::auth_code(&m), 11);
        scram.update(&m.body()[4..]).expect("server-first");
        out.clear();
        frontend::sasl_response(scram.message(), &mut out).expect("encode");
        self.s.write_all(&out).expect("send");
        let m = self.recv().expect("SASLFinal");
        assert_eq!(Raw::auth_code(&m), 12);
        scram.finish(&m.body()[4..]).expect("the proxy proves it knows the password");
        let mut key = None;
        let mut params = Vec::new();
        loop {
            let m = self.recv().expect("login messages");
            match m.tag {
                b'R' => assert_eq!(Raw::auth_code(&m), 0),
                b'S' => params.push(String::from_utf8_lossy(m.body()).into_owned()),
                b'K' => {
                    let b = m.body();
                    key = Some((
                        i32::from_be_bytes(b[..4].try_into().expect("pid")),
                        i32::from_be_bytes(b[4..8].try_into().expect("key")),
                    ));
                }
                b'Z' => break,
                other => panic!("unexpected {:?} during login", other as char),
            }
        }
        assert!(params.iter().any(|p| p.starts_with("server_version\0")), "ParameterStatus relayed: {params:?}");
        key.expect("BackendKeyData relayed")
    }
}

/// Sends `bytes` where the SASL response belongs; the proxy must answer an ErrorResponse and close.
fn garbage_in_sasl(port: u16, first: bool, bytes: &[u8]) {
    let mut c = Raw::connect(port);
    c.startup("app");
    let m = c.recv().expect("AuthenticationSASL");
    assert_eq!(Raw::auth_code(&m), 10);
    if !first {
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, b"n,,n=,r=abcdefgh", &mut out).expect("encode");
        c.s.write_all(&out).expect("send");
        let m = c.recv().expect("SASLContinue");
        assert_eq!(Raw::auth_code(&m), 11);
    }
    c.s.write_all(bytes).expect("send garbage");
    let m = c.recv().expect("an answer to garbage");
    assert_eq!(m.tag, b'E', "an ErrorResponse for {bytes:?}");
    assert!(c.recv().is_none(), "then the connection closes");
}

#[test]
fn scram_and_tls_terminate_at_the_proxy() {
    let pg = Pg::start("auth");
    setup_primary(&pg);
    let (cert, key) = certificate(&pg.dir);
    let postgres_verifier = postgres_protocol::password::scram_sha_256(b"pg-secret");
    let carol_verifier = postgres_protocol::password::scram_sha_256(b"carol-at-proxy");
    let (port, _rt) = start_proxy_with(
        &pg,
        &format!(
            "[tls]\ncert = '{cert}'\nkey = '{key}'\n\
             [[users]]\nname = 'app'\npassword = 'app-secret'\n\
             [[users]]\nname = 'postgres'\npassword = '{postgres_verifier}'\n\
             [[users]]\nname = 'carol'\npassword = '{carol_verifier}'\n"
        ),
    );

    // TLS + SCRAM (libpq picks SCRAM-SHA-256-PLUS: channel binding), upstream SCRAM as app
    let tls = conninfo(port, "app", "sslmode=require");
    let (ok, out) =
        psql_as(&tls, Some("app-secret"), "SELECT current_user || ':' || string_agg(v, ',' ORDER BY id) FROM t");
    assert!(ok && out == "app:a,b,c", "{out}");
    let (ok, out) = psql_as(&tls, Some("app-secret"), "\\conninfo");
    assert!(ok && out.contains("SSL connection"), "TLS in use: {out}");
    let (ok, out) = psql_as(&tls, Some("app-secret"), "\\echo :SERVER_VERSION_NAME");
    assert!(ok && out.starts_with(&psql(pg.port, "SHOW server_version")), "the primary's ParameterStatus: {out}");
    let (ok, out) =
        psql_as(&conninfo(port, "app", "sslmode=require channel_binding=require"), Some("app-secret"), "SELECT 1");
    assert!(ok && out == "1", "channel binding: {out}");
    let (ok, out) =
        psql_as(&conninfo(port, "app", "sslmode=require channel_binding=disable"), Some("app-secret"), "SELECT 2");
    assert!(ok && out == "2", "SCRAM over TLS without channel binding: {out}");
    // a large answer through TLS (many records, a full socket buffer)
    let (ok, out) =
        psql_as(&tls, Some("app-secret"), "SELECT repeat(md5(g::text), 40) FROM generate_series(1, 20000) g");
    assert!(ok && out.lines().count() == 20000 && out.len() > 20000 * 1280, "large result: {} bytes", out.len());

    // wrong password, unknown user: the same refusal
    let (ok, out) = psql_as(&tls, Some("wrong"), "SELECT 1");
    assert!(!ok && out.contains("password authentication failed for user \"app\""), "{out}");
    let (ok, out) = psql_as(&conninfo(port, "mallory", "sslmode=require"), Some("app-secret"), "SELECT 1");
    assert!(!ok && out.contains("password authentication failed for user \"mallory\""), "{out}");
    let (ok, out) = psql_as(&tls, None, "SELECT 1");
    assert!(!ok && out.contains("password"), "no password: {out}");

    // plaintext SCRAM (no -PLUS offered: libpq would refuse it)
    let plain = conninfo(port, "app", "sslmode=disable");
    let (ok, out) = psql_as(&plain, Some("app-secret"), "SELECT count(*) FROM t");
    assert!(ok && out == "3", "{out}");
    let (ok, out) = psql_as(&plain, Some("app-secret"), "\\conninfo");
    assert!(ok && !out.contains("SSL connection"), "{out}");
    let (ok, out) = psql_as(&plain, Some("nope"), "SELECT 1");
    assert!(!ok && out.contains("password authentication failed"), "{out}");

    // a verifier in the config; the primary trusts postgres: no password upstream
    let (ok, out) = psql_as(&conninfo(port, "postgres", "sslmode=prefer"), Some("pg-secret"), "SELECT current_user");
    assert!(ok && out == "postgres", "{out}");
    // a verifier and no upstream_password, and the primary wants one: a clear FATAL
    let (ok, out) = psql_as(&conninfo(port, "carol", "sslmode=require"), Some("carol-at-proxy"), "SELECT 1");
    assert!(!ok && out.contains("[[users]]") && out.contains("carol"), "{out}");

    // garbage instead of SASL messages: an error, the connection closes, the proxy goes on
    garbage_in_sasl(port, true, b"garbage garbage garbage");
    garbage_in_sasl(port, true, b"p\x00\x00\x00\x0aSCRAM\x00\xff");
    garbage_in_sasl(port, true, b"Q\x00\x00\x00\x0dSELECT 1\x00");
    garbage_in_sasl(port, true, b"p\x7f\xff\xff\xff");
    garbage_in_sasl(port, false, b"p\x00\x00\x00\x0ec=biws,r=x");
    garbage_in_sasl(port, false, b"p\x00\x00\x00\x08\xff\xfe\x00\x01");
    {
        // unencrypted bytes pipelined after an SSLRequest
        let mut c = Raw::connect(port);
        let mut m = BytesMut::new();
        m.put_i32(8);
        m.put_i32(protocol::SSL_REQUEST);
        m.extend_from_slice(&protocol::startup(&[("user".to_string(), "app".to_string())]).expect("startup"));
        c.s.write_all(&m).expect("send");
        let mut reply = Vec::new();
        let _ = c.s.read_to_end(&mut reply);
        assert_eq!(reply.first(), Some(&b'E'), "refused: {reply:?}");
    }
    let (ok, out) = psql_as(&tls, Some("app-secret"), "SELECT 'still serving'");
    assert!(ok && out == "still serving", "{out}");

    // pgbench over TLS with SCRAM: initialisation (COPY) and the extended protocol
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .env("PGPASSWORD", "pg-secret")
            .env("PGSSLMODE", "require")
            .output()
            .expect("pgbench runs");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, out) = pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i over TLS: {out}");
    let (ok, out) = pgbench(&["-S", "-M", "extended", "-c", "2", "-j", "1", "-t", "100", "-n"]);
    assert!(ok && out.contains("200/200"), "pgbench over TLS: {out}");
}

/// The BackendKeyData the client gets is the primary's: a CancelRequest sent
/// to the proxy cancels the query on the primary.
#[test]
fn cancel_reaches_the_primary() {
    let pg = Pg::start("auth-cancel");
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let (port, _rt) = start_proxy_with(&pg, &format!("[[users]]\nname = 'postgres'\npassword = '{verifier}'\n"));
    let mut c = Raw::connect(port);
    let (pid, key) = c.login("postgres", "pw");
    let pids = psql(pg.port, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'");
    assert!(pids.lines().any(|p| p == pid.to_string()), "the key names a primary backend: {pid} in {pids}");
    c.s.write_all(&protocol::query("SELECT pg_sleep(30)")).expect("query");
    let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'";
    assert!(pg::eventually(|| psql(pg.port, sleeping) == "1"), "the query runs on the primary");
    let started = Instant::now();
    let mut cancel = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut m = BytesMut::new();
    m.put_i32(16);
    m.put_i32(protocol::CANCEL_REQUEST);
    m.put_i32(pid);
    m.put_i32(key);
    cancel.write_all(&m).expect("cancel");
    let mut answer = Vec::new();
    while let Some(m) = c.recv() {
        answer.push(m.tag);
        if m.tag == b'E' {
            assert!(String::from_utf8_lossy(m.body()).contains("canceling statement"), "{:?}", m.body());
        }
        if m.tag == b'Z' {
            break;
        }
    }
    // RowDescription comes before pg_sleep runs; then the cancellation's error
    assert!(answer.contains(&b'E') && !answer.contains(&b'D'), "the query was cancelled: {answer:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// No [[users]]: any user name, no password; a primary that wants one gets
/// the client a FATAL naming the fix.
#[test]
fn without_users_the_upstream_decides() {
    let pg = Pg::start("auth-trust");
    setup_primary(&pg);
    let (port, _rt) = start_proxy_with(&pg, "");
    assert_eq!(psql(port, "SELECT current_user"), "postgres");
    let (ok, out) = psql_as(&conninfo(port, "app", "sslmode=disable"), Some("app-secret"), "SELECT 1");
    assert!(!ok && out.contains("[[users]]") && out.contains("password"), "{out}");
    // no [tls]: SSLRequest gets 'N' (sslmode=require fails, prefer falls back)
    let (ok, out) = psql_as(&conninfo(port, "postgres", "sslmode=require"), None, "SELECT 1");
    assert!(!ok && out.contains("SSL"), "{out}");
    let (ok, out) = psql_as(&conninfo(port, "postgres", "sslmode=prefer"), None, "SELECT 1");
    assert!(ok && out == "1", "{out}");
    // an upstream_password lets the proxy log in with SCRAM upstream
    let verifier = postgres_protocol::password::scram_sha_256(b"at-proxy");
    let (port2, _rt2) = start_proxy_with(
        &pg,
        &format!("[[users]]\nname = 'app'\npassword = '{verifier}'\nupstream_password = 'app-secret'\n"),
    );
    let (ok, out) = psql_as(&conninfo(port2, "app", "sslmode=disable"), Some("at-proxy"), "SELECT count(*) FROM t");
    assert!(ok && out == "3", "{out}");
}

#[test]
fn bad_auth_configuration_is_refused_clearly() {
    let base = "listen = '127.0.0.1:1'\nupstream = '127.0.0.1:2'\n";
    let err = |extra: &str| match Config::parse("t.toml", &format!("{base}{extra}")) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    };
    let e = err("[[users]]\nname = 'a'\npassword = 'SCRAM-SHA-256$4096:xx$yy'\n");
    assert!(e.contains("users[0]") && e.contains("verifier"), "{e}");
    let e = err("[[users]]\nname = 'a'\npassword = 'md5d41d8cd98f00b204e9800998ecf8427e'\n");
    assert!(e.contains("MD5"), "{e}");
    let e = err("[[users]]\nname = 'a'\npassword = 'x'\n[[users]]\nname = 'a'\npassword = 'y'\n");
    assert!(e.contains("twice"), "{e}");
    let e = err("[[users]]\nname = 'a'\npassword = ''\n");
    assert!(e.contains("empty"), "{e}");
    let e = err("[[users]]\nname = 'a'\npassword = 'x'\nrole = 'admin'\n");
    assert!(e.contains("unknown field"), "{e}");
    let e = err("[tls]\ncert = '/no/such/cert.pem'\nkey = '/no/such/key.pem'\n");
    assert!(e.contains("tls") && e.contains("/no/such/cert.pem"), "{e}");
    let e = err("[upstream_tls]\nmode = 'verify-full'\n");
    assert!(e.contains("upstream_tls") && e.contains("root_cert"), "{e}");
    let e = err("[upstream_tls]\nmode = 'verify-ca'\nroot_cert = '/no/such/ca.pem'\n");
    assert!(e.contains("/no/such/ca.pem"), "{e}");
    let e = err("[upstream_tls]\nmode = 'allow'\n");
    assert!(e.contains("unknown variant"), "{e}");
    let e = err("[upstream_tls]\nserver_name = 'not a name'\n");
    assert!(e.contains("server_name"), "{e}");
    let ok = Config::parse("t.toml", &format!("{base}[[users]]\nname = 'a'\npassword = 'plain'\n")).expect("parses");
    assert_eq!(ok.upstream_password("a"), Some("plain"));
    let v = postgres_protocol::password::scram_sha_256(b"p");
    let ok = Config::parse("t.toml", &format!("{base}[[users]]\nname = 'a'\npassword = '{v}'\n")).expect("parses");
    assert_eq!(ok.upstream_password("a"), None);
    assert!(!format!("{ok:?}").contains(&v), "Debug never shows passwords");
}

/// A certificate authority and a server certificate it signed for
/// `localhost` and `127.0.0.1`: (CA PEM, server certificate PEM, server key PEM).
fn authority_and_server() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params")
        .signed_by(&key, &*ca)
        .expect("server certificate");
    (ca.pem(), server.pem(), key.serialize_pem())
}

#[test]
fn tls_to_the_primary_in_every_checking_mode() {
    let pg = Pg::start("upstream-tls");
    let (ca, cert, key) = authority_and_server();
    pg.write_private("server.crt", cert.as_bytes());
    pg.write_private("server.key", key.as_bytes());
    let out = psql(
        pg.port,
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'app-secret'; \
         ALTER ROLE app SET search_path = public; CREATE ROLE plain LOGIN;",
    );
    assert!(!out.contains("ERROR"), "{out}");
    let out = psql(pg.port, "ALTER SYSTEM SET ssl = on");
    assert!(!out.contains("ERROR"), "{out}");
    // app: SCRAM over TLS or nothing (PostgreSQL offers SCRAM-SHA-256-PLUS over TLS);
    // plain: no TLS (a server whose pg_hba.conf refuses it over TLS)
    let hba = pg.dir.join("data").join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    let lines = "hostssl all app 127.0.0.1/32 scram-sha-256\nhostnossl all app 127.0.0.1/32 reject\n\
                 hostssl all plain 127.0.0.1/32 reject\n";
    std::fs::write(&hba, format!("{lines}{text}")).expect("write pg_hba.conf");
    assert_eq!(psql(pg.port, "SELECT pg_reload_conf()"), "t");
    let (ok, out) = psql_as(&conninfo(pg.port, "app", "sslmode=disable"), Some("app-secret"), "SELECT 1");
    assert!(!ok && out.contains("no encryption"), "the primary refuses app in plaintext: {out}");

    let dir = pg.dir.join("client");
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca).expect("write ca.pem");
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, authority_and_server().0).expect("write other-ca.pem");
    let user = "[[users]]\nname = 'app'\npassword = 'app-secret'\n";
    let through = |tls: &str| {
        let (port, proxy) = start_proxy_with(&pg, &format!("{user}[upstream_tls]\n{tls}\n"));
        let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        let r = psql_as(&conninfo(port, "app", "sslmode=disable"), Some("app-secret"), sql);
        drop(proxy);
        r
    };
    let ca_path = ca_path.display();
    for good in [
        format!("mode = 'verify-full'\nroot_cert = '{ca_path}'"),
        format!("mode = 'verify-ca'\nroot_cert = '{ca_path}'\nserver_name = 'db.example'"),
        format!("mode = 'require'\nroot_cert = '{ca_path}'"),
        "mode = 'require'".to_string(),
        String::new(), // prefer
    ] {
        let (ok, out) = through(&good);
        assert!(ok && out == "t", "[upstream_tls] {good}: {out}");
    }
    for (bad, why) in [
        (
            format!("mode = 'verify-full'\nroot_cert = '{ca_path}'\nserver_name = 'db.example'"),
            "not valid for name \"db.example\"",
        ),
        (format!("mode = 'verify-full'\nroot_cert = '{}'", other_ca.display()), "invalid peer certificate"),
        (format!("mode = 'verify-ca'\nroot_cert = '{}'", other_ca.display()), "invalid peer certificate"),
        ("mode = 'disable'".to_string(), "no encryption"),
    ] {
        let (ok, out) = through(&bad);
        assert!(!ok && out.contains(why), "[upstream_tls] {bad}: wanted {why:?} in {out}");
    }
    // prefer, as libpq: a login refused over TLS is tried again in plaintext; require: refused
    let plain = |tls: &str| {
        let (port, proxy) = start_proxy_with(&pg, &format!("[upstream_tls]\n{tls}\n"));
        let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        let r = psql_as(&conninfo(port, "plain", "sslmode=disable"), None, sql);
        drop(proxy);
        r
    };
    assert_eq!(plain("mode = 'prefer'"), (true, "f".to_string()));
    let (ok, out) = plain("mode = 'require'");
    assert!(!ok && out.contains("pg_hba.conf rejects"), "{out}");
    // a dead TLS upstream did not stop the proxy: the next login works
    let (port, _proxy) =
        start_proxy_with(&pg, &format!("{user}[upstream_tls]\nmode = 'verify-full'\nroot_cert = '{ca_path}'\n"));
    for _ in 0..2 {
        let (ok, out) = psql_as(&conninfo(port, "app", ""), Some("app-secret"), "SELECT current_user");
        assert!(ok && out == "app", "{out}");
    }
}

//! Who may use the Worker, and as whom it logs in to PostgreSQL.
//!
//! The Worker holds its own credentials for the database (a
//! `DATABASE_URL` secret, as an application backend would, or a
//! Hyperdrive binding), and serves a client that proves it knows the API
//! token: in `Authorization: Bearer <token>` (the driver's `authToken`) or as
//! the password of the connection string it sends (`neon(url)`), compared
//! in constant time. The client's user and database must be the Worker's:
//! one role per Worker, so answers are never shared across roles.

use subtle::ConstantTimeEq;

use crate::neon::DbError;
use crate::pg::Login;

/// A `postgres://` or `postgresql://` URL, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub application_name: Option<String>,
}

/// Parses a connection string as the driver sends it (`Neon-Connection-String`).
pub fn parse_conn(s: &str) -> Result<ConnInfo, String> {
    let u = url::Url::parse(s).map_err(|e| format!("invalid connection string: {e}"))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err("connection string must start with postgres:// or postgresql://".into());
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let user = decode(u.username());
    if user.is_empty() {
        return Err("connection string names no user".into());
    }
    let database = decode(u.path().trim_start_matches('/'));
    let database = if database.is_empty() { user.clone() } else { database };
    let application_name = u.query_pairs().find(|(k, _)| k == "application_name").map(|(_, v)| v.into_owned());
    // what goes into PostgreSQL's startup message: a control character
    // (a NUL would add parameters of the client's choosing) is refused, and
    // the name is cut where PostgreSQL would cut it (63 bytes)
    let password = u.password().map(decode).unwrap_or_default();
    let names = [("user", Some(&user)), ("database", Some(&database)), ("application_name", application_name.as_ref())];
    if let Some((what, _)) = names.iter().find(|(_, v)| v.is_some_and(|v| v.chars().any(char::is_control))) {
        return Err(format!("the connection string's {what} holds a control character"));
    }
    let application_name = application_name.map(|mut a| {
        let mut end = a.len().min(63);
        while !a.is_char_boundary(end) {
            end -= 1;
        }
        a.truncate(end);
        a
    });
    Ok(ConnInfo {
        user,
        password,
        host: u.host_str().unwrap_or_default().to_string(),
        port: u.port().unwrap_or(5432),
        database,
        application_name,
    })
}

/// The Worker's settings (from its environment).
#[derive(Clone, Debug)]
pub struct Access {
    /// The API token clients must present.
    pub token: String,
    /// The Worker's own login to PostgreSQL, and where.
    pub upstream: ConnInfo,
    /// The regional proxy whose change feed keeps the cache fresh (a role
    /// with REPLICATION there); `None`: nothing is cached.
    pub feed: Option<ConnInfo>,
}

impl Access {
    /// Checks a request: the token in `bearer` or as the connection
    /// string's password, and the Worker's own user and database. The
    /// login to use upstream on success.
    pub fn authorize(&self, conn: Option<&str>, bearer: Option<&str>) -> Result<Login, DbError> {
        let refused = || DbError::new("28P01", "password authentication failed: wrong or missing API token");
        let conn = conn.ok_or_else(|| DbError::new("08P01", "missing Neon-Connection-String header"))?;
        let info = parse_conn(conn).map_err(|e| DbError::new("08P01", &e))?;
        let presented = bearer.unwrap_or(&info.password);
        if self.token.is_empty() || !bool::from(presented.as_bytes().ct_eq(self.token.as_bytes())) {
            return Err(refused());
        }
        if info.user != self.upstream.user || info.database != self.upstream.database {
            let m = format!(
                "this edge serves role {:?} on database {:?} only (asked for {:?} on {:?})",
                self.upstream.user, self.upstream.database, info.user, info.database
            );
            return Err(DbError::new("28000", &m));
        }
        Ok(login_of(&self.upstream, info.application_name))
    }
}

/// The login a connection string names.
pub fn login_of(c: &ConnInfo, application_name: Option<String>) -> Login {
    Login {
        user: c.user.clone(),
        password: c.password.clone(),
        database: c.database.clone(),
        application_name: application_name.or(c.application_name.clone()).unwrap_or_else(|| "postai-worker".into()),
        // a statement whose client left (an HTTP request given up, a
        // WebSocket closed) is cancelled within a second, not run to its end
        settings: vec![("client_connection_check_interval".into(), "1000".into())],
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        let upstream = parse_conn("postgresql://app:secret@127.0.0.1:5433/shop").unwrap();
        Access { token: "t0k%n".into(), upstream, feed: None }
    }

    #[test]
    fn connection_strings_decode() {
        let c = parse_conn("postgres://us%40er:p%2Fw+x@db.example:6543/my%20db?application_name=a%20b").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("us@er", "p/w+x"));
        assert_eq!((c.host.as_str(), c.port, c.database.as_str()), ("db.example", 6543, "my db"));
        assert_eq!(c.application_name.as_deref(), Some("a b"));
        assert_eq!(parse_conn("postgresql://u@h").unwrap().database, "u");
        assert!(parse_conn("mysql://u@h/d").is_err());
        assert!(parse_conn("postgresql://h/d").is_err());
        assert!(parse_conn("not a url").is_err());
    }

    /// A NUL in the application name would add startup parameters of the
    /// client's choosing (a second `database`, `options`, `search_path`):
    /// the login's settings and database would no longer be the Worker's,
    /// and what it cached would be shared with every caller.
    #[test]
    fn names_cannot_smuggle_startup_parameters() {
        let a = access();
        for bad in [
            "postgresql://app:t0k%25n@h/shop?application_name=x%00database%00other",
            "postgresql://app:t0k%25n@h/shop?application_name=x%00options%00-csearch_path%3Devil",
            "postgresql://app%00x:t0k%25n@h/shop",
            "postgresql://app:t0k%25n@h/shop%00database%00other",
            "postgresql://app:t0k%25n@h/shop?application_name=a%0Ab",
        ] {
            let e = a.authorize(Some(bad), None).expect_err(bad);
            assert_eq!(e.code(), "08P01", "{bad}");
        }
        let long = format!("postgresql://app:t0k%25n@h/shop?application_name={}", "é".repeat(40));
        let login = a.authorize(Some(&long), None).expect("a long name is cut");
        assert!(login.application_name.len() <= 63 && login.application_name.starts_with('é'));
    }

    #[test]
    fn the_token_is_required_by_password_or_bearer() {
        let a = access();
        assert!(a.authorize(Some("postgresql://app:t0k%25n@edge/shop"), None).is_ok());
        assert!(a.authorize(Some("postgresql://app@edge/shop"), Some("t0k%n")).is_ok());
        let wrong = a.authorize(Some("postgresql://app:secret@edge/shop"), None).unwrap_err();
        assert_eq!(wrong.code(), "28P01");
        // a bearer token replaces the password: a wrong one is refused even with the right password
        assert!(a.authorize(Some("postgresql://app:t0k%25n@edge/shop"), Some("nope")).is_err());
        assert!(a.authorize(Some("postgresql://app:t0k%25@edge/shop"), None).is_err());
        assert!(a.authorize(None, Some("t0k%n")).is_err());
        let other = a.authorize(Some("postgresql://admin:t0k%25n@edge/shop"), None).unwrap_err();
        assert_eq!(other.code(), "28000");
        assert!(a.authorize(Some("postgresql://app:t0k%25n@edge/other"), None).is_err());
        let no_token = Access { token: String::new(), upstream: a.upstream.clone(), feed: None };
        assert!(no_token.authorize(Some("postgresql://app@edge/shop"), Some("")).is_err());
        let login = a.authorize(Some("postgresql://app:t0k%25n@edge/shop"), None).unwrap();
        assert_eq!((login.user.as_str(), login.password.as_str()), ("app", "secret"));
    }

    #[test]
    fn bearer_headers_parse() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}

//! The cluster the Worker's tests share.

#[path = "../../../edge/tests/pg/cluster.rs"]
#[allow(dead_code)]
pub mod cluster;

use std::sync::atomic::{AtomicU32, Ordering};

use cluster::{Pg, psql};
use postai_worker::access::ConnInfo;
use postai_worker::handler::Net;
use tokio::net::TcpStream;

/// The Worker's connections as tokio streams, counted; its clock the system's.
#[derive(Default)]
pub struct Tcp {
    pub opened: AtomicU32,
}

impl Net for Tcp {
    type Stream = TcpStream;
    async fn open(&self, to: &ConnInfo) -> std::io::Result<TcpStream> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        TcpStream::connect((to.host.as_str(), to.port)).await
    }
    fn now(&self) -> postai_core::Instant {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        postai_core::Instant::from_nanos(since.as_nanos() as u64)
    }
    async fn sleep(&self, d: std::time::Duration) {
        tokio::time::sleep(d).await
    }
}

/// A cluster with password logins over TCP: `app` (SCRAM) owns database
/// `shop`, `old` logs in with MD5.
pub fn shop() -> Pg {
    let pg = Pg::start("worker");
    psql(pg.port, "CREATE ROLE app LOGIN PASSWORD 'app pw'");
    psql(pg.port, "CREATE DATABASE shop OWNER app");
    psql(pg.port, "SET password_encryption = 'md5'; CREATE ROLE old LOGIN PASSWORD 'old pw'");
    let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all old 127.0.0.1/32 md5\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(pg.dir.join("data/pg_hba.conf"), hba).expect("write pg_hba.conf");
    psql(pg.port, "SELECT pg_reload_conf()");
    let shop = |sql: &str| shop_sql(&pg, sql);
    shop("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2), tags text[], made date)");
    shop("ALTER TABLE items OWNER TO app");
    shop("INSERT INTO items VALUES (1, 'one', 1.50, '{a,b}', '2024-01-02'), (2, 'two', NULL, NULL, NULL)");
    pg
}

/// Runs `sql` on database `shop` as the superuser (psql); panics on error.
pub fn shop_sql(pg: &Pg, sql: &str) {
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "shop"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

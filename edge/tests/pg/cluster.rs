//! A throwaway PostgreSQL cluster for tests: initdb in a temporary directory,
//! a free port, run as the `postgres` user when the tests run as root
//! (initdb refuses root). Stopped and removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir("/usr/lib/postgresql").ok()?.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
    versions.sort();
    versions.pop().filter(|b| b.join("initdb").exists())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

impl Pg {
    pub fn start(name: &str) -> Pg {
        Pg::start_with(name, "")
    }

    /// A cluster whose postgresql.conf also has `extra` (settings, one per line).
    pub fn start_with(name: &str, extra: &str) -> Pg {
        let bin = pg_bin().expect("PostgreSQL server binaries under /usr/lib/postgresql (.ci/run installs them)");
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("postai-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let pg = Pg { dir, port, bin, as_postgres };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown the cluster directory to postgres");
        }
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\nfsync = off\n",
            pg.dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        text.push_str(extra);
        std::fs::write(&path, text).expect("write postgresql.conf");
        pg.pg_ctl_start();
        pg
    }

    /// A streaming replica of this cluster (pg_basebackup), named `name` (its
    /// `application_name`); `apply_delay_ms` makes it lag on purpose.
    #[allow(dead_code)]
    pub fn start_replica(&self, name: &str, apply_delay_ms: u64) -> Pg {
        let dir = std::env::temp_dir().join(format!("postai-{name}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let replica = Pg { dir, port, bin: self.bin.clone(), as_postgres: self.as_postgres };
        if self.as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&replica.dir).status();
            assert!(ok.map(|s| s.success()).unwrap_or(false), "chown the replica directory to postgres");
        }
        let data = replica.dir.join("data");
        let primary_port = self.port.to_string();
        replica.run(
            "pg_basebackup",
            &["-h", "127.0.0.1", "-p", &primary_port, "-U", "postgres", "-D", &data.to_string_lossy(), "-X", "stream"],
        );
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nprimary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres application_name={name}'\nrecovery_min_apply_delay = '{apply_delay_ms}ms'\nhot_standby_feedback = on\n",
            replica.dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        std::fs::write(data.join("standby.signal"), "").expect("standby.signal");
        if self.as_postgres {
            let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&replica.dir).status();
        }
        replica.pg_ctl_start();
        replica
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-w", "start"]);
    }

    /// Kills the server (`pg_ctl stop -m immediate`: a crash).
    #[allow(dead_code)]
    pub fn crash(&self) {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"]);
    }

    /// Starts the server again after [`Pg::crash`].
    #[allow(dead_code)]
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes `name` into the data directory, readable by the server only
    /// (what PostgreSQL demands of a private key).
    #[allow(dead_code)]
    pub fn write_private(&self, name: &str, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join("data").join(name);
        std::fs::write(&path, contents).expect("write into the data directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        if self.as_postgres {
            let ok = Command::new("chown").arg("postgres:postgres").arg(&path).status().is_ok_and(|s| s.success());
            assert!(ok, "chown {name} to postgres");
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.command("pg_ctl").args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `sql` with psql against `port` and returns the unaligned output
/// (with `ERROR: ` and psql's message appended when it fails).
pub fn psql(port: u16, sql: &str) -> String {
    let port = port.to_string();
    let out = Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        s.push_str("ERROR: ");
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    s.trim_end().to_string()
}

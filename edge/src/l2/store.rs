//! The writer thread and the SQLite store behind [`super::L2File`]: the
//! schema, what a fill and an invalidation do to the rows, the position, the
//! encoding of keys and dependencies.

use super::*;

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// `None`: the file is off (never opened, or stopped after an error).
    pub(super) store: Option<Store>,
    pub(super) path: PathBuf,
    /// Entries may have been restored from a file that is off now: the next
    /// adoption must tell the reader to drop them.
    pub(super) unvouched: bool,
}

impl Writer {
    pub(super) fn run(mut self) {
        loop {
            let ops: Vec<Op> = {
                let mut q = self.shared.queue();
                while q.ops.is_empty() && !q.closed {
                    q = self.shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.ops.is_empty() {
                    return;
                }
                q.fills = 0;
                q.fill_bytes = 0;
                q.ops.drain(..).collect()
            };
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.batch(ops)));
            if ran.is_err() {
                // a bug: stop the file; the batch's answers were dropped with it
                self.store = None;
                let mut q = self.shared.queue();
                q.closed = true;
                q.ops.clear();
                drop(q);
                self.shared.set_status(Some("off: the writer failed".into()), None);
                return;
            }
        }
    }

    /// Applies a batch in one transaction, then answers its acknowledgements.
    pub(super) fn batch(&mut self, ops: Vec<Op>) {
        let stats = &self.shared.stats;
        let mut wiped: Vec<Option<String>> = Vec::new();
        let outcome = match self.store.as_mut() {
            None => Ok(()),
            Some(store) => store.apply(&ops, stats, &mut wiped),
        };
        if let Err(e) = &outcome {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            // stop using the file; remove it, best effort (a next start
            // would wipe it anyway: the slot moves past its position)
            self.store = None;
            for suffix in ["-wal", "-shm", ""] {
                let _ = std::fs::remove_file(aside_path(&self.path, suffix));
            }
            let msg = format!("write failed ({e}): file removed, L2 in memory only");
            eprintln!("postai-edge: L2 file {}: {msg}", self.path.display());
            self.shared.set_status(Some(format!("off: {e}")), Some(msg));
            stats.entries.store(0, Ordering::Relaxed);
            stats.bytes.store(0, Ordering::Relaxed);
        }
        if let Some(s) = &self.store {
            stats.entries.store(s.entries, Ordering::Relaxed);
            stats.bytes.store(s.bytes, Ordering::Relaxed);
        }
        let mut wiped = wiped.into_iter();
        for op in ops {
            match op {
                Op::Fill(_) => {}
                Op::Clear(reason) => self.shared.set_status(None, Some(format!("cleared: {reason}"))),
                // without a file (now), nothing can be restored stale
                Op::Invalidate { ack, .. } | Op::Barrier(ack) => {
                    let _ = ack.send(Ok(()));
                }
                Op::Adopt { ack, .. } => {
                    let reason = match &outcome {
                        Ok(()) if self.store.is_some() => wiped.next().flatten(),
                        _ if self.unvouched => Some("the file failed: restored entries dropped".to_string()),
                        _ => None,
                    };
                    self.unvouched = false;
                    if let Some(r) = &reason {
                        eprintln!("postai-edge: L2 file {}: wiped: {r}", self.path.display());
                        self.shared.set_status(None, Some(format!("wiped: {r}")));
                    }
                    let _ = ack.send(reason);
                }
            }
        }
    }
}

/// The open file.
pub(super) struct Store {
    pub(super) conn: Connection,
    pub(super) budget: Budget,
    pub(super) entries: u64,
    pub(super) bytes: u64,
    /// Every change at or below this is reflected (`None`: never adopted).
    pub(super) through: Option<Lsn>,
    /// Adopted by this process's CDC reader: fills are written only after.
    pub(super) adopted: bool,
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    lsn INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    deps BLOB NOT NULL,
    value BLOB NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deps (
    seq INTEGER NOT NULL REFERENCES entries (seq) ON DELETE CASCADE,
    table_id INTEGER NOT NULL,
    key_hash INTEGER
);
CREATE INDEX IF NOT EXISTS deps_by_target ON deps (table_id, key_hash);
CREATE INDEX IF NOT EXISTS deps_by_seq ON deps (seq);
";

type Loaded = (Store, Vec<Record>, Vec<String>);

impl Store {
    pub(super) fn open(
        path: &Path,
        fingerprint: &str,
        budget: Budget,
        tables: u32,
        now_ms: u64,
    ) -> Result<Loaded, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        Store::load(conn, fingerprint, budget, tables, now_ms).map_err(|e| e.to_string())
    }

    pub(super) fn load(
        conn: Connection,
        fingerprint: &str,
        budget: Budget,
        tables: u32,
        now_ms: u64,
    ) -> rusqlite::Result<Loaded> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("integrity check: {check}")),
            ));
        }
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        let mut store = Store { conn, budget, entries: 0, bytes: 0, through: None, adopted: false };
        let mut notices = Vec::new();
        let want = format!("{fingerprint}; schema {}", hash_text(SCHEMA));
        let have = store.meta("fingerprint")?;
        if have.as_deref() != Some(want.as_str()) {
            let n = store.in_transaction(|st| {
                let n = st.wipe_rows()?;
                st.conn.execute("DELETE FROM meta", [])?;
                st.set_meta("fingerprint", &want)?;
                Ok(n)
            })?;
            if have.is_some() {
                notices.push(format!("written under another configuration: {n} entries wiped"));
            }
        }
        store.through = store.meta("through")?.and_then(|s| s.parse().ok()).map(Lsn);
        let mut restored = Vec::new();
        let mut bad = Vec::new();
        {
            let mut stmt = store
                .conn
                .prepare("SELECT seq, key, lsn, expires_ms, deps, value, checksum FROM entries ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let key: Vec<u8> = row.get(1)?;
                let lsn: i64 = row.get(2)?;
                let expires_ms: i64 = row.get(3)?;
                let deps: Vec<u8> = row.get(4)?;
                let value: Vec<u8> = row.get(5)?;
                let sum: i64 = row.get(6)?;
                let record = decode_key(&key).zip(decode_deps(&deps)).map(|(key, deps)| Record {
                    key,
                    value: Arc::from(value),
                    lsn: Lsn(lsn as u64),
                    deps,
                    expires_ms: expires_ms as u64,
                });
                match record {
                    Some(r)
                        if checksum(&r) as i64 == sum
                            && r.expires_ms > now_ms
                            && r.deps.iter().all(|d| dep_table(d).0 < tables) =>
                    {
                        restored.push((seq, r))
                    }
                    _ => bad.push(seq),
                }
            }
        }
        if !bad.is_empty() {
            store.in_transaction(|st| {
                for seq in &bad {
                    st.conn.execute("DELETE FROM entries WHERE seq = ?1", [seq])?;
                }
                Ok(())
            })?;
        }
        store.entries = restored.len() as u64;
        store.bytes = restored.iter().map(|(_, r)| r.value.len() as u64).sum();
        let evicted = store.in_transaction(Store::evict)?;
        let restored: Vec<Record> = restored.into_iter().skip(evicted as usize).map(|(_, r)| r).collect();
        Ok((store, restored, notices))
    }

    /// Runs `f` in one transaction (rolled back on error).
    pub(super) fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = f(self).and_then(|v| self.conn.execute_batch("COMMIT").map(|()| v));
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result
    }

    pub(super) fn meta(&self, name: &str) -> rusqlite::Result<Option<String>> {
        self.conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0)).optional()
    }

    pub(super) fn set_meta(&self, name: &str, value: &str) -> rusqlite::Result<()> {
        self.conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)", [name, value])?;
        Ok(())
    }

    /// Deletes every row; returns how many there were.
    pub(super) fn wipe_rows(&mut self) -> rusqlite::Result<u64> {
        self.conn.execute("DELETE FROM deps", [])?;
        let n = self.conn.execute("DELETE FROM entries", [])? as u64;
        self.entries = 0;
        self.bytes = 0;
        Ok(n)
    }

    /// One batch, in one transaction. `wiped` gets one answer per Adopt.
    pub(super) fn apply(
        &mut self,
        ops: &[Op],
        stats: &FileStats,
        wiped: &mut Vec<Option<String>>,
    ) -> rusqlite::Result<()> {
        let (entries0, bytes0) = (self.entries, self.bytes);
        let through0 = self.through;
        let adopted0 = self.adopted;
        let result = self.in_transaction(|st| {
            for op in ops {
                match op {
                    Op::Fill(r) => {
                        if st.adopted && st.insert(r)? {
                            stats.writes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Op::Invalidate { changes, through, .. } => {
                        let n = st.invalidate(changes)?;
                        stats.deleted.fetch_add(n, Ordering::Relaxed);
                        let t = st.through.map_or(*through, |t| t.max(*through));
                        st.set_meta("through", &t.0.to_string())?;
                        st.through = Some(t);
                    }
                    Op::Adopt { slot, created, system_id, .. } => wiped.push(st.adopt(*slot, *created, system_id)?),
                    Op::Clear(_) => {
                        let n = st.wipe_rows()?;
                        stats.deleted.fetch_add(n, Ordering::Relaxed);
                    }
                    Op::Barrier(_) => {}
                }
            }
            let n = st.evict()?;
            stats.evicted.fetch_add(n, Ordering::Relaxed);
            Ok(())
        });
        if result.is_err() {
            // rolled back: the counters and position were not written
            (self.entries, self.bytes, self.through, self.adopted) = (entries0, bytes0, through0, adopted0);
        }
        result
    }

    /// Inserts or replaces (never by an older snapshot). Returns whether it wrote.
    pub(super) fn insert(&mut self, r: &Record) -> rusqlite::Result<bool> {
        let key = r.key.to_le_bytes();
        let old: Option<(i64, i64, i64)> = self
            .conn
            .query_row("SELECT seq, lsn, length(value) FROM entries WHERE key = ?1", [&key[..]], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        if let Some((seq, lsn, size)) = old {
            if lsn as u64 > r.lsn.0 {
                return Ok(false);
            }
            self.conn.execute("DELETE FROM entries WHERE seq = ?1", [seq])?;
            self.entries = self.entries.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(size as u64);
        }
        self.conn.execute(
            "INSERT INTO entries (key, lsn, expires_ms, deps, value, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                &key[..],
                r.lsn.0 as i64,
                r.expires_ms.min(i64::MAX as u64) as i64,
                encode_deps(&r.deps),
                &r.value[..],
                checksum(r) as i64
            ],
        )?;
        let seq = self.conn.last_insert_rowid();
        let mut dep = self.conn.prepare_cached("INSERT INTO deps (seq, table_id, key_hash) VALUES (?1, ?2, ?3)")?;
        for d in &r.deps {
            match *d {
                Dep::Table(t) => dep.execute(params![seq, t.0, None::<i64>])?,
                Dep::Key(t, k) => dep.execute(params![seq, t.0, k as i64])?,
                // never persisted (`stable_deps`)
                Dep::Any => continue,
            };
        }
        self.entries += 1;
        self.bytes += r.value.len() as u64;
        Ok(true)
    }

    /// Deletes the rows `changes` invalidate, as `VersionMap::is_valid` would:
    /// a row with snapshot below the change's LSN whose deps the change touched.
    pub(super) fn invalidate(&mut self, changes: &[Change]) -> rusqlite::Result<u64> {
        let mut deleted = 0u64;
        let mut sizes = |conn: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<()> {
            let mut stmt = conn.prepare_cached(sql)?;
            let mut rows = stmt.query(p)?;
            while let Some(row) = rows.next()? {
                let size: i64 = row.get(0)?;
                deleted += 1;
                self.entries = self.entries.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(size as u64);
            }
            Ok(())
        };
        for change in changes {
            let lsn = change.lsn.0 as i64;
            for target in &change.targets {
                match target {
                    ChangeTarget::All => {
                        sizes(&self.conn, "DELETE FROM entries WHERE lsn < ?1 RETURNING length(value)", &[&lsn])?
                    }
                    ChangeTarget::Table(t) => sizes(
                        &self.conn,
                        "DELETE FROM entries WHERE lsn < ?1 AND seq IN \
                         (SELECT seq FROM deps WHERE table_id = ?2) RETURNING length(value)",
                        &[&lsn, &t.0],
                    )?,
                    ChangeTarget::Keys(t, keys) => {
                        sizes(
                            &self.conn,
                            "DELETE FROM entries WHERE lsn < ?1 AND seq IN \
                             (SELECT seq FROM deps WHERE table_id = ?2 AND key_hash IS NULL) RETURNING length(value)",
                            &[&lsn, &t.0],
                        )?;
                        for k in keys {
                            sizes(
                                &self.conn,
                                "DELETE FROM entries WHERE lsn < ?1 AND seq IN \
                                 (SELECT seq FROM deps WHERE table_id = ?2 AND key_hash = ?3) RETURNING length(value)",
                                &[&lsn, &t.0, &(*k as i64)],
                            )?;
                        }
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Checks the file against the slot the CDC reader found; returns why it
    /// wiped, if it did.
    pub(super) fn adopt(
        &mut self,
        slot: Lsn,
        created: bool,
        system_id: &Option<String>,
    ) -> rusqlite::Result<Option<String>> {
        let stored = self.meta("system_id")?;
        let reason = if created {
            Some("the CDC slot was created: the changes before it are unknown".to_string())
        } else if let (Some(a), Some(b)) = (&stored, system_id)
            && a != b
        {
            Some(format!("another database cluster (system identifier {b}, the file's {a})"))
        } else {
            match self.through {
                None if self.entries > 0 => Some("the file has entries but no CDC position".to_string()),
                Some(p) if slot > p => Some(format!(
                    "the CDC slot stands at {}, past the file's position {}: changes in between were not applied",
                    fmt_lsn(slot),
                    fmt_lsn(p)
                )),
                _ => None,
            }
        };
        let reason = reason.filter(|_| self.entries > 0 || self.through.is_some());
        if reason.is_some() {
            self.wipe_rows()?;
            self.through = Some(slot);
        } else {
            self.through = Some(self.through.map_or(slot, |t| t.max(slot)));
        }
        if let Some(t) = self.through {
            self.set_meta("through", &t.0.to_string())?;
        }
        if let Some(id) = system_id {
            self.set_meta("system_id", id)?;
        }
        self.adopted = true;
        Ok(reason)
    }

    /// Evicts the oldest rows past the budgets; returns how many.
    pub(super) fn evict(&mut self) -> rusqlite::Result<u64> {
        if self.entries <= self.budget.entries as u64 && self.bytes <= self.budget.bytes {
            return Ok(0);
        }
        let need_entries = self.entries.saturating_sub(self.budget.entries as u64);
        let need_bytes = self.bytes.saturating_sub(self.budget.bytes);
        let (mut n, mut freed, mut upto) = (0u64, 0u64, None);
        {
            let mut stmt = self.conn.prepare("SELECT seq, length(value) FROM entries ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while n < need_entries || freed < need_bytes {
                let Some(row) = rows.next()? else { break };
                upto = Some(row.get::<_, i64>(0)?);
                freed += row.get::<_, i64>(1)? as u64;
                n += 1;
            }
        }
        if let Some(seq) = upto {
            self.conn.execute("DELETE FROM entries WHERE seq <= ?1", [seq])?;
        }
        self.entries = self.entries.saturating_sub(n);
        self.bytes = self.bytes.saturating_sub(freed);
        Ok(n)
    }
}

pub(super) fn dep_table(d: &Dep) -> TableId {
    match *d {
        Dep::Table(t) | Dep::Key(t, _) => t,
        // on no table a file can vouch for
        Dep::Any => TableId(u32::MAX),
    }
}

/// Deps as 13 bytes each: tag (0 table, 1 key), table id, key hash (LE).
pub(super) fn encode_deps(deps: &[Dep]) -> Vec<u8> {
    let mut out = Vec::with_capacity(deps.len() * 13);
    for d in deps {
        let (tag, t, k) = match *d {
            Dep::Table(t) => (0u8, t, 0u64),
            Dep::Key(t, k) => (1u8, t, k),
            Dep::Any => (2u8, TableId(0), 0),
        };
        out.push(tag);
        out.extend_from_slice(&t.0.to_le_bytes());
        out.extend_from_slice(&k.to_le_bytes());
    }
    out
}

pub(super) fn decode_deps(b: &[u8]) -> Option<Vec<Dep>> {
    if !b.len().is_multiple_of(13) {
        return None;
    }
    b.chunks_exact(13)
        .map(|c| {
            let t = TableId(u32::from_le_bytes(c[1..5].try_into().ok()?));
            let k = u64::from_le_bytes(c[5..13].try_into().ok()?);
            match c[0] {
                0 => Some(Dep::Table(t)),
                1 => Some(Dep::Key(t, k)),
                2 => Some(Dep::Any),
                _ => None,
            }
        })
        .collect()
}

pub(super) fn decode_key(b: &[u8]) -> Option<u128> {
    Some(u128::from_le_bytes(b.try_into().ok()?))
}

/// A digest of the whole row: a row damaged in a way SQLite does not see is dropped.
pub(super) fn checksum(r: &Record) -> u64 {
    let mut d = Digest128::new();
    d.bytes(&r.key.to_le_bytes());
    d.u64(r.lsn.0);
    d.u64(r.expires_ms.min(i64::MAX as u64));
    d.bytes(&encode_deps(&r.deps));
    d.bytes(&r.value);
    d.finish() as u64 >> 1
}

pub(super) fn hash_text(s: &str) -> String {
    let mut d = Digest128::new();
    d.bytes(s.as_bytes());
    format!("{:016x}", d.finish() as u64)
}

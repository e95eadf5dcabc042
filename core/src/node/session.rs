//! A client session as the cache sees it: the settings and role that decide
//! which cached results it may share (its context), its transaction, and
//! its floor for read-your-writes.

use crate::Lsn;
use crate::consistency::Consistency;
use crate::hash::Digest128;
use crate::invalidation::ChangeTarget;
use crate::sql::{RESULT_NEUTRAL_SETTINGS, SessionCommand};

use super::SessionId;

#[derive(Clone, Debug)]
pub(super) struct Session {
    pub consistency: Consistency,
    /// LSN of the session's last acknowledged write.
    pub last_write: Lsn,
    /// Entries older than the floor may serve the session only once the
    /// change stream has passed this LSN: writes this node did not see in
    /// full (a floor learned from outside, a write that reaches rows it does
    /// not name). Every other write of the session was applied to this
    /// node's version map when it was acknowledged.
    pub stream_floor: Lsn,
    pub in_txn: bool,
    /// Changes of the open transaction, applied at COMMIT.
    pub txn_targets: Vec<ChangeTarget>,
    /// The open transaction wrote rows it does not name (see
    /// [`crate::sql::Shape::writes_opaque`]).
    pub txn_opaque: bool,
    /// Result-affecting settings, sorted: the cache context.
    settings: Vec<(String, String)>,
    /// Settings the session started with (its startup parameters): what
    /// `RESET` and `DISCARD ALL` go back to.
    startup: Vec<(String, String)>,
    pub context: u64,
    /// The context with the result-neutral settings too, for statements that
    /// read settings (`current_setting('work_mem')`).
    pub context_all: u64,
    /// The current role (`SET ROLE` changes it; `RESET ROLE` goes back to
    /// the startup role or `login_role`).
    role: String,
    login_role: String,
    database: String,
    /// Which catalog of roles the session logged in under (per-role
    /// settings and memberships): sessions of different generations never
    /// share entries.
    login_generation: u64,
    id: SessionId,
    /// The session's state changed in a way the context cannot follow: its
    /// entries are its own (the context includes the session id), and its
    /// reads run on its own connection.
    pub private: bool,
    /// Each change the context cannot follow is a fresh context (entries
    /// from before may reflect state that is gone).
    private_epoch: u64,
    /// A statement with unknown effects ran: even DISCARD ALL does not make
    /// the state known again (a custom setting it created stays, empty).
    opaque_ever: bool,
    /// Settings and role before the open transaction's first session command
    /// (restored by ROLLBACK: a SET inside a rolled-back transaction is undone).
    pub txn_saved: Option<(Vec<(String, String)>, String)>,
    /// A ROLLBACK TO SAVEPOINT after a session command: which SETs survive is unknown.
    pub txn_uncertain: bool,
    /// A statement of the open transaction failed: its COMMIT rolls back.
    pub txn_failed: bool,
    /// Custom settings the open transaction named: defined (empty) after it
    /// whatever its fate, as PostgreSQL's placeholders are.
    txn_placeholders: Vec<String>,
}

impl Session {
    pub fn new(id: SessionId, role: &str, database: &str, consistency: Consistency, login_generation: u64) -> Session {
        let mut s = Session {
            consistency,
            last_write: Lsn(0),
            stream_floor: Lsn(0),
            in_txn: false,
            txn_targets: Vec::new(),
            txn_opaque: false,
            settings: Vec::new(),
            startup: Vec::new(),
            context: 0,
            context_all: 0,
            role: role.to_string(),
            login_role: role.to_string(),
            database: database.to_string(),
            login_generation,
            id,
            private: false,
            private_epoch: 0,
            opaque_ever: false,
            txn_saved: None,
            txn_uncertain: false,
            txn_failed: false,
            txn_placeholders: Vec::new(),
        };
        s.recompute_context();
        s
    }

    fn recompute_context(&mut self) {
        let digest = |all: bool| {
            let mut d = Digest128::new();
            d.bytes(self.role.as_bytes());
            d.bytes(self.database.as_bytes());
            d.u64(self.login_generation);
            for (k, v) in &self.settings {
                if all || !RESULT_NEUTRAL_SETTINGS.contains(&k.as_str()) {
                    d.bytes(k.as_bytes());
                    d.bytes(v.as_bytes());
                }
            }
            if self.private {
                d.bytes(b"\0private");
                d.bytes(&self.id.0.to_le_bytes());
                d.bytes(&self.private_epoch.to_le_bytes());
            }
            d.finish() as u64
        };
        self.context = digest(false);
        self.context_all = digest(true);
    }

    /// The session's state changed in a way the context cannot follow: a
    /// new private context, whose entries are the session's own.
    pub fn make_private(&mut self) {
        self.private = true;
        self.private_epoch += 1;
        self.recompute_context();
    }

    /// `standard_conforming_strings` is off: backslashes in plain string
    /// literals are escapes, and the lexer (which reads them as PostgreSQL
    /// does by default) could mistake where a string ends.
    pub fn backslash_strings(&self) -> bool {
        self.settings.iter().any(|(k, v)| {
            k == "standard_conforming_strings"
                && matches!(v.to_ascii_lowercase().as_str(), "off" | "false" | "no" | "0")
        })
    }

    /// A statement whose effects on the session cannot be known ran.
    pub fn make_opaque(&mut self) {
        self.opaque_ever = true;
        self.make_private();
    }

    /// A setting the session started with (a startup parameter, `-c
    /// name=value` in `options`).
    pub fn startup_setting(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        self.startup.retain(|(k, _)| *k != name);
        self.startup.push((name.clone(), value.to_string()));
        apply_setting(self, SessionCommand::Set { name, value: value.to_string() });
    }

    /// A session command ran (successfully) in the session's current state.
    pub fn command(&mut self, cmd: SessionCommand) {
        let changes = !matches!(cmd, SessionCommand::SetLocal { .. } | SessionCommand::NoEffect);
        if changes && self.in_txn && self.txn_saved.is_none() {
            self.txn_saved = Some((self.settings.clone(), self.role.clone()));
        }
        if let SessionCommand::Set { name, .. } | SessionCommand::SetLocal { name } | SessionCommand::Reset { name } =
            &cmd
            && name.contains('.')
        {
            if self.in_txn {
                self.txn_placeholders.push(name.clone());
            } else {
                self.define_placeholder(name);
            }
        }
        apply_setting(self, cmd);
    }

    /// A custom setting named by a SET stays defined, empty, once set.
    fn define_placeholder(&mut self, name: &str) {
        if !self.settings.iter().any(|(k, _)| k == name) {
            self.settings.push((name.to_string(), String::new()));
            self.settings.sort();
            self.recompute_context();
        }
    }

    /// The transaction ended: committed (`Some(true)`), rolled back
    /// (`Some(false)`) or unknown (`None`).
    pub fn end_transaction(&mut self, committed: Option<bool>) {
        self.in_txn = false;
        // a COMMIT of a failed transaction rolls it back
        let committed = if std::mem::take(&mut self.txn_failed) { committed.map(|_| false) } else { committed };
        let saved = self.txn_saved.take();
        let uncertain = std::mem::take(&mut self.txn_uncertain);
        if let Some((settings, role)) = saved {
            match committed {
                Some(true) if !uncertain => {}
                Some(false) => {
                    self.settings = settings;
                    self.role = role;
                    self.recompute_context();
                }
                _ => self.make_private(),
            }
        }
        for name in std::mem::take(&mut self.txn_placeholders) {
            self.define_placeholder(&name);
        }
    }
}

fn is_role_setting(name: &str) -> bool {
    name == "role" || name == "session authorization"
}

/// SET ROLE if any, else SET SESSION AUTHORIZATION if any, else the login role.
fn current_role(s: &Session) -> String {
    let get = |n: &str| s.settings.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    get("role").or_else(|| get("session authorization")).unwrap_or_else(|| s.login_role.clone())
}

/// `RESET name`: back to the startup value, if the session started with
/// one. A custom setting (`app.tenant`) a SET or RESET named is defined,
/// empty (`current_setting('app.tenant', true)` is then `''`, not NULL).
fn reset(s: &mut Session, name: &str) {
    let startup = s.startup.iter().find(|(k, _)| k == name).cloned();
    s.settings.retain(|(k, _)| k != name);
    match startup {
        Some(kv) => s.settings.push(kv),
        None if name.contains('.') => s.settings.push((name.to_string(), String::new())),
        None => {}
    }
    s.settings.sort();
}

/// RESET ALL's settings: the startup ones, custom settings left defined
/// and empty, and (`role` is not reset by RESET ALL) the role as it is,
/// unless `keep_role` is false.
fn reset_all(s: &mut Session, keep_role: bool) {
    let mut next: Vec<(String, String)> = s.startup.clone();
    for (k, v) in &s.settings {
        let custom = k.contains('.') && !s.startup.iter().any(|(n, _)| n == k);
        if custom {
            next.push((k.clone(), String::new()));
        } else if keep_role && is_role_setting(k) {
            next.retain(|(n, _)| !is_role_setting(n));
            next.push((k.clone(), v.clone()));
        }
    }
    next.sort();
    next.dedup_by(|a, b| a.0 == b.0);
    s.settings = next;
}

pub(super) fn apply_setting(s: &mut Session, cmd: SessionCommand) {
    match cmd {
        SessionCommand::Set { name, value } => {
            if name == "session authorization" {
                // also resets the role
                s.settings.retain(|(k, _)| !is_role_setting(k));
            } else {
                s.settings.retain(|(k, _)| *k != name);
            }
            let back = value.eq_ignore_ascii_case("none") || value.eq_ignore_ascii_case("default");
            if !(is_role_setting(&name) && back) {
                s.settings.push((name, value));
                s.settings.sort();
            }
            s.role = current_role(s);
        }
        SessionCommand::Reset { name } => {
            if name == "session authorization" {
                reset(s, "role");
                reset(s, "session authorization");
            } else {
                reset(s, &name);
            }
            s.role = current_role(s);
        }
        SessionCommand::ResetAll => reset_all(s, true),
        // DISCARD ALL: SET SESSION AUTHORIZATION DEFAULT, RESET ALL (back to
        // the startup settings, the startup role among them), temporary
        // objects dropped: the state is known again, unless a statement of
        // unknown effect created settings the context never saw
        SessionCommand::DiscardAll => {
            reset_all(s, false);
            s.role = current_role(s);
            s.private = s.opaque_ever;
        }
        SessionCommand::SetLocal { .. } | SessionCommand::NoEffect => return,
    }
    s.recompute_context();
}

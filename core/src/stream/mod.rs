//! The change stream as machines: what the edge's slot reader, a subscriber
//! of a regional proxy and the regional's history decide, without the
//! connections, locks and clocks around them (the drivers in `edge/src/cdc.rs`
//! do the SQL and move the rows; the Worker and the simulation can drive the
//! same machines).
//!
//! - [`decoding`]: `test_decoding`'s lines read by their grammar.
//! - [`Record`]: one decoded row of the stream (BEGIN, a change, COMMIT, a
//!   barrier).
//! - [`reader::SlotReader`]: a slot peeked, its changes applied, the slot
//!   advanced only past what was applied, a new or moved slot detected.
//! - [`subscriber::Subscriber`]: an edge following a regional proxy's stream,
//!   resuming where it left off when the regional kept every row since.
//! - [`history::History`]: the rows a regional proxy keeps for resumes.
//! - [`publisher`]: the regional's lines, opening a subscription and carrying
//!   each feed.
//! - [`visibility::Visibility`]: the WAL position below which every commit
//!   is visible (what a fill may be dated with).
//! - [`Line`]: the subscription protocol's lines (`R`, `K`, `X`, `C`, `O`).

pub mod decoding;
pub mod history;
pub mod publisher;
pub mod reader;
pub mod subscriber;
pub mod visibility;

use crate::invalidation::{ChangeTarget, Lsn};
use crate::sql::Catalog;

/// The prefix of the logical messages the proxy's DDL event triggers emit.
pub const DDL_PREFIX: &str = "postai_ddl";

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok().filter(|h| *h <= u64::from(u32::MAX))?;
    let lo = u64::from_str_radix(lo, 16).ok().filter(|l| *l <= u64::from(u32::MAX))?;
    Some(Lsn((hi << 32) | lo))
}

/// An LSN as PostgreSQL prints it.
pub fn fmt_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn.0 >> 32, lsn.0 & 0xffff_ffff)
}

/// One row of the stream, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A transaction begins: what it changes so far is forgotten.
    Begin,
    /// A change inside a transaction: what it reaches.
    Change(Vec<ChangeTarget>),
    /// The transaction commits at this LSN (`None`: unreadable position,
    /// taken as the last one applied).
    Commit(Option<Lsn>),
    /// A non-transactional message: every earlier record precedes it, so
    /// its position is a safe one to advance the slot to.
    Barrier(Option<Lsn>),
    /// Nothing cached can depend on it.
    Other,
}

/// Whether a `test_decoding` line is the message of a DDL event trigger.
pub fn is_ddl_message(line: &str) -> bool {
    line.strip_prefix("message: transactional: 1 prefix: ")
        .and_then(|rest| rest.split_once(','))
        .is_some_and(|(prefix, _)| prefix == DDL_PREFIX)
}

/// One `test_decoding` row (`lsn`, `data` as `pg_logical_slot_peek_changes`
/// gives them) decoded against `catalog`.
pub fn decode(lsn: &str, data: &str, catalog: &Catalog) -> Record {
    if data.starts_with("BEGIN") {
        Record::Begin
    } else if data.starts_with("COMMIT") {
        Record::Commit(parse_lsn(lsn))
    } else if data.starts_with("message: transactional: 0 ") {
        Record::Barrier(parse_lsn(lsn))
    } else if is_ddl_message(data) {
        // what any cached result means may have changed
        Record::Change(vec![ChangeTarget::All])
    } else if data.starts_with("table ") {
        decoding::change_targets(data, catalog).map_or(Record::Other, Record::Change)
    } else {
        Record::Other
    }
}

/// The commit time `test_decoding` prints with `include-timestamp` in a UTC
/// session (`COMMIT 754 (at 2026-11-27 03:10:26.123456+00)`), in
/// microseconds since the Unix epoch.
pub fn commit_time_us(line: &str) -> Option<u64> {
    let at = line.split_once("(at ")?.1.strip_suffix(')')?;
    let (date, time) = at.split_once(' ')?;
    let time = time.strip_suffix("+00")?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // (PostgreSQL's timestamps end in the year 294276: past it the
    // arithmetic below would overflow)
    let calendar = (1..=294_276).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&day);
    if !calendar || hh > 23 || mm > 59 || ss > 60 || frac.len() > 9 {
        return None;
    }
    let nanos: u64 = format!("{frac:0<9}").parse().ok()?;
    // days from the civil date (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days.checked_mul(86_400)?.checked_add(hh * 3600 + mm * 60 + ss)?;
    secs.checked_mul(1_000_000)?.checked_add(nanos / 1000)
}

/// A line of `POSTAI SUBSCRIBE`'s stream (each one CopyData).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// `R <lsn>\t<row>`: a row as the regional's slot gave it.
    Row { lsn: &'a str, data: &'a str },
    /// `K <lsn>`: after each poll, where the primary's WAL stands.
    Keepalive(Lsn),
    /// `V <lsn>`: every commit up to this position is visible on the
    /// primary (a commit's WAL record is written before it is visible, and
    /// the stream sends it from the record): an answer read from the
    /// primary after this line reflects every commit up to it. Sent by a
    /// regional that probes the primary, before its opening and its feeds.
    Visible(Lsn),
    /// `X <lsn>`: the regional started a new slot there; what came before
    /// may never be streamed.
    Reset(Lsn),
    /// `C <lsn>`: the stream continues after this position with nothing
    /// missing (the rows kept since follow, then one `K`).
    Continue(Lsn),
    /// `O <origin>`: the positions that follow are on this history (the
    /// cluster and the timeline of the server the regional's slot is on):
    /// first in every subscription, and before each `X`. A position of
    /// another history is never continued: a failover that lost commits
    /// starts a timeline that reuses their positions for other commits.
    Origin(&'a str),
}

impl<'a> Line<'a> {
    /// `None` for a line this protocol does not have (or an unreadable LSN).
    pub fn parse(line: &'a str) -> Option<Line<'a>> {
        let (tag, rest) = line.split_at_checked(2)?;
        match tag {
            "R " => rest.split_once('\t').map(|(lsn, data)| Line::Row { lsn, data }),
            "K " => parse_lsn(rest).map(Line::Keepalive),
            "V " => parse_lsn(rest).map(Line::Visible),
            "X " => parse_lsn(rest).map(Line::Reset),
            "C " => parse_lsn(rest).map(Line::Continue),
            "O " if !rest.is_empty() => Some(Line::Origin(rest)),
            _ => None,
        }
    }

    /// The line as sent.
    pub fn to_text(&self) -> String {
        match self {
            Line::Row { lsn, data } => format!("R {lsn}\t{data}"),
            Line::Keepalive(l) => format!("K {}", fmt_lsn(*l)),
            Line::Visible(l) => format!("V {}", fmt_lsn(*l)),
            Line::Reset(l) => format!("X {}", fmt_lsn(*l)),
            Line::Continue(l) => format!("C {}", fmt_lsn(*l)),
            Line::Origin(o) => format!("O {o}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(Lsn(0x16_B374_D848)));
        assert_eq!(fmt_lsn(Lsn(0x16_B374_D848)), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(Lsn(0)));
        for bad in ["", "16", "x/1", "1/", "100000000/0", "0/100000000"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn rows_decode() {
        let c = Catalog::new();
        assert_eq!(decode("0/10", "BEGIN 123", &c), Record::Begin);
        assert_eq!(decode("0/20", "COMMIT 123 (at 2026-11-27 03:10:26+00)", &c), Record::Commit(Some(Lsn(0x20))));
        assert_eq!(decode("junk", "COMMIT 123", &c), Record::Commit(None));
        assert_eq!(
            decode("0/30", "message: transactional: 0 prefix: postai, sz: 0 content:", &c),
            Record::Barrier(Some(Lsn(0x30)))
        );
        assert_eq!(
            decode("0/40", "message: transactional: 1 prefix: postai_ddl, sz: 6 content:CREATE", &c),
            Record::Change(vec![ChangeTarget::All])
        );
        assert_eq!(decode("0/50", "table public.unknown: INSERT: id[integer]:1", &c), Record::Other);
        assert_eq!(decode("0/60", "table public.x: INSERT garbage", &c), Record::Change(vec![ChangeTarget::All]));
    }

    #[test]
    fn ddl_messages() {
        assert!(is_ddl_message("message: transactional: 1 prefix: postai_ddl, sz: 11 content:ALTER TABLE"));
        assert!(!is_ddl_message("message: transactional: 0 prefix: postai_ddl, sz: 0 content:"));
        assert!(!is_ddl_message("message: transactional: 1 prefix: postai_ddl_x, sz: 0 content:"));
        assert!(!is_ddl_message("message: transactional: 1 prefix: postai, sz: 0 content:"));
    }

    #[test]
    fn commit_timestamps() {
        assert_eq!(commit_time_us("COMMIT 754 (at 2026-11-27 03:10:26.5+00)"), Some(1_795_749_026_500_000));
        assert_eq!(commit_time_us("COMMIT 1 (at 2000-03-01 00:00:00+00)"), Some(951_868_800_000_000));
        for bad in [
            "COMMIT 1",
            "COMMIT 1 (at 2026-13-01 00:00:00+00)",
            "COMMIT 1 (at 2026-11-27 03:10:26+02)",
            "COMMIT (at x y)",
            "COMMIT 1 (at 600000-01-01 00:00:00+00)",
            "COMMIT 1 (at 9223372036854775807-01-01 00:00:00+00)",
            "COMMIT 1 (at 0-01-01 00:00:00+00)",
        ] {
            assert_eq!(commit_time_us(bad), None, "{bad}");
        }
    }

    #[test]
    fn subscription_lines_round_trip() {
        for line in [
            Line::Row { lsn: "0/16B3748", data: "table public.t: INSERT: id[integer]:1\tx" },
            Line::Keepalive(Lsn(5)),
            Line::Visible(Lsn(4)),
            Line::Reset(Lsn(1 << 33)),
            Line::Continue(Lsn(0)),
            Line::Origin("7312345678901234567/00000002"),
        ] {
            let text = line.to_text();
            assert_eq!(Line::parse(&text), Some(line), "{text}");
        }
        for bad in ["", "R", "K x", "Z 0/1", "R 0/1 no tab", "é", "O "] {
            assert_eq!(Line::parse(bad), None, "{bad}");
        }
    }
}

//! `POSTAI SUBSCRIBE`: the CDC rows this proxy applies, streamed to the
//! edges behind it.

use super::*;
use postai_core::stream::{Line, publisher};

/// A subscription line as CopyData.
fn line_into(out: &mut BytesMut, line: Line<'_>) {
    frame_into(out, b'd', line.to_text().as_bytes());
}

/// `POSTAI SUBSCRIBE [FROM 'lsn']`: `None` for another statement; the FROM
/// position, or why the statement is malformed.
pub(super) fn subscribe_command(sql: &str) -> Option<Result<Option<Lsn>, String>> {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_whitespace().collect();
    if words.len() < 2 || !words[0].eq_ignore_ascii_case("postai") || !words[1].eq_ignore_ascii_case("subscribe") {
        return None;
    }
    Some(match words[2..] {
        [] => Ok(None),
        [from, at] if from.eq_ignore_ascii_case("from") => at
            .strip_prefix('\'')
            .and_then(|a| a.strip_suffix('\''))
            .and_then(protocol::parse_lsn)
            .map(|l| Some(Lsn(l)))
            .ok_or_else(|| format!("postai-edge: POSTAI SUBSCRIBE FROM needs an LSN such as '0/16B3748', not {at}")),
        _ => Err("postai-edge: usage: POSTAI SUBSCRIBE [FROM 'lsn']".to_string()),
    })
}

impl Client {
    /// `POSTAI SUBSCRIBE [FROM 'lsn']` (an edge behind this regional proxy):
    /// CopyOut of every CDC row this proxy's slot reader applies,
    /// `R <lsn>\t<row>`, and `K <lsn>` after each poll; `O <origin>` first
    /// and before each `X` (the history positions are on); `X <lsn>` when the
    /// reader starts a new slot there (what came before may never be
    /// streamed). The stream opens with `C <lsn>` when it continues after
    /// FROM's position with nothing missing (the rows kept since follow, then
    /// one `K`), else with a `K` (where it starts; the subscriber knows
    /// nothing of before). Ends with an error when the subscriber falls behind, or
    /// when it leaves.
    pub(super) async fn stream_cdc(&mut self, from: Option<Lsn>) -> anyhow::Result<()> {
        if self.proxy.config.cdc.source != crate::config::CdcSource::Slot || !self.proxy.config.cdc.enabled {
            let e = "postai-edge: POSTAI SUBSCRIBE needs a proxy reading a slot of its own ([cdc] source = \"slot\")";
            self.refuse("55000", e).await?;
            return Ok(());
        }
        // every row change of every table, whatever its privileges and row
        // security say: only for a role that could read the WAL itself
        // (every name qualified: the client's search_path and temporary
        // objects must not answer for the catalog)
        let may = "SELECT (r.rolsuper OR r.rolreplication)::pg_catalog.text FROM pg_catalog.pg_roles r \
                   WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER";
        let msgs = self.own_query(may).await?;
        if protocol::first_value(&msgs).as_deref() != Some("true") {
            let e = "postai-edge: permission denied: POSTAI SUBSCRIBE needs a superuser or a role with REPLICATION";
            self.refuse("42501", e).await?;
            return Ok(());
        }
        // listening and the opening under the history's lock: no feed missed or sent twice
        let mut out = BytesMut::with_capacity(4096);
        frame_into(&mut out, b'H', &[0, 0, 1, 0, 0]);
        let (mut rx, opened) = {
            let history = self.proxy.cdc_history.lock().unwrap_or_else(|p| p.into_inner());
            // only a regional keeps a history to continue from
            let regional = self.proxy.config.role == crate::config::Role::Regional;
            let last = Some(Lsn(self.proxy.cdc_last.load(Ordering::Relaxed))).filter(|l| l.0 > 0);
            let opened = publisher::opening(&history, from.filter(|_| regional), last, &mut |l| line_into(&mut out, l));
            // (after the opening: its history comes first)
            if let Some(v) = self.proxy.visible_position().filter(|_| opened.is_ok()) {
                line_into(&mut out, Line::Visible(v));
            }
            (self.proxy.cdc_feed.subscribe(), opened)
        };
        if let Err(e) = opened {
            self.refuse("55000", &format!("postai-edge: {e}")).await?;
            return Ok(());
        }
        self.wr.write_all(&out).await?;
        let mut probe = [0u8; 1];
        let mut ended = self.proxy.subscriptions.subscribe();
        loop {
            let feed = tokio::select! {
                f = rx.recv() => f,
                _ = ended.changed() => {
                    let e = "postai-edge: the regional proxy ended this subscription; subscribe again";
                    self.wr.write_all(&protocol::error_response("ERROR", "57P01", e)).await?;
                    return Ok(());
                }
                // the subscriber sends nothing: a read returns when it leaves
                r = self.rd.read(&mut probe) => {
                    let _ = r;
                    return Ok(());
                }
            };
            let feed = match feed {
                Ok(f) => f,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let e = format!("postai-edge: the subscriber fell {n} polls behind; subscribe again");
                    self.wr.write_all(&protocol::error_response("ERROR", "53400", &e)).await?;
                    return Ok(());
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            };
            out.clear();
            let last = self.proxy.cdc_last.load(Ordering::Relaxed);
            if let Some(v) = self.proxy.visible_position() {
                line_into(&mut out, Line::Visible(v));
            }
            publisher::feed_lines(&feed, last, &mut |l| line_into(&mut out, l));
            self.wr.write_all(&out).await?;
        }
    }
}

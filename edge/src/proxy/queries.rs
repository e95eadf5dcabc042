//! `SHOW POSTAI QUERIES`: what each statement shape asked of this proxy
//! (the core's counts: answered by L1, by L2, sent upstream, and the time
//! upstream took), most calls first. The optimization engine reads it
//! beside `pg_stat_statements`, which never sees what the cache answered.
//! Query texts are other sessions' too: like `pg_stat_statements`, only a
//! superuser or a member of `pg_read_all_stats` sees them (or a user of
//! `admin_users` or `stats_users`). Simple protocol.

use tokio::io::AsyncWriteExt;

use super::{Client, text_result};
use crate::protocol;

/// Whether `sql` is the command (case, spaces and a final `;` do not matter).
pub(super) fn is_show_queries(sql: &str) -> bool {
    let words: Vec<String> = sql.trim().trim_end_matches(';').split_whitespace().map(str::to_ascii_lowercase).collect();
    words == ["show", "postai", "queries"]
}

const COLUMNS: [&str; 8] =
    ["fingerprint", "query", "calls", "l1_hits", "l2_hits", "upstream", "upstream_ms", "hit_rate"];

impl Client {
    pub(super) async fn show_queries(&mut self) -> anyhow::Result<()> {
        let may = self.admin_privilege(None).await?;
        if !(may.admin || may.stats) {
            let e = "postai-edge: permission denied: SHOW POSTAI QUERIES needs a user of admin_users or \
                     stats_users, a superuser or a member of pg_read_all_stats";
            self.refuse("42501", e).await?;
            return Ok(());
        }
        let rows: Vec<Vec<String>> = self
            .proxy
            .node()
            .shape_rows()
            .into_iter()
            .map(|r| {
                let c = r.counters;
                let calls = c.calls();
                let hit = if calls == 0 { 0.0 } else { (c.l1_hits + c.l2_hits) as f64 * 100.0 / calls as f64 };
                vec![
                    format!("{:016x}", r.fingerprint),
                    r.text,
                    calls.to_string(),
                    c.l1_hits.to_string(),
                    c.l2_hits.to_string(),
                    c.upstream.to_string(),
                    format!("{:.3}", c.upstream_us as f64 / 1e3),
                    format!("{hit:.1}"),
                ]
            })
            .collect();
        let mut out = text_result(&COLUMNS, &rows, "SHOW");
        out.extend_from_slice(&protocol::ready_for_query(self.wire.status()));
        self.wr.write_all(&out).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_is_recognised_by_its_words() {
        assert!(super::is_show_queries("show postai   queries;"));
        assert!(!super::is_show_queries("SHOW POSTAI QUERIES x"));
    }
}

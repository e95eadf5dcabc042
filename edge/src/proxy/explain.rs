//! `POSTAI EXPLAIN <query>`: what the proxy's core decides about a
//! statement for this session now (kind, tables and keys, cacheable or why
//! not, how long an entry lives, where it would be answered), then
//! PostgreSQL's plan of it (`EXPLAIN`, which runs nothing), asked on the
//! session's own connection and role. The plan is asked only of a single
//! statement whose effects the core can see: text that holds several
//! statements, calls functions of unknown effect or reaches rows it does
//! not name is explained by the core alone (an `EXPLAIN` of it could run
//! more than the plan), or in a session that reads backslash escapes in
//! strings (its text may hide statements the lexer did not see), and so is
//! any statement inside a transaction (an `EXPLAIN` that fails would abort
//! the client's). The plan is asked in the extended protocol, where
//! PostgreSQL parses one statement at most. The command itself comes in
//! the simple protocol.

use tokio::io::AsyncWriteExt;

use super::{Client, text_result};
use crate::protocol::{self, Message};

/// The query of `POSTAI EXPLAIN <query>`, if `sql` is that command.
pub(super) fn explain_command(sql: &str) -> Option<&str> {
    let (a, rest) = sql.trim_start().split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (b, query) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if !a.eq_ignore_ascii_case("postai") || !b.eq_ignore_ascii_case("explain") {
        return None;
    }
    Some(query.trim())
}

impl Client {
    pub(super) async fn postai_explain(&mut self, query: &str) -> anyhow::Result<()> {
        let session = self.session;
        let mut rows: Vec<Vec<String>> =
            self.proxy.node().explain(session, query).into_iter().map(|(k, v)| vec![k, v]).collect();
        let plain = self.proxy.node().plain_statement(session, query);
        if self.wire.status() != b'I' || self.wire.unsynced() {
            // an EXPLAIN that fails (a typo) would abort the client's transaction
            rows.push(vec!["plan".into(), "not asked of PostgreSQL inside a transaction".into()]);
        } else if plain && !query.is_empty() {
            // the extended protocol: PostgreSQL refuses to parse more than
            // one statement there, whatever the lexer made of the text
            let msgs = self.own_extended(&format!("EXPLAIN {query}")).await?;
            rows.extend(plan_rows(&msgs));
        } else {
            rows.push(vec!["plan".into(), "not asked of PostgreSQL (its effects are not the core's to see)".into()]);
        }
        let mut out = text_result(&["item", "value"], &rows, "EXPLAIN");
        out.extend_from_slice(&protocol::ready_for_query(self.wire.status()));
        self.wr.write_all(&out).await?;
        Ok(())
    }
}

/// EXPLAIN's lines, or PostgreSQL's error.
fn plan_rows(msgs: &[Message]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for m in msgs {
        match m.tag {
            b'D' => {
                if let Some(Some(line)) = protocol::text_columns(m).and_then(|c| c.into_iter().next()) {
                    out.push(vec!["plan".into(), line]);
                }
            }
            b'E' => out.push(vec!["plan".into(), format!("PostgreSQL: {}", protocol::error_message(m))]),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_and_its_query() {
        assert_eq!(super::explain_command("postai  explain SELECT 1"), Some("SELECT 1"));
        assert_eq!(super::explain_command("POSTAI EXPLAIN"), Some(""));
        assert_eq!(super::explain_command("EXPLAIN SELECT 1"), None);
        assert_eq!(super::explain_command("postaiexplain"), None);
    }
}

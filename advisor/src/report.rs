//! The report as text, for a DBA to read.

use std::fmt::Write;

use crate::Report;

fn short(q: &str) -> String {
    let one: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 100 { format!("{}...", one.chars().take(100).collect::<String>()) } else { one }
}

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    statements(&mut o, r);
    for (title, list) in [("recommended indexes", &r.recommended), ("withdrawn after real execution", &r.withdrawn)] {
        let _ = writeln!(o, "== {title}: {}", list.len());
        for rec in list.iter() {
            recommendation(&mut o, rec);
        }
    }
    rest(&mut o, r);
    o
}

fn statements(o: &mut String, r: &Report) {
    let _ = writeln!(o, "== statements (the {} that cost the database the most time)", r.statements.len());
    for (i, s) in r.statements.iter().enumerate() {
        let _ = writeln!(o, "[{i}] {:.0} calls, {:.1} ms in all: {}", s.calls, s.total_ms, short(&s.query));
        if let Some(c) = &s.cache {
            let _ = writeln!(
                o,
                "    at the proxy: {:.0} calls, {:.1} % answered by its cache ({:.0} sent upstream)",
                c.calls, c.hit_pct, c.upstream
            );
        }
        if let Some(why) = &s.unplanned {
            let _ = writeln!(o, "    not planned: {why}");
        }
        for b in &s.bottlenecks {
            let _ = writeln!(o, "    {}: {}", b.kind, b.detail);
            if let Some(h) = &b.hint {
                let _ = writeln!(o, "      hint: {h}");
            }
        }
    }
}

fn recommendation(o: &mut String, rec: &crate::Recommendation) {
    let c = &rec.choice;
    let _ = writeln!(
        o,
        "{};\n    estimated: {:.1} ms of reads saved, {:.1} ms of index upkeep, {:.0} kB{}",
        c.ddl,
        c.read_ms_saved,
        c.write_ms_cost,
        c.bytes / 1024.0,
        if c.breaks_hot { "; updates of an indexed column stop being HOT" } else { "" }
    );
    let Some(v) = &rec.verdict else {
        let _ = writeln!(o, "    not verified (no scratch database)");
        return;
    };
    for t in &v.timings {
        let _ = writeln!(
            o,
            "    [{}] {:.3} ms -> {:.3} ms (median of {} runs) with {}",
            t.statement,
            t.before_ms,
            t.after_ms,
            crate::verify::RUNS,
            if t.values.is_empty() { "no parameters" } else { &t.values }
        );
    }
    if !v.unverified.is_empty() {
        let _ = writeln!(o, "    could not run (no representative values, or failed): {:?}", v.unverified);
    }
    if !v.slower.is_empty() {
        let _ = writeln!(o, "    made slower: {:?}", v.slower);
    }
    if v.faster.is_empty() && v.slower.is_empty() {
        let _ = writeln!(o, "    made none of the statements it was chosen for faster");
    }
}

/// Declined candidates, the proxy's shapes, schema hints, indexes to drop.
fn rest(o: &mut String, r: &Report) {
    if !r.declined.is_empty() {
        let n = r.declined.len();
        let _ = writeln!(o, "== considered, not recommended (upkeep over saving, or over the budget): {n}");
        for c in r.declined.iter().take(10) {
            let _ = writeln!(
                o,
                "{}: {:.1} ms of reads saved, {:.1} ms of index upkeep, {:.0} kB{}",
                c.ddl,
                c.read_ms_saved,
                c.write_ms_cost,
                c.bytes / 1024.0,
                if c.breaks_hot { "; its updates would stop being HOT" } else { "" }
            );
        }
    }
    if !r.cache_only.is_empty() {
        let _ = writeln!(o, "== at the proxy only (not among the statements above): {}", r.cache_only.len());
        for c in r.cache_only.iter().take(20) {
            let _ = writeln!(o, "{:.0} calls, {:.1} % from its cache: {}", c.calls, c.hit_pct, short(&c.query));
        }
    }
    let _ = writeln!(o, "== schema hints: {}", r.hints.len());
    for h in &r.hints {
        let _ = writeln!(o, "{} {}: {}\n    {}", h.kind, h.object, h.detail, h.action);
    }
    let _ = writeln!(o, "== indexes to drop: {}", r.drops.len());
    for d in &r.drops {
        let _ = writeln!(
            o,
            "{};  -- {}; {:.0} kB, {:.1} ms of upkeep saved",
            d.ddl,
            d.reason,
            d.bytes / 1024.0,
            d.write_ms_saved
        );
    }
}

/// One line per recommendation, withdrawal and proposed drop: what a
/// background run announces when one appears.
pub fn headlines(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = r.recommended.iter().map(|x| format!("recommended: {};", x.choice.ddl)).collect();
    out.extend(r.withdrawn.iter().map(|x| format!("withdrawn after real execution: {};", x.choice.ddl)));
    out.extend(r.drops.iter().map(|d| format!("drop proposed: {}; ({})", d.ddl, d.reason)));
    out
}

/// The lines of `now` not in `before`.
pub fn new_lines(before: &[String], now: &[String]) -> Vec<String> {
    now.iter().filter(|l| !before.contains(l)).cloned().collect()
}

/// What [`crate::apply::measure`] found, as text.
pub fn render_measured(m: &[crate::apply::Measured]) -> String {
    let mut o = String::new();
    for x in m {
        let _ = writeln!(o, "== {}", x.index);
        for i in &x.impacts {
            let after = i.after_ms.map_or("not run since".to_string(), |a| format!("{a:.3} ms"));
            let _ = writeln!(
                o,
                "{:.3} ms -> {after} per call ({:.0} calls since): {}",
                i.before_ms,
                i.calls_since,
                short(&i.query)
            );
        }
        if let Some(d) = &x.drop {
            let _ = writeln!(o, "no statement it was built for got faster: {d};");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_run_announces_only_what_is_new() {
        let before = vec!["recommended: CREATE INDEX ON a (x);".to_string()];
        let now = vec!["recommended: CREATE INDEX ON a (x);".to_string(), "drop proposed: DROP INDEX b;".to_string()];
        assert_eq!(new_lines(&before, &now), vec!["drop proposed: DROP INDEX b;"]);
        assert!(new_lines(&now, &before).is_empty());
    }
}

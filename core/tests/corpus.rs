//! Data-driven: every statement of `corpus.toml` classified as the corpus says.

use postai_core::sql::{Analyzer, AnalyzerConfig, ArgRef, Catalog, Lexer, canonical_literal};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Corpus {
    schema: BTreeMap<String, String>,
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sql: String,
    kind: String,
    reads: Vec<String>,
    writes: Vec<String>,
    cacheable: bool,
    keys: Option<Vec<String>>,
}

#[test]
fn corpus_classification() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus.toml"))
        .expect("corpus.toml is readable");
    let corpus: Corpus = toml::from_str(&text).expect("corpus.toml parses");
    assert!(corpus.case.len() >= 80, "the corpus has at least 80 statements");
    let mut catalog = Catalog::new();
    for (table, pk) in &corpus.schema {
        catalog.set_primary_key(table, pk);
    }
    let mut analyzer = Analyzer::new(AnalyzerConfig::default(), catalog);
    let mut failures = Vec::new();
    for case in &corpus.case {
        let got = match analyzer.lookup(&case.sql) {
            Ok((shape, _)) => {
                let names = |ids: &[postai_core::sql::TableId]| -> Vec<String> {
                    let mut v: Vec<String> = ids.iter().map(|t| analyzer.catalog().name(*t).to_string()).collect();
                    v.sort();
                    v
                };
                let accesses: Vec<_> = shape.read_keys.iter().chain(shape.write_keys.iter()).collect();
                let keys = (!accesses.is_empty()).then(|| {
                    let mut lexer = Lexer::new();
                    let lexed = lexer.lex(&case.sql).expect("lexed once already").clone();
                    let mut out = Vec::new();
                    for a in accesses {
                        for arg in &a.args {
                            let v = match arg {
                                ArgRef::Param(i) => format!("${}", i + 1),
                                ArgRef::Literal(i) => {
                                    canonical_literal(&case.sql, &lexed.literals[*i as usize]).unwrap_or_default()
                                }
                            };
                            out.push(format!("{}:{v}", analyzer.catalog().name(a.table)));
                        }
                    }
                    out
                });
                (
                    shape.kind.to_string(),
                    names(&shape.reads),
                    names(&shape.writes),
                    shape.is_cacheable(),
                    keys,
                    format!("{:?}", shape.cacheable),
                )
            }
            Err(e) => ("other".to_string(), vec![], vec![], false, None, e.to_string()),
        };
        let mut want_reads = case.reads.clone();
        want_reads.sort();
        let mut want_writes = case.writes.clone();
        want_writes.sort();
        let want = (case.kind.clone(), want_reads, want_writes, case.cacheable, case.keys.clone());
        if (got.0.clone(), got.1.clone(), got.2.clone(), got.3, got.4.clone()) != want {
            failures.push(format!(
                "{}: {}\n   want kind={} reads={:?} writes={:?} cacheable={} keys={:?}\n   got  kind={} reads={:?} writes={:?} cacheable={} keys={:?} ({})",
                case.name, case.sql, want.0, want.1, want.2, want.3, want.4, got.0, got.1, got.2, got.3, got.4, got.5
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases differ:\n{}",
        failures.len(),
        corpus.case.len(),
        failures.join("\n")
    );
}

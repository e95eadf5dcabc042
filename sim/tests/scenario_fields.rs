//! A scenario file never panics the simulator: every number in it (every
//! field of every section and of every fault kind), set out of range, is
//! either refused with an error that names the file and the field, or the
//! scenario runs.

use std::panic::{AssertUnwindSafe, catch_unwind};

use postai_sim::{Scenario, run_scenario};
use toml::Value;

/// A small world (six sites, four seconds, a few thousand queries) with one
/// fault of every kind, so that each fault's fields are reached.
const BASE: &str = r#"
name = "fields"
description = "every field of a scenario"
seed = 3
duration_s = 4
warmup_s = 1
warm_start_s = 30
sites = 6

[workload]
rate_qps = 600.0
keys = 500
bypass_write_qps = 5.0
eu_resident_share = 0.1

[network]
loss = 0.01

[[faults]]
kind = "primary-crash"
at_s = 1.5
restart_after_s = 1.0

[[faults]]
kind = "replica-crash"
at_s = 1.2
region = "APAC"
restart_after_s = 1.0

[[faults]]
kind = "regional-outage"
at_s = 1.1
region = "US"
duration_s = 0.5

[[faults]]
kind = "slot-drop"
at_s = 2.1
region = "US"

[[faults]]
kind = "edge-restart"
at_s = 2.3
region = "APAC"

[[faults]]
kind = "tier-loss"
at_s = 2.0
tier = "L2"
region = "EU"

[[faults]]
kind = "edge-partition"
at_s = 2.2
region = "EU"
duration_s = 0.5

[[faults]]
kind = "primary-partition"
at_s = 2.4
region = "APAC"
duration_s = 0.5

[[faults]]
kind = "slow-link"
at_s = 2.6
region = "US"
extra_ms = 50.0
duration_s = 0.5

[[faults]]
kind = "cdc-stall"
at_s = 2.8
duration_s = 0.5
"#;

/// Paths of every number in `v` (a table key, or an array index).
fn numbers(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Integer(_) | Value::Float(_) => out.push(path.clone()),
        Value::Table(t) => {
            for (k, x) in t {
                path.push(k.clone());
                numbers(x, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i.to_string());
                numbers(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'v>(v: &'v mut Value, path: &[String]) -> &'v mut Value {
    path.iter().fold(v, |v, k| match v {
        Value::Table(t) => t.get_mut(k).expect("a path of the document"),
        Value::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("paths end at numbers"),
    })
}

#[test]
fn out_of_range_numbers_are_refused_or_run() {
    let base = Scenario::parse("fields.toml", BASE).expect("the base scenario is valid");
    // every field, defaults included, as the file would spell it
    let doc: Value = Value::try_from(&base).expect("a scenario is a TOML document");
    let mut paths = Vec::new();
    numbers(&doc, &mut Vec::new(), &mut paths);
    assert!(paths.len() > 60, "only {} numbers found", paths.len());
    let (mut refused, mut ran, mut panicked) = (0, 0, Vec::new());
    for path in &paths {
        let name = path.join(".");
        let floats = [-1.0, 0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300];
        let ints = [-1, 0, i64::MAX];
        let bad: Vec<Value> = match at(&mut doc.clone(), path) {
            Value::Float(_) => floats.iter().map(|f| Value::Float(*f)).collect(),
            _ => ints.iter().map(|i| Value::Integer(*i)).collect(),
        };
        for value in bad {
            let mut d = doc.clone();
            *at(&mut d, path) = value.clone();
            let text = toml::to_string(&d).expect("the document prints");
            match Scenario::parse("fields.toml", &text) {
                Err(e) => {
                    let (e, field) = (e.to_string(), path.last().expect("a path"));
                    assert!(e.starts_with("fields.toml") && e.contains(field.as_str()), "{name} = {value}: {e}");
                    refused += 1;
                }
                Ok(sc) => {
                    if catch_unwind(AssertUnwindSafe(|| run_scenario(&sc))).is_err() {
                        panicked.push(format!("{name} = {value}"));
                    }
                    ran += 1;
                }
            }
        }
    }
    assert!(panicked.is_empty(), "accepted, and the run panicked: {panicked:?}");
    assert!(refused > 0 && ran > 0, "refused {refused}, ran {ran}");
}

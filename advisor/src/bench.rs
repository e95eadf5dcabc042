//! The advisor's benchmark: a TPC-H-derived analytic schema (its tables and
//! columns, data generated here, deterministic) with parameterised
//! TPC-H-style queries, and an OLTP part with writes. The same workload
//! runs on copies of the database with no advice, with the Dexter-style
//! reference's indexes and with ours; measured by real execution.

use std::time::Instant;

use tokio_postgres::Client;

use crate::db::{AdvisorError, exec};

/// The schema and its data at scale `sf` (1.0 = TPC-H's SF 1 row counts;
/// the benchmark uses about 0.02).
pub fn schema_sql(sf: f64) -> String {
    let n = |base: f64| ((base * sf).round() as i64).max(10);
    let (supp, cust, part, orders) = (n(10_000.0), n(150_000.0), n(200_000.0), n(1_500_000.0));
    format!(
        "CREATE TABLE region (r_regionkey int PRIMARY KEY, r_name text NOT NULL);
         INSERT INTO region SELECT g, 'region' || g FROM generate_series(0, 4) g;
         CREATE TABLE nation (n_nationkey int PRIMARY KEY, n_name text NOT NULL, n_regionkey int NOT NULL);
         INSERT INTO nation SELECT g, 'nation' || g, g % 5 FROM generate_series(0, 24) g;
         CREATE TABLE supplier (s_suppkey int PRIMARY KEY, s_name text NOT NULL, s_nationkey int NOT NULL);
         INSERT INTO supplier SELECT g, 'Supplier#' || g, g % 25 FROM generate_series(1, {supp}) g;
         CREATE TABLE customer (c_custkey int PRIMARY KEY, c_name text NOT NULL, c_nationkey int NOT NULL,
             c_mktsegment text NOT NULL, c_acctbal numeric NOT NULL);
         INSERT INTO customer SELECT g, 'Customer#' || g, (g * 7) % 25,
             (ARRAY['AUTOMOBILE','BUILDING','FURNITURE','MACHINERY','HOUSEHOLD'])[1 + g % 5], (g * 37) % 10000
             FROM generate_series(1, {cust}) g;
         CREATE TABLE part (p_partkey int PRIMARY KEY, p_name text NOT NULL, p_brand text NOT NULL,
             p_type text NOT NULL, p_size int NOT NULL);
         INSERT INTO part SELECT g, 'part ' || g, 'Brand#' || (1 + g % 25),
             (ARRAY['STANDARD','SMALL','MEDIUM','LARGE','ECONOMY','PROMO'])[1 + g % 6] || ' ' ||
             (ARRAY['ANODIZED','BURNISHED','PLATED','POLISHED','BRUSHED'])[1 + (g / 6) % 5], 1 + g % 50
             FROM generate_series(1, {part}) g;
         CREATE TABLE orders (o_orderkey int PRIMARY KEY, o_custkey int NOT NULL, o_orderstatus text NOT NULL,
             o_totalprice numeric NOT NULL, o_orderdate date NOT NULL, o_orderpriority text NOT NULL);
         INSERT INTO orders SELECT g, 1 + (g * 7919) % {cust}, (ARRAY['O','F','P'])[1 + g % 3], (g * 13) % 50000,
             date '1992-01-01' + (g * 2405 / {orders}), (ARRAY['1-URGENT','2-HIGH','3-MEDIUM','4-NOT SPECIFIED','5-LOW'])[1 + g % 5]
             FROM generate_series(1, {orders}) g;
         CREATE TABLE lineitem (l_orderkey int NOT NULL, l_linenumber int NOT NULL, l_partkey int NOT NULL,
             l_suppkey int NOT NULL, l_quantity int NOT NULL, l_extendedprice numeric NOT NULL,
             l_discount numeric NOT NULL, l_shipdate date NOT NULL, l_returnflag text NOT NULL,
             PRIMARY KEY (l_orderkey, l_linenumber));
         INSERT INTO lineitem SELECT o, l, 1 + (o * 31 + l * 17) % {part}, 1 + (o * 11 + l) % {supp}, 1 + (o + l) % 50,
             ((o + l) % 1000) * 10, ((o + l) % 11) / 100.0, date '1992-01-02' + (o * 2405 / {orders}) + l * 3,
             (ARRAY['R','A','N'])[1 + (o + l) % 3]
             FROM generate_series(1, {orders}) o, generate_series(1, 4) l;
         ANALYZE;"
    )
}

/// One statement of the workload: its text and how to draw its parameters
/// (as text) from a run's counter.
pub struct Query {
    pub name: &'static str,
    pub sql: &'static str,
    pub params: fn(u64) -> Vec<String>,
    /// It writes (the OLTP part).
    pub write: bool,
}

/// The workload: TPC-H-style reads (Q3, Q6, Q14, Q4, Q10-like, a
/// supplier's recent lines) and OLTP statements with writes.
pub fn workload() -> Vec<Query> {
    vec![
        Query {
            name: "Q3 one customer's orders and revenue",
            sql: "SELECT o_orderkey, o_orderdate, sum(l_extendedprice * (1 - l_discount)) FROM customer \
                  JOIN orders ON o_custkey = c_custkey JOIN lineitem ON l_orderkey = o_orderkey \
                  WHERE c_custkey = $1::int GROUP BY o_orderkey, o_orderdate ORDER BY o_orderdate",
            params: |i| vec![(1 + (i * 7) % 3000).to_string()],
            write: false,
        },
        Query {
            name: "Q6 a week's discounted revenue",
            sql: "SELECT sum(l_extendedprice * l_discount) FROM lineitem WHERE l_shipdate >= $1::date \
                  AND l_shipdate < $2::date AND l_discount BETWEEN 0.02 AND 0.09 AND l_quantity < 30",
            params: |i| vec![shipdate(i), shipdate_plus(i, 7)],
            write: false,
        },
        Query {
            name: "Q14 one part's lines",
            sql: "SELECT sum(l_extendedprice), count(*) FROM lineitem WHERE l_partkey = $1::int",
            params: |i| vec![(1 + (i * 13) % 4000).to_string()],
            write: false,
        },
        Query {
            name: "Q4 a month's orders of a priority",
            sql: "SELECT count(*) FROM orders WHERE o_orderdate >= $1::date AND o_orderdate < $2::date \
                  AND o_orderpriority = $3",
            params: |i| {
                let p = ["1-URGENT", "2-HIGH", "3-MEDIUM", "5-LOW"][(i % 4) as usize];
                vec![shipdate(i), shipdate_plus(i, 30), p.to_string()]
            },
            write: false,
        },
        Query {
            name: "supplier's latest lines",
            sql: "SELECT l_orderkey, l_shipdate FROM lineitem WHERE l_suppkey = $1::int ORDER BY l_shipdate DESC LIMIT 10",
            params: |i| vec![(1 + (i * 3) % 200).to_string()],
            write: false,
        },
        Query {
            name: "customer's recent orders",
            sql: "SELECT o_orderkey, o_totalprice FROM orders WHERE o_custkey = $1::int ORDER BY o_orderdate DESC LIMIT 5",
            params: |i| vec![(1 + (i * 11) % 3000).to_string()],
            write: false,
        },
        Query {
            name: "OLTP order status",
            sql: "UPDATE orders SET o_orderstatus = $1 WHERE o_orderkey = $2::int",
            params: |i| vec![["O", "F", "P"][(i % 3) as usize].to_string(), (1 + (i * 101) % 30000).to_string()],
            write: true,
        },
        Query {
            name: "OLTP new line",
            sql: "INSERT INTO lineitem VALUES ($1::int, $2::int, 1 + $1::int % 4000, 1 + $1::int % 200, 5, 100, 0.05, \
                  '1998-08-01'::date, 'N') ON CONFLICT DO NOTHING",
            params: |i| vec![(1 + (i * 37) % 30000).to_string(), (5 + i / 30000).to_string()],
            write: true,
        },
    ]
}

fn shipdate(i: u64) -> String {
    shipdate_plus(i, 0)
}

fn shipdate_plus(i: u64, days: u64) -> String {
    chrono_free_date(1 + (i * 97) % 2300 + days)
}

/// `1992-01-01` plus `days`, as ISO text (no date library: the proleptic
/// Gregorian calendar by hand).
fn chrono_free_date(days: u64) -> String {
    let (mut y, mut d) = (1992i64, days as i64);
    loop {
        let len = if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 366 } else { 365 };
        if d < len {
            break;
        }
        d -= len;
        y += 1;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let months = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut m = 0;
    while d >= months[m] {
        d -= months[m];
        m += 1;
    }
    format!("{y:04}-{:02}-{:02}", m + 1, d + 1)
}

/// Runs each statement of `queries` `n` times (parameters from the counter
/// `from..from + n`, as literals): each statement's total ms, in order.
pub async fn run(client: &Client, queries: &[Query], n: u64, from: u64) -> Result<Vec<f64>, AdvisorError> {
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let _ = exec(client, "DEALLOCATE bench").await;
        exec(client, &format!("PREPARE bench AS {}", q.sql)).await?;
        let t = Instant::now();
        for i in from..from + n {
            let args: Vec<String> = (q.params)(i).iter().map(|v| crate::db::literal(v)).collect();
            exec(client, &format!("EXECUTE bench({})", args.join(", "))).await?;
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = exec(client, "DEALLOCATE bench").await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_counted_from_1992() {
        assert_eq!(chrono_free_date(0), "1992-01-01");
        assert_eq!(chrono_free_date(59), "1992-02-29");
        assert_eq!(chrono_free_date(366), "1993-01-01");
        assert_eq!(chrono_free_date(2299), "1998-04-18");
    }

    #[test]
    fn every_statement_draws_its_parameters() {
        for q in workload() {
            let n = crate::plan::param_count(q.sql);
            assert_eq!((q.params)(7).len(), n, "{}", q.name);
        }
    }
}

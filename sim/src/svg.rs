//! An SVG of a report: read-latency CDF per region, and a world map of each
//! site's read p95 (equirectangular; dots coloured against the 10 ms target).

use std::fmt::Write;

use crate::run::Report;

const W: f64 = 1200.0;
const H: f64 = 520.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn render(r: &Report, target_ms: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="24" font-size="16" font-weight="bold">{} (seed {}): read p95 {:.1} ms, hit rate {:.1} %</text>"#,
        esc(&r.scenario),
        r.seed,
        r.reads.p95_ms,
        r.hit_rate * 100.0
    );
    cdf_panel(&mut s, r, 50.0, 50.0, 400.0, 420.0, target_ms);
    map_panel(&mut s, r, 490.0, 50.0, 690.0, 345.0, target_ms);
    s.push_str("</svg>\n");
    s
}

/// x: latency on a log scale 0.1 ms .. 1000 ms; y: share of reads.
fn cdf_panel(s: &mut String, r: &Report, x0: f64, y0: f64, w: f64, h: f64, target_ms: f64) {
    let xs = |ms: f64| x0 + (ms.clamp(0.1, 1000.0).log10() + 1.0) / 4.0 * w;
    let ys = |q: f64| y0 + h - q * h;
    let _ = writeln!(s, r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#fafafa" stroke="#999"/>"##);
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let x = xs(ms);
        let _ = writeln!(s, r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#ddd"/>"##, y0 + h);
        let _ = writeln!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{ms} ms</text>"#, y0 + h + 16.0);
    }
    for q in [0.5, 0.95, 0.99] {
        let y = ys(q);
        let _ = writeln!(s, r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##, x0 + w);
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">p{}</text>"#, x0 - 2.0, y + 4.0, (q * 100.0) as u32);
    }
    let tx = xs(target_ms);
    let _ =
        writeln!(s, r##"<line x1="{tx}" y1="{y0}" x2="{tx}" y2="{}" stroke="#c00" stroke-dasharray="4 3"/>"##, y0 + h);
    let _ = writeln!(s, r##"<text x="{}" y="{}" fill="#c00">target</text>"##, tx + 3.0, y0 + 12.0);
    let colours = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"];
    for (i, (region, points)) in r.read_cdf_by_region.iter().enumerate() {
        let c = colours[i % colours.len()];
        let mut d = String::new();
        for (j, (ms, q)) in points.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1} ", if j == 0 { "M" } else { "L" }, xs(*ms), ys(*q));
        }
        let _ = writeln!(s, r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="2"/>"#);
        let ly = y0 + h - 60.0 + i as f64 * 16.0;
        let _ = writeln!(s, r#"<rect x="{}" y="{}" width="12" height="4" fill="{c}"/>"#, x0 + w - 90.0, ly - 4.0);
        let _ = writeln!(s, r#"<text x="{}" y="{ly}">{}</text>"#, x0 + w - 74.0, esc(region));
    }
    let _ = writeln!(s, r#"<text x="{x0}" y="{}">Read latency CDF by region</text>"#, y0 - 6.0);
}

fn colour(p95_ms: f64, target_ms: f64) -> &'static str {
    if p95_ms <= 0.0 {
        "#bbbbbb"
    } else if p95_ms < target_ms {
        "#2ca02c"
    } else if p95_ms < 5.0 * target_ms {
        "#ffbf00"
    } else {
        "#d62728"
    }
}

fn map_panel(s: &mut String, r: &Report, x0: f64, y0: f64, w: f64, h: f64, target_ms: f64) {
    let xs = |lon: f64| x0 + (lon + 180.0) / 360.0 * w;
    let ys = |lat: f64| y0 + (90.0 - lat) / 180.0 * h;
    let _ = writeln!(s, r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#eef4fb" stroke="#999"/>"##);
    for lon in (-180..=180).step_by(30) {
        let x = xs(lon as f64);
        let _ = writeln!(s, r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#d5e2f0"/>"##, y0 + h);
    }
    for lat in (-90..=90).step_by(30) {
        let y = ys(lat as f64);
        let _ = writeln!(s, r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#d5e2f0"/>"##, x0 + w);
    }
    for (name, lat, lon, p95) in &r.site_read_p95_ms {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}" stroke="#333" stroke-width="0.5"><title>{}: read p95 {:.1} ms</title></circle>"##,
            xs(*lon),
            ys(*lat),
            colour(*p95, target_ms),
            esc(name),
            p95
        );
    }
    let _ = writeln!(s, r#"<text x="{x0}" y="{}">Read p95 per site (hover for the value)</text>"#, y0 - 6.0);
    let ly = y0 + h + 22.0;
    for (i, (label, c)) in [
        (format!("< {target_ms} ms"), "#2ca02c"),
        (format!("< {} ms", 5.0 * target_ms), "#ffbf00"),
        (format!(">= {} ms", 5.0 * target_ms), "#d62728"),
    ]
    .iter()
    .enumerate()
    {
        let lx = x0 + i as f64 * 140.0;
        let _ = writeln!(
            s,
            r#"<circle cx="{lx}" cy="{}" r="5" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            ly - 4.0,
            lx + 10.0,
            ly,
            esc(label)
        );
    }
}

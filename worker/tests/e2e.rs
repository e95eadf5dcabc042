//! The built Worker, end to end: `test/e2e.mjs` starts it in Miniflare
//! against this test's PostgreSQL and drives it with the real
//! `@neondatabase/serverless` driver, its cache kept fresh by a regional
//! proxy started here. It needs `worker/build` (made by
//! `worker/build.sh`) and `worker/node_modules` (`worker/setup.sh`);
//! `.ci/run` runs both before the tests.

#[allow(dead_code)]
mod common;

// the proxy starters; its cluster.rs is common's too (two copies of the module)
#[path = "../../edge/tests/pg/mod.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod pg;

use std::path::Path;
use std::process::Command;

#[test]
fn the_real_driver_through_the_worker_in_miniflare() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for needed in
        ["build/index.js", "build/index_bg.wasm", "node_modules/miniflare", "node_modules/@neondatabase/serverless"]
    {
        assert!(
            dir.join(needed).exists(),
            "worker/{needed} is missing: run `bash worker/setup.sh && bash worker/build.sh` (.ci/run does)"
        );
    }
    let pg = common::shop();
    let regional = pg::start_proxy(&format!(
        "upstream = '{}'\nrole = 'regional'\n[cdc]\nslot = 'worker_e2e'\ndatabase = 'shop'\npoll_ms = 20\n",
        pg.addr()
    ));
    let out = Command::new("node")
        .arg("test/e2e.mjs")
        .current_dir(dir)
        .env("PG_PORT", pg.port.to_string())
        .env("FEED_PORT", regional.port.to_string())
        .output()
        .expect("node runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the end-to-end test failed:\n{text}");
    assert!(text.contains("all passed"), "{text}");
}

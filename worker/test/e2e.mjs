// The built Worker (worker/build) in Miniflare, in front of a throwaway
// PostgreSQL that worker/tests/e2e.rs started, through the real
// @neondatabase/serverless driver, compared with node-postgres talking to
// PostgreSQL directly. Run by `cargo test -p postai-worker --test e2e`;
// environment: PG_PORT, and the role app / database shop it created;
// FEED_PORT, a regional proxy (postai-edge) reading PostgreSQL's changes.
import assert from "node:assert/strict";
import { Miniflare } from "miniflare";
import { neon, neonConfig, NeonDbError, Pool } from "@neondatabase/serverless";
import pg from "pg";
import ws from "ws";

const port = Number(process.env.PG_PORT);
assert.ok(port, "PG_PORT is set");
const feedPort = Number(process.env.FEED_PORT);
assert.ok(feedPort, "FEED_PORT is set");
const TOKEN = "e2e-token";
const here = new URL(".", import.meta.url).pathname;

// `extra`: more Miniflare options (a Hyperdrive binding in place of DATABASE_URL)
function worker(databaseUrl, feedUrl, extra = {}) {
  const bindings = { POSTAI_TOKEN: TOKEN };
  if (databaseUrl) bindings.DATABASE_URL = databaseUrl;
  if (feedUrl) Object.assign(bindings, { POSTAI_FEED_URL: feedUrl, POSTAI_FEED_MS: "1" });
  return new Miniflare({
    modules: true,
    scriptPath: here + "../build/index.js",
    modulesRules: [
      { type: "ESModule", include: ["**/*.js"] },
      { type: "CompiledWasm", include: ["**/*.wasm"] },
    ],
    compatibilityDate: "2026-04-01",
    bindings,
    host: "127.0.0.1",
    port: 0,
    ...extra,
  });
}

const mf = worker(
  `postgresql://app:app%20pw@127.0.0.1:${port}/shop`,
  `postgresql://postgres@127.0.0.1:${feedPort}/shop`,
);
const url = await mf.ready;
neonConfig.fetchEndpoint = new URL("/sql", url).href;
const sql = neon(`postgresql://app:${TOKEN}@edge.example/shop`);
const direct = new pg.Client({ host: "127.0.0.1", port, user: "app", password: "app pw", database: "shop" });
await direct.connect();

const failures = [];
async function check(name, f) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error("no answer within 30 s")), 30_000);
  });
  try {
    await Promise.race([f(), limit]);
    console.log(`ok   ${name}`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}\n${e.stack ?? e}`);
  } finally {
    clearTimeout(timer);
  }
}

const TYPES = `SELECT 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8, 1.50::numeric(10,2) AS num,
  2.5::float8 AS f8, 'tëxt'::text AS t, true AS b, NULL::int AS n, '2024-02-29'::date AS d,
  '2024-02-29 12:34:56.789+00'::timestamptz AS ts, '{"k":[1,2]}'::json AS j, '{"k":1}'::jsonb AS jb,
  '\\x00ff'::bytea AS by, '11111111-2222-3333-4444-555555555555'::uuid AS u, '{1,2,NULL}'::int[] AS ia,
  '{"a b",c}'::text[] AS ta, '1 day 02:00:00'::interval AS iv, 1 AS dup, 2 AS dup`;

// the driver bundles its own copies of node-postgres's type parsers: equal
// values of classes from two copies, compared as their JSON and class names
const kind = (v) => (v === null ? "null" : `${typeof v}:${v.constructor?.name}`);
const same = (got, want) => {
  assert.deepStrictEqual(JSON.parse(JSON.stringify(got)), JSON.parse(JSON.stringify(want)));
  assert.deepStrictEqual(got.map((r) => Object.values(r).map(kind)), want.map((r) => Object.values(r).map(kind)));
};

await check("rows and types equal node-postgres against PostgreSQL", async () => {
  const got = await sql.query(TYPES, [], { arrayMode: true });
  const want = await direct.query({ text: TYPES, rowMode: "array" });
  same(got, want.rows);
  const objects = await sql.query(TYPES);
  const wantObjects = await direct.query(TYPES);
  same(objects, wantObjects.rows);
});

await check("fields, command and rowCount equal node-postgres's (fullResults)", async () => {
  const q = "SELECT id, name, price FROM items WHERE id = $1";
  const got = await sql.query(q, [1], { fullResults: true });
  const want = await direct.query(q, [1]);
  assert.equal(got.command, want.command);
  assert.equal(got.rowCount, want.rowCount);
  const pick = (f) => [f.name, f.tableID, f.columnID, f.dataTypeID, f.dataTypeSize, f.dataTypeModifier];
  assert.deepStrictEqual(got.fields.map(pick), want.fields.map(pick));
  same(got.rows, want.rows);
});

await check("tagged templates bind parameters, Dates and arrays included", async () => {
  const id = 1;
  const rows = await sql`SELECT name FROM items WHERE id = ${id} AND ${new Date("2024-01-01T00:00:00Z")}::date < now()
    AND ${["a", "b"]}::text[] @> tags`;
  assert.deepStrictEqual(rows, [{ name: "one" }]);
});

await check("writes and transactions, with SQLSTATE on failure and rollback", async () => {
  const ins = await sql.query("INSERT INTO items (id, name) VALUES ($1, $2)", [100, "hundred"], { fullResults: true });
  assert.equal(ins.command, "INSERT");
  assert.equal(ins.rowCount, 1);
  const [, after] = await sql.transaction([
    sql`UPDATE items SET name = 'HUNDRED' WHERE id = 100`,
    sql`SELECT name FROM items WHERE id = 100`,
  ]);
  assert.deepStrictEqual(after, [{ name: "HUNDRED" }]);
  await assert.rejects(
    sql.transaction([sql`DELETE FROM items WHERE id = 100`, sql`INSERT INTO items (id, name) VALUES (1, 'dup')`]),
    (e) => e instanceof NeonDbError && e.code === "23505",
  );
  assert.deepStrictEqual(await sql`SELECT name FROM items WHERE id = 100`, [{ name: "HUNDRED" }]);
  const [level] = await sql.transaction([sql`SELECT current_setting('transaction_isolation') AS l`], {
    isolationLevel: "Serializable",
    readOnly: true,
  });
  assert.deepStrictEqual(level, [{ l: "serializable" }]);
});

await check("bad SQL is a NeonDbError with PostgreSQL's fields", async () => {
  await assert.rejects(sql`SELECT * FROM nope`, (e) => {
    assert.ok(e instanceof NeonDbError);
    assert.equal(e.code, "42P01");
    assert.equal(e.position, "15");
    assert.equal(e.severity, "ERROR");
    assert.match(e.message, /relation "nope" does not exist/);
    return true;
  });
});

await check("a wrong token is refused, by password and by authToken", async () => {
  const wrong = neon(`postgresql://app:nope@edge.example/shop`);
  await assert.rejects(wrong`SELECT 1`, (e) => e.code === "28P01");
  const bearer = neon(`postgresql://app@edge.example/shop`, { authToken: TOKEN });
  assert.deepStrictEqual(await bearer`SELECT 1 AS one`, [{ one: 1 }]);
  const badBearer = neon(`postgresql://app:${TOKEN}@edge.example/shop`, { authToken: "nope" });
  await assert.rejects(badBearer`SELECT 1`, (e) => e.code === "28P01");
});

await check("plain fetch: malformed JSON, wrong routes, the tier and LSN headers", async () => {
  const headers = { "Neon-Connection-String": `postgresql://app:${TOKEN}@edge.example/shop` };
  const endpoint = new URL("/sql", url);
  let r = await mf.dispatchFetch(endpoint, { method: "POST", headers, body: "{nope" });
  assert.equal(r.status, 400);
  assert.equal((await r.json()).code, "08P01");
  r = await mf.dispatchFetch(new URL("/other", url), { method: "GET" });
  assert.equal(r.status, 400);
  await r.text();
  r = await mf.dispatchFetch(endpoint, { method: "POST", headers, body: JSON.stringify({ query: "SELECT 1" }) });
  assert.equal(r.status, 200);
  assert.equal(r.headers.get("x-postai-served"), "primary");
  assert.match(r.headers.get("x-postai-lsn"), /^[0-9A-F]+\/[0-9A-F]+$/);
  assert.match(r.headers.get("x-postai-session"), /^[0-9A-F]+\/[0-9A-F]+$/);
  await r.json();
});

// plain fetch, to see the headers: what served it, the session token
async function post(query, params, extra = {}) {
  const r = await mf.dispatchFetch(new URL("/sql", url), {
    method: "POST",
    headers: {
      "Neon-Connection-String": `postgresql://app:${TOKEN}@edge.example/shop`,
      "Neon-Array-Mode": "true",
      ...extra,
    },
    body: JSON.stringify({ query, params }),
  });
  const body = await r.json();
  assert.equal(r.status, 200, JSON.stringify(body));
  return { body, served: r.headers.get("x-postai-served"), token: r.headers.get("x-postai-session") };
}
const nameOf = (id, extra) => post("SELECT name FROM items WHERE id = $1", [String(id)], extra);

async function untilCached(id) {
  for (let i = 0; i < 400; i++) {
    if ((await nameOf(id)).served === "L1") return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`item ${id} was never served at the edge`);
}

await check("a miss, then a hit served at the edge (L1)", async () => {
  await untilCached(1);
  const hit = await nameOf(1);
  assert.equal(hit.served, "L1");
  assert.deepStrictEqual(hit.body.rows, [["one"]]);
  // the driver gets the cached answer too, parsed the same
  assert.deepStrictEqual(await sql`SELECT name FROM items WHERE id = ${1}`, [{ name: "one" }]);
});

await check("a write through the Worker, read back with the session token", async () => {
  const w = await post("UPDATE items SET name = 'uno' WHERE id = 1", []);
  assert.equal(w.body.rowCount, 1);
  assert.ok(w.token, "a session token");
  const r = await nameOf(1, { "x-postai-session": w.token });
  assert.deepStrictEqual(r.body.rows, [["uno"]]);
});

await check("a write made on PostgreSQL reaches the edge through the change feed", async () => {
  await untilCached(2);
  await direct.query("UPDATE items SET name = 'zwei' WHERE id = 2");
  const started = Date.now();
  let seenNew = false;
  while (Date.now() - started < 5000) {
    const r = await nameOf(2);
    const name = r.body.rows[0][0];
    if (name === "zwei") seenNew = true;
    else assert.ok(!seenNew, "the old value after the new one");
    if (seenNew && r.served === "L1") break;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.ok(seenNew, "the direct write never reached the Worker within 5 s (the silence bound)");
  console.log(`     reached the edge within ${Date.now() - started} ms`);
});

// the WebSocket mode: the driver's Pool speaks PostgreSQL's protocol over a
// WebSocket to the Worker (Node 20 has no global WebSocket: the ws package)
neonConfig.webSocketConstructor = ws;
neonConfig.useSecureWebSocket = false;
neonConfig.wsProxy = () => `${new URL(url).host}/v2`;

await check("the WebSocket mode: a Pool logs in with the token and runs on PostgreSQL", async () => {
  const pool = new Pool({ connectionString: `postgresql://app:${TOKEN}@edge.example/shop` });
  try {
    const got = await pool.query({ text: TYPES, rowMode: "array" });
    const want = await direct.query({ text: TYPES, rowMode: "array" });
    same(got.rows, want.rows);
    const pick = (f) => [f.name, f.tableID, f.columnID, f.dataTypeID, f.dataTypeSize, f.dataTypeModifier];
    assert.deepStrictEqual(got.fields.map(pick), want.fields.map(pick));
    // a transaction on one connection, and an error with its SQLSTATE
    const client = await pool.connect();
    try {
      await client.query("BEGIN");
      await client.query("UPDATE items SET name = 'ws' WHERE id = 2");
      await assert.rejects(client.query("SELECT * FROM nope"), (e) => e.code === "42P01");
      await client.query("ROLLBACK");
    } finally {
      client.release();
    }
    const { rows } = await pool.query("SELECT current_user AS u, name FROM items WHERE id = $1", [2]);
    assert.equal(rows[0].u, "app");
    assert.notEqual(rows[0].name, "ws", "rolled back");
  } finally {
    await pool.end();
  }
});

await check("the WebSocket mode refuses a wrong token", async () => {
  const pool = new Pool({ connectionString: `postgresql://app:nope@edge.example/shop` });
  try {
    await assert.rejects(pool.query("SELECT 1"), (e) => e.code === "28P01");
  } finally {
    await pool.end();
  }
});

await check("a Hyperdrive binding in place of DATABASE_URL", async () => {
  const hd = worker(null, null, {
    hyperdrives: { HYPERDRIVE: `postgresql://app:app%20pw@127.0.0.1:${port}/shop` },
  });
  const hdUrl = await hd.ready;
  try {
    const r = await hd.dispatchFetch(new URL("/sql", hdUrl), {
      method: "POST",
      headers: { "Neon-Connection-String": `postgresql://app:${TOKEN}@edge.example/shop`, "Neon-Array-Mode": "true" },
      body: JSON.stringify({ query: "SELECT current_user, name FROM items WHERE id = $1", params: ["2"] }),
    });
    const body = await r.json();
    assert.equal(r.status, 200, JSON.stringify(body));
    assert.equal(body.rows[0][0], "app");
  } finally {
    await hd.dispose();
  }
});

await check("an unreachable database is a clear error (08006); the Worker keeps serving", async () => {
  const dead = worker(`postgresql://app:app%20pw@127.0.0.1:1/shop`);
  const deadUrl = await dead.ready;
  try {
    const r = await dead.dispatchFetch(new URL("/sql", deadUrl), {
      method: "POST",
      headers: { "Neon-Connection-String": `postgresql://app:${TOKEN}@edge.example/shop` },
      body: JSON.stringify({ query: "SELECT 1" }),
    });
    assert.equal(r.status, 400);
    const body = await r.json();
    assert.equal(body.code, "08006");
    assert.match(body.message, /unreachable/);
  } finally {
    await dead.dispose();
  }
  assert.deepStrictEqual(await sql`SELECT 2 AS two`, [{ two: 2 }]);
});

await check("a database socket dropped mid-query is survived", async () => {
  const killer = (async () => {
    for (let i = 0; i < 100; i++) {
      await new Promise((r) => setTimeout(r, 50));
      const k = await direct.query(
        "SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
      );
      if (k.rows[0].n === 1) return;
    }
    throw new Error("the sleeping query never showed up");
  })();
  await assert.rejects(sql`SELECT pg_sleep(30)`, (e) => ["57P01", "08006"].includes(e.code));
  await killer;
  assert.deepStrictEqual(await sql`SELECT 3 AS three`, [{ three: 3 }]);
});

await direct.end();
await mf.dispose();
if (failures.length) {
  console.log(`${failures.length} failed: ${failures.join("; ")}`);
  process.exit(1);
}
console.log("all passed");

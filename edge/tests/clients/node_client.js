// node-postgres (`pg`) through the postai-edge proxy, run by edge/tests/clients.rs.
//
// usage: node node_client.js MODE PORT
//
// Prints `key=value` facts that the Rust test asserts on; it checks nothing
// itself (an exception fails the run). Modes:
//   checks               parameterised reads, repeats (cache hits), a named
//                        prepared statement, a transaction, errors, types
//   named_second_client  the same `name:` on a second connection while the
//                        answer is cached

'use strict'

const { Client } = require('pg')

const MODE = process.argv[2]
const PORT = Number(process.argv[3])

function out(key, value) {
  console.log(`${key}=${value}`)
}

async function connect() {
  const c = new Client({ host: '127.0.0.1', port: PORT, user: 'postgres', database: 'postgres' })
  await c.connect()
  return c
}

// A counter of SHOW POSTAI STATS (no parameters: the simple protocol).
async function stat(c, name) {
  const r = await c.query('SHOW POSTAI STATS')
  const row = r.rows.find((x) => x.name === name)
  if (!row) throw new Error(`no ${name} in SHOW POSTAI STATS`)
  return Number(row.value)
}

async function sqlstate(fn) {
  try {
    await fn()
  } catch (e) {
    return e.code
  }
  return 'no error'
}

async function repeated(c, key, query, times = 3) {
  const before = await stat(c, 'l1_hits')
  const values = []
  for (let i = 0; i < times; i++) values.push((await c.query(query)).rows[0].v)
  out(key, new Set(values).size === 1 ? values[0] : values.join('|'))
  out(`${key}_hits`, (await stat(c, 'l1_hits')) - before)
}

async function checks() {
  const c = await connect()
  await repeated(c, 'simple', 'SELECT v FROM items WHERE id = 1')
  await repeated(c, 'param', { text: 'SELECT v FROM items WHERE id = $1', values: [7] })

  // a named prepared statement: Parse once, then Bind/Describe/Execute/Sync
  const before = await stat(c, 'l1_hits')
  const named = []
  for (const id of [8, 8, 8, 9]) {
    const r = await c.query({ name: 'get_item', text: 'SELECT v FROM items WHERE id = $1', values: [id] })
    named.push(r.rows[0].v)
  }
  out('named', named.join('|'))
  out('named_hits', (await stat(c, 'l1_hits')) - before)

  // a transaction: read (cached), write, read inside, read after COMMIT
  const read = async (id) => (await c.query('SELECT v FROM items WHERE id = $1', [id])).rows[0].v
  await read(12)
  out('txn_read_before', await read(12))
  await c.query('BEGIN')
  await c.query('UPDATE items SET v = $1 WHERE id = $2', ['twelve', 12])
  out('txn_read_inside', await read(12))
  await c.query('COMMIT')
  out('txn_read_after', await read(12))
  await c.query('BEGIN')
  await c.query('UPDATE items SET v = $1 WHERE id = $2', ['never', 12])
  await c.query('ROLLBACK')
  out('rollback_read', await read(12))

  // a write outside a transaction, then read-your-writes
  await read(13)
  await read(13)
  await c.query('UPDATE items SET v = $1 WHERE id = $2', ['thirteen', 13])
  out('write_read', await read(13))

  // errors
  try {
    await c.query('INSERT INTO items VALUES ($1, $2)', [1, 'dup'])
    out('unique_violation', 'no error')
  } catch (e) {
    out('unique_violation', `${e.code} ${e.constraint}`)
  }
  out('syntax_error_params', await sqlstate(() => c.query('SELEC $1', [1])))
  out('syntax_error_simple', await sqlstate(() => c.query('SELEC 1')))
  out('undefined_table', await sqlstate(() => c.query('SELECT * FROM no_such_table WHERE id = $1', [1])))
  out('division_by_zero', await sqlstate(() => c.query('SELECT 1 / $1::int', [0])))
  const t = await connect()
  await t.query('BEGIN')
  await sqlstate(() => t.query('INSERT INTO items VALUES ($1, $2)', [1, 'dup']))
  out('in_failed_txn', await sqlstate(() => t.query('SELECT $1::int', [1])))
  await t.query('ROLLBACK')
  await t.end()
  out('after_errors', await read(15))

  // node-postgres' own type parsers, on text results through the proxy (twice)
  const typed = []
  for (let i = 0; i < 2; i++) {
    const r = await c.query(
      "SELECT id, v, id = $1 AS b, 1.50::numeric AS n, '{\"a\": [1, 2]}'::json AS j, '{1,NULL,3}'::int4[] AS a FROM items WHERE id = $1",
      [7],
    )
    const row = r.rows[0]
    typed.push(
      `int4:${row.id} text:${row.v} bool:${row.b} numeric:${row.n} json:${JSON.stringify(row.j)} int4[]:${JSON.stringify(row.a)}`,
    )
  }
  out('types', typed[0] === typed[1] ? typed[0] : typed.join(' / '))
  await c.end()
}

async function namedSecondClient() {
  const query = (id) => ({ name: 'get_item', text: 'SELECT v FROM items WHERE id = $1', values: [id] })
  const a = await connect()
  out('first_client', (await a.query(query(8))).rows[0].v)
  out('first_client_again', (await a.query(query(8))).rows[0].v)
  const b = await connect()
  let parseComplete = 0
  b.connection.on('parseComplete', () => parseComplete++)
  out('second_client', (await b.query(query(8))).rows[0].v)
  out('second_client_parse_complete', parseComplete)
  out('second_client_parsed', Boolean(b.connection.parsedStatements.get_item))
  out('second_client_other_value', (await b.query(query(9))).rows[0].v)
  await a.end()
  await b.end()
}

const modes = { checks, named_second_client: namedSecondClient }
modes[MODE]().catch((e) => {
  console.error(e)
  process.exit(1)
})

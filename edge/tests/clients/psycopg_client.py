"""psycopg 3 through the postai-edge proxy, run by edge/tests/clients.rs.

usage: psycopg_client.py MODE PORT

Prints `key=value` facts that the Rust test asserts on; it checks nothing
itself (an exception fails the run). Modes:
  checks     parameterised reads, repeats (cache hits), prepared statements,
             a pipeline, transactions, errors with their SQLSTATE
  int_param  `%s` with a Python int (psycopg sends it in binary format)
  types      every value of `types` as raw bytes (hex), text and binary
             result formats, each read twice (PQexecParams)
"""

import sys

import psycopg
from psycopg import errors

MODE = sys.argv[1]
PORT = int(sys.argv[2])


def connect(**kw):
    return psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres", **kw)


def out(key, value):
    print(f"{key}={value}", flush=True)


def stat(conn, name):
    """A counter of SHOW POSTAI STATS (simple protocol: PQexec)."""
    res = conn.pgconn.exec_(b"SHOW POSTAI STATS")
    for i in range(res.ntuples):
        if res.get_value(i, 0) == name.encode():
            return int(res.get_value(i, 1))
    raise SystemExit(f"no {name} in SHOW POSTAI STATS")


def repeated(conn, key, sql, params, times=3, **kw):
    """Runs a read `times` times; prints its value and the L1 hits it made."""
    before = stat(conn, "l1_hits")
    values = [conn.execute(sql, params, **kw).fetchone()[0] for _ in range(times)]
    hits = stat(conn, "l1_hits") - before
    out(key, values[0] if len(set(values)) == 1 else "|".join(values))
    out(f"{key}_hits", hits)


def sqlstate(fn):
    try:
        fn()
    except psycopg.Error as e:
        return e.sqlstate
    return "no error"


def checks():
    conn = connect(autocommit=True)
    # no parameters: the simple protocol
    repeated(conn, "simple", "SELECT v FROM items WHERE id = 1", None)
    # a str parameter: text format, type left to the server
    repeated(conn, "text_param", "SELECT v FROM items WHERE id = %s", ["8"])
    # %t: text format for an int
    repeated(conn, "text_format_param", "SELECT v FROM items WHERE id = %t", [9])
    # prepare=True: a named server-side statement (Parse, then Bind/Describe/Execute)
    before = stat(conn, "l1_hits")
    values = [conn.execute("SELECT v FROM items WHERE id = %t", [10], prepare=True).fetchone()[0] for _ in range(7)]
    out("prepared", "|".join(values))
    out("prepared_hits", stat(conn, "l1_hits") - before)

    # a pipeline: several Parse/Bind/Describe/Execute before one Sync
    with conn.pipeline():
        curs = [conn.execute("SELECT v FROM items WHERE id = %t", [i]) for i in (20, 21, 22)]
    out("pipeline", "|".join(c.fetchone()[0] for c in curs))

    # a transaction: read (cached), write, read inside, read after COMMIT
    read12 = lambda: conn.execute("SELECT v FROM items WHERE id = %t", [12]).fetchone()[0]  # noqa: E731
    read12()
    out("txn_read_before", read12())
    with conn.transaction():
        conn.execute("UPDATE items SET v = %s WHERE id = %s", ["twelve", 12])
        out("txn_read_inside", read12())
    out("txn_read_after", read12())

    class Rollback(Exception):
        pass

    try:
        with conn.transaction():
            conn.execute("UPDATE items SET v = %s WHERE id = %s", ["never", 12])
            raise Rollback()
    except Rollback:
        pass
    out("rollback_read", read12())

    # a write outside a transaction (autocommit), then read-your-writes
    read13 = lambda: conn.execute("SELECT v FROM items WHERE id = %t", [13]).fetchone()[0]  # noqa: E731
    read13()
    read13()
    conn.execute("UPDATE items SET v = %s WHERE id = %t", ["thirteen", 13])
    out("autocommit_write_read", read13())

    # psycopg's default: not autocommit (every statement inside BEGIN)
    with connect() as tx_conn:
        out("non_autocommit_read", tx_conn.execute("SELECT v FROM items WHERE id = %s", [14]).fetchone()[0])

    # errors
    try:
        conn.execute("INSERT INTO items VALUES (%s, %s)", [1, "dup"])
        out("unique_violation", "no error")
    except errors.UniqueViolation as e:
        out("unique_violation", f"{e.sqlstate} {e.diag.constraint_name}")
    out("syntax_error_params", sqlstate(lambda: conn.execute("SELEC %s", [1])))
    out("syntax_error_simple", sqlstate(lambda: conn.execute("SELEC 1")))
    out("undefined_table", sqlstate(lambda: conn.execute("SELECT * FROM no_such_table WHERE id = %s", [1])))
    out("division_by_zero", sqlstate(lambda: conn.execute("SELECT 1 / %s", [0])))
    with connect() as tx_conn:
        sqlstate(lambda: tx_conn.execute("INSERT INTO items VALUES (%s, %s)", [1, "dup"]))
        out("in_failed_txn", sqlstate(lambda: tx_conn.execute("SELECT %s", [1])))
    out("after_errors", conn.execute("SELECT v FROM items WHERE id = %t", [15]).fetchone()[0])

    count, total = conn.execute("SELECT count(*), sum(id) FROM items WHERE id > %t", [0]).fetchone()
    out("many_rows", f"{count} {total}")
    conn.close()


def int_param():
    conn = connect(autocommit=True)
    repeated(conn, "int_param", "SELECT v FROM items WHERE id = %s", [7])
    conn.close()


def types():
    conn = connect(autocommit=True)
    pgconn = conn.pgconn
    reads = [(b"SELECT * FROM types ORDER BY id", [])]
    reads += [(b"SELECT * FROM types WHERE id = $1", [str(i).encode()]) for i in range(1, 6)]
    for sql, params in reads:
        for fmt, fmt_name in ((0, "text"), (1, "binary")):
            for round_ in ("first", "second"):
                res = pgconn.exec_params(sql, params, result_format=fmt)
                if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                    raise SystemExit(f"{sql!r}: {res.error_message.decode()}")
                for r in range(res.ntuples):
                    for c in range(res.nfields):
                        v = res.get_value(r, c)
                        hexed = "NULL" if v is None else v.hex()
                        name = res.fname(c).decode()
                        print(f"{fmt_name} {round_} {params} row {r} {name} {res.ftype(c)} {hexed}")
    conn.close()


{"checks": checks, "int_param": int_param, "types": types}[MODE]()

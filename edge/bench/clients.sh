#!/usr/bin/env bash
# Benchmark command (not a test): many concurrent clients on one edge in
# front of PostgreSQL with its default max_connections (100). CLIENTS
# (default 10 000) pgbench sessions, each reading one of 1 000 hot rows of
# pgbench_accounts, 1 % of them updating one, for SECONDS (default 15), run
# side by side against the same server: through postai-edge with session
# pooling (each client holds a server connection, the edge role's default),
# and with transaction pooling (`[pool] mode = "transaction"`: a client
# holds a server connection only for a request the cache does not answer,
# or for as long as its session state needs one). Per mode: the clients
# that got in, tps, p50 / p99 latency, the proxy's resident memory per
# client, the server connections used.
# Usage: bash edge/bench/clients.sh [seconds] [clients]. Starts a
# throwaway cluster as the postgres user; leaves nothing running. Needs
# `ulimit -n` above the client count (the script raises it when it can).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-15}
clients=${2:-10000}
pool_size=${POOL_SIZE:-40}
ulimit -n $((clients * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -le $((clients + 100)) ]; then
  echo "clients.sh: ulimit -n is $(ulimit -n), too low for $clients clients" >&2
  exit 2
fi
dir=$(mktemp -d /tmp/postai-clients.XXXX)
chown postgres:postgres "$dir"
port=$((20000 + RANDOM % 10000)); proxy_port=$((port + 2))
. edge/bench/lib.sh
cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
# PostgreSQL's default max_connections
primary_start < /dev/null
max_conn=$(psql -X -At -h 127.0.0.1 -p "$port" -U postgres -c 'SHOW max_connections')

cat > "$dir/mostly-reads.sql" <<'SQL'
\set aid random(1, 1000)
\set r random(1, 100)
\if :r <= 99
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\else
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
\endif
SQL

cargo build --release -q -p postai-edge
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
server_conns() {
  psql -X -At -h 127.0.0.1 -p "$port" -U postgres -c \
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND application_name <> 'postai-edge' AND pid <> pg_backend_pid()"
}
echo "PostgreSQL max_connections = $max_conn; $clients clients, ${secs} s per mode, pool size $pool_size"
printf '%-12s %9s %9s %9s %9s %14s %12s\n' pooling 'got in' tps 'p50 ms' 'p99 ms' 'KiB/client' 'server conns'
for mode in session transaction; do
  cat > "$dir/edge.toml" <<CONF
listen = "127.0.0.1:$proxy_port"
upstream = "127.0.0.1:$port"
max_client_conn = $((clients + 100))
[cache]
ttl_s = 3600
[cdc]
poll_ms = 50
[pool]
mode = "$mode"
size = $pool_size
wait_ms = 30000
CONF
  ./target/release/postai-edge --config "$dir/edge.toml" 2>"$dir/edge-$mode.log" &
  proxy_pid=$!
  proxy_wait "$proxy_port"
  # warm: the hot rows cached
  pgbench -n -c 8 -j 2 -T 3 -f "$dir/mostly-reads.sql" -h 127.0.0.1 -p "$proxy_port" -U postgres postgres >/dev/null 2>&1 || true
  idle=$(rss_kib "$proxy_pid")
  rm -f "$dir"/pgbench_log.*
  (cd "$dir" && pgbench -n -c "$clients" -j 2 -T "$secs" -l -f "$dir/mostly-reads.sql" \
    -h 127.0.0.1 -p "$proxy_port" -U postgres postgres > "$dir/pgbench-$mode.out" 2>&1) &
  bench_pid=$!
  # mid-run: memory and server connections with every client connected
  peak=$idle; conns=0
  for _ in $(seq $((secs * 2 + 60))); do
    kill -0 "$bench_pid" 2>/dev/null || break
    sleep 0.5
    r=$(rss_kib "$proxy_pid" 2>/dev/null || echo 0); [ "$r" -gt "$peak" ] && peak=$r
    c=$(server_conns 2>/dev/null || echo 0); [ "${c:-0}" -gt "$conns" ] && conns=$c
  done
  wait "$bench_pid" || true
  out="$dir/pgbench-$mode.out"
  tps=$(awk '/^tps = / { printf "%.0f", $3 }' "$out")
  # clients that connected: pgbench aborts the run when one cannot
  if grep -q 'connection to server .* failed\|could not connect\|too many' "$out"; then
    got_in="refused"
    reason=$(grep -m1 -o 'FATAL: .*\|sorry, too many clients.*\|remaining connection slots.*' "$out" || true)
  else
    got_in=$(awk '/^number of clients:/ { print $4 }' "$out"); reason=
  fi
  lat=$(cat "$dir"/pgbench_log.* 2>/dev/null | awk '{ print $3 }' | sort -n | awk '
    { v[NR] = $1 } END { if (NR) printf "%.2f %.2f", v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000; else print "- -" }')
  per_client=$(awk -v p="$peak" -v i="$idle" -v c="$clients" 'BEGIN { printf "%.1f", (p - i) / c }')
  printf '%-12s %9s %9s %9s %9s %14s %12s\n' "$mode" "$got_in" "${tps:--}" ${lat} "$per_client" "$conns"
  [ -n "$reason" ] && echo "  ($mode: $reason)"
  kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; proxy_pid=
done

#!/usr/bin/env bash
# Benchmark command (not a test): what each consistency mode costs.
# A primary and a streaming replica that applies WAL LAG_MS late (default
# 20 ms), pgbench tables (scale 1), and postai-edge in front of both, run
# once per mode (`[cache] consistency`): read-your-writes, proxy, eventual,
# strong. Two workloads over 1 000 hot rows of pgbench_accounts: "mixed", 8
# clients each 90 % point reads and 10 % updates; "readers", 7 clients that
# only read and one that updates 1 000 rows a second. Per mode and workload:
# tps, the share of reads answered by the cache, the replica, the primary.
# Usage: bash edge/bench/consistency.sh [seconds]. Starts throwaway
# clusters as the postgres user; leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-15}
lag=${LAG_MS:-20}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
dir=$(mktemp -d /tmp/postai-consistency.XXXX)
chown postgres:postgres "$dir"
port=$((20000 + RANDOM % 10000)); rport=$((port + 1)); proxy_port=$((port + 2))
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  as_pg "$bin/pg_ctl" -D "$dir/replica" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
cat >> "$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 4
max_wal_senders = 4
max_connections = 200
CONF
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
pgbench -i -s 1 -q -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$dir/replica" -X stream >/dev/null
cat >> "$dir/replica/postgresql.conf" <<CONF
port = $rport
primary_conninfo = 'host=127.0.0.1 port=$port user=postgres'
recovery_min_apply_delay = '${lag}ms'
hot_standby_feedback = on
CONF
as_pg touch "$dir/replica/standby.signal"
as_pg "$bin/pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w start >/dev/null

cat > "$dir/mix.sql" <<'SQL'
\set aid random(1, 1000)
\set r random(1, 100)
\if :r <= 90
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\else
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
\endif
SQL
cat > "$dir/read.sql" <<'SQL'
\set aid random(1, 1000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat > "$dir/write.sql" <<'SQL'
\set aid random(1, 1000)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
SQL

cargo build --release -q -p postai-edge
stat() { psql -X -At -h 127.0.0.1 -p "$proxy_port" -U postgres -c 'SHOW POSTAI STATS' | awk -F'|' -v k="$1" '$1 == k { print $2 }'; }
bench() { pgbench -n -j 1 -h 127.0.0.1 -p "$proxy_port" -U postgres "$@" postgres 2>&1 | awk '/^tps = / { printf "%.0f", $3 }'; }
# mixed: every session reads and writes; readers: 7 sessions that only read,
# one that writes 1 000 rows a second (what "proxy" costs readers)
run_workload() {
  case "$1" in
    mixed) bench -c 8 -j 2 -T "$secs" -f "$dir/mix.sql" ;;
    readers)
      w=$(mktemp); bench -c 1 -T "$secs" -R 1000 -f "$dir/write.sql" > "$w" &
      r=$(bench -c 7 -j 2 -T "$secs" -f "$dir/read.sql"); wait; echo $(( r + $(cat "$w") )); rm -f "$w" ;;
  esac
}
printf '%-18s %-8s %10s %10s %10s %10s\n' mode workload tps cache replica primary
for mode in read-your-writes proxy eventual strong; do
  cat > "$dir/edge.toml" <<CONF
listen = "127.0.0.1:$proxy_port"
upstream = "127.0.0.1:$port"
replicas = ["127.0.0.1:$rport"]
[cache]
ttl_s = 3600
consistency = "$mode"
[cdc]
poll_ms = 50
CONF
  ./target/release/postai-edge --config "$dir/edge.toml" 2>"$dir/edge-$mode.log" &
  proxy_pid=$!
  for _ in $(seq 50); do psql -X -At -h 127.0.0.1 -p "$proxy_port" -U postgres -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
  # warm: the hot rows cached, the replica's health known
  pgbench -n -c 8 -j 2 -T 3 -f "$dir/mix.sql" -h 127.0.0.1 -p "$proxy_port" -U postgres postgres >/dev/null 2>&1
  for workload in mixed readers; do
    h0=$(( $(stat l1_hits) + $(stat l2_hits) )); q0=$(stat queries); r0=$(stat replica_reads); w0=$(stat writes)
    tps=$(run_workload "$workload")
    h=$(( $(stat l1_hits) + $(stat l2_hits) - h0 )); q=$(( $(stat queries) - q0 )); r=$(( $(stat replica_reads) - r0 ))
    reads=$(( q - ($(stat writes) - w0) )); primary=$(( reads - h - r )); [ "$primary" -lt 0 ] && primary=0
    pct() { awk -v a="$1" -v b="$reads" 'BEGIN { printf "%.1f %%", (b ? 100 * a / b : 0) }'; }
    printf '%-18s %-8s %10s %10s %10s %10s\n' "$mode" "$workload" "$tps" "$(pct "$h")" "$(pct "$r")" "$(pct "$primary")"
  done
  kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; proxy_pid=
done

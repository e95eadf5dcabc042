#!/usr/bin/env bash
# Benchmark command (not a test): pgbench -S side by side, direct PostgreSQL,
# PgBouncer (transaction mode, if installed), postai-edge with a warm cache,
# for -M simple, extended and prepared. Usage: bash edge/bench/pgbench.sh [seconds]
# Starts a throwaway cluster as the postgres user; leaves nothing running.
# PgBouncer 1.18 (Debian 12) cannot keep prepared statements in transaction
# mode: its -M prepared column fails ("-").
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
dir=$(mktemp -d /tmp/postai-bench.XXXX)
chown postgres:postgres "$dir"
port=$((20000 + RANDOM % 10000)); proxy_port=$((port + 1)); bouncer_port=$((port + 2))
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "${pass_pid:-}" ] && kill "$pass_pid" 2>/dev/null || true
  [ -n "${bouncer_pid:-}" ] && kill "$bouncer_pid" 2>/dev/null || true
  # runuser's child outlives it
  pkill -f "$dir/pgbouncer.ini" 2>/dev/null || true
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
max_connections = 200
CONF
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
pgbench -i -s 1 -q -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1

cargo build --release -q -p postai-edge
cat > "$dir/edge.toml" <<CONF
listen = "127.0.0.1:$proxy_port"
upstream = "127.0.0.1:$port"
[cache]
l1_entries = 200000
l1_bytes = 1073741824
l2_entries = 200000
l2_bytes = 1073741824
ttl_s = 3600
[[tables]]
name = "pgbench_accounts"
primary_key = "aid"
integer_key = true
CONF
./target/release/postai-edge --config "$dir/edge.toml" 2>"$dir/edge.log" &
proxy_pid=$!
pass_port=$((port + 3))
# pass-through: one event loop, as PgBouncer (measured: more loops cost more
# wakeups than the little work per query they share out)
sed -e "s/:$proxy_port/:$pass_port/" -e 's/^\[cache\]/threads = 1\n[cache]\nenabled = false/' "$dir/edge.toml" > "$dir/pass.toml"
./target/release/postai-edge --config "$dir/pass.toml" 2>"$dir/pass.log" &
pass_pid=$!
if command -v pgbouncer >/dev/null; then
  cat > "$dir/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = 20
unix_socket_dir =
CONF
  echo '"postgres" ""' > "$dir/users.txt"
  chown -R postgres:postgres "$dir"
  as_pg pgbouncer "$dir/pgbouncer.ini" >/dev/null 2>&1 &
  bouncer_pid=$!
fi
sleep 1

tps() {
  local t
  t=$(pgbench -S -n -M "$2" -c 8 -j 2 -T "$3" -h 127.0.0.1 -p "$1" -U postgres postgres 2>&1 | tee -a "$dir/pgbench.log" | awk '/^tps/ {print int($3)}' || true)
  echo "${t:--}"
}
printf "%-10s %10s %10s %22s %20s\n" mode direct pgbouncer "postai-edge (no cache)" "postai-edge (warm)"
for mode in simple extended prepared; do
  d=$(tps "$port" "$mode" "$secs")
  b="-"; [ -n "${bouncer_pid:-}" ] && b=$(tps "$bouncer_port" "$mode" "$secs")
  p=$(tps "$pass_port" "$mode" "$secs")
  tps "$proxy_port" "$mode" "$secs" >/dev/null   # warm the cache
  e=$(tps "$proxy_port" "$mode" "$secs")
  printf "%-10s %10s %10s %22s %20s\n" "$mode" "$d" "$b" "$p" "$e"
done

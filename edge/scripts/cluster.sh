#!/usr/bin/env bash
# A local primary + synchronous streaming replica for trying postai-edge.
#
#   bash edge/scripts/cluster.sh start      # primary on 15432, replica on 15433
#   bash edge/scripts/cluster.sh status
#   bash edge/scripts/cluster.sh crash      # kill the primary (watch the failover)
#   bash edge/scripts/cluster.sh restart-old-primary
#   bash edge/scripts/cluster.sh stop       # stop both and remove the directory
#
# PGDIR (default /tmp/postai-cluster), PRIMARY_PORT, REPLICA_PORT override the
# defaults. Runs the servers as the postgres user when started as root
# (initdb refuses root). Needs Debian's postgresql package.
set -euo pipefail
dir=${PGDIR:-/tmp/postai-cluster}
pport=${PRIMARY_PORT:-15432}
rport=${REPLICA_PORT:-15433}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -1)
[ -x "$bin/initdb" ] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi
sql() { psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }

start() {
  if [ -d "$dir/primary" ]; then echo "$dir exists: '$0 stop' first" >&2; exit 1; fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  as_pg "$bin/initdb" -D "$dir/primary" -A trust -U postgres --no-sync -E UTF8 >/dev/null
  cat >> "$dir/primary/postgresql.conf" <<CONF
port = $pport
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 8
max_wal_senders = 8
max_connections = 200
CONF
  as_pg "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w start >/dev/null
  as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$pport" -U postgres -D "$dir/replica" -X stream
  cat >> "$dir/replica/postgresql.conf" <<CONF
port = $rport
primary_conninfo = 'host=127.0.0.1 port=$pport user=postgres application_name=replica'
hot_standby_feedback = on
CONF
  as_pg touch "$dir/replica/standby.signal"
  as_pg "$bin/pg_ctl" -D "$dir/replica" -l "$dir/replica.log" -w start >/dev/null
  # synchronous replication: a commit is acknowledged once the replica has it
  sql "$pport" "ALTER SYSTEM SET synchronous_standby_names = 'replica'" >/dev/null
  sql "$pport" "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 50); do
    [ "$(sql "$pport" "SELECT sync_state FROM pg_stat_replication" 2>/dev/null)" = sync ] && break
    sleep 0.2
  done
  pgbench -i -s 1 -q -h 127.0.0.1 -p "$pport" -U postgres postgres >/dev/null 2>&1
  status
}

status() {
  for p in "$pport" "$rport"; do
    if r=$(sql "$p" "SELECT CASE WHEN pg_is_in_recovery() THEN 'replica' ELSE 'primary' END" 2>/dev/null); then
      echo "127.0.0.1:$p  $r"
    else
      echo "127.0.0.1:$p  down"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  crash) as_pg "$bin/pg_ctl" -D "$dir/primary" -m immediate stop ;;
  restart-old-primary) as_pg "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w start ;;
  stop)
    for d in primary replica; do
      [ -d "$dir/$d" ] && as_pg "$bin/pg_ctl" -D "$dir/$d" -m fast stop >/dev/null 2>&1 || true
    done
    rm -rf "$dir"
    ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac

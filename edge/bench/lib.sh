# Shared by the benchmark scripts (sourced): a throwaway primary run as the
# postgres user. Expects `dir` (owned by postgres) and `port` to be set.
bin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
as_pg() { runuser -u postgres -- "$@"; }

# initdb, the settings every bench needs plus the lines on stdin, start,
# pgbench tables at scale 1.
primary_start() {
  as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
  {
    printf "port = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" "$port" "$dir"
    printf "wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n"
    cat
  } >> "$dir/data/postgresql.conf"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
  pgbench -i -s 1 -q -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
}

# Waits (10 s at most) until the proxy on port $1 answers.
proxy_wait() {
  for _ in $(seq 50); do psql -X -At -h 127.0.0.1 -p "$1" -U postgres -c 'SELECT 1' >/dev/null 2>&1 && return; sleep 0.2; done
}

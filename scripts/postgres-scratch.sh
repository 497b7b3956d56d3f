#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suite (the queue/library suite runs on it, the
# chaos test's workers share it).
#   scripts/postgres-scratch.sh start DIR   # prints the admin URL (KILN_TEST_POSTGRES)
#   scripts/postgres-scratch.sh stop DIR
# The cluster lives in DIR and listens only on a unix socket there (no port to collide with,
# nothing reachable from the network), trusting local connections. PostgreSQL refuses to run
# as root: as root, the server runs as the `postgres` user.
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?a scratch folder}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
if [ -z "$bin" ] && command -v pg_ctl >/dev/null; then bin=$(dirname "$(command -v pg_ctl)"); fi
[ -n "$bin" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
as_owner=()
if [ "$(id -u)" -eq 0 ]; then as_owner=(runuser -u postgres --); fi
case "$cmd" in
start)
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
    "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -A trust -U kiln >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-c listen_addresses='' -k $dir -c max_connections=200 -c fsync=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    # The socket folder as a percent-encoded URL host (rust-postgres and libpq read it so).
    host=$(printf '%s' "$dir" | sed 's|/|%2F|g')
    echo "postgres://kiln@$host/postgres"
    ;;
stop)
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac

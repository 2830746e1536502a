# Shared settings and helpers for dbopt's scripts. Source it; do not run it.
# Every port and directory can be overridden from the environment, so a second stack (the tests')
# never collides with a running one.

PGRX_VERSION=0.18.0
# PostgreSQL 15: Debian's, or (DBOPT_PG_CONFIG) a relocated copy of it — what scripts/test uses, so
# that installing test builds of the extension never touches the dbopt.so a running stack has loaded.
SYSTEM_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG_CONFIG=${DBOPT_PG_CONFIG:-$SYSTEM_PG_CONFIG}
PG_BIN=$(dirname "$PG_CONFIG")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[dbopt %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[dbopt] error: %s\n' "$*" >&2; exit 1; }

# --- the stack's layout: one base port, everything else derived from it ---------------------------
DBOPT_DIR=${DBOPT_DIR:-/var/tmp/dbopt-stack}       # all data, logs, pidfiles and configs
DBOPT_PORT_BASE=${DBOPT_PORT_BASE:-25400}           # PostgreSQL nodes: base+0..3
DBOPT_REST_BASE=${DBOPT_REST_BASE:-$((DBOPT_PORT_BASE + 10))}   # Patroni REST: +10..13
DBOPT_ETCD_PORT=${DBOPT_ETCD_PORT:-$((DBOPT_PORT_BASE + 20))}   # etcd client (peer: +1)
DBOPT_REDIS_PORT=${DBOPT_REDIS_PORT:-$((DBOPT_PORT_BASE + 30))}
DBOPT_ROUTER_PORT=${DBOPT_ROUTER_PORT:-$((DBOPT_PORT_BASE + 50))}   # dbopt-router (admin HTTP: +1)
DBOPT_APP_PASSWORD=${DBOPT_APP_PASSWORD:-app-secret}        # router user 'app'
DBOPT_ADMIN_TOKEN=${DBOPT_ADMIN_TOKEN:-dbopt-admin-token}  # POST /cache/invalidate on the router's admin port
DBOPT_PG_PASSWORD=${DBOPT_PG_PASSWORD:-dbopt-postgres}      # superuser 'postgres'
DBOPT_REPL_PASSWORD=${DBOPT_REPL_PASSWORD:-dbopt-replicator}
DBOPT_REWIND_PASSWORD=${DBOPT_REWIND_PASSWORD:-dbopt-rewind}
DBOPT_PATRONI_TTL=${DBOPT_PATRONI_TTL:-10}       # leader lease, seconds (failover within ≈ ttl + 2 s)
case "$DBOPT_PATRONI_TTL" in
  ''|*[!0-9]*) die "DBOPT_PATRONI_TTL must be a whole number of seconds, got '$DBOPT_PATRONI_TTL'" ;;
esac
((DBOPT_PATRONI_TTL >= 10)) || die "DBOPT_PATRONI_TTL must be at least 10 (Patroni's minimum), got $DBOPT_PATRONI_TTL"
# Real clients of the end-to-end tests: Django (psycopg 3) in this virtualenv, Prisma 7 under
# tests/clients/node_modules (both made by scripts/setup).
DBOPT_CLIENTS_VENV=${DBOPT_CLIENTS_VENV:-/var/tmp/dbopt-clients-venv}
# Node.js for Prisma 7 (>= 20.19): the machine's, or one scripts/setup fetched from the npm registry
# into this directory when the machine's is missing or older.
DBOPT_NODE_DIR=${DBOPT_NODE_DIR:-/var/tmp/dbopt-node}
if [ -x "$DBOPT_NODE_DIR/bin/node" ]; then
  PATH="$DBOPT_NODE_DIR/bin:$PATH"
  export PATH
fi
NODES=(node0 node1 node2 node3)
# node3 streams from node1, not from the primary: the cascade.
declare -A REPLICATE_FROM=([node3]=node1)
PG_OS_USER=postgres
PG_OS_HOME=$(getent passwd postgres 2>/dev/null | cut -d: -f6)

node_index() { echo "${1#node}"; }
pg_port() { echo $((DBOPT_PORT_BASE + $(node_index "$1"))); }
rest_port() { echo $((DBOPT_REST_BASE + $(node_index "$1"))); }

# Runs a command as the postgres OS user, keeping its PID (no forking wrapper): PostgreSQL and
# Patroni refuse to run as root.
as_postgres() {
  setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups env HOME="$PG_OS_HOME" "$@"
}

# psql against one node over TCP as the superuser; extra arguments go to psql.
pg_sql() {
  local port=$1; shift
  PGPASSWORD=$DBOPT_PG_PASSWORD PGCONNECT_TIMEOUT=3 "$PG_BIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pidfile_pid() { if [ -f "$1" ]; then head -n1 "$1"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }

# wait_until SECONDS DESCRIPTION COMMAND...: polls every 0.5 s; fails with DESCRIPTION on timeout.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    ((SECONDS < deadline)) || { log "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.5
  done
}

# bench_size NORMAL QUICK: a benchmark's default size. Under DBOPT_BENCH_QUICK=1 — scripts/test runs
# every benchmark that way, to completion on tiny sizes and one round, so that a benchmark README
# quotes cannot rot unseen (its figures then mean nothing) — the QUICK one.
bench_size() { if [ "${DBOPT_BENCH_QUICK:-0}" = 1 ]; then echo "$2"; else echo "$1"; fi; }

# derived_router_config PORT [dbopt-stackconf derive options...]: the stack's router.toml for a
# router process of the caller's own (a benchmark's) on PORT, admin on PORT + 1 — typed, from
# dbopt-stackconf: e.g. --without cache --without alerts --extra $'[pool]\nmax_size = 20'. The
# stack's file and its router are never changed.
derived_router_config() {
  local port=$1; shift
  "$ROOT/target/release/dbopt-stackconf" derive --from "$DBOPT_DIR/router.toml" --port "$port" "$@"
}

# split_router_config LISTEN_PORT [options...]: the stack's read/write split over every node
# without the result cache, alert and rate-limit sections — the split's own cost, for the
# benchmarks.
split_router_config() {
  local port=$1; shift
  derived_router_config "$port" --without cache --without alerts --without limits "$@"
}

# bouncer_config DIR PORT PRIMARY_PORT POOL MIN_POOL: writes DIR/userlist.txt and DIR/pgbouncer.ini for
# a PgBouncer in transaction mode in front of the primary (the benchmarks' anchor; logs in DIR).
bouncer_config() {
  local dir=$1 port=$2 primary=$3 pool=$4 min=$5
  printf '"app" "%s"\n' "$DBOPT_APP_PASSWORD" >"$dir/userlist.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$primary dbname=postgres user=app password=$DBOPT_APP_PASSWORD
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $pool
min_pool_size = $min
max_client_conn = 1000
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
unix_socket_dir =
INI
}

# solo_router_config LISTEN_PORT PRIMARY_PORT POOL: a dbopt-router that knows only the primary
# (PgBouncer's job: the proxy's own cost), admin on LISTEN_PORT + 1.
solo_router_config() {
  cat <<TOML
[listen]
address = "127.0.0.1:$1"
admin_address = "127.0.0.1:$(($1 + 1))"
[pool]
min_size = 4
max_size = $3
[server]
user = "postgres"
password = "$DBOPT_PG_PASSWORD"
[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $2
[[users]]
name = "app"
password = "$DBOPT_APP_PASSWORD"
TOML
}

# Makes (or refreshes, when the system's PostgreSQL changed) a relocated copy of the system's
# PostgreSQL 15 under DIR and prints its pg_config. Nothing the system's servers use is touched.
private_postgres() {
  local dir=$1 stamp want
  want=$("$(dirname "$SYSTEM_PG_CONFIG")/postgres" --version)
  stamp="$dir/.copied-from"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "copying PostgreSQL 15 to $dir (for tests that install extension builds)"
    rm -rf "$dir"
    mkdir -p "$dir/lib/postgresql" "$dir/share/postgresql" "$dir/include"
    cp -a "$(dirname "$(dirname "$SYSTEM_PG_CONFIG")")" "$dir/lib/postgresql/"
    cp -a "$("$SYSTEM_PG_CONFIG" --sharedir)" "$dir/share/postgresql/"
    cp -a "$("$SYSTEM_PG_CONFIG" --includedir)" "$dir/include/"
    echo "$want" >"$stamp"
  fi
  echo "$dir/lib/postgresql/15/bin/pg_config"
}

# Removes the installed dbopt.so before a new one is copied in. Copying over the file in place
# changes pages that running postmasters have mapped and crashes every backend (seen here: SIGSEGV
# in all nodes of a running stack); after an unlink they keep the old inode and the copy is a new one.
unlink_installed_extension() {
  rm -f "$("$PG_CONFIG" --pkglibdir)/dbopt.so"
}

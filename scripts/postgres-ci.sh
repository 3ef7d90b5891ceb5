#!/usr/bin/env bash
# Makes a scratch PostgreSQL cluster available for the PostgreSQL store's tests, and takes it
# away again.
#
#   scripts/postgres-ci.sh start   install Debian's `postgresql` if initdb/pg_ctl are missing;
#                                  make a fresh cluster in $CATTERY_PG_DIR (initdb, trust auth on
#                                  loopback only), start it as the `postgres` user on a free
#                                  loopback port, wait until it answers. Prints on stdout the
#                                  lines to `eval`:
#                                    CATTERY_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres
#                                    CATTERY_PG_BIN=/usr/lib/postgresql/NN/bin
#   scripts/postgres-ci.sh stop    stop the cluster `start` made (pg_ctl stop -m immediate) and
#                                  delete its directory.
#   scripts/postgres-ci.sh status  say whether the cluster runs.
#
# The cluster lives in $CATTERY_PG_DIR (default target/postgres-ci, relative to the repository),
# owned by `postgres` (PostgreSQL refuses to run as root). It is disposable: fsync off, every
# start makes it anew. Measured on a 2-core VM: initdb ~0.6 s, start until ready ~0.2 s.

set -euo pipefail
cd "$(dirname "$0")/.."

PG_DIR="${CATTERY_PG_DIR:-$PWD/target/postgres-ci}"
_log() { echo "postgres-ci: $*" >&2; }

_pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

_install() {
  if _pg_bin >/dev/null; then return 0; fi
  _log "installing postgresql"
  if [ "$(id -u)" -ne 0 ]; then
    _log "postgresql is missing and installing it needs root"
    return 1
  fi
  # The package's own cluster (main, port 5432) is not used: policy-rc.d keeps apt from
  # starting it.
  local had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
    >"/tmp/postgres-ci-apt.$$.log" 2>&1 || { cat "/tmp/postgres-ci-apt.$$.log" >&2; [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d; return 1; }
  [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
  rm -f "/tmp/postgres-ci-apt.$$.log"
}

# Runs a command as `postgres` when we are root (PostgreSQL refuses root), else as ourselves.
_as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  _install
  local bin port
  bin="$(_pg_bin)"
  stop_quiet
  mkdir -p "$PG_DIR"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$PG_DIR"
  _as_pg "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync \
    >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  port="$(_free_port)"
  # The socket directory is the cluster's own (not /run/postgresql, which may not exist).
  _as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR/data -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    >/dev/null || { cat "$PG_DIR/server.log" >&2; return 1; }
  echo "$port" >"$PG_DIR/port"
  _log "PostgreSQL ($bin) ready on 127.0.0.1:$port"
  echo "CATTERY_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres"
  echo "CATTERY_PG_BIN=$bin"
}

stop_quiet() {
  local bin
  bin="$(_pg_bin)" || return 0
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    _as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$PG_DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop_quiet; _log "stopped" ;;
  status)
    if [ -f "$PG_DIR/port" ] && "$(_pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$(cat "$PG_DIR/port")"; then
      echo "running on port $(cat "$PG_DIR/port")"
    else
      echo "not running"; exit 1
    fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

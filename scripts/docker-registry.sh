#!/usr/bin/env bash
# A private image registry on 127.0.0.1 with a user and password, for tests of authenticated
# pulls (imagePullSecretSet, `pcc deploy --credentials`) on machines that reach no public registry.
#
#   scripts/docker-registry.sh start [--push IMAGE:TAG=PATH:TAG]...
#       install Debian's docker-registry (distribution 2.8) and apache2-utils if missing, start the
#       registry unless this script's one is already running, print its settings as shell
#       variables (CATTERY_TEST_REGISTRY=127.0.0.1:PORT, CATTERY_TEST_REGISTRY_USER,
#       CATTERY_TEST_REGISTRY_PASSWORD, CATTERY_TEST_REGISTRY_DOCKER_CONFIG); each --push tags a
#       local image as REGISTRY/PATH:TAG, pushes it, and removes that extra tag again.
#   scripts/docker-registry.sh stop    stop the registry this script started (by its PID).
#
# The engine speaks plain HTTP to registries on 127.0.0.0/8 without any daemon setting, and the
# registry accepts basic auth over HTTP. The docker login goes to a config directory of its own,
# never to ~/.docker. State: $CATTERY_REGISTRY_DIR (default /var/tmp/cattery-registry);
# port $CATTERY_REGISTRY_PORT (default 5999).
set -euo pipefail
dir="${CATTERY_REGISTRY_DIR:-/var/tmp/cattery-registry}"
port="${CATTERY_REGISTRY_PORT:-5999}"
user=cattery
password=cattery-test-password
addr="127.0.0.1:$port"
DOCKER="${DOCKER:-/usr/bin/docker}"

log() { echo "docker-registry: $*" >&2; }

owned_pid() {
  local pid
  pid="$(cat "$dir/pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in */docker-registry) echo "$pid" ;; *) return 1 ;; esac
}

start() {
  if ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null || ! command -v curl >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker-registry apache2-utils curl; } >/tmp/docker-registry-apt.$$.log 2>&1 \
      || { cat /tmp/docker-registry-apt.$$.log >&2; exit 1; }
    rm -f /tmp/docker-registry-apt.$$.log
  fi
  mkdir -p "$dir/data" "$dir/docker-config"
  if ! owned_pid >/dev/null; then
    htpasswd -Bbn "$user" "$password" >"$dir/htpasswd"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $addr
  secret: cattery-test-registry
auth:
  htpasswd:
    realm: cattery-test
    path: $dir/htpasswd
EOF
    setsid docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    local i
    for i in $(seq 1 100); do
      # 401 = up and asking for credentials.
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v2/" || true)" = 401 ] && break
      kill -0 "$(cat "$dir/pid")" 2>/dev/null || { tail -20 "$dir/registry.log" >&2; exit 1; }
      sleep 0.1
    done
    log "registry $(cat "$dir/pid") listening on $addr"
  fi
  DOCKER_CONFIG="$dir/docker-config" "$DOCKER" login -u "$user" --password-stdin "$addr" \
    <<<"$password" >/dev/null 2>&1 || { log "docker login to $addr failed"; exit 1; }
  while [ $# -gt 0 ]; do
    case "$1" in
      --push)
        local src="${2%%=*}" dst="$addr/${2#*=}"
        "$DOCKER" tag "$src" "$dst"
        DOCKER_CONFIG="$dir/docker-config" "$DOCKER" push "$dst" >/dev/null
        "$DOCKER" rmi "$dst" >/dev/null
        log "pushed $src as $dst"
        shift 2 ;;
      *) log "unknown argument: $1"; exit 2 ;;
    esac
  done
  echo "CATTERY_TEST_REGISTRY=$addr"
  echo "CATTERY_TEST_REGISTRY_USER=$user"
  echo "CATTERY_TEST_REGISTRY_PASSWORD=$password"
  echo "CATTERY_TEST_REGISTRY_DOCKER_CONFIG=$dir/docker-config"
}

stop() {
  local pid i
  if ! pid="$(owned_pid)"; then log "no registry started by this script is running"; return 0; fi
  kill -TERM "$pid"
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; log "registry $pid stopped"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 start [--push IMAGE:TAG=PATH:TAG]... | stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Makes a Docker engine available for the container tests, and takes it away again.
#
#   scripts/docker-ci.sh start   install Debian's docker.io if the engine binaries are missing;
#                                start dockerd in the background unless an engine already
#                                answers; wait until `docker info` works. Prints the seconds spent.
#   scripts/docker-ci.sh stop    stop the dockerd that `start` launched (by its PID), and only it.
#                                An engine this script did not start is left alone.
#   scripts/docker-ci.sh status  say whether an engine answers and whether this script owns it.
#
# Can also be sourced: `. scripts/docker-ci.sh; docker_ci_start; ...; docker_ci_stop`.
#
# The engine is the local default (unix:///var/run/docker.sock, data root /var/lib/docker).
# The dockerd this script starts keeps its PID file and log in $CATTERY_DOCKERD_DIR
# (default /run/cattery-dockerd). The client is always Debian's /usr/bin/docker: another
# `docker` earlier on PATH may be a client only, or of another version.
#
# Works on a fresh Debian 12 machine as root with only the package mirrors reachable. Measured
# on a 2-core VM: installing docker.io ~18 s, starting dockerd until `docker info` answers ~2 s.
#
# CATTERY_DOCKER_KEEP=1 makes `stop` a no-op (keep the engine for the next run).

_docker_ci_dir="${CATTERY_DOCKERD_DIR:-/run/cattery-dockerd}"
DOCKER_BIN="/usr/bin/docker"

_docker_ci_log() { echo "docker-ci: $*" >&2; }

_docker_ci_dockerd_path() {
  local p
  for p in /usr/sbin/dockerd /usr/bin/dockerd; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

_docker_ci_now() { date +%s.%N; }
_docker_ci_secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

_docker_ci_answers() { "$DOCKER_BIN" info >/dev/null 2>&1; }

# The PID in our PID file, if that process is still a dockerd. Guards against a stale file whose
# PID was reused by an unrelated process.
_docker_ci_owned_pid() {
  local pidfile="$_docker_ci_dir/dockerd.pid" pid exe
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  case "$exe" in */dockerd) echo "$pid"; return 0 ;; esac
  return 1
}

docker_ci_install() {
  if [ -x "$DOCKER_BIN" ] && _docker_ci_dockerd_path >/dev/null; then
    return 0
  fi
  local t0 t1
  t0="$(_docker_ci_now)"
  _docker_ci_log "installing docker.io"
  if [ "$(id -u)" -ne 0 ]; then
    _docker_ci_log "docker.io is missing and installing it needs root"
    return 1
  fi
  # --no-install-recommends: the recommends (apparmor, needrestart, git, ...) are not needed to
  # run containers, and needrestart would try to restart services.
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io; } \
    >"/tmp/docker-ci-apt.$$.log" 2>&1 || { cat "/tmp/docker-ci-apt.$$.log" >&2; return 1; }
  rm -f "/tmp/docker-ci-apt.$$.log"
  t1="$(_docker_ci_now)"
  _docker_ci_log "docker.io installed in $(_docker_ci_secs "$t0" "$t1") s"
}

docker_ci_start() {
  docker_ci_install || return 1
  if _docker_ci_answers; then
    if _docker_ci_owned_pid >/dev/null; then
      _docker_ci_log "engine answers (dockerd $(_docker_ci_owned_pid), started earlier by this script)"
    else
      _docker_ci_log "engine answers (not started by this script; it will be left running)"
    fi
    return 0
  fi
  local dockerd t0 t1 pid
  dockerd="$(_docker_ci_dockerd_path)"
  mkdir -p "$_docker_ci_dir"
  # A dockerd we started earlier that no longer answers: stop it before starting another.
  if pid="$(_docker_ci_owned_pid)"; then
    _docker_ci_log "dockerd $pid does not answer; stopping it"
    docker_ci_stop
  fi
  t0="$(_docker_ci_now)"
  # setsid: its own session and process group, so a Ctrl-C or a job-control kill of the caller
  # does not reach it; stop is explicit.
  setsid "$dockerd" --pidfile "$_docker_ci_dir/dockerd.pid" \
    >>"$_docker_ci_dir/dockerd.log" 2>&1 </dev/null &
  pid=$!
  local i
  for i in $(seq 1 600); do
    if _docker_ci_answers; then
      t1="$(_docker_ci_now)"
      _docker_ci_log "dockerd $pid answers after $(_docker_ci_secs "$t0" "$t1") s (log $_docker_ci_dir/dockerd.log)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      _docker_ci_log "dockerd exited during start; last lines of $_docker_ci_dir/dockerd.log:"
      tail -20 "$_docker_ci_dir/dockerd.log" >&2
      return 1
    fi
    sleep 0.1
  done
  _docker_ci_log "dockerd $pid did not answer within 60 s"
  return 1
}

docker_ci_stop() {
  if [ "${CATTERY_DOCKER_KEEP:-0}" = 1 ]; then
    _docker_ci_log "CATTERY_DOCKER_KEEP=1: leaving the engine running"
    return 0
  fi
  local pid i
  if ! pid="$(_docker_ci_owned_pid)"; then
    _docker_ci_log "no dockerd started by this script is running; nothing to stop"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  # dockerd stops its containers (10 s grace each, in parallel) before exiting.
  for i in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { _docker_ci_log "dockerd $pid stopped"; rm -f "$_docker_ci_dir/dockerd.pid"; return 0; }
    sleep 0.1
  done
  _docker_ci_log "dockerd $pid still running after 30 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$_docker_ci_dir/dockerd.pid"
}

docker_ci_status() {
  local pid
  if _docker_ci_answers; then
    if pid="$(_docker_ci_owned_pid)"; then
      echo "engine answers; dockerd $pid was started by this script"
    else
      echo "engine answers; not started by this script"
    fi
  else
    echo "no engine answers"
    return 1
  fi
}

# Run as a command (not sourced).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-start}" in
    start) docker_ci_start ;;
    stop) docker_ci_stop ;;
    status) docker_ci_status ;;
    install) docker_ci_install ;;
    *) echo "usage: $0 [start|stop|status|install]" >&2; exit 2 ;;
  esac
fi

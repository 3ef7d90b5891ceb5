#!/usr/bin/env bash
# Creates the Python environments the tests use (idempotent), under $CATTERY_PY_DIR, else
# /var/cache/cattery-py as root, else ~/.cache/cattery-py. As root the server runs instances under
# unprivileged uids of their own (docs/security.md), and those cannot enter /root: the bots'
# interpreter must live where any user may read it.
#   main/ : pipecat-ai[cli,webrtc] + pipecatcloud 1.x + fastapi + uvicorn: runs example bots
#           through the Cattery runner, and the current official CLI (`pipecat cloud ...`);
#           and uv, with which the local builder installs a context's uv.lock (docs/builds.md).
#   pcc/  : pipecatcloud==0.7.2, the legacy `pcc` CLI.
#   ops/  : prometheus_client, whose text parser checks `GET /metrics` (tests/e2e/ops.rs).
# Prints the two interpreters' paths. Tests find them in the same place (or via
# CATTERY_TEST_PYTHON / CATTERY_TEST_PCC_PYTHON).
set -euo pipefail
default="$HOME/.cache/cattery-py"
[ "$(id -u)" = 0 ] && default=/var/cache/cattery-py
root="${CATTERY_PY_DIR:-$default}"
umask 022
mkdir -p "$root"
chmod a+rx "$root"
# The base interpreter must be reachable by instance uids too (a pyenv one under /root is not).
base=python3
[ "$(id -u)" = 0 ] && [ -x /usr/bin/python3 ] && base=/usr/bin/python3

if ! "$base" -m venv --help >/dev/null 2>&1 || ! "$base" -c 'import ensurepip' >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

make_env() {
  local name="$1"; shift
  local stamp="$root/$name/.cattery-stamp"
  local want="$base $*"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$root/$name/bin/python" -c 'import sys' 2>/dev/null; then
    return 0
  fi
  rm -rf "$root/$name"
  "$base" -m venv "$root/$name"
  "$root/$name/bin/pip" install -q --disable-pip-version-check "$@"
  echo "$want" > "$stamp"
}

# Installs packages into an existing env unless it imports `module` already: an env made before
# they were added gets them in place, not made again.
add_to_env() {
  local name="$1" module="$2"; shift 2
  "$root/$name/bin/python" -c "import $module" 2>/dev/null && return 0
  "$root/$name/bin/pip" install -q --disable-pip-version-check "$@"
}

make_env main 'pipecat-ai[cli,webrtc]' 'pipecatcloud>=1.4,<2' fastapi uvicorn websockets
add_to_env main uv uv
make_env pcc 'pipecatcloud==0.7.2'
make_env ops prometheus_client
echo "$root/main/bin/python"
echo "$root/pcc/bin/python"

#!/usr/bin/env bash
# API fuzz: runs schemathesis against GET /v1/openapi.json of a fresh `cattery serve` (temporary
# data dir, free loopback port), with a private key on the private API and a public key on the
# start route. Fails on any 5xx answer, any
# response that breaks the documented schema, status code or content type, or a server crash.
#
#   scripts/fuzz.sh [--seconds N] [--bin-dir DIR] [--report DIR]
#
# --seconds   time budget of the fuzzing itself (default 60)
# --bin-dir   where `cattery` and `cattery-test-agent` are (default target/debug)
# --report    keep schemathesis' JUnit report and the server log there
#
# schemathesis is installed (once) into a venv under ${CATTERY_PY_DIR:-~/.cache/cattery-py}/fuzz.
# The server runs with PATH pointing at an empty directory, so agents the fuzzer deploys with
# random `command` names cannot run anything; one real agent (`fuzz-agent`, the test agent)
# is deployed so routes that need a live agent are reached too.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

seconds=60
bin="target/debug"
report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --bin-dir) bin="$2"; shift 2 ;;
    --report) report="$2"; shift 2 ;;
    *) echo "usage: scripts/fuzz.sh [--seconds N] [--bin-dir DIR] [--report DIR]" >&2; exit 2 ;;
  esac
done
bin="$(cd "$bin" && pwd)"
for b in cattery cattery-test-agent; do
  [ -x "$bin/$b" ] || { echo "fuzz: $bin/$b not found (cargo build --workspace --bins)" >&2; exit 2; }
done

venv="${CATTERY_PY_DIR:-$HOME/.cache/cattery-py}/fuzz"
want='schemathesis>=4.3,<5'
if [ ! -f "$venv/.cattery-stamp" ] || [ "$(cat "$venv/.cattery-stamp")" != "$want" ] \
   || ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$want"
  echo "$want" > "$venv/.cattery-stamp"
fi

work="$(mktemp -d -t cattery-fuzz-XXXXXX)"
data="$work/data"
mkdir -p "$data" "$work/empty-path"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    sleep 0.3
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  if [ -n "$report" ]; then
    mkdir -p "$report"
    cp "$work/server.log" "$report/" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"

PATH="$work/empty-path" "$bin/cattery" serve --listen "127.0.0.1:$port" --data-dir "$data" \
  --start-timeout-seconds 10 --stop-grace-seconds 1 >"$work/server.log" 2>&1 &
server_pid=$!

python3 - "$base" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).read()
        break
    except Exception:
        time.sleep(0.05)
else:
    sys.exit("fuzz: the server did not come up")
PY
# Keys go into the database the server created (`keys create` works while it runs).
SK="$("$bin/cattery" keys create --type private --data-dir "$data")"
PK="$("$bin/cattery" keys create --type public --data-dir "$data")"

python3 - "$base" "$SK" "$bin/cattery-test-agent" <<'PY'
import json, sys, urllib.request
base, sk, agent = sys.argv[1:4]
body = json.dumps({"serviceName": "fuzz-agent", "command": [agent],
                   "autoScaling": {"minAgents": 1, "maxAgents": 4}, "stopGraceSeconds": 1}).encode()
req = urllib.request.Request(base + "/v1/agents", data=body, method="POST",
                             headers={"Authorization": "Bearer " + sk, "Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=10).read()
PY

cat >"$work/schemathesis.toml" <<'TOML'
headers = { Authorization = "Bearer ${CATTERY_FUZZ_SK}" }

[[operations]]
include-path = "/v1/public/{agent_name}/start"
headers = { Authorization = "Bearer ${CATTERY_FUZZ_PK}" }
parameters = { agent_name = "fuzz-agent" }

# The session proxy takes the public key too (random session ids: 404s, bad paths: 4xx).
[[operations]]
include-path-regex = "^/v1/public/\\{agent_name\\}/sessions/"
headers = { Authorization = "Bearer ${CATTERY_FUZZ_PK}" }
parameters = { agent_name = "fuzz-agent" }

# Reach past the 404s: these operations get the live agent's name (its delete is left
# to random names, so the agent stays for the whole run).
[[operations]]
include-path-regex = "^/v1/agents/\\{agent_name\\}(/sessions|/logs)?$"
include-method-regex = "^(GET|POST)$"
parameters = { agent_name = "fuzz-agent" }
TOML

args=(run "$base/v1/openapi.json"
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance
  --max-time "$seconds" --request-timeout 30 --workers 1 --phases examples,coverage,fuzzing
  --suppress-health-check all --seed 1 --generation-database none)
if [ -n "$report" ]; then
  mkdir -p "$report"
  args+=(--report junit --report-dir "$report")
fi
status=0
( cd "$work" && CATTERY_FUZZ_SK="$SK" CATTERY_FUZZ_PK="$PK" \
    timeout $((seconds + 120)) "$venv/bin/schemathesis" --no-color --config-file "$work/schemathesis.toml" "${args[@]}" ) || status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "fuzz: the server died during the run; last log lines:" >&2
  tail -20 "$work/server.log" >&2
  exit 1
fi
if grep -q "panicked" "$work/server.log"; then
  echo "fuzz: the server log has a panic:" >&2
  grep -n "panicked" "$work/server.log" | head -5 >&2
  status=1
fi
[ "$status" -eq 0 ] && echo "fuzz: no 5xx, no schema violations in ${seconds} s"
exit "$status"

#!/usr/bin/env bash
# SQLite vs PostgreSQL, one node vs three, for one or two builds of `cattery`, in one run
# (docs/cluster.md, "Measured"). Each configuration runs `cattery-bench --quick --only warm`
# then `--only churn` (each PostgreSQL run on a new empty database), and the PostgreSQL
# server's own CPU over the churn run is recorded (the scratch cluster of scripts/postgres-ci.sh).
#
#   scripts/bench-cluster.sh OUT_DIR ROUNDS NAME=CATTERY_BIN [NAME=CATTERY_BIN ...]
#
# CONFIGS (default "sqlite pg1 pg3") picks the configurations: sqlite, pgN (PostgreSQL, N
# nodes: churn sends each start and each stop to any node, a stop landing on another node than
# the owner is forwarded), pgNo (the same, each stop to the node that started the session).
# The churn's JSON also holds the machine's CPU busy fraction, the nodes', their instances',
# the bench's and PostgreSQL's CPU over the churn window (cattery-bench --postgres-pid).
#
# Needs a scratch PostgreSQL (eval "$(scripts/postgres-ci.sh start)") and a release
# cattery-bench and cattery-test-agent in target/release (or CATTERY_BENCH=path).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 rounds=$2; shift 2
mkdir -p "$out"
bench=${CATTERY_BENCH:-target/release/cattery-bench}
url=${CATTERY_TEST_DATABASE_URL:?start a scratch PostgreSQL first (scripts/postgres-ci.sh)}
base=${url%/*}
pgdata=${CATTERY_PG_DIR:-$PWD/target/postgres-ci}/data
pg_cpu() { # CPU ticks of the scratch cluster: its postmaster, its live processes, and (through
  # the postmaster's children's time) the backends that exited meanwhile
  local pm t p
  pm=$(head -1 "$pgdata/postmaster.pid")
  t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat")
  for p in $(pgrep -P "$pm" || true); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
n=0
for r in $(seq 1 "$rounds"); do
  for side in "$@"; do
    name=${side%%=*} bin=${side#*=}
    for cfg in ${CONFIGS:-sqlite pg1 pg3}; do
      args=()
      nodes=${cfg#pg} stops=any
      case $nodes in *o) nodes=${nodes%o} stops=owner ;; esac
      pgargs=(--database-url "$base/DB" --nodes "$nodes" --churn-stops "$stops"
        --postgres-pid "$(head -1 "$pgdata/postmaster.pid")")
      if [ "$cfg" != sqlite ]; then
        n=$((n + 1)); db="bench_${$}_$n"
        psql -q "$url" -c "CREATE DATABASE $db" >/dev/null
        args=("${pgargs[@]/DB/$db}")
      fi
      echo "== round $r $name $cfg (load $(cut -d' ' -f1 /proc/loadavg)) $(date +%T)" >&2
      "$bench" --cattery "$bin" --quick --only warm --warm 1:30,8:10 "${args[@]}" \
        --json "$out/$name-$cfg-$r-warm.json" >/dev/null 2>&1 || echo "warm run failed" >&2
      if [ "$cfg" != sqlite ]; then
        psql -q "$url" -c "DROP DATABASE $db" >/dev/null
        n=$((n + 1)); db="bench_${$}_$n"
        psql -q "$url" -c "CREATE DATABASE $db" >/dev/null
        args=("${pgargs[@]/DB/$db}")
      else
        args=(--postgres-pid "$(head -1 "$pgdata/postmaster.pid")")
      fi
      c0=$(pg_cpu)
      "$bench" --cattery "$bin" --quick --only churn "${args[@]}" \
        --json "$out/$name-$cfg-$r-churn.json" >/dev/null 2>&1 || echo "churn run failed" >&2
      c1=$(pg_cpu)
      printf "{\"postgres_cpu_s\": %.3f}\n" "$(echo "scale=3; ($c1 - $c0) / $hz" | bc)" >"$out/$name-$cfg-$r-pgcpu.json"
      [ "$cfg" = sqlite ] || psql -q "$url" -c "DROP DATABASE $db" >/dev/null
    done
  done
done

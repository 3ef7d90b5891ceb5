#!/bin/bash
# A/B interleaved: main, spare, main, spare. Usage: spare-ab.sh <phase-set-name> <only> [extra...]
set -u
cd /work/wt/spare
OUT=bench/results/spare-2026-12-05
NAME=$1; ONLY=$2; shift 2
for i in ${ROUNDS:-1 2}; do
  for v in main spare; do
    if [ $v = main ]; then C=/work/notes/bench15/cattery-main; else C=target/release/cattery; fi
    echo "== $v-$i $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
    timeout 600 ${BENCH:-target/release/cattery-bench} --only $ONLY --cattery $C --json $OUT/$NAME-$v-$i.json ${AGENT:+--agent $AGENT} "$@" > /tmp/spare-bench-$NAME-$v-$i.log 2>&1
    echo "   rc=$? after $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
  done
done

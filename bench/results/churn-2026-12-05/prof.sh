#!/bin/bash
# usage: prof.sh CATTERY BENCH AGENT OUT
C=$1; B=$2; A=$3; OUT=$4
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 200); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 3
SP=$(pgrep -P $BP -f "serve" | head -1)
echo "bench $BP server $SP"
perf record -F 499 --call-graph dwarf,32768 -o $OUT.perf.data -p $SP -- sleep 8 2> $OUT.perf.log
wait $BP
uptime

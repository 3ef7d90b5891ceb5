#!/bin/bash
# usage: pr.sh CATTERY OUT -- perf record -g (kernel + user frame pointers) of the server, 8 s of churn
C=$1; OUT=$2; D=/tmp/hp24w; B=$D/base/cattery-bench; A=$D/base/cattery-test-agent
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 4
SP=$(pgrep -P $BP -f "serve" | head -1)
perf record -F 999 -g -o $OUT.perf.data -p $SP -- sleep 8 2> $OUT.perf.log
wait $BP

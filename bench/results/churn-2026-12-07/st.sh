#!/bin/bash
# usage: st.sh CATTERY OUT -- strace -c -f of the server over 10 s inside the churn
C=$1; OUT=$2; D=/tmp/hp24w; B=$D/base/cattery-bench; A=$D/base/cattery-test-agent
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 4
SP=$(pgrep -P $BP -f "serve" | head -1)
timeout -s INT 10 strace -c -f -p $SP -o $OUT.strace
wait $BP

#!/bin/bash
# usage: cg.sh CATTERY BENCH AGENT OUT -- callgrind of the server over 15 s inside the churn phase
C=$1; B=$2; A=$3; OUT=$4
export CG_BIN=$C CG_OUT=/tmp/churn2/$OUT.cg
rm -f /tmp/churn2/$OUT.cg*
$B --cattery /tmp/churn2/vg-wrap.sh --agent $A --only churn --churn-seconds 40 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 600); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
SP=$(pgrep -P $BP | head -1)
for i in $(seq 1 600); do n=$(pgrep -P $SP | wc -l); [ "$n" -ge 16 ] && break; sleep 0.2; done
sleep 2
callgrind_control -z $SP >/dev/null
sleep 15
callgrind_control -d $SP >/dev/null
echo "bench $BP server(valgrind) $SP"
wait $BP
uptime

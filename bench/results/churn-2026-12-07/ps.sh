#!/bin/bash
# usage: ps.sh CATTERY OUT -- perf stat --no-inherit of the server's own threads over 10 s of churn:
# system calls in all and by kind, context switches, and utime/stime from /proc
C=$1; OUT=$2; D=/tmp/hp24w; B=$D/base/cattery-bench; A=$D/base/cattery-test-agent
uptime > $OUT.uptime
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 4
SP=$(pgrep -P $BP -f "serve" | head -1)
s0=$(awk '{print $14, $15}' /proc/$SP/stat)
E=raw_syscalls:sys_enter,context-switches
for k in openat close read write pread64 pwrite64 mkdir rmdir rename connect socket sendto recvfrom futex epoll_wait getrandom statx unlinkat clone clone3 fcntl readlinkat getdents64 flock; do E=$E,syscalls:sys_enter_$k; done
perf stat --no-inherit -e $E -p $SP -o $OUT.perfstat -- sleep 10
s1=$(awk '{print $14, $15}' /proc/$SP/stat)
echo "$s0 $s1" > $OUT.ticks
wait $BP
uptime >> $OUT.uptime

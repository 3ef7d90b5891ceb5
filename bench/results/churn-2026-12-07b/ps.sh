#!/bin/bash
# usage: ps.sh CATTERY OUT -- churn (20 s) with the baseline bench and agent; over 10 s inside it,
# perf stat --no-inherit of the server's own threads (system calls in all and by kind, context
# switches) and the server's utime/stime from /proc. Prints one summary line.
C=$1; OUT=$2; D=${BASE_DIR:-/tmp/hp25/base}; B=$D/cattery-bench; A=$D/cattery-test-agent
uptime > $OUT.uptime
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 4
SP=$(pgrep -P $BP -f "serve" | head -1)
s0=$(awk '{print $14, $15}' /proc/$SP/stat)
E=raw_syscalls:sys_enter,context-switches
for k in openat close read write unlink ioctl mmap munmap madvise sched_yield accept4 getpeername setsockopt getsockopt shutdown pidfd_open pidfd_send_signal waitid wait4 kill pread64 pwrite64 mkdir rmdir rename connect socket bind getsockname sendto recvfrom futex epoll_wait getrandom statx newfstatat lseek unlinkat clone clone3 fcntl readlinkat getdents64 flock ftruncate; do E=$E,syscalls:sys_enter_$k; done
perf stat --no-inherit -e $E -p $SP -o $OUT.perfstat -- sleep 10
s1=$(awk '{print $14, $15}' /proc/$SP/stat)
echo "$s0 $s1" > $OUT.ticks
wait $BP
uptime >> $OUT.uptime
python3 "$(dirname "$0")/sum.py" $OUT

#!/bin/bash
# usage: stp.sh CATTERY BENCH AGENT OUT SECS -- strace -f with paths of the server's calls over SECS s of churn
C=$1; B=$2; A=$3; OUT=$4; S=${5:-3}
$B --cattery $C --agent $A --only churn --churn-seconds 15 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 3
SP=$(pgrep -P $BP -f "serve" | head -1)
ls /proc/$SP/task > $OUT.tids0
timeout -s INT $S strace -f -tt -y -e trace=openat,statx,newfstatat,close,read,mkdir,rmdir,unlinkat,connect,readlinkat,getdents64,fcntl,pwrite64,pread64,write,rename,socket,getrandom,flock,futex,recvfrom,sendto -p $SP -o $OUT.strace
ls /proc/$SP/task > $OUT.tids1
wait $BP

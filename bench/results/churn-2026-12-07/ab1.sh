#!/bin/bash
# usage: ab1.sh CATTERY OUT -- churn (20 s) with the baseline bench and agent; over 10 s inside the
# churn: the server's user and system CPU (/proc/<pid>/stat) and its system calls (perf stat).
C=$1; OUT=$2; D=/tmp/hp24w; B=$D/base/cattery-bench; A=$D/base/cattery-test-agent
uptime > $OUT.uptime
$B --cattery $C --agent $A --only churn --churn-seconds 20 --json $OUT.json > $OUT.bench.log 2>&1 &
BP=$!
for i in $(seq 1 300); do grep -q "churn:" $OUT.bench.log && break; sleep 0.2; done
sleep 4
SP=$(pgrep -P $BP -f "serve" | head -1)
s0=$(awk '{print $14, $15}' /proc/$SP/stat)
perf stat -e raw_syscalls:sys_enter,context-switches,task-clock -p $SP -o $OUT.perfstat -- sleep 10
s1=$(awk '{print $14, $15}' /proc/$SP/stat)
echo "$s0 $s1" > $OUT.ticks
wait $BP
uptime >> $OUT.uptime
python3 - $OUT <<'PY'
import json,sys,re
o=sys.argv[1]
j=json.load(open(o+'.json'))
sc={s['key']:s['value'] for s in j.get('scalars',[])}
rate=sc.get('churn_cycles_per_second') or sc.get('churn_rate')
t=open(o+'.ticks').read().split(); u0,s0,u1,s1=map(int,t)
ps=open(o+'.perfstat').read()
m=re.search(r'([\d,]+)\s+raw_syscalls:sys_enter',ps); sysc=int(m.group(1).replace(',',''))
m=re.search(r'([\d,]+)\s+context-switches',ps); cs=int(m.group(1).replace(',',''))
cyc=rate*10 if rate else float('nan')
print(f"{o}: rate {rate:.1f}/s cpu/cycle {sc.get('churn_server_cpu_per_cycle'):.3f} ms; window: user {(u1-u0)*10/cyc:.3f} sys {(s1-s0)*10/cyc:.3f} ms/cycle, syscalls {sysc/cyc:.0f}/cycle, cs {cs/cyc:.1f}/cycle; load {open(o+'.uptime').read().split('average:')[1].split()[0]}")
PY

import json,sys,re
o=sys.argv[1]
j=json.load(open(o+'.json'))
def find(j):
    out={}
    def walk(x):
        if isinstance(x,dict):
            for k,v in x.items():
                if isinstance(v,(int,float)): out.setdefault(k,v)
                else: walk(v)
        elif isinstance(x,list):
            for v in x: walk(v)
    walk(j); return out
sc={x['key']:x['value'] for x in j.get('scalars',[])}
rate=sc.get('churn_cycles_per_second') or sc.get('churn_rate')
cpu=sc.get('churn_server_cpu_per_cycle') or sc.get('churn_cpu_per_cycle_ms')
t=open(o+'.ticks').read().split(); u0,s0,u1,s1=map(int,t)
ps=open(o+'.perfstat').read()
cyc=rate*10
kinds={}
for m in re.finditer(r'^\s*([\d,]+)\s+(raw_syscalls:sys_enter|context-switches|syscalls:sys_enter_\w+)',ps,re.M):
    n=int(m.group(1).replace(',','')); k=m.group(2)
    kinds[k.replace('syscalls:sys_enter_','')]=n
sysc=kinds.get('raw_syscalls:sys_enter',0); cs=kinds.get('context-switches',0)
up=open(o+'.uptime').read().split('average:')
load=[u.split()[0].rstrip(',') for u in up[1:]]
print(f"{o}: rate {rate:.1f}/s cpu/cycle {cpu:.3f} ms; window: user {(u1-u0)*10/cyc:.3f} sys {(s1-s0)*10/cyc:.3f} ms/cycle, syscalls {sysc/cyc:.1f}/cycle, cs {cs/cyc:.1f}/cycle; load {'→'.join(load)}")
print('  '+' '.join(f"{k} {v/cyc:.1f}" for k,v in sorted(kinds.items(), key=lambda kv:-kv[1]) if k not in('raw_syscalls:sys_enter','context-switches') and v/cyc>=0.05))
store=sum(kinds.get(k,0) for k in ('pwrite64','pread64','fcntl'))
print(f"  without pwrite64+pread64+fcntl (mostly SQLite): {(sysc-store)/cyc:.1f}/cycle")
inst=kinds.get('mkdir',0)/7
if inst:
    print(f"  per spawned instance (mkdir/7 = {inst:.0f} instances in the window): all {sysc/inst:.1f}, without pwrite64+pread64+fcntl {(sysc-store)/inst:.1f}; "+' '.join(f"{k} {v/inst:.1f}" for k,v in sorted(kinds.items(), key=lambda kv:-kv[1]) if k not in('raw_syscalls:sys_enter','context-switches') and v/inst>=0.05))

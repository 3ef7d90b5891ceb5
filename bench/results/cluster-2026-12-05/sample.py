#!/usr/bin/env python3
"""CPU of the bench's process tree by role over a churn window, and pg wait events.
usage: sample.py BENCH_PID POSTMASTER_PID WINDOW_START_S WINDOW_S"""
import os, sys, time, subprocess
HZ = os.sysconf("SC_CLK_TCK")
bench, pm, start, win = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def stat(p):
    try:
        s = open(f"/proc/{p}/stat").read()
    except OSError:
        return None
    f = s[s.rfind(")") + 2:].split()
    return int(f[11]) + int(f[12]), int(f[13]) + int(f[14])
def kids(p):
    out = []
    try:
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                out += [int(x) for x in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out
def comm(p):
    try: return open(f"/proc/{p}/comm").read().strip()
    except OSError: return "?"
def tree(p):
    st = stat(p)
    if not st: return 0
    t = st[0] + st[1]
    for k in kids(p): t += tree(k)
    return t
def snap():
    r = {"bench": (stat(bench) or (0, 0))[0], "nodes_self": 0, "node_tree": 0, "pg": tree(pm)}
    for k in kids(bench):
        if comm(k).startswith("cattery"):
            s = stat(k)
            r["nodes_self"] += s[0] if s else 0
            r["node_tree"] += tree(k)
    l = open("/proc/stat").readline().split()[1:9]
    v = list(map(int, l)); r["busy"] = sum(v) - v[3] - v[4]; r["total"] = sum(v)
    return r
time.sleep(start)
a = snap(); t0 = time.time(); time.sleep(win); b = snap(); dt = time.time() - t0
d = {k: (b[k] - a[k]) for k in a}
print(f"window {dt:.1f}s: machine busy {d['busy']/max(d['total'],1):.2f} of all cores ({os.cpu_count()})")
for k in ("nodes_self", "node_tree", "pg", "bench"):
    print(f"  {k}: {d[k]/HZ/dt:.2f} cores")
print(f"  agents (node tree - nodes): {(d['node_tree']-d['nodes_self'])/HZ/dt:.2f} cores")

#!/usr/bin/env python3
"""Prints one line per run of this directory's JSON files (cold and churn A/B runs)."""
import glob, json, os

here = os.path.dirname(os.path.abspath(__file__))
for f in sorted(glob.glob(os.path.join(here, "*.json")), key=lambda p: (os.path.basename(p).split("-")[0], os.path.basename(p).split("-")[-1], os.path.basename(p))):
    d = json.load(open(f))
    figs = {x["key"]: x for x in d.get("figures", [])}
    scal = {x["key"]: x for x in d.get("scalars", [])} if "scalars" in d else {}
    def p50(k):
        x = figs.get(k)
        return x["summary"]["p50"] if x else float("nan")
    def ratio(k):
        x = figs.get(k)
        return (x.get("ratio_p50") or float("nan")) if x else float("nan")
    def val(k):
        x = scal.get(k)
        return x["value"] if x else float("nan")
    name = os.path.basename(f)[:-5]
    load = d.get("load_start", [0])[0], d.get("load_end", [0])[0]
    if "cold_start_overhead" in figs:
        print(f"{name:16} load {load[0]:5.1f}-{load[1]:5.1f}  fork/exec floor {p50('floor_fork_exec'):.3f}"
              f"  back-to-back overhead {p50('cold_start_overhead'):6.2f} ms ({ratio('cold_start_overhead'):.1f}x)"
              f"  pre {p50('cold_start_pre'):5.2f}"
              f" | spaced overhead {p50('cold_start_delay_overhead'):6.2f} ms ({ratio('cold_start_delay_overhead'):.1f}x)"
              f"  pre {p50('cold_start_delay_pre'):5.2f}  post {p50('cold_start_delay_post'):5.2f}")
    else:
        print(f"{name:16} load {load[0]:5.1f}-{load[1]:5.1f}  churn {val('churn_rate'):6.1f}/s"
              f"  server CPU/cycle {val('churn_server_cpu_per_cycle'):.2f} ms"
              f"  reaped children CPU/cycle {val('churn_children_cpu_per_cycle'):.2f} ms")

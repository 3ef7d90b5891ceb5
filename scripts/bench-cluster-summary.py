#!/usr/bin/env python3
"""Summary table of scripts/bench-cluster.sh's output: scripts/bench-cluster-summary.py OUT_DIR"""
import glob, json, os, re, sys
d = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(d, "*-*-*-*.json"))):
    m = re.match(r"(.+)-(sqlite|pg1|pg3)-(\d+)-(warm|churn|pgcpu)\.json$", os.path.basename(f))
    if not m:
        continue
    name, cfg, r, kind = m.groups()
    j = json.load(open(f))
    row = rows.setdefault((name, cfg, int(r)), {})
    if kind == "pgcpu":
        row["pg_cpu_s"] = j["postgres_cpu_s"]
        continue
    row.setdefault("load", j["load_start"][0])
    for fig in j["figures"]:
        if fig["key"] in ("warm_start_c1", "warm_start_c8", "churn_start", "churn_stop") and fig["summary"]:
            row[fig["key"]] = fig["summary"]["p50"]
    for s in j["scalars"]:
        row[s["key"]] = s["value"]
        if s["key"] == "churn_rate":
            row["cycles"] = int(s["note"].split()[0])
    row["errors"] = row.get("errors", 0) + len(j["errors"])
cols = ["load", "warm_start_c1", "warm_start_c8", "churn_rate", "churn_cold_fraction", "churn_start", "churn_stop",
        "churn_server_cpu_per_cycle", "pg_cpu_per_cycle", "errors"]
print("| build | store | round | " + " | ".join(cols) + " |")
print("|" + "---|" * (len(cols) + 3))
for (name, cfg, r), row in sorted(rows.items(), key=lambda x: (x[0][2], x[0][0], x[0][1])):
    if "pg_cpu_s" in row and row.get("cycles"):
        row["pg_cpu_per_cycle"] = row["pg_cpu_s"] * 1000 / row["cycles"]
    cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
    print(f"| {name} | {cfg} | {r} | " + " | ".join(cells) + " |")

import sys, re, collections
# perf script output -> inclusive share per category (first matching category, in priority order)
cats = [
 ("log prune (write_tx)", ["prune_logs_over"]),
 ("log append", ["append_logs", "log_writer"]),
 ("store group writer", ["group_writer", "run_group"]),
 ("store write_tx other", ["write_tx"]),
 ("key check", ["find_live_key", "find_key"]),
 ("store read other", ["read_now", "read_on"]),
 ("spawn (start_blocking)", ["start_blocking"]),
 ("spawn_instance other", ["spawn_instance"]),
 ("terminate", ["do_terminate"]),
 ("wait_ready/readyz", ["wait_ready", "get_status_keep"]),
 ("post_bot/instance conn", ["post_bot", "instance_http", "hyper::client", "hyper::proto::h1::dispatch::Client"]),
 ("tailer", ["logs::Tail", "Tailer"]),
 ("reaper", ["reaper::"]),
 ("owns_endpoint", ["owns_endpoint", "pids_hold_socket", "listening_inodes"]),
 ("ports", ["ports::"]),
 ("uids", ["uids::"]),
 ("api http server", ["http_server::serve", "hyper::proto::h1::dispatch::Server", "axum"]),
 ("actor other", ["actor::run", "actor::Actor"]),
 ("finish other", ["cleanup::"]),
 ("reconcile", ["reconcile"]),
 ("metrics/telemetry", ["metrics::", "telemetry"]),
 ("tokio park/epoll", ["park", "epoll_wait", "Driver::turn"]),
 ("tokio scheduler", ["tokio::runtime::scheduler", "tokio::runtime::task"]),
]
samples = []
cur = []
for line in open(sys.argv[1], errors="replace"):
    if not line.strip():
        if cur: samples.append(cur); cur = []
        continue
    if line[0] not in " \t":
        cur = [line]
    else:
        cur.append(line.strip())
if cur: samples.append(cur)
c = collections.Counter()
kern = collections.Counter()
for s in samples:
    frames = " | ".join(s[1:])
    cat = "other"
    for name, keys in cats:
        if any(k in frames for k in keys):
            cat = name; break
    c[cat] += 1
    # innermost kernel syscall
    m = re.findall(r"\s(__x64_sys_\w+|__do_sys_\w+)", " ".join(s[1:]))
    if m: kern[(cat, m[0])] += 1
n = len(samples)
print(n, "samples")
for k, v in c.most_common():
    print(f"{100*v/n:5.1f}% {k}")
print("--- syscalls (innermost) by category, top 40")
for (cat, sc), v in kern.most_common(40):
    print(f"{100*v/n:5.1f}% {sc:28} {cat}")

#!/usr/bin/env python3
"""Forwarded stop vs local stop: two release-built nodes on one PostgreSQL database, same run.
Usage: scripts/bench-forwarded-stop.py postgres://USER@HOST:PORT/EMPTY_DB [STOPS]  (cargo build --release first).
Sessions start on node A; interleaved, one is stopped through A (local) and the next through B
(forwarded to A). Prints p50/p90 of the DELETE round trip for each."""
import json, os, subprocess, sys, time, tempfile, urllib.request, statistics, signal
BIN = os.environ.get("CATTERY_BIN_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release"))
PG = sys.argv[1]  # postgres URL of an empty database
N = int(sys.argv[2]) if len(sys.argv) > 2 else 60
tmp = tempfile.mkdtemp(prefix="fwdstop-")
secret = os.path.join(tmp, "cluster-secret"); open(secret, "w").write("s" * 48); os.chmod(secret, 0o600)
keyf = os.path.join(tmp, "secrets-key"); open(keyf, "wb").write(os.urandom(32)); os.chmod(keyf, 0o600)
def key(kind):
    return subprocess.check_output([f"{BIN}/cattery", "keys", "create", "--type", kind, "--database-url", PG, "--data-dir", tmp + "/a"]).decode().strip()
procs = []
def node(name, port):
    d = os.path.join(tmp, name); os.makedirs(d, exist_ok=True)
    p = subprocess.Popen([f"{BIN}/cattery", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", d, "--database-url", PG,
        "--node-id", name, "--advertise-url", f"http://127.0.0.1:{port}", "--cluster-secret-file", secret,
        "--secrets-key-file", keyf], stdout=open(d + ".log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
def req(method, url, tok, body=None):
    r = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(r, timeout=30) as f:
        b = f.read()
    return (time.perf_counter() - t) * 1000, json.loads(b or b"{}")
try:
    node("a", 17871); node("b", 17872)
    for port in (17871, 17872):
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1); break
            except Exception:
                time.sleep(0.05)
    sk, pk = key("private"), key("public")
    A, B = "http://127.0.0.1:17871", "http://127.0.0.1:17872"
    req("POST", f"{A}/v1/agents", sk, {"serviceName": "fwd", "command": [f"{BIN}/cattery-test-agent"],
        "autoScaling": {"minAgents": 0, "maxAgents": 50}})
    time.sleep(1.5)
    local, fwd = [], []
    for i in range(N):
        _, s = req("POST", f"{A}/v1/public/fwd/start", pk, {"body": {}})
        sid = s["sessionId"]
        time.sleep(0.3)
        via = A if i % 2 == 0 else B
        ms, body = req("DELETE", f"{via}/v1/agents/fwd/sessions/{sid}", sk)
        assert body.get("status") == "terminated", body
        (local if via == A else fwd).append(ms)
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]
    print(f"stops per path: {len(local)}; load {os.getloadavg()[0]:.2f}")
    print(f"local stop (through the owner)   p50 {statistics.median(local):.2f} ms  p90 {q(local,.9):.2f} ms")
    print(f"forwarded stop (through node b)  p50 {statistics.median(fwd):.2f} ms  p90 {q(fwd,.9):.2f} ms")
    print(f"forwarding adds p50 {statistics.median(fwd)-statistics.median(local):+.2f} ms")
finally:
    for p in procs:
        try: os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError: pass
    for p in procs:
        try: p.wait(30)
        except Exception: os.killpg(p.pid, signal.SIGKILL)

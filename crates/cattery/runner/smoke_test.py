#!/usr/bin/env python3
"""Smoke test for cattery_runner.py: starts the runner on a free port for each example bot (and a
few throw-away bots) and checks the Pipecat Cloud instance contract. Standard library only.

    python3 smoke_test.py --python /path/to/venv/bin/python [--runner cattery_runner.py]
                          [--examples /path/to/examples] [--keep-logs DIR] [-v]

``--python`` is the interpreter the runner runs under (it needs pipecat-ai, pipecatcloud, fastapi
and uvicorn; the SmallWebRTC check runs only when aiortc is importable there). Exits 0 when every
check passes, 1 otherwise, and prints one line per check plus a closing ``N passed, N failed``.
"""

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL) *"
    r"\| [^|]+:[^|]+:\d+ \| (\S+) - "
)

RESULTS = {"passed": 0, "failed": 0}
VERBOSE = False


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["passed" if ok else "failed"] += 1
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail and (not ok or VERBOSE) else ""))
    sys.stdout.flush()
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------------------------


def call_http(port, method, path, body=None, headers=None, timeout=30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            hdrs.setdefault("content-type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return resp.status, payload
    finally:
        conn.close()


class Background:
    """Runs an HTTP request in a thread (a /bot call blocks for the whole session)."""

    def __init__(self, *args, **kwargs):
        self.result = None
        self.error = None
        self.started = time.monotonic()
        self.elapsed = None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs):
        try:
            self.result = call_http(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.error = exc
        self.elapsed = time.monotonic() - self.started

    def wait(self, timeout):
        self.thread.join(timeout)
        return self.result


# ---------------------------------------------------------------------------------------------
# Minimal WebSocket client (RFC 6455) and pipecat protobuf audio frames
# ---------------------------------------------------------------------------------------------


class WebSocketClient:
    def __init__(self, port, path, headers=None, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed during handshake")
            buf += chunk
        head, self.pending = buf.split(b"\r\n\r\n", 1)
        self.status_line = head.split(b"\r\n", 1)[0].decode()
        if " 101 " not in self.status_line + " ":
            raise ConnectionError(f"handshake refused: {self.status_line}")
        self.closed = False
        self.close_code = None

    def _read_exact(self, n):
        while len(self.pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.pending += chunk
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def send(self, payload: bytes, opcode=0x2):
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self):
        """Next data message as (opcode, payload); None once closed."""
        message, first_opcode = b"", None
        while True:
            b0, b1 = self._read_exact(2)
            opcode, fin = b0 & 0x0F, b0 & 0x80
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read_exact(8))[0]
            mask = self._read_exact(4) if b1 & 0x80 else None
            payload = self._read_exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                self.closed = True
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return None
            if opcode == 0x9:
                self.send(payload, opcode=0xA)
                continue
            if opcode == 0xA:
                continue
            if first_opcode is None:
                first_opcode = opcode
            message += payload
            if fin:
                return first_opcode, message

    def close(self):
        if not self.closed:
            try:
                self.send(struct.pack("!H", 1000), opcode=0x8)
            except OSError:
                pass
        self.sock.close()


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _read_varint(data: bytes, i: int):
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def proto_audio_frame(audio: bytes, sample_rate: int, channels: int) -> bytes:
    """pipecat.Frame{audio: AudioRawFrame{audio=3, sample_rate=4, num_channels=5}}."""
    inner = b"\x1a" + _varint(len(audio)) + audio + b"\x20" + _varint(sample_rate) + b"\x28" + _varint(channels)
    return b"\x12" + _varint(len(inner)) + inner


def proto_parse(data: bytes) -> dict:
    """{field_number: value} of one message level (bytes for length-delimited, int for varint)."""
    fields, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            fields[field], i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            fields[field], i = data[i : i + n], i + n
        elif wire == 1:
            fields[field], i = data[i : i + 8], i + 8
        elif wire == 5:
            fields[field], i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
    return fields


# ---------------------------------------------------------------------------------------------
# Runner process
# ---------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, python, runner, bot_dir, log_dir, name, env=None):
        self.port = free_port()
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log_file = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update({"PORT": str(self.port), "CATTERY_BOT_DIR": bot_dir})
        full_env.update(env or {})
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            [python, runner], cwd=bot_dir, env=full_env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        self.ready_secs = None

    def wait_ready(self, timeout=60.0, path="/livez") -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status, _ = call_http(self.port, "GET", path, timeout=2)
                if status == 200:
                    self.ready_secs = time.monotonic() - self.spawned
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def log_lines_for(log: str, session_id: str):
    return [line for line in log.splitlines() if (m := LOG_LINE.match(line)) and m.group(2) == session_id]


def check_log_format(name: str, log: str):
    lines = [line for line in log.splitlines() if line.strip()]
    starts = [line for line in lines if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)]
    bad = [line for line in starts if not LOG_LINE.match(line)]
    check(f"{name}: every log line has the session-id format", not bad and bool(starts), "; ".join(bad[:3]))
    probes = [line for line in lines if re.search(r'"GET /(readyz|livez)', line)]
    check(f"{name}: no /readyz or /livez access lines", not probes, "; ".join(probes[:2]))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

SID_A = "11111111-1111-1111-1111-111111111111"
SID_B = "22222222-2222-2222-2222-222222222222"
SID_C = "33333333-3333-3333-3333-333333333333"
SID_D = "44444444-4444-4444-4444-444444444444"
SID_E = "55555555-5555-5555-5555-555555555555"


def test_session_status(ctx):
    r = Runner(ctx.python, ctx.runner, os.path.join(ctx.examples, "session-status"), ctx.log_dir, "session-status")
    try:
        if not check("session-status: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        ctx.ready_times.append(("session-status", r.ready_secs))
        status, body = call_http(r.port, "GET", "/readyz")
        check("session-status: /readyz dict form -> 200 echoed", status == 200 and body.get("ready") is True, f"{status} {body}")
        status, body = call_http(r.port, "GET", "/livez")
        check("session-status: /livez", status == 200 and body == {"status": "ok"}, f"{status} {body}")

        call = Background(r.port, "POST", "/bot", {"duration_secs": 1.5, "tick_secs": 0.05}, {"x-daily-session-id": SID_A})
        time.sleep(0.8)
        status, st = call_http(r.port, "GET", "/status", headers={"x-daily-session-id": SID_A})
        check(
            "session-status: custom /status route while the session runs",
            status == 200 and st.get("running") is True and st.get("frames_processed", 0) > 0 and st.get("session_id") == SID_A,
            f"{status} {st}",
        )
        result = call.wait(15)
        check("session-status: POST /bot -> 200 {} when bot() returns", result == (200, {}), f"{result} {call.error}")
        check("session-status: /bot blocked for the session", call.elapsed is not None and 1.3 < call.elapsed < 6, f"{call.elapsed}")

        call = Background(r.port, "POST", "/bot", {}, {"x-daily-session-id": SID_B, "X-PCC-Max-Session-Seconds": "1"})
        result = call.wait(15)
        check(
            "session-status: X-PCC-Max-Session-Seconds cancels bot() -> 200 {}",
            result == (200, {}) and call.elapsed is not None and 0.9 < call.elapsed < 5,
            f"{result} after {call.elapsed}",
        )
        _, st = call_http(r.port, "GET", "/status")
        check("session-status: budget ended the pipeline", st.get("end_reason") == "cancelled" and not st.get("running"), f"{st}")

        for raw in ("0", "-3", "soon"):
            call = Background(r.port, "POST", "/bot", {"duration_secs": 1.2}, {"X-PCC-Max-Session-Seconds": raw})
            result = call.wait(15)
            check(
                f"session-status: X-PCC-Max-Session-Seconds: {raw!r} is not enforced",
                result == (200, {}) and _status_end(r) == "duration elapsed",
                f"{result} after {call.elapsed}",
            )

        status, body = call_http(r.port, "POST", "/bot", {"fail": True}, {"x-daily-session-id": SID_C})
        check(
            "session-status: bot() raising -> 500 BOT_ERROR",
            status == 500 and isinstance(body, dict) and body.get("code") == "BOT_ERROR" and "asked to fail" in body.get("error", ""),
            f"{status} {body}",
        )
        for bad in ("[1, 2]", '"text"', "not json"):
            status, _ = call_http(r.port, "POST", "/bot", bad.encode(), {"content-type": "application/json"})
            check(f"session-status: POST /bot {bad} -> 422", status == 422, f"{status}")

        # SIGTERM while a session runs: bot() is cancelled, /bot answers, the process exits 0.
        call = Background(r.port, "POST", "/bot", {}, {"x-daily-session-id": SID_D})
        time.sleep(0.8)
        t0 = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        try:
            code = r.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        result = call.wait(5)
        check("session-status: SIGTERM stops a running session and exits 0", code == 0 and took < 15, f"rc={code} in {took:.1f}s")
        check("session-status: /bot answered 200 {} on SIGTERM", result == (200, {}), f"{result} {call.error}")

        log = r.log()
        check_log_format("session-status", log)
        a_lines = log_lines_for(log, SID_A)
        check(
            "session-status: bot and pipecat log lines carry the session id",
            any("Starting bot session" in x for x in a_lines)
            and any("| bot:" in x for x in a_lines)
            and any("| pipecat." in x for x in a_lines)
            and any("GET /status" in x for x in a_lines),
            f"{len(a_lines)} lines for {SID_A}",
        )
        c_lines = log_lines_for(log, SID_C)
        check(
            "session-status: bot exception traceback logged under its session",
            any("Exception running bot()" in x for x in c_lines) and "Traceback" in log and "asked to fail" in log,
            f"{c_lines[:2]}",
        )
        check("session-status: budget expiry logged", any("Max session duration" in x for x in log_lines_for(log, SID_B)))
    finally:
        r.stop()


def test_orphaned_session(ctx):
    """The platform's /bot request goes away (a control-plane restart): the session goes on, and
    the runner exits when bot() ends, so the restarted platform sees the end."""
    r = Runner(ctx.python, ctx.runner, os.path.join(ctx.examples, "session-status"), ctx.log_dir, "orphaned")
    try:
        if not check("orphaned: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        try:
            call_http(r.port, "POST", "/bot", {"duration_secs": 2.0, "tick_secs": 0.05}, {"x-daily-session-id": SID_E}, timeout=0.5)
        except OSError:
            pass
        time.sleep(0.5)
        _, st = call_http(r.port, "GET", "/status")
        check("orphaned: bot() goes on after the /bot request closed", st.get("running") is True and st.get("session_id") == SID_E, f"{st}")
        try:
            code = r.proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        check("orphaned: the runner exits 0 when bot() ends", code == 0, f"rc={code}")
        lines = log_lines_for(r.log(), SID_E)
        check("orphaned: closed /bot request logged", any("/bot request was closed" in x for x in lines), f"{lines[-3:]}")
    finally:
        r.stop()


def _status_end(r):
    _, st = call_http(r.port, "GET", "/status")
    return st.get("end_reason") if isinstance(st, dict) else None


def test_ws_echo(ctx):
    r = Runner(ctx.python, ctx.runner, os.path.join(ctx.examples, "ws-echo"), ctx.log_dir, "ws-echo")
    try:
        if not check("ws-echo: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        ctx.ready_times.append(("ws-echo", r.ready_secs))
        status, body = call_http(r.port, "GET", "/readyz")
        check("ws-echo: /readyz without readyz() -> 200 ok", (status, body) == (200, {"status": "ok"}), f"{status} {body}")

        body_param = base64.b64encode(json.dumps({"hello": "ws"}).encode()).decode()
        ws = WebSocketClient(r.port, f"/ws?body={body_param}", {"x-daily-session-id": SID_E})
        rate, chunk = 16000, 320  # 20 ms of 16-bit mono
        audio = bytes((i * 7) % 251 for i in range(rate * 2 * 6 // 10))  # 0.6 s: whole 40 ms output chunks
        received = bytearray()
        others = []

        def reader():
            try:
                while True:
                    msg = ws.recv()
                    if msg is None:
                        return
                    frame = proto_parse(msg[1])
                    if 2 in frame:
                        inner = proto_parse(frame[2])
                        received.extend(inner.get(3, b""))
                    else:
                        others.append(sorted(frame))
            except (OSError, ConnectionError, ValueError):
                return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        for i in range(0, len(audio), chunk * 2):
            ws.send(proto_audio_frame(audio[i : i + chunk * 2], rate, 1))
            time.sleep(0.02)
        deadline = time.monotonic() + 10
        while len(received) < len(audio) and time.monotonic() < deadline:
            time.sleep(0.05)
        check(
            "ws-echo: audio frames echoed back byte for byte",
            bytes(received[: len(audio)]) == audio,
            f"sent {len(audio)} got {len(received)}",
        )
        ws.close()
        time.sleep(1.0)
        log = r.log()
        lines = log_lines_for(log, SID_E)
        check(
            "ws-echo: session logged under x-daily-session-id, ?body= decoded",
            any("Starting bot session" in x and "WebSocketSessionArguments" in x for x in lines)
            and any("body={'hello': 'ws'}" in x for x in lines)
            and any("Stopping bot session" in x for x in lines),
            f"{len(lines)} lines",
        )
        check_log_format("ws-echo", log)
    finally:
        r.stop()


RTC_CLIENT = textwrap.dedent(
    r'''
    import asyncio, fractions, json, sys, time, urllib.request
    import numpy as np
    from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
    from av import AudioFrame

    class Tone(MediaStreamTrack):
        kind = "audio"
        def __init__(self):
            super().__init__(); self.pts = 0; self.t0 = None
        async def recv(self):
            self.t0 = self.t0 or time.monotonic()
            wait = self.t0 + self.pts / 48000 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            t = (np.arange(960) + self.pts) / 48000
            f = AudioFrame.from_ndarray((8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
            f.sample_rate = 48000; f.pts = self.pts; f.time_base = fractions.Fraction(1, 48000); self.pts += 960
            return f

    def post(url, data, method, headers):
        req = urllib.request.Request(url, data=json.dumps(data).encode(), method=method, headers={"content-type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    async def main(port, sid):
        pc = RTCPeerConnection()
        pc.addTrack(Tone())
        levels = []
        @pc.on("track")
        def on_track(track):
            async def read():
                while True:
                    try:
                        frame = await track.recv()
                    except Exception:
                        return
                    levels.append(float(np.abs(frame.to_ndarray()).mean()))
            asyncio.ensure_future(read())
        await pc.setLocalDescription(await pc.createOffer())
        hdr = {"x-daily-session-id": sid}
        answer = await asyncio.to_thread(post, f"http://127.0.0.1:{port}/api/offer",
            {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}, "POST", hdr)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        patched = await asyncio.to_thread(post, f"http://127.0.0.1:{port}/api/offer",
            {"pc_id": answer["pc_id"], "candidates": []}, "PATCH", hdr)
        await asyncio.sleep(3)
        await pc.close()
        print(json.dumps({"frames": len(levels), "loud": sum(1 for v in levels if v > 500), "patch": patched}))

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    '''
)


def test_webrtc_echo(ctx):
    probe = subprocess.run([ctx.python, "-c", "import aiortc, av, numpy"], capture_output=True)
    if probe.returncode != 0:
        print("SKIP  webrtc-echo: aiortc/av/numpy not importable by the runner python")
        return
    sid = "66666666-6666-6666-6666-666666666666"
    r = Runner(
        ctx.python, ctx.runner, os.path.join(ctx.examples, "webrtc-echo"), ctx.log_dir, "webrtc-echo",
        env={"CATTERY_ICE_SERVERS": ""},
    )
    try:
        if not check("webrtc-echo: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        ctx.ready_times.append(("webrtc-echo", r.ready_secs))
        call = Background(
            r.port, "POST", "/bot", {"from": "start"},
            {"x-daily-session-id": sid, "x-daily-transport-type": "webrtc"}, timeout=60,
        )
        time.sleep(0.5)
        check("webrtc-echo: /bot waits for the offer", call.result is None)
        client = os.path.join(ctx.log_dir, "rtc_client.py")
        with open(client, "w") as f:
            f.write(RTC_CLIENT)
        proc = subprocess.run([ctx.python, client, str(r.port), sid], capture_output=True, text=True, timeout=60)
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {}
        check("webrtc-echo: POST /api/offer answered, audio echoed", out.get("loud", 0) > 20, f"{out} {proc.stderr[-800:]}")
        check("webrtc-echo: PATCH /api/offer -> success", out.get("patch") == {"status": "success"}, f"{out.get('patch')}")
        result = call.wait(20)
        check("webrtc-echo: /bot returns 200 {} when that bot() ends", result == (200, {}), f"{result} {call.error}")
        lines = log_lines_for(r.log(), sid)
        check(
            "webrtc-echo: bot got SmallWebRTCSessionArguments with the stashed body",
            any("SmallWebRTCSessionArguments" in x for x in lines) and any("body={'from': 'start'}" in x for x in lines),
            f"{len(lines)} lines",
        )
        check_log_format("webrtc-echo", r.log())
    finally:
        r.stop()

    r = Runner(
        ctx.python, ctx.runner, os.path.join(ctx.examples, "webrtc-echo"), ctx.log_dir, "webrtc-timeout",
        env={"CATTERY_WEBRTC_TIMEOUT": "1"},
    )
    try:
        if r.wait_ready():
            status, body = call_http(r.port, "POST", "/bot", {}, {"x-daily-transport-type": "webrtc"})
            check(
                "webrtc-echo: no offer in time -> 500 WEBRTC_TIMEOUT",
                status == 500 and isinstance(body, dict) and body.get("code") == "WEBRTC_TIMEOUT",
                f"{status} {body}",
            )
    finally:
        r.stop()


PROBE_BOT = '''
import asyncio, json, os
from pipecatcloud_system import app

LAST = {}
HERE = os.path.dirname(os.path.abspath(__file__))

@app.get("/last")
async def last():
    return LAST

async def bot(args):
    LAST.clear()
    LAST.update(
        cls=type(args).__name__,
        session_id=args.session_id,
        body=args.body,
        room_url=getattr(args, "room_url", None),
        token=getattr(args, "token", None),
    )
    if getattr(args, "websocket", None) is not None:
        await args.websocket.send_text(json.dumps(LAST))

def readyz():
    mode = open(os.path.join(HERE, "mode")).read().strip()
    if mode == "true":
        return True
    if mode == "false":
        return False
    if mode == "dict-false":
        return {"ready": False, "why": "warming"}
    if mode == "raise":
        raise RuntimeError("db down")
    if mode == "async":
        async def later():
            return True
        return later()
    return "something else"
'''


def test_probe_bot(ctx):
    bot_dir = os.path.join(ctx.log_dir, "probe-bot")
    os.makedirs(bot_dir, exist_ok=True)
    with open(os.path.join(bot_dir, "bot.py"), "w") as f:
        f.write(PROBE_BOT)
    mode_file = os.path.join(bot_dir, "mode")
    with open(mode_file, "w") as f:
        f.write("true")
    r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, "probe-bot", env={"CATTERY_SESSION_ID": "env-session"})
    try:
        if not check("probe-bot: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        expected = {
            "true": (200, {"status": "ok"}),
            "false": (503, {"status": "not ready"}),
            "dict-false": (503, {"ready": False, "why": "warming"}),
            "raise": (503, {"ready": False, "error": "db down"}),
            "async": (200, {"status": "ok"}),
            "other": (503, None),
        }
        for mode, (want_status, want_body) in expected.items():
            with open(mode_file, "w") as f:
                f.write(mode)
            status, body = call_http(r.port, "GET", "/readyz")
            ok = status == want_status and (want_body is None or body == want_body)
            check(f"probe-bot: readyz() {mode} -> {want_status}", ok, f"{status} {body}")
        # The access lines of /readyz are dropped: a not-ready answer is logged when it changes,
        # with the bot's reason, once.
        said = [line for line in r.log().splitlines() if "/readyz answers 503" in line]
        check(
            "probe-bot: a not-ready /readyz is logged with its reason, once per change",
            any('"why":"warming"' in line for line in said) and any("db down" in line for line in said) and len(said) == 4,
            "; ".join(said[-5:]),
        )

        status, _ = call_http(
            r.port, "POST", "/bot", {"k": 1},
            {"x-daily-session-id": SID_A, "x-daily-room-url": "https://x.daily.co/room", "x-daily-room-token": "tok"},
        )
        _, last = call_http(r.port, "GET", "/last")
        check(
            "probe-bot: room headers -> DailySessionArguments",
            status == 200 and last == {"cls": "DailySessionArguments", "session_id": SID_A, "body": {"k": 1},
                                       "room_url": "https://x.daily.co/room", "token": "tok"},
            f"{status} {last}",
        )
        call_http(r.port, "POST", "/bot", {}, {"x-daily-session-id": SID_B, "x-daily-room-url": "https://x.daily.co/room"})
        _, last = call_http(r.port, "GET", "/last")
        check(
            "probe-bot: only one room header -> PipecatSessionArguments",
            last.get("cls") == "PipecatSessionArguments" and last.get("session_id") == SID_B and last.get("body") == {},
            f"{last}",
        )
        call_http(r.port, "POST", "/bot", {})
        _, last = call_http(r.port, "GET", "/last")
        check("probe-bot: no x-daily-session-id -> CATTERY_SESSION_ID", last.get("session_id") == "env-session", f"{last}")

        check_log_format("probe-bot", r.log())
        check(
            "probe-bot: lines outside a request use CATTERY_SESSION_ID",
            any("Runner ready" in x for x in log_lines_for(r.log(), "env-session")),
        )
    finally:
        r.stop()
    # A /ws session ends its instance: once bot() returns the runner closes the socket (1000),
    # writes 0 to $CATTERY_EXIT_STATUS_FILE and exits 0. One runner per session.
    status_file = os.path.join(bot_dir, "exit-status")
    cases = [
        ("/ws", {"x-daily-session-id": SID_C}, SID_C, "body None"),
        ("/ws?body=%%%notbase64", {}, "env-session", "undecodable ?body= -> None"),
    ]
    for path, headers, sid, what in cases:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_file)
        env = {"CATTERY_SESSION_ID": "env-session", "CATTERY_EXIT_STATUS_FILE": status_file}
        r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, "probe-bot-ws", env=env)
        try:
            if not check(f"probe-bot /ws: runner ready ({what})", r.wait_ready(), r.log()[-2000:]):
                return
            ws = WebSocketClient(r.port, path, headers)
            msg = ws.recv()
            closed = ws.recv()
            ws.close()
            try:
                code = r.proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            written = open(status_file).read().strip() if os.path.exists(status_file) else None
            want = {"cls": "WebSocketSessionArguments", "session_id": sid, "body": None, "room_url": None, "token": None}
            got = json.loads(msg[1]) if msg and msg[0] == 0x1 else msg
            check(
                f"probe-bot: /ws -> WebSocketSessionArguments, {what}, socket closed 1000 after bot(), runner exits 0",
                got == want and closed is None and ws.close_code == 1000 and code == 0 and written == "0",
                f"{got} close={ws.close_code} exit={code} status_file={written}",
            )
        finally:
            r.stop()


def test_broken_bots(ctx):
    cases = {
        "import-error": ("import os\nraise ValueError('boom at import')\n", "boom at import"),
        "syntax-error": ("def bot(:\n", "SyntaxError"),
        "no-bot": ("X = 1\n", "defines no bot() function"),
    }
    for name, (source, needle) in cases.items():
        bot_dir = os.path.join(ctx.log_dir, name)
        os.makedirs(bot_dir, exist_ok=True)
        with open(os.path.join(bot_dir, "bot.py"), "w") as f:
            f.write(source)
        r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, name)
        try:
            code = r.proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        log = r.log()
        r.stop()
        check(f"{name}: runner exits non-zero and logs why", code not in (0, None) and needle in log, f"rc={code} {log[-600:]}")


WHATSAPP_BOT = """
async def bot(args):
    pass
"""


def _whatsapp_event(event: str, call_id: str) -> bytes:
    call = {"id": call_id, "event": event, "from": "15550001111", "to": "15550002222", "timestamp": "1700000000",
            "direction": "USER_INITIATED"}
    if event == "terminate":
        call.update(status="COMPLETED", duration=3)
    payload = {"object": "whatsapp_business_account", "entry": [{"id": "waba-1", "changes": [
        {"field": "calls", "value": {"messaging_product": "whatsapp",
                                     "metadata": {"display_phone_number": "15550002222", "phone_number_id": "123"},
                                     "calls": [call]}}]}]}
    return json.dumps(payload).encode()


def _whatsapp_sign(secret: str, raw: bytes) -> str:
    import hashlib
    import hmac

    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


def test_whatsapp(ctx):
    """POST /whatsapp as the base image serves it: only with the three WHATSAPP_* secrets, Meta's
    signature checked, events handed to pipecat's WhatsAppClient. (A connect would call Meta's API,
    so the served route is exercised with a terminate.)"""
    probe = subprocess.run(
        [ctx.python, "-c", "import aiortc, pipecat.transports.whatsapp.client"], capture_output=True
    )
    if probe.returncode != 0:
        print("SKIP  whatsapp: aiortc or pipecat's WhatsApp client not importable by the runner python")
        return
    bot_dir = os.path.join(ctx.log_dir, "whatsapp-bot")
    os.makedirs(bot_dir, exist_ok=True)
    with open(os.path.join(bot_dir, "bot.py"), "w") as f:
        f.write(WHATSAPP_BOT)
    raw = _whatsapp_event("terminate", "wacid.smoke")
    sid = "77777777-7777-7777-7777-777777777777"

    r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, "whatsapp-off",
               env={"WHATSAPP_TOKEN": "t", "WHATSAPP_PHONE_NUMBER_ID": "123"})
    try:
        if check("whatsapp: runner ready without WHATSAPP_APP_SECRET", r.wait_ready(), r.log()[-2000:]):
            status, body = call_http(r.port, "POST", "/whatsapp", raw)
            check("whatsapp: not served without all three secrets", status == 404, f"{status} {body}")
    finally:
        r.stop()

    secret = "smoke-app-secret"
    env = {"WHATSAPP_TOKEN": "t", "WHATSAPP_PHONE_NUMBER_ID": "123", "WHATSAPP_APP_SECRET": secret,
           "CATTERY_ICE_SERVERS": ""}
    r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, "whatsapp", env=env)
    try:
        if not check("whatsapp: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        check("whatsapp: route enabled", "WhatsApp route enabled" in r.log(), r.log()[-2000:])
        status, body = call_http(r.port, "POST", "/whatsapp", {"object": "page", "entry": []},
                                 {"x-hub-signature-256": _whatsapp_sign(secret, b"{}")})
        check("whatsapp: another object -> 400", status == 400 and isinstance(body, dict)
              and body.get("code") == "GENERIC_BAD_REQUEST", f"{status} {body}")
        for name, sig in [("unsigned", None), ("wrong secret", _whatsapp_sign("other", raw))]:
            headers = {"x-daily-session-id": sid}
            if sig:
                headers["x-hub-signature-256"] = sig
            status, body = call_http(r.port, "POST", "/whatsapp", raw, headers)
            check(f"whatsapp: {name} -> 403", status == 403 and isinstance(body, dict)
                  and body.get("code") == "INVALID_SIGNATURE", f"{status} {body}")
        headers = {"x-daily-session-id": sid, "x-hub-signature-256": _whatsapp_sign(secret, raw)}
        status, body = call_http(r.port, "POST", "/whatsapp", raw, headers)
        check("whatsapp: signed terminate -> 200 success", status == 200 and isinstance(body, dict)
              and body.get("status") == "success", f"{status} {body}")
        log = r.log()
        check("whatsapp: the event is logged under its session",
              any("wacid.smoke" in line for line in log_lines_for(log, sid)), log[-2000:])
    finally:
        r.stop()


STUBBORN_BOT = """
import asyncio

async def bot(args):
    while True:  # swallows every cancellation
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
"""


def test_stubborn_bot(ctx):
    """A bot() that ignores cancellation must not keep the runner alive after SIGTERM."""
    bot_dir = os.path.join(ctx.log_dir, "stubborn-bot")
    os.makedirs(bot_dir, exist_ok=True)
    with open(os.path.join(bot_dir, "bot.py"), "w") as f:
        f.write(STUBBORN_BOT)
    r = Runner(ctx.python, ctx.runner, bot_dir, ctx.log_dir, "stubborn-bot", env={"CATTERY_SHUTDOWN_TIMEOUT": "1"})
    try:
        if not check("stubborn-bot: runner ready", r.wait_ready(), r.log()[-2000:]):
            return
        Background(r.port, "POST", "/bot", {}, {"x-daily-session-id": SID_A}, timeout=30)
        time.sleep(0.5)
        t0 = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        try:
            code = r.proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        check("stubborn-bot: SIGTERM exit is bounded (CATTERY_SHUTDOWN_TIMEOUT + 5 s)", code is not None and took < 9, f"rc={code} in {took:.1f}s")
    finally:
        r.stop(sig=signal.SIGKILL)


def main() -> int:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=os.environ.get("CATTERY_PYTHON") or sys.executable)
    parser.add_argument("--runner", default=os.path.join(HERE, "cattery_runner.py"))
    parser.add_argument("--examples", default=os.path.normpath(os.path.join(HERE, "..", "..", "..", "examples")))
    parser.add_argument("--keep-logs", default=None, help="write runner logs here and keep them")
    parser.add_argument("--only", action="append", default=None, help="run only these groups")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    VERBOSE = args.verbose

    log_dir = args.keep_logs or tempfile.mkdtemp(prefix="cattery-runner-smoke-")
    os.makedirs(log_dir, exist_ok=True)
    ctx = argparse.Namespace(
        python=args.python, runner=os.path.abspath(args.runner), examples=os.path.abspath(args.examples),
        log_dir=log_dir, ready_times=[],
    )
    groups = {
        "session-status": test_session_status,
        "orphaned": test_orphaned_session,
        "ws-echo": test_ws_echo,
        "webrtc-echo": test_webrtc_echo,
        "probe-bot": test_probe_bot,
        "broken": test_broken_bots,
        "stubborn": test_stubborn_bot,
        "whatsapp": test_whatsapp,
    }
    started = time.monotonic()
    for name, fn in groups.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(ctx)
        except Exception as exc:  # noqa: BLE001
            check(f"{name}: ran without crashing", False, f"{type(exc).__name__}: {exc}")
    for name, secs in ctx.ready_times:
        print(f"spawn-to-ready {name}: {secs:.2f} s")
    print(f"logs: {log_dir}" if args.keep_logs or RESULTS["failed"] else f"total {time.monotonic() - started:.1f} s")
    if not args.keep_logs and not RESULTS["failed"]:
        shutil.rmtree(log_dir, ignore_errors=True)
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 0 if RESULTS["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

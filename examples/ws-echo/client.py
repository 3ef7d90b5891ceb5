#!/usr/bin/env python3
"""Talk to the ws-echo bot: send a tone as pipecat protobuf audio frames, check it comes back.

    python client.py WS_URL [--seconds 2] [--header 'Authorization: Bearer TOKEN']

WS_URL is the ``wsUrl`` a ``/start`` with ``"transport": "websocket"`` returned (with its token),
or ``ws://127.0.0.1:$PORT/ws`` for a runner started by hand. Needs ``pipecat-ai`` (for the
protobuf frame definitions) and ``websockets``, both in the bot's own environment.
"""

import argparse
import asyncio
import math
import struct
import sys
import time

import websockets
from pipecat.frames.protobufs import frames_pb2

RATE = 16000
CHUNK = RATE // 50  # 20 ms


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}

    n = int(RATE * args.seconds) // (CHUNK * 2) * (CHUNK * 2)  # whole 40 ms output chunks
    tone = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / RATE))) for i in range(n))
    received = bytearray()

    async with websockets.connect(args.url, additional_headers=headers) as ws:

        async def reader():
            async for message in ws:
                frame = frames_pb2.Frame.FromString(message)
                if frame.WhichOneof("frame") == "audio":
                    received.extend(frame.audio.audio)

        reading = asyncio.create_task(reader())
        started = time.monotonic()
        for i in range(0, len(tone), CHUNK * 2):
            frame = frames_pb2.Frame()
            frame.audio.audio = tone[i : i + CHUNK * 2]
            frame.audio.sample_rate = RATE
            frame.audio.num_channels = 1
            await ws.send(frame.SerializeToString())
            await asyncio.sleep(0.02)
        while len(received) < len(tone) and time.monotonic() - started < args.seconds + 10:
            await asyncio.sleep(0.05)
        reading.cancel()

    ok = bytes(received[: len(tone)]) == tone
    print(f"sent {len(tone)} bytes of audio, got {len(received)} back: {'echo OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

#!/usr/bin/env python3
"""Talk to the webrtc-echo bot: send a tone over SmallWebRTC and measure what comes back.

    python client.py OFFER_URL [--seconds 4] [--header 'Authorization: Bearer PUBLIC_KEY']

OFFER_URL is the session's signalling endpoint: through Cattery's session proxy,
``$CATTERY/v1/public/webrtc-echo/sessions/$SESSION_ID/api/offer`` (after a ``/start`` with
``"transport": "webrtc"``); for a runner started by hand, ``http://127.0.0.1:$PORT/api/offer``
(after ``POST /bot`` with ``x-daily-transport-type: webrtc``). Needs ``pipecat-ai[webrtc]``.
"""

import argparse
import asyncio
import fractions
import json
import sys
import time
import urllib.request

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame


class Tone(MediaStreamTrack):
    kind = "audio"

    def __init__(self):
        super().__init__()
        self.pts = 0
        self.t0 = None

    async def recv(self):
        self.t0 = self.t0 or time.monotonic()
        wait = self.t0 + self.pts / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(960) + self.pts) / 48000
        samples = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(1, -1)
        frame = AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, 48000)
        self.pts += 960
        return frame


def send(url, payload, method, headers):
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method=method,
        headers={"content-type": "application/json", **headers},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("offer_url")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args()
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in args.header)}

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
    offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    answer = await asyncio.to_thread(send, args.offer_url, offer, "POST", headers)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await asyncio.sleep(args.seconds)
    await pc.close()
    loud = sum(1 for level in levels if level > 500)
    print(f"received {len(levels)} audio frames, {loud} carrying the echoed tone")
    return 0 if loud > 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

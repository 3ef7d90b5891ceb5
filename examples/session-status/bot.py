"""session-status: a Pipecat bot with a custom Session API route.

Started with ``POST /bot`` (a ``/start`` with no transport). It runs a small pipeline that counts
the frames flowing through it, until the session is cancelled or for ``duration_secs`` seconds
given in the start body. ``GET /status`` (reached through the session proxy,
``/v1/public/{agent}/sessions/{sessionId}/status``) reports what it has processed.

Start body (all optional)::

    {"duration_secs": 5, "tick_secs": 0.1, "fail": false}

Needs no cloud service and no API key.
"""

import asyncio
import time

from loguru import logger
from pipecat.frames.frames import EndFrame, Frame, TextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineTask

# The Session API: Pipecat Cloud (and Cattery) expose this app's routes at
# /v1/public/{agent}/sessions/{sessionId}/<path>.
from pipecatcloud_system import app

STATE = {
    "running": False,
    "session_id": None,
    "sessions_started": 0,
    "sessions_finished": 0,
    "frames_processed": 0,
    "text_frames": 0,
    "last_text": None,
    "started_at": None,
    "ended_at": None,
    "end_reason": None,
}


class FrameCounter(FrameProcessor):
    """Counts every frame that passes and remembers the last text it saw."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        STATE["frames_processed"] += 1
        if isinstance(frame, TextFrame):
            STATE["text_frames"] += 1
            STATE["last_text"] = frame.text
        await self.push_frame(frame, direction)


async def run_pipeline(task):
    """Run one pipeline to its end; the runner process owns the signals, not the bot."""
    runner = PipelineRunner(handle_sigint=False)
    if hasattr(runner, "add_workers"):  # pipecat >= 1.3
        await runner.add_workers(task)
        await runner.run()
    else:
        await runner.run(task)


@app.get("/status")
async def status():
    now = time.time()
    started = STATE["started_at"]
    end = STATE["ended_at"] or now
    return {**STATE, "uptime_secs": round(end - started, 3) if started else None}


def readyz():
    # Dict form: 200 when ready is true, and the dict is echoed back.
    return {"ready": True, "sessions_finished": STATE["sessions_finished"]}


async def bot(runner_args):
    body = runner_args.body or {}
    if body.get("fail"):
        raise RuntimeError("asked to fail by the start body")
    duration = body.get("duration_secs")
    tick = float(body.get("tick_secs", 0.1))

    STATE.update(
        running=True,
        session_id=runner_args.session_id,
        started_at=time.time(),
        ended_at=None,
        end_reason=None,
        frames_processed=0,
        text_frames=0,
        last_text=None,
    )
    STATE["sessions_started"] += 1
    logger.info(f"session-status bot started (duration_secs={duration}, tick_secs={tick})")

    pipeline = Pipeline([FrameCounter()])
    # No transport, so no speaking frames: turn the idle timeout off.
    task = PipelineTask(pipeline, idle_timeout_secs=None)

    async def produce():
        n = 0
        deadline = time.monotonic() + float(duration) if duration is not None else None
        while deadline is None or time.monotonic() < deadline:
            n += 1
            await task.queue_frame(TextFrame(text=f"tick {n}"))
            await asyncio.sleep(tick)
        STATE["end_reason"] = "duration elapsed"
        await task.queue_frame(EndFrame())

    producer = asyncio.create_task(produce())
    try:
        await run_pipeline(task)
    finally:
        producer.cancel()
        STATE["running"] = False
        STATE["ended_at"] = time.time()
        STATE["end_reason"] = STATE["end_reason"] or "cancelled"
        STATE["sessions_finished"] += 1
        logger.info(f"session-status bot finished: {STATE['frames_processed']} frames ({STATE['end_reason']})")

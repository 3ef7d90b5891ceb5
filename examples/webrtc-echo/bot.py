"""webrtc-echo: a SmallWebRTC audio echo bot.

Started with ``/start`` and ``"transport": "webrtc"``: the platform calls ``POST /bot`` with
``x-daily-transport-type: webrtc``, the client then sends its SDP offer to
``/v1/public/{agent}/sessions/{sessionId}/api/offer`` and this bot receives a
``SmallWebRTCSessionArguments`` whose ``webrtc_connection`` it hands to ``SmallWebRTCTransport``.
Whatever audio the peer sends is played back to it.

Needs ``pipecat-ai[webrtc]``; no cloud service and no API key.
"""

from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask

SAMPLE_RATE = 16000


class AudioEcho(FrameProcessor):
    """Turns every input audio frame into an output audio frame with the same samples."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio,
                    sample_rate=frame.sample_rate,
                    num_channels=frame.num_channels,
                )
            )
        else:
            await self.push_frame(frame, direction)


async def run_pipeline(task):
    """Run one pipeline to its end; the runner process owns the signals, not the bot."""
    runner = PipelineRunner(handle_sigint=False)
    if hasattr(runner, "add_workers"):  # pipecat >= 1.3
        await runner.add_workers(task)
        await runner.run()
    else:
        await runner.run(task)


async def bot(runner_args):
    """Pipecat Cloud entry point; runner_args is a SmallWebRTCSessionArguments."""
    logger.info(f"webrtc-echo bot starting (body={runner_args.body})")
    transport = SmallWebRTCTransport(
        webrtc_connection=runner_args.webrtc_connection,
        params=TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=SAMPLE_RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=SAMPLE_RATE,
        ),
    )
    pipeline = Pipeline([transport.input(), AudioEcho(), transport.output()])
    task = PipelineTask(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info("peer connected")

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info("peer disconnected")
        await task.cancel()

    await run_pipeline(task)
    logger.info("webrtc-echo bot finished")

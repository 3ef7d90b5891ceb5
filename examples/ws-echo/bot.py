"""ws-echo: a WebSocket audio echo bot.

A Pipecat pipeline ``transport.input() -> AudioEcho -> transport.output()`` over the
Pipecat Cloud WebSocket session (``WebSocketSessionArguments.websocket``), speaking pipecat's
protobuf wire format (``ProtobufFrameSerializer``): every ``audio`` frame the client sends comes
back as an ``audio`` frame with the same samples, paced in real time by the output transport.

Needs no cloud service and no API key.
"""

from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

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
    """Pipecat Cloud entry point; runner_args is a WebSocketSessionArguments."""
    logger.info(f"ws-echo bot starting (body={runner_args.body})")
    transport = FastAPIWebsocketTransport(
        websocket=runner_args.websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_in_sample_rate=SAMPLE_RATE,
            audio_out_enabled=True,
            audio_out_sample_rate=SAMPLE_RATE,
            add_wav_header=False,
            serializer=ProtobufFrameSerializer(),
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
        logger.info("client connected")

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info("client disconnected")
        await task.cancel()

    await run_pipeline(task)
    logger.info("ws-echo bot finished")

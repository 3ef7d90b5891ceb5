"""A Pipecat telephony bot for Cattery's tests: pipecat's own parse_telephony_websocket reads the
provider's opening messages, pipecat's TwilioFrameSerializer decodes and encodes the media, and
the caller's audio is played back. ``GET /call`` (the Session API) reports what it saw."""

from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineTask

from pipecatcloud_system import app

SEEN = {"audio_in": 0}


@app.get("/call")
async def call():
    return SEEN


class PlayBack(FrameProcessor):
    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            SEEN["audio_in"] += 1
            await self.push_frame(
                OutputAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels)
            )
        else:
            await self.push_frame(frame, direction)


async def bot(args):
    transport_type, call_data = await parse_telephony_websocket(args.websocket)
    SEEN.update(transport_type=transport_type, call_data=call_data)
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=args.websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    task = PipelineTask(Pipeline([transport.input(), PlayBack(), transport.output()]), idle_timeout_secs=None)
    runner = PipelineRunner(handle_sigint=False)
    if hasattr(runner, "add_workers"):
        await runner.add_workers(task)
        await runner.run()
    else:
        await runner.run(task)

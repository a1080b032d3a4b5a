"""A voice loading on its first request never holds up the TTS worker's event loop: the handler calls the
engine from a thread, so the worker's other requests, heartbeats and acknowledgements go on meanwhile."""

from __future__ import annotations

import asyncio
import threading

from voice.v1 import audio_pb2, tts_pb2
from voice_bus.worker import RequestContext
from voice_tts.handler import SynthesizeHandler
from voice_tts.piper_engine import PiperEngine

LOAD_WAIT_S = 10.0


class SlowLoadingPiper(PiperEngine):
    """The embedded Piper voice, whose preparation waits until the test says the voice has loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded_voice = threading.Event()

    def _prepare(self, voice, speaker, language):
        if not self.loaded_voice.wait(LOAD_WAIT_S):
            raise RuntimeError("the voice never finished loading: the worker's event loop was held while it loaded")
        return super()._prepare(voice, speaker, language)


async def test_the_event_loop_runs_while_a_voice_loads():
    engine = SlowLoadingPiper()
    engine.load()
    handler = SynthesizeHandler(engine)
    request = tts_pb2.SynthesizeRequest(
        text="Hello there.", output_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16)
    )

    async def first_chunk() -> tts_pb2.AudioChunk:
        async for event in handler(request, RequestContext(request_id="r1")):
            if event.chunk.audio:
                return event.chunk
        raise AssertionError("no audio")

    speaking = asyncio.create_task(first_chunk())
    await asyncio.sleep(0.1)
    # Runs only if the loop is free while the request prepares its voice.
    engine.loaded_voice.set()
    chunk = await asyncio.wait_for(speaking, LOAD_WAIT_S * 3)
    assert chunk.audio and chunk.text == "Hello there."

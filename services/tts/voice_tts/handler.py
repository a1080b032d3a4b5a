"""The Synthesize operation in protobuf terms, shared by the NATS worker and the gRPC server.

Each piece of a sentence the engine yields is sent as it comes (one ``AudioChunk`` each, the sentence's
index and text on every piece); a sentence's pieces go through one streaming resampler, so they join
without a click.

The engine is called off the event loop, since the first request for a Piper voice other than the default
loads that voice (1.5 s for ``joe`` on a 2-core CPU): the worker's other requests, heartbeats and
acknowledgements go on meanwhile.

The text to speak goes into the span (``voice.tts.text``) and a log line only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``; by default the span has its length.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import numpy as np
from opentelemetry import trace
from prometheus_client import Histogram

from voice.v1 import audio_pb2, tts_pb2
from voice_audio import Encoding, StreamResampler, encode_pcm16
from voice_bus.worker import RequestContext, stopped_error
from voice_runtime.formats import encoding_of, proto_format
from voice_runtime.threads import iterate_in_thread
from voice_telemetry.metrics import LATENCY_BUCKETS_S, RTF_BUCKETS
from voice_telemetry.tracing import capture_content, set_content_attribute
from voice_tts.engine import SynthesisCancelled, TextToSpeechEngine

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_tts")

MIN_OUTPUT_RATE = 8000
MAX_OUTPUT_RATE = 48000
MAX_TEXT_CHARS = 5000

TTS_FIRST_CHUNK = Histogram(
    "voice_tts_time_to_first_byte_seconds", "Request to the first audio chunk", buckets=LATENCY_BUCKETS_S
)
TTS_RTF = Histogram("voice_tts_real_time_factor", "Synthesis time divided by audio duration", buckets=RTF_BUCKETS)


class SynthesizeHandler:
    """Synthesizes sentence by sentence and converts each chunk to the requested encoding and rate.

    Args:
        engine: The text-to-speech engine.
    """

    def __init__(self, engine: TextToSpeechEngine) -> None:
        self._engine = engine

    def voices(self) -> list[tts_pb2.Voice]:
        """The engine's voices in protobuf form, the default first."""
        return [
            tts_pb2.Voice(
                name=v.name,
                engine=v.engine,
                language=v.language,
                sample_rate=v.sample_rate,
                speakers=list(v.speakers),
                languages=list(v.languages),
            )
            for v in self._engine.voices()
        ]

    async def __call__(
        self, request: tts_pb2.SynthesizeRequest, context: RequestContext
    ) -> AsyncIterator[tts_pb2.SynthesizeEvent]:
        with tracer.start_as_current_span("tts.synthesize") as span:
            span.set_attribute("voice.session_id", context.session_id)
            span.set_attribute("voice.tts.engine", self._engine.name)
            span.set_attribute("voice.tts.voice", request.voice or "default")
            span.set_attribute("voice.tts.characters", len(request.text))
            set_content_attribute(span, "voice.tts.text", request.text)
            if capture_content():
                logger.info("synthesizing for %s: %r", context.request_id, request.text)
            started = time.perf_counter()
            if len(request.text) > MAX_TEXT_CHARS:
                raise ValueError(f"text of {len(request.text)} characters exceeds {MAX_TEXT_CHARS}")
            fmt = request.output_format
            if fmt.container not in (audio_pb2.AUDIO_CONTAINER_RAW,):
                raise ValueError("output_format.container must be RAW: the stream is headerless audio")
            encoding = encoding_of(fmt, default=Encoding.PCM16)
            if fmt.sample_rate and not MIN_OUTPUT_RATE <= fmt.sample_rate <= MAX_OUTPUT_RATE:
                raise ValueError(
                    f"output sample rate {fmt.sample_rate} Hz is outside {MIN_OUTPUT_RATE}-{MAX_OUTPUT_RATE} Hz"
                )
            chunks = await asyncio.to_thread(
                self._engine.synthesize,
                request.text,
                voice=request.voice or None,
                speaker=request.speaker or None,
                language=request.language or None,
                speed=request.speed or 1.0,
                should_stop=context.should_stop,
            )
            count = 0
            audio_s = 0.0
            first_chunk_s = 0.0
            out_format = None
            resampler: StreamResampler | None = None
            try:
                async for chunk in iterate_in_thread(lambda: chunks):
                    rate = fmt.sample_rate or chunk.sample_rate
                    out_format = out_format or proto_format(encoding, rate)
                    resampler = resampler or StreamResampler(chunk.sample_rate, rate)
                    samples = resampler.process(chunk.samples)
                    if chunk.final:
                        samples = np.concatenate([samples, resampler.flush()])
                        resampler = None
                    if not samples.size:
                        continue
                    audio = encode_pcm16(samples, from_rate=rate, encoding=encoding, to_rate=rate)
                    duration = samples.size / rate
                    if count == 0:
                        first_chunk_s = time.perf_counter() - started
                        TTS_FIRST_CHUNK.observe(first_chunk_s)
                        span.set_attribute("voice.tts.time_to_first_chunk_s", first_chunk_s)
                    count += 1
                    audio_s += duration
                    yield tts_pb2.SynthesizeEvent(
                        chunk=tts_pb2.AudioChunk(
                            audio=audio,
                            format=out_format,
                            sentence_index=chunk.sentence_index,
                            text=chunk.text,
                            duration_s=duration,
                        )
                    )
            except SynthesisCancelled:
                raise stopped_error(context) from None
            elapsed = time.perf_counter() - started
            if audio_s > 0:
                TTS_RTF.observe(elapsed / audio_s)
            span.set_attribute("voice.audio.duration_s", audio_s)
            yield tts_pb2.SynthesizeEvent(
                summary=tts_pb2.SynthesisSummary(
                    chunks=count,
                    audio_duration_s=audio_s,
                    processing_time_s=elapsed,
                    time_to_first_chunk_s=first_chunk_s,
                    voice=request.voice or self._engine.voices()[0].name,
                    format=out_format,
                )
            )

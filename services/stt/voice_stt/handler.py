"""The Transcribe operation in protobuf terms, shared by the NATS worker and the gRPC server.

The transcript and the request's ``initial_prompt`` go into the span (``voice.stt.transcript``,
``voice.stt.initial_prompt``) and a log line only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace
from prometheus_client import Histogram

from voice.v1 import stt_pb2
from voice_audio import AudioFormatError, Encoding, decode_to_float
from voice_bus.worker import RequestContext, stopped_error
from voice_runtime.formats import container_of, encoding_of
from voice_runtime.threads import iterate_in_thread
from voice_stt.engine import Segment, SpeechToTextEngine, Transcript, TranscriptionCancelled
from voice_telemetry.metrics import LATENCY_BUCKETS_S, RTF_BUCKETS
from voice_telemetry.tracing import capture_content, set_content_attribute

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_stt")

STT_LATENCY = Histogram(
    "voice_stt_latency_seconds", "Decoding and transcribing one utterance", buckets=LATENCY_BUCKETS_S
)
STT_RTF = Histogram("voice_stt_real_time_factor", "Processing time divided by audio duration", buckets=RTF_BUCKETS)
STT_AUDIO = Histogram(
    "voice_stt_audio_duration_seconds", "Duration of transcribed utterances", buckets=LATENCY_BUCKETS_S
)


class TranscribeHandler:
    """Decodes the request's audio, runs the engine, streams segments, then the transcript.

    Args:
        engine: A loaded (or lazily loading) speech-to-text engine.
    """

    def __init__(self, engine: SpeechToTextEngine) -> None:
        self._engine = engine

    async def __call__(
        self, request: stt_pb2.TranscribeRequest, context: RequestContext
    ) -> AsyncIterator[stt_pb2.TranscribeEvent]:
        with tracer.start_as_current_span("stt.transcribe") as span:
            span.set_attribute("voice.session_id", context.session_id)
            span.set_attribute("voice.stt.model", self._engine.name)
            if request.initial_prompt:
                set_content_attribute(span, "voice.stt.initial_prompt", request.initial_prompt)
            started = time.perf_counter()
            if not request.audio:
                raise ValueError("empty audio")
            fmt = request.format
            try:
                audio = await asyncio.to_thread(
                    decode_to_float,
                    request.audio,
                    encoding=encoding_of(fmt, default=Encoding.PCM16),
                    sample_rate=fmt.sample_rate or 16000,
                    container=container_of(fmt),
                    channels=fmt.channels or 1,
                    target_rate=self._engine.sample_rate,
                )
            except AudioFormatError as exc:
                raise ValueError(f"bad audio: {exc}") from None
            duration_s = audio.size / self._engine.sample_rate
            span.set_attribute("voice.audio.duration_s", duration_s)

            def produce():
                return self._engine.transcribe(
                    audio,
                    language=request.language or None,
                    word_timestamps=request.word_timestamps,
                    initial_prompt=request.initial_prompt or None,
                    should_stop=context.should_stop,
                )

            try:
                async for item in iterate_in_thread(produce):
                    if isinstance(item, Segment):
                        yield stt_pb2.TranscribeEvent(segment=segment_proto(item))
                    elif isinstance(item, Transcript):
                        elapsed = time.perf_counter() - started
                        STT_LATENCY.observe(elapsed)
                        STT_AUDIO.observe(duration_s)
                        if duration_s > 0:
                            STT_RTF.observe(elapsed / duration_s)
                            span.set_attribute("voice.stt.real_time_factor", elapsed / duration_s)
                        span.set_attribute("voice.stt.language", item.language)
                        set_content_attribute(span, "voice.stt.transcript", item.text)
                        if capture_content():
                            logger.info("transcript of %s: %r", context.request_id, item.text)
                        transcript = transcript_proto(item)
                        transcript.processing_time_s = elapsed
                        yield stt_pb2.TranscribeEvent(transcript=transcript)
            except TranscriptionCancelled:
                raise stopped_error(context) from None


def segment_proto(segment: Segment) -> stt_pb2.Segment:
    """The protobuf form of an engine segment."""
    return stt_pb2.Segment(
        id=segment.id,
        start_s=segment.start_s,
        end_s=segment.end_s,
        text=segment.text,
        words=[
            stt_pb2.Word(word=w.word, start_s=w.start_s, end_s=w.end_s, probability=w.probability)
            for w in segment.words
        ],
        avg_logprob=segment.avg_logprob,
        no_speech_prob=segment.no_speech_prob,
    )


def transcript_proto(transcript: Transcript) -> stt_pb2.Transcript:
    """The protobuf form of an engine transcript."""
    return stt_pb2.Transcript(
        text=transcript.text,
        segments=[segment_proto(s) for s in transcript.segments],
        language=transcript.language,
        language_probability=transcript.language_probability,
        audio_duration_s=transcript.audio_duration_s,
        processing_time_s=transcript.processing_time_s,
        model=transcript.model,
    )

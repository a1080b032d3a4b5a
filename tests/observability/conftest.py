"""Fixtures for the observability tests: real STT and TTS workers exporting spans to a local receiver.

Each stack has its own nats-server, so that no other test's worker takes its requests, and its own
:class:`~voicectl.otlp_receiver.OtlpReceiver` writing the JSON-lines file ``voicectl trace`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.support.workers import WorkerProcess
from voice.v1 import audio_pb2, stt_pb2, tts_pb2
from voice_bus.client import BusClient
from voice_bus.connection import connect
from voice_telemetry.tracing import CAPTURE_CONTENT_ENV
from voicectl.local import NatsServer
from voicectl.otlp_receiver import OtlpReceiver

PCM16 = audio_pb2.AUDIO_ENCODING_PCM16


@dataclass
class TracedStack:
    """A nats-server, real workers and the receiver their spans go to."""

    receiver: OtlpReceiver
    nats: NatsServer
    workers: dict[str, WorkerProcess]

    @property
    def trace_file(self) -> Path:
        return self.receiver.path

    def log(self) -> str:
        """Every worker's log so far."""
        return "".join(worker.log.getvalue() for worker in self.workers.values())


@contextlib.contextmanager
def traced_stack(folder: Path, *, capture_content: bool, services=("stt", "tts")):
    """Starts the workers with the standard OTEL_* variables pointing at a fresh receiver."""
    with OtlpReceiver(folder / "traces.jsonl") as receiver, NatsServer() as nats:
        env = {**receiver.env(), CAPTURE_CONTENT_ENV: "true" if capture_content else "false"}
        workers = {service: WorkerProcess(service, nats.url, env) for service in services}
        try:
            for worker in workers.values():
                worker.launch()
            for worker in workers.values():
                worker.wait_ready()
            yield TracedStack(receiver, nats, workers)
        finally:
            for worker in workers.values():
                worker.stop()


@pytest.fixture(scope="package")
def default_stack(tmp_path_factory):
    """STT and TTS workers with the default: no transcript or text in spans and logs."""
    with traced_stack(tmp_path_factory.mktemp("traces-default"), capture_content=False) as stack:
        yield stack


async def traced_call(stack: TracedStack, session_id: str, text: str) -> tuple[str, list[dict]]:
    """Plays one turn of a call as the gateway would: a ``session`` span and a ``turn`` span (exported
    by this test process) around a TTS request for ``text`` and an STT request for its audio.

    Returns:
        The transcript, and every span of the call's trace once the workers' spans have arrived.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": "voice-test-caller"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=stack.receiver.endpoint + "/v1/traces")))
    tracer = provider.get_tracer("tests.observability")
    nc = await connect(stack.nats.url, name="observability-test")
    try:
        bus = BusClient(nc)
        attributes = {"voice.session_id": session_id}
        with tracer.start_as_current_span("session", attributes={**attributes, "voice.dialect": "test"}) as session:
            with tracer.start_as_current_span("turn", attributes={**attributes, "voice.turn.kind": "text"}):
                request = tts_pb2.SynthesizeRequest(
                    text=text, output_format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate=16000)
                )
                events = await bus.collect("tts", request, timeout=60, session_id=session_id)
                audio = b"".join(e.chunk.audio for e in events if e.HasField("chunk"))
                request = stt_pb2.TranscribeRequest(
                    audio=audio, format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate=16000)
                )
                transcript = (await bus.collect("stt", request, timeout=60, session_id=session_id))[-1].transcript
        trace_id = format(session.get_span_context().trace_id, "032x")
    finally:
        await nc.close()
        await asyncio.to_thread(provider.shutdown)
    wanted = {"session", "turn", "tts.work", "tts.synthesize", "stt.work", "stt.transcribe"}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        spans = [s for s in stack.receiver.spans if s["trace_id"] == trace_id]
        if wanted <= {s["name"] for s in spans}:
            return transcript.text, spans
        await asyncio.sleep(0.1)
    raise AssertionError(f"spans of {session_id} never arrived: {sorted({s['name'] for s in spans})}")

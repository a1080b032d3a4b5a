"""Transcripts, prompts and synthesized text stay out of spans and logs unless the operator opts in
with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.

Real STT and TTS workers export to an OTLP receiver, once with the default and once opted in; the
LLM handler is checked in-process with a scripted engine; and two real gateways, one of each kind,
in front of the session's real workers take a spoken turn whose ``turn`` span they export.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.gateway.client import BrowserClient
from tests.observability.conftest import traced_call, traced_stack
from tests.support.otlp import OtlpReceiver
from tests.support.speech import speak
from tests.support.workers import _Tee
from voice.v1 import llm_pb2
from voice_audio import wav_bytes
from voice_bus.worker import RequestContext
from voice_llm import handler as llm_handler
from voice_llm.engine import Completion, TokenDelta, Usage
from voice_telemetry.tracing import CAPTURE_CONTENT_ENV, capture_content
from voicectl.local import GatewayProcess

TEXT = "Please call me back at the office tomorrow morning."
WORDS = ("office", "tomorrow")


def texts_in(spans: list[dict]) -> str:
    """Every attribute and event value of ``spans`` as one lower-case string."""
    values = []
    for span in spans:
        values += [json.dumps(v) for v in span["attributes"].values()]
        values += [json.dumps(e) for e in span.get("events", [])]
        values.append(span.get("status_message", ""))
    return " ".join(values).lower()


@pytest.fixture(scope="module")
def capturing_stack(tmp_path_factory):
    with traced_stack(tmp_path_factory.mktemp("traces-capture"), capture_content=True) as stack:
        yield stack


async def test_by_default_no_span_or_log_line_holds_the_text(default_stack):
    transcript, spans = await traced_call(default_stack, f"default-{uuid.uuid4().hex[:8]}", TEXT)
    assert all(word in transcript.lower() for word in WORDS), transcript  # the text really went through
    worker_spans = [s for s in spans if s["service"] in ("voice-stt", "voice-tts")]
    assert {s["name"] for s in worker_spans} >= {"tts.synthesize", "stt.transcribe"}
    recorded = texts_in(worker_spans)
    assert not any(word in recorded for word in WORDS), recorded
    synthesize = next(s for s in worker_spans if s["name"] == "tts.synthesize")
    assert synthesize["attributes"]["voice.tts.characters"] == len(TEXT)
    log = default_stack.log().lower()
    assert not any(word in log for word in WORDS)


async def test_with_the_opt_in_spans_and_logs_hold_the_text(capturing_stack):
    transcript, spans = await traced_call(capturing_stack, f"capture-{uuid.uuid4().hex[:8]}", TEXT)
    synthesize = next(s for s in spans if s["name"] == "tts.synthesize")
    assert synthesize["attributes"]["voice.tts.text"] == TEXT
    transcribe = next(s for s in spans if s["name"] == "stt.transcribe")
    assert transcribe["attributes"]["voice.stt.transcript"] == transcript
    log = capturing_stack.log()
    assert TEXT in log and transcript in log


class ScriptedEngine:
    """An LLM engine that streams a fixed answer."""

    model = "scripted"

    def stream(self, messages, **kwargs) -> AsyncIterator:
        async def events():
            yield TokenDelta("Four two seven, ")
            yield TokenDelta("noted.")
            yield Completion("Four two seven, noted.", (), "stop", Usage(12, 6, 18), "scripted", 0.05, 0.2)

        return events()


@pytest.fixture
def llm_spans(monkeypatch):
    """The LLM handler's spans, in memory; and a switch for the opt-in variable."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(llm_handler, "tracer", provider.get_tracer("test"))

    def opt_in(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
        else:
            monkeypatch.setenv(CAPTURE_CONTENT_ENV, value)
        capture_content.cache_clear()

    yield exporter, opt_in
    capture_content.cache_clear()


@pytest.mark.parametrize(("value", "captured"), [(None, False), ("false", False), ("TRUE", True), ("true", True)])
async def test_llm_prompt_and_answer_only_with_the_opt_in(llm_spans, caplog, value, captured):
    exporter, opt_in = llm_spans
    opt_in(value)
    handler = llm_handler.GenerateHandler(ScriptedEngine(), default_max_tokens=50)
    request = llm_pb2.GenerateRequest(
        messages=[
            llm_pb2.ChatMessage(role="system", content="You are terse."),
            llm_pb2.ChatMessage(role="user", content="My account number is four two seven."),
        ]
    )
    with caplog.at_level("INFO", logger="voice_llm"):
        events = [e async for e in handler(request, RequestContext(request_id="r1", session_id="s1"))]
    assert events[-1].completion.text == "Four two seven, noted."
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes)
    assert attributes["gen_ai.usage.output_tokens"] == 6
    text = json.dumps(attributes) + caplog.text
    assert ("account number" in text) is captured
    assert ("noted" in text) is captured
    if captured:
        assert json.loads(attributes["gen_ai.input.messages"]) == [
            {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
            {"role": "user", "parts": [{"type": "text", "content": "My account number is four two seven."}]},
        ]
        assert json.loads(attributes["gen_ai.output.messages"]) == [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": "Four two seven, noted."}],
                "finish_reason": "stop",
            }
        ]


@pytest.fixture(scope="module")
def gateways(nats_url, stt_worker, llm_worker, tts_worker):
    """Two gateways on the session's workers, one with the default and one opted in (keyed by whether
    they capture), exporting their spans to one receiver; each keeps its log in ``log``."""
    with OtlpReceiver() as receiver:
        started: dict[bool, GatewayProcess] = {}
        try:
            for capture in (False, True):
                log = io.StringIO()
                env = {**receiver.env(), CAPTURE_CONTENT_ENV: "true" if capture else "false"}
                started[capture] = GatewayProcess(nats_url, env, sink=_Tee(log)).start()
                started[capture].log = log
            yield receiver, started
        finally:
            for gateway in started.values():
                gateway.stop()


async def spoken_turn(gateway: GatewayProcess, receiver: OtlpReceiver) -> tuple[str, str, list[dict]]:
    """One browser call with one spoken turn saying ``TEXT``.

    Returns:
        The transcript and the answer the caller was sent, and the gateway's spans of the call once its
        audio ``turn`` span has arrived.
    """
    samples, rate = speak(TEXT)
    async with BrowserClient(gateway.url) as client:
        await client.send("init", agentId="default")
        session_id = (await client.next())["data"]["callLogId"]
        await client.until("audio_response")
        await client.send("audio", audio=base64.b64encode(wav_bytes(samples, rate)).decode())
        events = await client.until("processing_complete")
        await client.send("end")
        await client.until("session_ended")
    transcript = next(e["data"]["text"] for e in events if e["type"] == "stt_complete")
    answer = next(e["data"]["text"] for e in events if e["type"] == "llm_complete")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = [s for s in receiver.spans if s["attributes"].get("voice.session_id") == session_id]
        kinds = {s["attributes"].get("voice.turn.kind") for s in spans if s["name"] == "turn"}
        if {"greeting", "audio"} <= kinds and any(s["name"] == "session" for s in spans):
            return transcript, answer, spans
        await asyncio.sleep(0.1)
    raise AssertionError(f"the turn spans of {session_id} never arrived")


def audio_turn(spans: list[dict]) -> dict:
    return next(s for s in spans if s["name"] == "turn" and s["attributes"]["voice.turn.kind"] == "audio")


async def test_by_default_the_gateway_keeps_the_transcript_out_of_its_spans_and_log(gateways):
    receiver, started = gateways
    transcript, answer, spans = await spoken_turn(started[False], receiver)
    assert all(word in transcript.lower() for word in WORDS), transcript
    assert answer
    attributes = audio_turn(spans)["attributes"]
    assert "voice.user_text" not in attributes and "voice.assistant_text" not in attributes
    assert attributes["voice.timing.stt_s"] > 0  # the turn span is there, with its timings
    recorded = texts_in(spans)
    assert not any(word in recorded for word in WORDS), recorded
    assert answer.lower() not in recorded
    log = started[False].log.getvalue().lower()
    assert not any(word in log for word in WORDS)


async def test_with_the_opt_in_the_gateway_turn_span_holds_the_transcript_and_answer(gateways):
    receiver, started = gateways
    transcript, answer, spans = await spoken_turn(started[True], receiver)
    assert all(word in transcript.lower() for word in WORDS), transcript
    attributes = audio_turn(spans)["attributes"]
    assert attributes["voice.user_text"] == transcript
    assert attributes["voice.assistant_text"] == answer

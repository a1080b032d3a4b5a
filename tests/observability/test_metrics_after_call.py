"""After one real call, every process's Prometheus endpoint shows it.

A simulated caller speaks one sentence on the raw PCM dialect to the real gateway, which runs the
turn through the real STT, LLM and TTS workers. Each of the four processes is scraped over HTTP
before and after the call (the gateway at ``/metrics/`` on its HTTP port, the workers on their
``METRICS_PORT``), and the speech histograms must have grown by real observations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import API_KEY
from tests.support.speech import speak
from voicectl.callers import call

SENTENCE = "I would like to book a table for two people."
STAGES = ("endpointing", "stt", "llm_first_token", "llm", "tts_first_chunk")
SERVICES = ("stt", "llm", "tts")


class Scrape:
    """The samples of one scrape of a ``/metrics`` endpoint, parsed by prometheus_client."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def has(self, name: str, **labels: str) -> bool:
        """Whether a sample ``name`` with (at least) these labels is exposed."""
        return any(n == name and _matches(found, labels) for n, found, _ in self.samples)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the ``name`` samples with (at least) these labels."""
        return sum(value for n, found, value in self.samples if n == name and _matches(found, labels))


def _matches(found: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(found.get(key) == value for key, value in wanted.items())


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
        response.raise_for_status()
        return Scrape(response.text)


@pytest.fixture(scope="module")
def endpoints(gateway, stt_worker, llm_worker, tts_worker) -> dict[str, str]:
    """The metrics URL of each of the four processes of the session's stack."""
    urls = {"gateway": gateway.url + "/metrics/"}
    for worker in (stt_worker, llm_worker, tts_worker):
        urls[worker.service] = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    return urls


async def scrape_all(endpoints: dict[str, str]) -> dict[str, Scrape]:
    scrapes = await asyncio.gather(*(scrape(url) for url in endpoints.values()))
    return dict(zip(endpoints, scrapes, strict=True))


async def test_one_call_leaves_observations_in_every_process(endpoints, gateway_url):
    before = await scrape_all(endpoints)
    samples, rate = speak(SENTENCE)
    # The caller speaks once the greeting is over (no barge-in), then listens to the answer.
    result = await call("pcm", gateway_url, samples, rate, speech_at_s=4.0, listen_s=8.0, api_key=API_KEY)
    assert result.voice_to_voice_s is not None, result.timeline.table()
    after = await scrape_all(endpoints)

    def grew(process: str, name: str, **labels: str) -> float:
        return after[process].total(name, **labels) - before[process].total(name, **labels)

    # The gateway: the turn's latencies as the caller lived them, and every stage of it.
    for name, labels in (
        ("voice_gateway_voice_to_voice_seconds", {"dialect": "pcm"}),
        ("voice_gateway_time_to_first_audio_seconds", {"dialect": "pcm", "kind": "audio"}),
        *(("voice_gateway_stage_seconds", {"stage": stage}) for stage in STAGES),
        *(("voice_bus_client_time_to_first_event_seconds", {"service": service}) for service in SERVICES),
    ):
        assert grew("gateway", name + "_count", **labels) >= 1, (name, labels)
        assert grew("gateway", name + "_sum", **labels) > 0, (name, labels)
    assert grew("gateway", "voice_gateway_turns_total", dialect="pcm", kind="audio", outcome="ok") >= 1
    for service in SERVICES:
        assert grew("gateway", "voice_bus_client_requests_total", service=service, outcome="ok") >= 1, service
        assert after["gateway"].has("voice_bus_client_in_flight", service=service), service
    assert after["gateway"].has("voice_gateway_active_sessions", dialect="pcm")
    assert after["gateway"].total("voice_gateway_event_loop_lag_seconds_count") > 0

    # The models, each in its own worker process.
    for process, name in (
        ("stt", "voice_stt_latency_seconds"),
        ("stt", "voice_stt_real_time_factor"),
        ("stt", "voice_stt_audio_duration_seconds"),
        ("llm", "voice_llm_time_to_first_token_seconds"),
        ("llm", "voice_llm_tokens_per_second"),
        ("tts", "voice_tts_time_to_first_byte_seconds"),
        ("tts", "voice_tts_real_time_factor"),
    ):
        assert grew(process, name + "_count") >= 1, name
        assert grew(process, name + "_sum") > 0, name
    # llama.cpp sends no usage when streaming: output tokens are counted per chunk, input ones stay unknown.
    assert grew("llm", "voice_llm_tokens_total", kind="output") > 0

    # The worker runtime, the same in the three of them: duration, queue wait, outcome, in-flight, lag.
    for service in SERVICES:
        work = {"service": service, "transport": "bus"}
        assert grew(service, "voice_worker_request_duration_seconds_count", **work) >= 1, service
        assert grew(service, "voice_worker_request_duration_seconds_sum", **work) > 0, service
        assert grew(service, "voice_worker_queue_wait_seconds_count", service=service) >= 1, service
        assert grew(service, "voice_worker_requests_total", **work, outcome="ok") >= 1, service
        assert after[service].total("voice_worker_slots", service=service) > 0, service
        for gauge in ("voice_worker_consumer_pending", "voice_worker_consumer_ack_pending"):
            assert after[service].has(gauge, service=service), (service, gauge)

    # Once the call is over, nothing is left in flight anywhere.
    deadline = time.monotonic() + 15
    while True:
        now = await scrape_all(endpoints)
        busy = {
            "sessions": now["gateway"].total("voice_gateway_active_sessions", dialect="pcm"),
            "bus callers": now["gateway"].total("voice_bus_client_in_flight"),
            **{service: now[service].total("voice_worker_in_flight", service=service) for service in SERVICES},
        }
        if not any(busy.values()):
            break
        assert time.monotonic() < deadline, busy
        await asyncio.sleep(0.2)

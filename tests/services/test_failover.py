"""Worker lifecycle on its own nats-server: kill -9 mid-request, SIGTERM draining, health during start-up."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from tests.services.conftest import presence
from tests.support.speech import word_error_rate
from tests.support.workers import WorkerProcess
from voice.v1 import audio_pb2, stt_pb2
from voice_audio import Encoding, encode_pcm16
from voice_bus.client import BusClient
from voice_bus.connection import connect
from voice_bus.errors import UNAVAILABLE, BusError
from voicectl.health import check
from voicectl.local import NatsServer

LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. Please call me back at the office tomorrow morning. "
    "I would like to book a table for two people. The weather will be sunny with a light breeze."
)


@pytest.fixture(scope="module")
def isolated_nats():
    with NatsServer() as server:
        yield server


@pytest.fixture
async def isolated_bus(isolated_nats):
    nc = await connect(isolated_nats.url, name="failover-test")
    yield BusClient(nc)
    await nc.close()


@pytest.fixture(scope="module")
def long_utterance(piper_speech) -> bytes:
    samples, rate = piper_speech(LONG_TEXT)
    audio = encode_pcm16(samples, from_rate=rate, encoding=Encoding.PCM16, to_rate=16000)
    return audio * 2


def stt_request(audio: bytes) -> stt_pb2.TranscribeRequest:
    return stt_pb2.TranscribeRequest(
        audio=audio, format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=16000)
    )


async def busy_worker(nc, workers: list[WorkerProcess], timeout_s: float = 10) -> WorkerProcess:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        for answer in await presence(nc, "stt", 0.1):
            if answer["in_flight"]:
                port = int(answer["worker"].rsplit(":", 1)[1])
                return next(w for w in workers if w.grpc_port == port)
    raise TimeoutError("no stt worker picked the request up")


async def test_kill_9_mid_request_completes_on_another_worker(isolated_nats, isolated_bus, long_utterance):
    workers = [WorkerProcess("stt", isolated_nats.url, {"STT_CONCURRENCY": "1"}) for _ in range(2)]
    for worker in workers:
        worker.launch()
    try:
        for worker in workers:
            await asyncio.to_thread(worker.wait_ready)
        request = asyncio.create_task(isolated_bus.collect("stt", stt_request(long_utterance), timeout=90))
        victim = await busy_worker(isolated_bus.nc, workers)
        await asyncio.sleep(0.3)
        victim.child.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        events = await request
        recovered_after = time.monotonic() - killed_at
    finally:
        for worker in workers:
            worker.stop()
    assert victim.child.process.returncode == -signal.SIGKILL
    transcript = events[-1].transcript.text
    assert word_error_rate(LONG_TEXT + " " + LONG_TEXT, transcript) <= 0.2, transcript
    assert recovered_after < 60


async def test_kill_9_with_no_other_worker_gives_unavailable_before_the_deadline(
    isolated_nats, isolated_bus, long_utterance
):
    worker = WorkerProcess("stt", isolated_nats.url, {"STT_CONCURRENCY": "1"}).start()
    try:
        request = asyncio.create_task(
            isolated_bus.collect("stt", stt_request(long_utterance), timeout=40, stall_timeout=10)
        )
        await busy_worker(isolated_bus.nc, [worker])
        worker.child.signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(BusError) as err:
            await request
        assert err.value.code == UNAVAILABLE
        assert time.monotonic() - started < 40
    finally:
        worker.stop()


async def test_sigterm_drains_in_flight_work_then_exits(isolated_nats, isolated_bus, long_utterance):
    worker = WorkerProcess("stt", isolated_nats.url, {"STT_CONCURRENCY": "1"}).start()
    request = asyncio.create_task(isolated_bus.collect("stt", stt_request(long_utterance), timeout=90))
    await busy_worker(isolated_bus.nc, [worker])
    worker.child.signal(signal.SIGTERM)
    events = await request
    exit_code = await asyncio.to_thread(worker.child.wait, 30)
    assert exit_code == 0
    assert word_error_rate(LONG_TEXT + " " + LONG_TEXT, events[-1].transcript.text) <= 0.2
    assert "exited cleanly" in worker.log.getvalue()
    with pytest.raises(BusError) as err:
        await isolated_bus.collect("stt", stt_request(long_utterance[:32000]), timeout=10)
    assert err.value.code == UNAVAILABLE


async def test_health_is_not_serving_until_the_model_is_loaded(isolated_nats):
    worker = WorkerProcess("tts", isolated_nats.url).launch()
    seen: list[str] = []
    try:
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up and (not seen or seen[-1] != "SERVING"):
            try:
                status = await asyncio.to_thread(check, worker.target, "voice.v1.TextToSpeech", 0.5)
            except grpc.RpcError:
                status = "unreachable"
            if not seen or seen[-1] != status:
                seen.append(status)
            await asyncio.sleep(0.02)
    finally:
        worker.stop()
    reachable = [s for s in seen if s != "unreachable"]
    assert reachable[0] == "NOT_SERVING" and reachable[-1] == "SERVING", seen
    assert "loaded" in worker.log.getvalue()

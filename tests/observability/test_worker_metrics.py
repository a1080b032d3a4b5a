"""The worker and bus client metrics against a real nats-server: consumer lag while every slot is busy,
in-flight work, outcomes and errors by kind on both front doors, and what callers see."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from prometheus_client import REGISTRY

from voice.v1 import stt_pb2
from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_bus.errors import INVALID_ARGUMENT, BusError
from voice_bus.worker import LAG_INTERVAL_S, Worker
from voice_runtime.grpc_bridge import stream_from_handler
from voicectl.local import NatsServer


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(check, timeout_s: float = 3 * LAG_INTERVAL_S) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not check():
        assert loop.time() < give_up, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def metrics_nats():
    with NatsServer() as server:
        yield server


@pytest.fixture
async def bus(metrics_nats):
    nc = await connect(metrics_nats.url, name="metrics-test")
    await ensure_streams(nc, ["stt"])
    yield BusClient(nc)
    await nc.close()


def request(tag: str) -> stt_pb2.TranscribeRequest:
    return stt_pb2.TranscribeRequest(audio=b"\0\0", language=tag)


def transcript(text: str) -> stt_pb2.TranscribeEvent:
    return stt_pb2.TranscribeEvent(transcript=stt_pb2.Transcript(text=text))


async def test_lag_in_flight_and_outcomes_while_every_slot_is_busy(bus):
    release = asyncio.Event()

    async def handler(req, ctx):
        if req.language == "bad":
            raise ValueError("bad request")
        await release.wait()
        yield transcript(req.language)

    worker = Worker(bus.nc, "stt", handler, concurrency=1, name="metrics-test-stt")
    await worker.start()
    ok_before = value("voice_worker_requests_total", service="stt", transport="bus", outcome="ok")
    bad_before = value("voice_worker_errors_total", service="stt", transport="bus", kind="invalid_argument")
    client_ok_before = value("voice_bus_client_requests_total", service="stt", outcome="ok")
    client_bad_before = value("voice_bus_client_requests_total", service="stt", outcome="invalid_argument")
    try:
        assert value("voice_worker_slots", service="stt") == 1
        calls = [asyncio.create_task(bus.collect("stt", request(f"r{i}"), timeout=30)) for i in range(3)]
        # One runs, two wait in the queue: the lag is published although the worker never idles.
        await eventually(lambda: value("voice_worker_consumer_pending", service="stt") == 2)
        assert value("voice_worker_in_flight", service="stt", transport="bus") == 1
        assert value("voice_worker_consumer_ack_pending", service="stt") == 1
        assert value("voice_bus_client_in_flight", service="stt") == 3
        release.set()
        results = await asyncio.gather(*calls)
        assert sorted(r[-1].transcript.text for r in results) == ["r0", "r1", "r2"]
        with pytest.raises(BusError) as error:
            await bus.collect("stt", request("bad"), timeout=10)
        assert error.value.code == INVALID_ARGUMENT
        await eventually(lambda: value("voice_worker_consumer_pending", service="stt") == 0)
    finally:
        await worker.stop(grace_s=5)
    assert value("voice_worker_slots", service="stt") == 0  # stopped (or draining) workers have no slots
    assert value("voice_worker_in_flight", service="stt", transport="bus") == 0
    assert value("voice_worker_requests_total", service="stt", transport="bus", outcome="ok") - ok_before == 3
    assert value("voice_worker_errors_total", service="stt", transport="bus", kind="invalid_argument") - bad_before == 1
    assert value("voice_bus_client_requests_total", service="stt", outcome="ok") - client_ok_before == 3
    assert value("voice_bus_client_requests_total", service="stt", outcome="invalid_argument") - client_bad_before == 1
    assert value("voice_bus_client_in_flight", service="stt") == 0
    assert value("voice_bus_client_time_to_first_event_seconds_count", service="stt") >= 3


async def test_a_caller_that_gives_up_counts_as_abandoned_not_as_an_error(bus):
    started = asyncio.Event()

    async def handler(req, ctx):
        started.set()
        await asyncio.sleep(30)
        yield transcript("never")

    before = value("voice_bus_client_requests_total", service="stt", outcome="abandoned")
    worker = Worker(bus.nc, "stt", handler, concurrency=1, name="metrics-test-stt")
    await worker.start()
    try:
        call = asyncio.create_task(bus.collect("stt", request("slow"), timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    finally:
        await worker.stop(grace_s=5)
    assert value("voice_bus_client_requests_total", service="stt", outcome="abandoned") - before == 1
    assert value("voice_bus_client_in_flight", service="stt") == 0


class FakeServicerContext:
    """Just what ``stream_from_handler`` uses of a gRPC servicer context."""

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return 10.0

    async def abort(self, code: grpc.StatusCode, details: str):
        raise grpc.aio.AbortError(code, details)


async def test_grpc_front_door_counts_in_flight_outcomes_and_errors():
    async def handler(req, ctx):
        assert value("voice_worker_in_flight", service="tts", transport="grpc") == 1
        if req.language == "bad":
            raise ValueError("bad")
        yield transcript("ok")

    ok_before = value("voice_worker_requests_total", service="tts", transport="grpc", outcome="ok")
    bad_before = value("voice_worker_errors_total", service="tts", transport="grpc", kind="invalid_argument")
    events = [e async for e in stream_from_handler(handler, request("x"), FakeServicerContext(), "t", service="tts")]
    assert events[-1].transcript.text == "ok"
    with pytest.raises(grpc.aio.AbortError):
        async for _ in stream_from_handler(handler, request("bad"), FakeServicerContext(), "t", service="tts"):
            pass
    assert value("voice_worker_requests_total", service="tts", transport="grpc", outcome="ok") - ok_before == 1
    assert (
        value("voice_worker_errors_total", service="tts", transport="grpc", kind="invalid_argument") - bad_before == 1
    )
    assert value("voice_worker_in_flight", service="tts", transport="grpc") == 0
    assert value("voice_worker_request_duration_seconds_count", service="tts", transport="grpc") >= 2

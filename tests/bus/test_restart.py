"""Recovery after nats-server restarts, with no manual step and no restart of workers or clients.

A real nats-server is stopped and started again on the same port, with the same store or a fresh,
empty one (what a pod without a persistent volume gets). Memory-storage work streams and their
consumers are gone either way; file-storage ones survive in the same store. Workers declare what is
gone again and go on consuming; a client publishing to a lost stream declares it again; the
gateway's KV buckets and ``CALLS`` stream come back on their next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid

import pytest
from nats.js.api import StorageType

from tests.bus.cluster import RestartableNats
from tests.support.gateway import api_client
from tests.support.workers import WorkerProcess, _Tee
from voice.v1 import audio_pb2, llm_pb2, tts_pb2
from voice_bus.catalog import SERVICES
from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams, ensure_streams_once, publish_work
from voice_bus.worker import Worker
from voice_gateway.agents import Agent, AgentStore
from voice_gateway.config import DEFAULT_AGENT_FILE
from voice_gateway.storage.call_log import CallLog, CallLogStore
from voice_gateway.storage.registry import CallRegistry
from voicectl.local import GatewayProcess

# A worker looks at its consumer every 2 s and right after reconnecting; nats-py reconnects every
# 0.5 s. Well within this, requests must be answered again.
RECOVERY_S = 15.0


def request(text: str) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content=text)])


async def echo(req, ctx):
    yield llm_pb2.GenerateEvent(completion=llm_pb2.Completion(text=req.messages[-1].content, finish_reason="stop"))


async def answered_within(bus: BusClient, text: str, timeout_s: float) -> float:
    """Seconds until an llm request is answered, retrying failed attempts; fails after ``timeout_s``."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout_s:
        try:
            events = await bus.collect("llm", request(text), timeout=3)
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.2)
            continue
        assert events[-1].completion.text == text
        return time.monotonic() - started
    raise AssertionError(f"no answer within {timeout_s:.0f}s; last error: {last!r}")


async def until_connected(nc) -> None:
    give_up = time.monotonic() + RECOVERY_S
    while not nc.is_connected and time.monotonic() < give_up:
        await asyncio.sleep(0.05)


@pytest.fixture
async def nats_at(tmp_path):
    server = RestartableNats(tmp_path / "store-1").start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def connections(url: str, *names: str):
    ncs = [await connect(url, name=name) for name in names]
    try:
        yield ncs
    finally:
        for nc in ncs:
            await nc.close()


@pytest.mark.parametrize("storage", [StorageType.MEMORY, StorageType.FILE])
@pytest.mark.parametrize("store", ["same store", "fresh store"])
async def test_worker_and_client_carry_on_after_nats_restarts(nats_at, tmp_path, storage, store):
    async with connections(nats_at.url, "restart-worker", "restart-client") as (worker_nc, client_nc):
        await ensure_streams(client_nc, storage=storage)
        bus = BusClient(client_nc)
        worker = Worker(worker_nc, "llm", echo, name="restart-llm", storage=storage)
        await worker.start()
        try:
            await answered_within(bus, "before", 5)
            await asyncio.to_thread(nats_at.restart, tmp_path / "store-2" if store == "fresh store" else None)
            await answered_within(bus, "after", RECOVERY_S)
            await answered_within(bus, "and again", 5)
        finally:
            await worker.stop(grace_s=5)
        info = await client_nc.jetstream().stream_info(SERVICES["llm"].stream)
        assert info.config.storage == storage
    if storage == StorageType.FILE and store == "same store":
        assert worker.recoveries == 0, "nothing was lost, nothing is declared again"


async def test_a_worker_declares_its_lost_stream_and_consumer_again(nats_at, tmp_path):
    async with connections(nats_at.url, "restart-worker") as (nc,):
        worker = Worker(nc, "llm", echo, name="restart-llm")
        await worker.start()
        try:
            await asyncio.to_thread(nats_at.restart, tmp_path / "store-2")
            give_up = time.monotonic() + RECOVERY_S
            while worker.recoveries == 0 and time.monotonic() < give_up:
                await asyncio.sleep(0.05)
            assert worker.recoveries >= 1
            consumer = await nc.jetstream().consumer_info(SERVICES["llm"].stream, SERVICES["llm"].durable)
            assert consumer.config.durable_name == "llm"
        finally:
            await worker.stop(grace_s=5)


async def test_publishing_to_a_lost_stream_declares_it_again_once(nats_at, tmp_path, caplog):
    async with connections(nats_at.url, "restart-client") as (nc,):
        await ensure_streams(nc, storage=StorageType.FILE)
        await asyncio.to_thread(nats_at.restart, tmp_path / "store-2")
        await until_connected(nc)
        caplog.set_level(logging.INFO, logger="voice_bus.connection")
        caplog.clear()
        acks = await asyncio.gather(
            *(publish_work(nc, "llm", f"request {i}".encode(), headers={"Voice-Request-Id": str(i)}) for i in range(20))
        )
        assert sorted(ack.seq for ack in acks) == list(range(1, 21))
        assert {ack.stream for ack in acks} == {SERVICES["llm"].stream}
        created = [r for r in caplog.records if r.getMessage().startswith("created stream VOICE_LLM")]
        assert len(created) == 1, "concurrent publishers must share one declaration"
        js = nc.jetstream()
        assert (await js.stream_info(SERVICES["llm"].stream)).config.storage == StorageType.FILE, (
            "the declaration again uses the options the connection declared with"
        )
        await ensure_streams_once(nc)
        for name in SERVICES:
            await js.consumer_info(SERVICES[name].stream, SERVICES[name].durable)


@pytest.mark.parametrize("store", ["same store", "fresh store"])
async def test_gateway_stores_come_back_after_nats_restarts(nats_at, tmp_path, store):
    async with connections(nats_at.url, "restart-gateway") as (nc,):
        js = nc.jetstream()
        agents = await AgentStore.open(js)
        default = await agents.load_default(DEFAULT_AGENT_FILE)
        await agents.put(Agent(id="custom", name="Custom"))
        calls = await CallLogStore.open(js)
        log_id = uuid.uuid4().hex
        await calls.save(CallLog(call_log_id=log_id, agent_id=default.id, agent_name=default.name, dialect="chat"))
        registry = await CallRegistry.open(js)
        await registry.announce("before-restart", default.id, {})

        await asyncio.to_thread(nats_at.restart, tmp_path / "store-2" if store == "fresh store" else None)
        await until_connected(nc)

        assert await agents.get(default.id) == default, "the default agent is always there"
        kept = store == "same store"
        assert (await agents.get("custom") is not None) == kept
        assert (await calls.get(log_id) is not None) == kept
        assert (await registry.claim("before-restart") is not None) == kept

        await agents.put(Agent(id="later", name="Later"))
        assert (await agents.get("later")).name == "Later"
        later_id = uuid.uuid4().hex
        await calls.save(CallLog(call_log_id=later_id, agent_id="later", agent_name="Later", dialect="chat"))
        assert (await calls.get(later_id)).agent_id == "later"
        await registry.announce("after-restart", "later", {"name": "Ada"})
        assert (await registry.claim("after-restart"))["variables"] == {"name": "Ada"}


async def test_gateway_bucket_lost_before_a_write_is_created_again(nats_at, tmp_path):
    async with connections(nats_at.url, "restart-gateway") as (nc,):
        js = nc.jetstream()
        registry = await CallRegistry.open(js)
        calls = await CallLogStore.open(js)
        await asyncio.to_thread(nats_at.restart, tmp_path / "store-2")
        await until_connected(nc)
        await registry.note_transfer("CA123", "+14155550100")
        assert await registry.transfer_of("CA123") == "+14155550100"
        log_id = uuid.uuid4().hex
        await calls.save(CallLog(call_log_id=log_id, agent_id="a", agent_name="A", dialect="chat"))
        assert (await calls.get(log_id)).call_log_id == log_id


async def test_a_worker_process_carries_on_after_nats_restarts_with_an_empty_store(nats_at, tmp_path):
    worker = WorkerProcess("tts", nats_at.url, {"TTS_CONCURRENCY": "1"})
    await asyncio.to_thread(worker.start)
    try:
        async with connections(nats_at.url, "restart-client") as (nc,):
            await ensure_streams(nc, ["tts"])
            bus = BusClient(nc)
            synthesize = tts_pb2.SynthesizeRequest(
                text="Hello.", output_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16)
            )
            assert await bus.collect("tts", synthesize, timeout=30)
            await asyncio.to_thread(nats_at.restart, tmp_path / "store-2")
            await until_connected(nc)
            started = time.monotonic()
            js = nc.jetstream()
            while True:
                # Nobody but the worker declares anything here: this client only looks.
                try:
                    await js.consumer_info(SERVICES["tts"].stream, SERVICES["tts"].durable)
                    break
                except Exception:
                    assert time.monotonic() - started < RECOVERY_S, "the worker did not declare its consumer again"
                    await asyncio.sleep(0.1)
            events = await bus.collect("tts", synthesize, timeout=30)
            assert any(event.HasField("chunk") for event in events)
        assert "declaring them again" in worker.log.getvalue()
    finally:
        await asyncio.to_thread(worker.stop)


async def test_a_gateway_process_serves_agents_and_calls_after_nats_restarts_with_an_empty_store(nats_at, tmp_path):
    log = io.StringIO()
    env = {"OTEL_TRACES_EXPORTER": "none", "GATEWAY_API_KEYS": "restart-key"}
    gateway = GatewayProcess(nats_at.url, env, sink=_Tee(log))
    await asyncio.to_thread(gateway.start)
    try:
        async with api_client(gateway.url, "restart-key", timeout=10) as http:
            assert (await http.put("/api/agents/custom", json={"name": "Custom"})).status_code == 200
            await asyncio.to_thread(nats_at.restart, tmp_path / "store-2")
            started = time.monotonic()
            while (await http.get("/healthz")).status_code != 200:
                assert time.monotonic() - started < RECOVERY_S, "the gateway did not reconnect"
                await asyncio.sleep(0.1)
            default = await http.get("/api/agents/default")
            assert default.status_code == 200, default.text
            assert (await http.get("/api/agents/custom")).status_code == 404, "lost with the store"
            assert (await http.put("/api/agents/custom", json={"name": "Custom"})).status_code == 200
            trigger = await http.post("/api/calls/trigger", json={"agent_id": "custom"})
            assert trigger.status_code == 200, trigger.text
            assert (await http.get(f"/api/calls/{uuid.uuid4().hex}")).status_code == 404
    finally:
        await asyncio.to_thread(gateway.stop)
    assert "KV bucket agents is gone" in log.getvalue()

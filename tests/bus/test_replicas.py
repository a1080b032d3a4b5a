"""Replicated streams: ``NATS_STREAM_REPLICAS`` and ``NATS_WORK_STORAGE`` are validated at start, and on a
real three-node NATS cluster every stream and KV bucket gets that many replicas, existing ones in place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys

import pytest
from nats.js.api import StorageType
from nats.js.errors import NotFoundError

from voice.v1 import llm_pb2
from voice_bus.catalog import SERVICES
from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_bus.worker import Worker
from voice_gateway.agents import AgentStore
from voice_gateway.config import Settings
from voice_gateway.storage.call_log import CallLogStore
from voice_gateway.storage.registry import CallRegistry
from voice_runtime.config import ConfigError, StreamSettings, WorkerSettings
from voicectl.local import NatsCluster

BAD_VALUES = [
    ({"NATS_STREAM_REPLICAS": "0"}, "NATS_STREAM_REPLICAS=0: must be at least 1"),
    ({"NATS_STREAM_REPLICAS": "6"}, "NATS_STREAM_REPLICAS=6: must be at most 5"),
    ({"NATS_STREAM_REPLICAS": "three"}, "NATS_STREAM_REPLICAS='three': expected an integer"),
    ({"NATS_STREAM_REPLICAS": "1.5"}, "NATS_STREAM_REPLICAS='1.5': expected an integer"),
    ({"NATS_WORK_STORAGE": "disk"}, "NATS_WORK_STORAGE='disk': expected one of memory, file"),
]


@pytest.mark.parametrize(("env", "message"), BAD_VALUES, ids=[next(iter(e.values())) for e, _ in BAD_VALUES])
def test_bad_stream_settings_fail_fast(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    worker_settings = lambda: WorkerSettings.from_env("llm", grpc_port=0, metrics_port=0)  # noqa: E731
    for read in (StreamSettings.from_env, worker_settings, Settings.from_env):
        with pytest.raises(ConfigError) as err:
            read()
        assert str(err.value) == message


def test_stream_settings_default_to_one_memory_replica_and_read_the_environment(monkeypatch):
    monkeypatch.delenv("NATS_STREAM_REPLICAS", raising=False)
    monkeypatch.delenv("NATS_WORK_STORAGE", raising=False)
    assert StreamSettings.from_env() == StreamSettings(replicas=1, work_storage=StorageType.MEMORY)
    monkeypatch.setenv("NATS_STREAM_REPLICAS", "3")
    monkeypatch.setenv("NATS_WORK_STORAGE", "file")
    expected = StreamSettings(replicas=3, work_storage=StorageType.FILE)
    assert StreamSettings.from_env() == expected
    assert WorkerSettings.from_env("stt", grpc_port=0, metrics_port=0).streams == expected
    assert Settings.from_env().streams == expected


def test_a_worker_with_bad_replicas_exits_2_naming_the_variable():
    result = subprocess.run(
        [sys.executable, "-m", "voice_tts"],
        env={"PATH": "/usr/bin:/bin", "NATS_STREAM_REPLICAS": "9"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "NATS_STREAM_REPLICAS=9: must be at most 5" in result.stderr


@pytest.fixture(scope="module")
def cluster():
    with NatsCluster(3) as nats:
        yield nats


async def replicas_of(js, stream: str) -> tuple[int, int]:
    """The stream's configured replica count and how many servers hold it (leader and followers)."""
    info = await js.stream_info(stream)
    return info.config.num_replicas, len(info.cluster.replicas or []) + (1 if info.cluster.leader else 0)


async def test_every_stream_and_bucket_gets_three_replicas_on_a_cluster(cluster):
    nc = await connect(cluster.url, name="replicas-test")
    try:
        js = nc.jetstream()
        await ensure_streams(nc, replicas=3)
        await AgentStore.open(js, replicas=3)
        await CallLogStore.open(js, replicas=3)
        await CallRegistry.open(js, replicas=3)
        streams = [spec.stream for spec in SERVICES.values()] + ["KV_agents", "KV_sessions", "CALLS"]
        for stream in streams:
            configured, _ = await replicas_of(js, stream)
            assert configured == 3, stream
        consumer = await js.consumer_info(SERVICES["llm"].stream, SERVICES["llm"].durable)
        assert len(consumer.cluster.replicas or []) + (1 if consumer.cluster.leader else 0) == 3

        async def echo(req, ctx):
            yield llm_pb2.GenerateEvent(completion=llm_pb2.Completion(text=req.messages[-1].content))

        worker = Worker(nc, "llm", echo, name="replicated-llm", replicas=3)
        await worker.start()
        try:
            request = llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="replicated")])
            events = await BusClient(nc).collect("llm", request, timeout=10)
        finally:
            await worker.stop(grace_s=5)
        assert events[-1].completion.text == "replicated"
    finally:
        await nc.close()


async def test_existing_streams_and_buckets_are_scaled_in_place(cluster, caplog):
    caplog.set_level(logging.INFO, logger="voice_bus.connection")
    nc = await connect(cluster.url, name="replicas-test")
    try:
        js = nc.jetstream()
        for stream in ("VOICE_STT", "KV_agents", "CALLS"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream)
        await ensure_streams(nc, ["stt"], storage=StorageType.FILE, replicas=1)
        await AgentStore.open(js, replicas=1)
        await CallLogStore.open(js, replicas=1)
        await js.publish("voice.stt.work", b"kept", stream="VOICE_STT")
        assert (await replicas_of(js, "VOICE_STT"))[0] == 1
        caplog.clear()

        await ensure_streams(nc, ["stt"], replicas=3)
        agents = await AgentStore.open(js, replicas=3)
        await CallLogStore.open(js, replicas=3)
        for stream in ("VOICE_STT", "KV_agents", "CALLS"):
            assert (await replicas_of(js, stream))[0] == 3, stream
        info = await js.stream_info("VOICE_STT")
        assert info.state.messages == 1, "scaling keeps the stream's messages"
        assert info.config.storage == StorageType.FILE, "an existing stream keeps its storage"
        messages = caplog.text
        assert "stream VOICE_STT: changing replicas from 1 to 3" in messages
        assert "KV bucket agents: changing replicas from 1 to 3" in messages
        assert "stream CALLS: changing replicas from 1 to 3" in messages
        assert "stream VOICE_STT keeps its file storage (asked for memory)" in messages
        async with asyncio.timeout(2):
            assert await agents.get("nobody") is None, "a scaled bucket answers once declared"
    finally:
        await nc.close()

"""Fixtures for the bus tests: a NATS connection and a way to run test workers on the llm queue."""

from __future__ import annotations

import contextlib

import pytest

from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_bus.worker import Worker
from voicectl.local import NatsServer


@pytest.fixture(scope="package")
def bus_nats():
    """A nats-server of the bus tests' own: no real worker of another test may take their requests."""
    with NatsServer() as server:
        yield server


@pytest.fixture
async def nc(bus_nats):
    connection = await connect(bus_nats.url, name="bus-test")
    await ensure_streams(connection)
    yield connection
    await connection.close()


@pytest.fixture
async def bus(nc) -> BusClient:
    return BusClient(nc)


@pytest.fixture
def running_worker(nc):
    """Starts a Worker for the test and always stops it, so no worker outlives its test."""

    @contextlib.asynccontextmanager
    async def run(service, handler, concurrency=1):
        worker = Worker(nc, service, handler, concurrency=concurrency, name=f"test-{service}")
        await worker.start()
        try:
            yield worker
        finally:
            await worker.stop(grace_s=5)

    return run

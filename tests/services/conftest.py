"""Fixtures for the service tests: a bus client on the session's nats-server, and presence probes."""

from __future__ import annotations

import asyncio
import json

import pytest

from voice_bus.catalog import service_spec
from voice_bus.client import BusClient
from voice_bus.connection import connect


@pytest.fixture
async def nc(nats_url):
    connection = await connect(nats_url, name="service-test")
    yield connection
    await connection.close()


@pytest.fixture
async def bus(nc) -> BusClient:
    return BusClient(nc)


async def presence(nc, service: str, window_s: float = 0.3) -> list[dict]:
    """Every worker of ``service`` that answers its presence subject within ``window_s``."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(service_spec(service).presence_subject, b"", reply=inbox)
    answers = []
    loop = asyncio.get_running_loop()
    end = loop.time() + window_s
    while (left := end - loop.time()) > 0:
        try:
            answers.append(json.loads((await sub.next_msg(timeout=left)).data))
        except Exception:
            break
    await sub.unsubscribe()
    return answers


async def wait_idle(nc, service: str, timeout_s: float) -> float:
    """Seconds until every worker of ``service`` reports no request in flight."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < timeout_s:
        if all(a["in_flight"] == 0 for a in await presence(nc, service, 0.05)):
            return loop.time() - start
    raise TimeoutError(f"{service} workers still busy after {timeout_s}s")

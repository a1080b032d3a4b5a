"""The gateway as a real process in front of real workers, for end-to-end tests."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from tests.support.workers import _Tee
from voicectl.local import GatewayProcess

TOKEN_SECRET = "test-token-secret"
API_KEY = "test-key"
SECOND_API_KEY = "second-key"
# GATEWAY_TOOL_ALLOWED_NETWORKS of gateways whose agents call the tests' webhook servers (tests/gateway/webhooks.py).
WEBHOOK_NETWORKS = "127.0.0.1/32"


def api_client(base_url: str, api_key: str = API_KEY, **options) -> httpx.AsyncClient:
    """An HTTP client of the gateway's REST API that sends ``api_key`` as ``Authorization: Bearer``."""
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, **options)


@pytest.fixture(scope="session")
def gateway(nats_url, stt_worker, llm_worker, tts_worker):
    """The gateway with the STT, LLM and TTS workers behind it; yields the GatewayProcess."""
    log = io.StringIO()
    env = {
        "OTEL_TRACES_EXPORTER": "none",
        "GATEWAY_API_KEYS": f"{API_KEY},{SECOND_API_KEY}",
        "GATEWAY_TOKEN_SECRET": TOKEN_SECRET,
        "GATEWAY_CHAT_PING_INTERVAL_SECONDS": "1",
        "GATEWAY_CHAT_PONG_TIMEOUT_SECONDS": "1.5",
        # The tests' webhook servers listen on loopback, which the egress policy refuses by default.
        "GATEWAY_TOOL_ALLOWED_NETWORKS": WEBHOOK_NETWORKS,
    }
    process = GatewayProcess(nats_url, env, sink=_Tee(log)).start()
    process.log = log
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gateway_url(gateway) -> str:
    """Base HTTP URL of the running gateway (WebSocket at ``ws://…/ws``)."""
    return gateway.url


@pytest.fixture(scope="session")
def start_bare_gateway(nats_url):
    """Factory: a gateway process with no workers behind it (enough wherever no turn has to finish), with
    the given extra environment; its output is kept in ``process.log``. Stopped at the end of the session."""
    started: list[GatewayProcess] = []

    def start(**env: str) -> GatewayProcess:
        log = io.StringIO()
        process = GatewayProcess(nats_url, {"OTEL_TRACES_EXPORTER": "none", **env}, sink=_Tee(log)).start()
        process.log = log
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


class FakeClock:
    """A clock the test moves by hand (``now``), for the limits' ``clock``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSocket:
    """Enough of a Starlette WebSocket for a connection guard: frames to hand out, then nothing."""

    def __init__(self, *frames: dict) -> None:
        self.frames = list(frames)

    async def receive(self) -> dict:
        if not self.frames:
            await asyncio.sleep(3600)
        return self.frames.pop(0)

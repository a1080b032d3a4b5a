"""The gateway as a real process in front of real workers, for end-to-end tests."""

from __future__ import annotations

import pytest

from tests.support.workers import _Tee
from voicectl.local import GatewayProcess

TOKEN_SECRET = "test-token-secret"


@pytest.fixture(scope="session")
def gateway(nats_url, stt_worker, llm_worker, tts_worker):
    """The gateway with the STT, LLM and TTS workers behind it; yields the GatewayProcess."""
    import io

    log = io.StringIO()
    env = {
        "OTEL_TRACES_EXPORTER": "none",
        "GATEWAY_API_KEYS": "test-key,second-key",
        "GATEWAY_TOKEN_SECRET": TOKEN_SECRET,
        "GATEWAY_CHAT_PING_INTERVAL_SECONDS": "1",
        "GATEWAY_CHAT_PONG_TIMEOUT_SECONDS": "1.5",
    }
    process = GatewayProcess(nats_url, env, sink=_Tee(log)).start()
    process.log = log
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gateway_url(gateway) -> str:
    """Base HTTP URL of the running gateway (WebSocket at ``ws://…/ws``)."""
    return gateway.url

"""A real nats-server with JetStream for the tests: one per session on a free port, temporary store."""

from __future__ import annotations

import pytest

from voicectl.local import NatsServer


@pytest.fixture(scope="session")
def nats_server():
    """A running nats-server (max_payload 8 MB, JetStream in a temporary directory)."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url

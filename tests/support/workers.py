"""Real worker processes for the tests, started with ``python -m voice_<service>`` like a user does."""

from __future__ import annotations

import io
import sys

import pytest
from voicectl.health import wait_serving
from voicectl.local import ChildProcess, free_port


class WorkerProcess:
    """One worker subprocess with its ports and captured log.

    Args:
        service: ``stt``, ``llm`` or ``tts``.
        nats_url: Bus to join.
        env: Extra environment (model settings, concurrency).
    """

    def __init__(self, service: str, nats_url: str, env: dict[str, str] | None = None) -> None:
        self.service = service
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.log = io.StringIO()
        self.child = ChildProcess(
            service,
            [sys.executable, "-m", f"voice_{service}"],
            env={
                "NATS_URL": nats_url,
                "GRPC_PORT": str(self.grpc_port),
                "METRICS_PORT": str(self.metrics_port),
                "OTEL_TRACES_EXPORTER": "none",
                **(env or {}),
            },
            sink=_Tee(self.log),
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 120) -> WorkerProcess:
        self.child.start()
        wait_serving(self.target, timeout_s, alive=self.child.running)
        return self

    def stop(self) -> None:
        self.child.stop(timeout_s=30)


class _Tee(io.TextIOBase):
    def __init__(self, buffer: io.StringIO) -> None:
        self._buffer = buffer

    def write(self, text: str) -> int:
        self._buffer.write(text)
        return sys.stderr.write(text)

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="session")
def start_worker(nats_url):
    """Factory: starts a worker process that is stopped at the end of the session at the latest."""
    started: list[WorkerProcess] = []

    def start(service: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(service, nats_url, env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def stt_worker(start_worker) -> WorkerProcess:
    return start_worker("stt", STT_CONCURRENCY="2")


@pytest.fixture(scope="session")
def tts_worker(start_worker) -> WorkerProcess:
    return start_worker("tts", TTS_CONCURRENCY="2")


@pytest.fixture(scope="session")
def llm_worker(start_worker, llama_server) -> WorkerProcess:
    return start_worker("llm", LLM_BASE_URL=llama_server, LLM_CONCURRENCY="2")

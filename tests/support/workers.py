"""Real worker processes for the tests, started with ``python -m voice_<service>`` like a user does."""

from __future__ import annotations

import io
import sys

import pytest

from voicectl.local import WorkerProcess as _WorkerProcess


class WorkerProcess(_WorkerProcess):
    """A worker whose log is both shown (on failure, by pytest) and kept in ``log`` for assertions."""

    def __init__(self, service: str, nats_url: str, env: dict[str, str] | None = None) -> None:
        self.log = io.StringIO()
        super().__init__(service, nats_url, {"OTEL_TRACES_EXPORTER": "none", **(env or {})}, sink=_Tee(self.log))


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

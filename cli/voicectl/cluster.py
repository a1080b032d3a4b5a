"""``voicectl cluster`` (``make cluster``): the platform as a production cluster runs it, on loopback.

Three nats-server nodes routed together with clustered JetStream (every stream and bucket has three
replicas), two gateways behind a round-robin balancer that follows their ``/readyz`` (what a
Kubernetes Service does), two workers of each service and the embedded llama.cpp server. Ctrl-C (or
SIGTERM) stops it cleanly: balancer, gateways (drained), workers (drained), LLM backend, NATS.

The :class:`LoopbackCluster` class is also what the fault tests run, so they break the same cluster
a user starts: kill -9 a worker, stop a NATS node, SIGTERM a gateway, restart NATS.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from voicectl.local import (
    ChildProcess,
    GatewayProcess,
    NatsCluster,
    WorkerProcess,
    embedded_llm_command,
    free_port,
    shared_core_threads,
    wait_for_port,
)

SERVICES = ("stt", "llm", "tts")
FRONT_PORT = 8000
GATEWAY_PORTS = (8001, 8002)
NATS_PORTS = (4222, 4223, 4224)
LLAMA_PORT = 8080
DEV_API_KEY = "dev-key"
REPLICAS = 3


class LoopbackCluster:
    """Three NATS nodes, two gateways behind a balancer, ``per_service`` workers of each service.

    Args:
        front_port: The balancer's port (clients connect here); a free one when 0.
        gateway_ports: One port per gateway; free ones when 0.
        nats_ports: The NATS nodes' client ports; free ones when empty.
        llm_base_url: An OpenAI-compatible backend; the embedded llama.cpp server is started if ``None``.
        per_service: Workers of each service.
        env: Extra environment for every worker and gateway.
        worker_env: Extra environment per service.
        sink: Where the children's prefixed log lines go (default stdout).
        state_dir: Where the NATS stores go; a temporary directory if ``None``.
    """

    def __init__(
        self,
        *,
        front_port: int = 0,
        gateway_ports: tuple[int, ...] = (0, 0),
        nats_ports: tuple[int, ...] = (),
        llm_base_url: str | None = None,
        per_service: int = 2,
        env: dict[str, str] | None = None,
        worker_env: dict[str, dict[str, str]] | None = None,
        sink=None,
        state_dir: str | None = None,
    ) -> None:
        self.front_port = front_port or free_port()
        self.gateway_ports = tuple(port or free_port() for port in gateway_ports)
        self.nats = NatsCluster(REPLICAS, base_dir=state_dir, ports=nats_ports)
        self._llm_base_url = llm_base_url
        self.per_service = per_service
        self.env = {"NATS_STREAM_REPLICAS": str(REPLICAS), **(env or {})}
        self.worker_env = worker_env or {}
        self.sink = sink
        self.llama: ChildProcess | None = None
        self.workers: dict[str, list[WorkerProcess]] = {service: [] for service in SERVICES}
        self.gateways: list[GatewayProcess] = []
        self.balancer: ChildProcess | None = None

    @property
    def url(self) -> str:
        """The front door (the balancer), ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.front_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.front_port}"

    @property
    def llm_base_url(self) -> str:
        return self._llm_base_url or f"http://127.0.0.1:{LLAMA_PORT}/v1"

    def children(self) -> list[ChildProcess]:
        """Every process but the NATS nodes, in start order."""
        found = [self.llama] if self.llama else []
        found += [worker.child for service in SERVICES for worker in self.workers[service]]
        found += [gateway.child for gateway in self.gateways]
        return found + ([self.balancer] if self.balancer else [])

    def start(self, timeout_s: float = 300.0) -> LoopbackCluster:
        """Starts everything and returns once every part is ready (workers SERVING, gateways healthy)."""
        self.nats.start()
        if self._llm_base_url is None:
            self.llama = ChildProcess(
                "llama",
                embedded_llm_command(LLAMA_PORT),
                sink=self.sink,
                color=33,
            ).start()
        for service in SERVICES:
            for _ in range(self.per_service):
                self.add_worker(service, wait=False)
        if self.llama is not None:
            wait_for_port(LLAMA_PORT, 120, process=self.llama.process)
        for service in SERVICES:
            for worker in self.workers[service]:
                worker.wait_ready(timeout_s)
        for port in self.gateway_ports:
            self.add_gateway(port)
        backends = [arg for gateway in self.gateways for arg in ("--backend", f"127.0.0.1:{gateway.port}")]
        self.balancer = ChildProcess(
            "balancer",
            [sys.executable, "-m", "voicectl.balancer", "--listen", str(self.front_port), *backends],
            sink=self.sink,
            color=37,
        ).start()
        wait_for_port(self.front_port, 30, process=self.balancer.process)
        return self

    def add_worker(self, service: str, *, wait: bool = True, env: dict[str, str] | None = None) -> WorkerProcess:
        """Starts one more worker of ``service`` (e.g. to replace one a test killed)."""
        extra = {**self.env, **self.worker_env.get(service, {}), **(env or {})}
        if service == "llm":
            extra.setdefault("LLM_BASE_URL", self.llm_base_url)
        if service == "tts" and self._llm_base_url is None:
            extra.setdefault("TTS_CPU_THREADS", os.environ.get("TTS_CPU_THREADS", str(shared_core_threads())))
        worker = WorkerProcess(service, self.nats.url, extra, sink=self.sink)
        worker.child.name = f"{service}-{len(self.workers[service]) + 1}"
        worker.launch()
        self.workers[service].append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def add_gateway(self, port: int = 0) -> GatewayProcess:
        """Starts one more gateway (it joins the balancer only if its port is one the balancer knows)."""
        env = {"GATEWAY_API_KEYS": os.environ.get("GATEWAY_API_KEYS", DEV_API_KEY), **self.env}
        gateway = GatewayProcess(self.nats.url, env, sink=self.sink, port=port)
        gateway.child.name = f"gw-{len(self.gateways) + 1}"
        gateway.start()
        self.gateways.append(gateway)
        return gateway

    def live_workers(self, service: str) -> list[WorkerProcess]:
        return [worker for worker in self.workers[service] if worker.child.running()]

    def stop(self) -> None:
        """Balancer and gateways first (they drain), then the workers (they drain), the backend, NATS."""
        if self.balancer:
            self.balancer.stop(timeout_s=5)
        for group in ([g.child for g in self.gateways], [w.child for s in SERVICES for w in self.workers[s]]):
            for child in group:
                child.signal(signal.SIGTERM)
            give_up = time.monotonic() + 60
            for child in group:
                child.wait(max(0.1, give_up - time.monotonic()))
                child.stop(timeout_s=1)
        if self.llama:
            self.llama.stop(timeout_s=10)
        self.nats.stop()

    def __enter__(self) -> LoopbackCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def run_cluster(state_dir: str = ".run/cluster") -> int:
    """Runs the loopback cluster in the foreground until Ctrl-C; returns the exit code."""
    from voicectl.stack import LOCAL_TRACES_DELAY_MS, _port_free, local_trace_receiver

    busy = [port for port in (FRONT_PORT, *GATEWAY_PORTS, *NATS_PORTS, LLAMA_PORT) if not _port_free(port)]
    if busy:
        print(f"voicectl cluster: ports already in use: {busy} (is `make run` or a cluster running?)", file=sys.stderr)
        return 1
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    receiver = local_trace_receiver(state_dir)
    env = receiver.env(LOCAL_TRACES_DELAY_MS) if receiver else {}
    store = Path(state_dir, "nats").resolve()
    cluster = LoopbackCluster(
        front_port=FRONT_PORT, gateway_ports=GATEWAY_PORTS, nats_ports=NATS_PORTS, env=env, state_dir=str(store)
    )
    try:
        cluster.start()
        nats = ", ".join(f":{node.port} ({node.server_name})" for node in cluster.nats.nodes)
        workers = "; ".join(
            f"{service} gRPC " + ", ".join(f":{w.grpc_port}" for w in cluster.workers[service]) for service in SERVICES
        )
        print(
            f"\n  cluster ready: open {cluster.url} (a balancer over gateways "
            f":{GATEWAY_PORTS[0]} and :{GATEWAY_PORTS[1]})\n"
            f"  NATS nodes {nats}, JetStream streams with {REPLICAS} replicas; NATS_URL={cluster.nats.url}\n"
            f"  workers: {workers}\n"
            "  break it: kill -9 a worker, SIGTERM a gateway, stop a NATS node; watch calls go on\n"
            "  stop: Ctrl-C\n",
            flush=True,
        )
        reported: set[str] = set()
        while not stop.is_set():
            for child in cluster.children():
                if not child.running() and child.name not in reported:
                    reported.add(child.name)
                    print(f"voicectl cluster: {child.name} exited ({child.process.returncode})", flush=True)
            stop.wait(0.5)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"voicectl cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the cluster", flush=True)
        cluster.stop()
        if receiver:
            receiver.stop()
        print("stopped", flush=True)

"""One worker process: the engine loaded once, served by a JetStream worker and a gRPC server.

Start-up order: logging, tracing, metrics, the gRPC server (health NOT_SERVING, reflection), the
engine load (in a thread), NATS and the worker, then health SERVING. SIGTERM or SIGINT drains:
health NOT_SERVING, stop fetching, finish in-flight work, stop gRPC, close NATS, flush traces.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voice_bus.connection import connect
from voice_bus.worker import Handler, Worker
from voice_runtime.config import ConfigError, WorkerSettings
from voice_telemetry.logs import setup_logging
from voice_telemetry.metrics import serve_metrics
from voice_telemetry.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

GRPC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SettingsT = TypeVar("SettingsT")


@dataclass
class WorkerApp:
    """Wiring of one worker service.

    Attributes:
        service: ``stt``, ``llm`` or ``tts``.
        settings: Shared worker settings.
        load: Loads the engine's models before any work is taken: a blocking function (run in a
            thread) or a coroutine function (awaited).
        handler: The bus handler, also served over gRPC by ``add_servicer``.
        add_servicer: Registers the gRPC servicer on the server.
        grpc_service_names: Full names of the gRPC services (for health and reflection).
        start: Optional async start-up after ``load`` (e.g. an HTTP client).
        close: Optional async clean-up after draining.
    """

    service: str
    settings: WorkerSettings
    load: Callable[[], None] | Callable[[], Awaitable[None]]
    handler: Handler
    add_servicer: Callable[[grpc.aio.Server], None]
    grpc_service_names: Sequence[str]
    start: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    grpc_port: int = field(default=0, init=False)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serves until SIGTERM/SIGINT (or ``stop`` is set), then drains and returns."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        setup_tracing(f"voice-{self.service}")
        serve_metrics(self.settings.metrics_port)

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
            ]
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self.add_servicer(server)
        names = [*self.grpc_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        for name in ("", *self.grpc_service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_port = server.add_insecure_port(f"[::]:{self.settings.grpc_port}")
        await server.start()
        logger.info("gRPC on :%d (health NOT_SERVING until the models are loaded)", self.grpc_port)

        loading = self.load() if inspect.iscoroutinefunction(self.load) else asyncio.to_thread(self.load)
        load = asyncio.create_task(loading)
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait({load, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            logger.info("stopping before the models finished loading")
            await server.stop(grace=1)
            return
        waiting.cancel()
        load.result()
        if self.start:
            await self.start()

        nc = await connect(self.settings.nats_url, name=f"voice-{self.service}@{socket.gethostname()}")
        worker = Worker(
            nc,
            self.service,
            self.handler,
            concurrency=self.settings.concurrency,
            name=f"{self.service}@{socket.gethostname()}:{self.grpc_port}",
            storage=self.settings.streams.work_storage,
            replicas=self.settings.streams.replicas,
        )
        await worker.start()
        for name in ("", *self.grpc_service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("%s worker ready", self.service)

        await stop.wait()
        logger.info("draining: no new work, finishing %d in-flight request(s)", worker.in_flight)
        await health_servicer.enter_graceful_shutdown()
        await worker.stop(self.settings.drain_grace_s)
        await server.stop(grace=5)
        try:
            await nc.drain()
        except Exception as exc:
            logger.warning("NATS drain skipped: %s", exc)
            await nc.close()
        if self.close:
            await self.close()
        shutdown_tracing()
        logger.info("%s worker exited cleanly", self.service)


def run_main(load_settings: Callable[[], SettingsT], build_app: Callable[[SettingsT], WorkerApp]) -> None:
    """A worker's ``main``: logging, settings from the environment (exit 2 with a clear message when
    they are wrong), then the app until it has drained."""
    setup_logging()
    try:
        app = build_app(load_settings())
    except (ConfigError, ValueError) as exc:
        logger.error("configuration error: %s", exc)
        sys.exit(2)
    asyncio.run(app.run())

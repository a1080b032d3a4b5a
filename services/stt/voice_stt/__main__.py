"""Entry point of the STT worker: ``python -m voice_stt``."""

from __future__ import annotations

import asyncio
import logging
import sys

from voice_runtime.app import WorkerApp
from voice_runtime.config import ConfigError
from voice_stt import server
from voice_stt.config import Settings
from voice_stt.engine import FasterWhisperEngine
from voice_stt.handler import TranscribeHandler
from voice_telemetry.logs import setup_logging

logger = logging.getLogger("voice_stt")


def build_app(settings: Settings) -> WorkerApp:
    """Wires the faster-whisper engine to the bus worker and the gRPC server."""
    engine = FasterWhisperEngine(
        model=settings.model,
        device=settings.device,
        compute_type=settings.compute_type,
        cpu_threads=settings.cpu_threads,
        num_workers=settings.worker.concurrency,
        beam_size=settings.beam_size,
    )
    handler = TranscribeHandler(engine)
    return WorkerApp(
        service="stt",
        settings=settings.worker,
        load=engine.load,
        handler=handler,
        add_servicer=lambda grpc_server: server.add_to_server(grpc_server, handler),
        grpc_service_names=[server.SERVICE_NAME],
    )


def main() -> None:
    setup_logging()
    try:
        settings = Settings.from_env()
        app = build_app(settings)
    except (ConfigError, ValueError) as exc:
        logger.error("configuration error: %s", exc)
        sys.exit(2)
    logger.info("STT worker: model %s on %s (%s)", settings.model, settings.device, settings.compute_type)
    asyncio.run(app.run())


if __name__ == "__main__":
    main()

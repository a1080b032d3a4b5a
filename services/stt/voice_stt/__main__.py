"""Entry point of the STT worker: ``python -m voice_stt``."""

from __future__ import annotations

import logging

from voice_runtime.app import WorkerApp, run_main
from voice_stt import server
from voice_stt.config import Settings
from voice_stt.faster_whisper_engine import FasterWhisperEngine
from voice_stt.handler import TranscribeHandler

logger = logging.getLogger("voice_stt")


def build_app(settings: Settings) -> WorkerApp:
    """Wires the faster-whisper engine to the bus worker and the gRPC server."""
    logger.info("STT worker: model %s on %s (%s)", settings.model, settings.device, settings.compute_type)
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
    run_main(Settings.from_env, build_app)


if __name__ == "__main__":
    main()

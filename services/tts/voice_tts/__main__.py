"""Entry point of the TTS worker: ``python -m voice_tts``."""

from __future__ import annotations

import logging

from voice_runtime.app import WorkerApp, run_main
from voice_tts import server
from voice_tts.config import Settings
from voice_tts.engine import TextToSpeechEngine
from voice_tts.handler import SynthesizeHandler

logger = logging.getLogger("voice_tts")


def build_engine(settings: Settings) -> TextToSpeechEngine:
    """The engine ``TTS_ENGINE`` names, configured but not loaded."""
    if settings.engine == "coqui":
        from voice_tts.coqui_engine import CoquiEngine

        return CoquiEngine(settings.voice, device=settings.device, speaker=settings.speaker, language=settings.language)
    from voice_tts.piper_engine import PiperEngine

    return PiperEngine(
        settings.voice,
        voices_dir=settings.voices_dir,
        use_cuda=settings.device == "cuda",
        cpu_threads=settings.cpu_threads,
    )


def build_app(settings: Settings) -> WorkerApp:
    """Wires the configured engine to the bus worker and the gRPC server."""
    logger.info("TTS worker: %s engine, voice %s", settings.engine, settings.voice)
    engine = build_engine(settings)
    handler = SynthesizeHandler(engine)
    return WorkerApp(
        service="tts",
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

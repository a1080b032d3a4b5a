"""TTS worker settings, read from the environment at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from voice_runtime.config import ConfigError, WorkerSettings, env_int, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the TTS worker reads from its environment.

    Attributes:
        worker: Shared worker settings (NATS_URL, GRPC_PORT, METRICS_PORT, TTS_CONCURRENCY, ...).
        engine: ``TTS_ENGINE``: ``piper`` (CPU default) or ``coqui`` (needs the coqui extra).
        voice: ``TTS_VOICE``: Piper: ``joe`` (embedded) or an ``.onnx`` path; Coqui: a model
            directory (config.json and checkpoint) or a locally cached model name.
        voices_dir: ``TTS_VOICES_DIR``: extra Piper voices (``*.onnx``), named by file stem.
        device: ``TTS_DEVICE``: ``cpu`` or ``cuda``.
        speaker: ``TTS_SPEAKER``: default speaker of a multi-speaker Coqui model (XTTS-v2).
        language: ``TTS_LANGUAGE``: default language of a multilingual Coqui model.
        cpu_threads: ``TTS_CPU_THREADS``: Piper's ONNX threads per synthesis on CPU; 0 lets onnxruntime
            choose (one per core).
    """

    worker: WorkerSettings
    engine: str
    voice: str
    voices_dir: str | None
    device: str
    speaker: str | None
    language: str | None
    cpu_threads: int = 0

    @classmethod
    def from_env(cls) -> Settings:
        engine = env_str("TTS_ENGINE", "piper", choices=("piper", "coqui"))
        voice = env_str("TTS_VOICE", "joe" if engine == "piper" else "")
        if not voice:
            raise ConfigError("TTS_VOICE is required with TTS_ENGINE=coqui: a model directory or cached model name")
        return cls(
            worker=WorkerSettings.from_env("tts", grpc_port=50053, metrics_port=9103, concurrency=2),
            engine=engine,
            voice=voice,
            voices_dir=env_str("TTS_VOICES_DIR", "") or None,
            device=env_str("TTS_DEVICE", "cpu", choices=("cpu", "cuda")),
            speaker=env_str("TTS_SPEAKER", "") or None,
            language=env_str("TTS_LANGUAGE", "") or None,
            cpu_threads=env_int("TTS_CPU_THREADS", 0, minimum=0, maximum=256),
        )

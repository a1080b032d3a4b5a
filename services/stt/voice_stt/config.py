"""STT worker settings, read from the environment at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from voice_runtime.config import WorkerSettings, env_int, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the STT worker reads from its environment.

    Attributes:
        worker: Shared worker settings (NATS_URL, GRPC_PORT, METRICS_PORT, STT_CONCURRENCY, ...).
        model: ``STT_MODEL``: ``tiny.en`` (embedded) or a mounted CTranslate2 model directory.
        device: ``STT_DEVICE``: ``cpu``, ``cuda`` or ``auto``.
        compute_type: ``STT_COMPUTE_TYPE``: ``int8`` on CPU, ``float16`` on GPU, ...
        beam_size: ``STT_BEAM_SIZE``.
        cpu_threads: ``STT_CPU_THREADS``; 0 lets CTranslate2 choose.
    """

    worker: WorkerSettings
    model: str
    device: str
    compute_type: str
    beam_size: int
    cpu_threads: int

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            worker=WorkerSettings.from_env("stt", grpc_port=50051, metrics_port=9101, concurrency=1),
            model=env_str("STT_MODEL", "tiny.en"),
            device=env_str("STT_DEVICE", "cpu", choices=("cpu", "cuda", "auto")),
            compute_type=env_str(
                "STT_COMPUTE_TYPE",
                "int8",
                choices=(
                    "default",
                    "auto",
                    "int8",
                    "int8_float16",
                    "int8_float32",
                    "int8_bfloat16",
                    "int16",
                    "float16",
                    "bfloat16",
                    "float32",
                ),
            ),
            beam_size=env_int("STT_BEAM_SIZE", 1, minimum=1, maximum=10),
            cpu_threads=env_int("STT_CPU_THREADS", 0, minimum=0, maximum=256),
        )

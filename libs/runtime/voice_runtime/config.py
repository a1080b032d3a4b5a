"""Reading settings from the environment, failing fast with a message that names the variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nats.js.api import StorageType

from voice_bus.connection import MAX_REPLICAS


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and why."""


def env_str(name: str, default: str | None = None, *, choices: tuple[str, ...] | None = None) -> str:
    """Returns ``$name`` (stripped) or ``default``; raises ConfigError when required and absent."""
    value = os.environ.get(name, "").strip() or default
    if value is None:
        raise ConfigError(f"{name} is required")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Returns ``$name`` as an integer within ``[minimum, maximum]``, or ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value}: must be at most {maximum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    """Returns ``$name`` as a float no smaller than ``minimum``, or ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value}: must be at least {minimum}")
    return value


@dataclass(frozen=True)
class StreamSettings:
    """How a process declares the JetStream streams and KV buckets it uses.

    Attributes:
        replicas: ``NATS_STREAM_REPLICAS``: replicas of every stream and KV bucket, 1 to 5 (default 1;
            more needs a NATS cluster of at least that many servers). An existing stream with another
            count is changed in place.
        work_storage: ``NATS_WORK_STORAGE``: ``memory`` (default) or ``file``, the storage of the work
            streams when they are created; an existing stream keeps its own.
    """

    replicas: int = 1
    work_storage: StorageType = StorageType.MEMORY

    @classmethod
    def from_env(cls) -> StreamSettings:
        """Reads ``NATS_STREAM_REPLICAS`` and ``NATS_WORK_STORAGE``; raises ConfigError when malformed."""
        return cls(
            replicas=env_int("NATS_STREAM_REPLICAS", 1, minimum=1, maximum=MAX_REPLICAS),
            work_storage=StorageType(env_str("NATS_WORK_STORAGE", "memory", choices=("memory", "file"))),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Settings every worker process shares.

    Attributes:
        nats_url: ``NATS_URL``.
        grpc_port: ``GRPC_PORT``; 0 picks a free port.
        metrics_port: ``METRICS_PORT``; 0 disables the metrics endpoint.
        concurrency: ``<SERVICE>_CONCURRENCY``: requests run at once (bus slots).
        drain_grace_s: ``DRAIN_GRACE_SECONDS``: how long SIGTERM waits for in-flight work.
        streams: ``NATS_STREAM_REPLICAS`` and ``NATS_WORK_STORAGE`` (see :class:`StreamSettings`).
    """

    nats_url: str
    grpc_port: int
    metrics_port: int
    concurrency: int
    drain_grace_s: float
    streams: StreamSettings = field(default_factory=StreamSettings)

    @classmethod
    def from_env(cls, service: str, *, grpc_port: int, metrics_port: int, concurrency: int = 1) -> WorkerSettings:
        """Reads the shared settings; the defaults are the service's own ports."""
        return cls(
            nats_url=env_str("NATS_URL", "nats://127.0.0.1:4222"),
            grpc_port=env_int("GRPC_PORT", grpc_port, minimum=0, maximum=65535),
            metrics_port=env_int("METRICS_PORT", metrics_port, minimum=0, maximum=65535),
            concurrency=env_int(f"{service.upper()}_CONCURRENCY", concurrency, minimum=1, maximum=256),
            drain_grace_s=env_float("DRAIN_GRACE_SECONDS", 60.0, minimum=0.0),
            streams=StreamSettings.from_env(),
        )

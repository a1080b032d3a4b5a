"""LLM worker settings, read from the environment at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from voice_llm.openai_engine import DEFAULT_CONNECT_TIMEOUT_S
from voice_runtime.config import ConfigError, WorkerSettings, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the LLM worker reads from its environment.

    Attributes:
        worker: Shared worker settings (NATS_URL, GRPC_PORT, METRICS_PORT, LLM_CONCURRENCY, ...).
        base_url: ``LLM_BASE_URL``: root of the OpenAI-compatible API (``.../v1``).
        model: ``LLM_MODEL``: default model when a request names none.
        api_key: ``LLM_API_KEY``: bearer token (local servers accept anything).
        max_tokens: ``LLM_MAX_TOKENS``: cap applied when a request asks for none.
        request_timeout_s: ``LLM_TIMEOUT_SECONDS``: longest wait for the backend's answer to start, and
            between its streamed chunks.
        connect_timeout_s: ``LLM_CONNECT_TIMEOUT_SECONDS``: longest wait to connect to the backend, so a
            backend that is gone answers UNAVAILABLE quickly.
        startup_timeout_s: ``LLM_STARTUP_TIMEOUT_SECONDS``: how long start-up waits for the backend.
    """

    worker: WorkerSettings
    base_url: str
    model: str
    api_key: str
    max_tokens: int
    request_timeout_s: float
    startup_timeout_s: float
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Settings:
        base_url = env_str("LLM_BASE_URL", "http://127.0.0.1:8080/v1")
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"LLM_BASE_URL={base_url!r}: expected an http(s) URL such as http://host:8080/v1")
        return cls(
            worker=WorkerSettings.from_env("llm", grpc_port=50052, metrics_port=9102, concurrency=4),
            base_url=base_url,
            model=env_str("LLM_MODEL", "SmolLM2-135M-Instruct"),
            api_key=env_str("LLM_API_KEY", "sk-no-key"),
            max_tokens=env_int("LLM_MAX_TOKENS", 256, minimum=1),
            request_timeout_s=env_float("LLM_TIMEOUT_SECONDS", 60.0, minimum=1.0),
            startup_timeout_s=env_float("LLM_STARTUP_TIMEOUT_SECONDS", 300.0, minimum=0.0),
            connect_timeout_s=env_float("LLM_CONNECT_TIMEOUT_SECONDS", DEFAULT_CONNECT_TIMEOUT_S, minimum=0.1),
        )

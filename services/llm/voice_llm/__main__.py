"""Entry point of the LLM worker: ``python -m voice_llm``."""

from __future__ import annotations

import asyncio
import logging
import time

from voice_llm import server
from voice_llm.config import Settings
from voice_llm.handler import GenerateHandler
from voice_llm.openai_engine import OpenAIChatEngine
from voice_runtime.app import WorkerApp, run_main

logger = logging.getLogger("voice_llm")


def build_app(settings: Settings) -> WorkerApp:
    """Wires the OpenAI-compatible engine to the bus worker and the gRPC server.

    The worker reports NOT_SERVING until the backend answers ``GET /models``.
    """
    logger.info("LLM worker: %s at %s", settings.model, settings.base_url)
    engine = OpenAIChatEngine(
        base_url=settings.base_url,
        model=settings.model,
        api_key=settings.api_key,
        timeout_s=settings.request_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
    )
    handler = GenerateHandler(engine, default_max_tokens=settings.max_tokens)

    async def wait_for_backend() -> None:
        logger.info("waiting for the LLM backend at %s", settings.base_url)
        give_up = time.monotonic() + settings.startup_timeout_s
        while not await engine.ready():
            if time.monotonic() > give_up:
                raise TimeoutError(
                    f"LLM backend at {settings.base_url} not ready after {settings.startup_timeout_s:.0f}s"
                )
            await asyncio.sleep(0.5)
        logger.info("LLM backend ready")

    return WorkerApp(
        service="llm",
        settings=settings.worker,
        load=wait_for_backend,
        handler=handler,
        add_servicer=lambda grpc_server: server.add_to_server(grpc_server, handler),
        grpc_service_names=[server.SERVICE_NAME],
        start=engine.start,
        close=engine.close,
    )


def main() -> None:
    run_main(Settings.from_env, build_app)


if __name__ == "__main__":
    main()

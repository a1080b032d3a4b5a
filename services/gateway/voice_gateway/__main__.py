"""Entry point of the gateway: ``python -m voice_gateway``.

SIGTERM drains before uvicorn shuts down: ``/readyz`` turns 503 and new sockets are refused, the
turns in flight finish (up to ``GATEWAY_DRAIN_TIMEOUT_SECONDS``), then every socket is closed with
1012 (service restart) and its session saved as ``handed_off`` for another gateway to resume; then
uvicorn gets ``GATEWAY_DRAIN_TIMEOUT_SECONDS`` again to finish what is left. A second signal skips
what is left of the drain. ``GATEWAY_MAX_CALL_SECONDS`` bounds how long a call lasts, so a preStop
hook that waits longer than it (the Helm chart's) lets every call end before SIGTERM.

Start-up fails (exit 2) on a bad setting or a missing model of the end-of-turn detector, naming the
package that ships it.
"""

from __future__ import annotations

import os

# The end-of-turn model runs on one thread per decision; numpy's BLAS must not wake a second pool of
# spinning threads beside it on every call (measured: twice the CPU for the same decision).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio
import logging
import math
import sys
from types import FrameType

import uvicorn

from voice_gateway.app import create_app
from voice_gateway.config import Settings
from voice_gateway.conversation.turn_model import ModelMissing, check_models
from voice_runtime.config import ConfigError
from voice_telemetry.logs import setup_logging

logger = logging.getLogger("voice_gateway")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the application's drain run between the first signal and the shutdown."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = getattr(self.config.app.state, "drain", None)
        if self._drain is not None or self._loop is None or drain is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain, drain, sig, frame)

    def _start_drain(self, drain, sig: int, frame: FrameType | None) -> None:
        async def drain_then_exit() -> None:
            try:
                await drain()
            except Exception:
                logger.exception("drain failed; shutting down now")
            super(DrainingServer, self).handle_exit(sig, frame)

        if self._drain is None:
            self._drain = self._loop.create_task(drain_then_exit())


def main() -> None:
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        sys.exit(2)
    try:
        models = check_models()
    except ModelMissing as exc:
        logger.error("missing model: %s", exc)
        sys.exit(2)
    logger.info("turn detection models: %s", ", ".join(f"{name} {path}" for name, path in models.items()))
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=4 * settings.max_message_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        log_config=None,
        # After the drain closed the sockets: what is left (HTTP requests, the lifespan's shutdown).
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
    )
    DrainingServer(config).run()


if __name__ == "__main__":
    main()

"""Entry point of the gateway: ``python -m voice_gateway``."""

from __future__ import annotations

import logging
import sys

import uvicorn

from voice_gateway.app import create_app
from voice_gateway.config import Settings
from voice_runtime.config import ConfigError
from voice_telemetry.logs import setup_logging

logger = logging.getLogger("voice_gateway")


def main() -> None:
    setup_logging()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        sys.exit(2)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=4 * settings.max_message_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()

"""Connecting to NATS and declaring the JetStream work streams and consumers, idempotently."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from nats.aio.client import Client as NatsClient
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from voice_bus.catalog import SERVICES, ServiceSpec

logger = logging.getLogger(__name__)

# A worker marks its message in progress every ACK_WAIT_S / 3; a worker that dies stops doing so
# and its message goes to another worker after ACK_WAIT_S.
ACK_WAIT_S = 6.0
MAX_DELIVER = 3
# Work nobody picked up within this long is dropped by the stream (its deadline has long passed).
WORK_MAX_AGE_S = 300.0
# nats-server runs with max_payload 8 MB; one request is capped below it.
MAX_REQUEST_BYTES = 8 * 1024 * 1024 - 64 * 1024


async def connect(url: str, *, name: str, connect_timeout_s: float = 30.0) -> NatsClient:
    """Connects to NATS, retrying until ``connect_timeout_s`` so services may start before the server.

    Args:
        url: One or more comma-separated ``nats://`` URLs.
        name: Connection name shown in the server's monitoring.
        connect_timeout_s: Give up (raising the last error) after this long.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    client = NatsClient()

    async def on_disconnect() -> None:
        if not (client.is_closed or client.is_draining):
            logger.warning("NATS disconnected")

    give_up = time.monotonic() + connect_timeout_s
    delay = 0.2
    while True:
        try:
            await client.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=_log_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=_log_reconnect,
            )
            return client
        except Exception as exc:
            if time.monotonic() + delay > give_up:
                raise ConnectionError(f"cannot reach NATS at {url}: {exc}") from exc
            logger.info("NATS at %s not reachable yet (%s); retrying", url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _log_error(exc: Exception) -> None:
    logger.warning("NATS error: %s", exc)


async def _log_reconnect() -> None:
    logger.info("NATS reconnected")


def stream_config(spec: ServiceSpec, *, storage: StorageType, replicas: int) -> StreamConfig:
    """The work-queue stream of one service."""
    return StreamConfig(
        name=spec.stream,
        subjects=[spec.subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=storage,
        num_replicas=replicas,
        max_age=WORK_MAX_AGE_S,
        max_msg_size=MAX_REQUEST_BYTES,
        discard=DiscardPolicy.OLD,
    )


def consumer_config(spec: ServiceSpec) -> ConsumerConfig:
    """The durable pull consumer every worker of one service shares."""
    return ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        filter_subject=spec.subject,
        max_ack_pending=10_000,
    )


async def ensure_streams(
    nc: NatsClient,
    services: Iterable[str] = tuple(SERVICES),
    *,
    storage: StorageType = StorageType.MEMORY,
    replicas: int = 1,
) -> None:
    """Creates, or brings up to date, the work streams and durable consumers of ``services``.

    Safe to call from every process at every start: existing streams are updated in place.
    """
    js = nc.jetstream()
    for name in services:
        spec = SERVICES[name]
        config = stream_config(spec, storage=storage, replicas=replicas)
        try:
            info = await js.stream_info(spec.stream)
        except NotFoundError:
            await js.add_stream(config)
            logger.info("created stream %s", spec.stream)
        else:
            if info.config.storage != storage:
                logger.warning(
                    "stream %s keeps its %s storage (asked for %s); delete it to change",
                    spec.stream,
                    info.config.storage,
                    storage,
                )
                config.storage = info.config.storage
            await js.update_stream(config)
        try:
            await js.add_consumer(spec.stream, consumer_config(spec))
        except BadRequestError as exc:
            logger.warning("consumer %s kept as it is: %s", spec.durable, exc.description)

"""Connecting to NATS and declaring JetStream streams, consumers and KV buckets, idempotently.

Every declaration creates what is missing and brings what exists up to date (a different replica
count is changed in place), so it is safe at every start of every process and again whenever NATS
lost its streams: a nats-server restarted with an empty store (memory storage, a new volume) has
none, and :func:`is_missing` recognises the errors that say so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Iterable

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from voice_bus.catalog import SERVICES, ServiceSpec, service_spec

logger = logging.getLogger(__name__)

# A worker marks its message in progress every ACK_WAIT_S / 3; a worker that dies stops doing so
# and its message goes to another worker after ACK_WAIT_S.
ACK_WAIT_S = 6.0
MAX_DELIVER = 3
# Work nobody picked up within this long is dropped by the stream (its deadline has long passed).
WORK_MAX_AGE_S = 300.0
# nats-server runs with max_payload 8 MB; one request is capped below it.
MAX_REQUEST_BYTES = 8 * 1024 * 1024 - 64 * 1024
# How long a process keeps declaring its streams while a NATS cluster is still forming.
DECLARE_TIMEOUT_S = 60.0
# JetStream allows at most this many replicas of a stream.
MAX_REPLICAS = 5
# How long a declaration waits for a stream it scaled to elect its leader.
SCALE_TIMEOUT_S = 15.0

# JetStream API error codes (nats-server's errors.json) saying that a stream or consumer does not exist.
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014


@dataclasses.dataclass(frozen=True)
class _Declared:
    services: frozenset[str]
    storage: StorageType
    replicas: int


# What each connection declared last, so that a re-declaration after a restart asks for the same.
_declared: weakref.WeakKeyDictionary[NatsClient, _Declared] = weakref.WeakKeyDictionary()
_redeclaring: weakref.WeakKeyDictionary[NatsClient, dict[frozenset[str], asyncio.Future]] = weakref.WeakKeyDictionary()
_reconnect_listeners: weakref.WeakKeyDictionary[NatsClient, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


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

    async def on_reconnect() -> None:
        logger.info("NATS reconnected")
        for listener in list(_reconnect_listeners.get(client, ())):
            try:
                listener()
            except Exception:
                logger.exception("NATS reconnect listener failed")

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
                reconnected_cb=on_reconnect,
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


def add_reconnect_listener(nc: NatsClient, listener: Callable[[], None]) -> Callable[[], None]:
    """Calls ``listener`` each time ``nc`` (made by :func:`connect`) reconnects to NATS.

    The listener runs inside the client's reconnection, so it must return at once (set an event,
    start a task).

    Returns:
        A function that removes the listener.
    """
    listeners = _reconnect_listeners.setdefault(nc, [])
    listeners.append(listener)

    def remove() -> None:
        if listener in listeners:
            listeners.remove(listener)

    return remove


def is_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says that a stream, KV bucket or consumer does not exist.

    That is what NATS answers after it restarted without the streams (memory storage, an empty
    store): publishing finds no stream, API requests name a stream or consumer it does not know.
    """
    if isinstance(exc, (NoStreamResponseError, BucketNotFoundError)):
        return True
    return isinstance(exc, NotFoundError) and exc.err_code in (STREAM_NOT_FOUND, CONSUMER_NOT_FOUND)


def _named(storage: StorageType | None) -> str:
    return storage.value if isinstance(storage, StorageType) else str(storage or "file")


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Creates the stream ``config`` describes, or updates the existing one in place to match it.

    An existing stream keeps its storage (NATS cannot change it; a warning says so); a different
    replica count is applied in place, and logged.

    Args:
        js: A JetStream context.
        config: The wanted configuration; ``num_replicas`` unset means 1.

    Returns:
        The stream's info after the declaration.
    """
    wanted = config.num_replicas or 1
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            info = await js.add_stream(config)
        except BadRequestError as exc:
            # Another process may have created it meanwhile, with other settings: update that one.
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                raise exc from None
        else:
            logger.info("created stream %s (%s storage, %d replica(s))", config.name, _named(config.storage), wanted)
            return info
    if config.storage is not None and info.config.storage != config.storage:
        logger.warning(
            "stream %s keeps its %s storage (asked for %s); delete it to change",
            config.name,
            _named(info.config.storage),
            _named(config.storage),
        )
        config = dataclasses.replace(config, storage=info.config.storage)
    current = info.config.num_replicas or 1
    if current == wanted:
        return await js.update_stream(config)
    logger.warning("stream %s: changing replicas from %d to %d", config.name, current, wanted)
    await js.update_stream(config)
    return await _until_led(js, config.name)


async def ensure_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Opens the KV bucket ``config`` describes, creating it when missing.

    An existing bucket keeps its settings except the replica count, which is changed in place (and
    logged) when it differs from ``config.replicas``.
    """
    wanted = config.replicas or 1
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            kv = await js.create_key_value(config)
        except BadRequestError as exc:
            try:
                kv = await js.key_value(config.bucket)
            except BucketNotFoundError:
                raise exc from None
        else:
            logger.info(
                "created KV bucket %s (%s storage, %d replica(s))", config.bucket, _named(config.storage), wanted
            )
            return kv
    stream = f"KV_{config.bucket}"
    info = await js.stream_info(stream)
    current = info.config.num_replicas or 1
    if current != wanted:
        logger.warning("KV bucket %s: changing replicas from %d to %d", config.bucket, current, wanted)
        await js.update_stream(dataclasses.replace(info.config, num_replicas=wanted))
        await _until_led(js, stream)
    return kv


async def _until_led(js: JetStreamContext, stream: str, timeout_s: float = SCALE_TIMEOUT_S) -> StreamInfo:
    """Waits until a stream whose replica count just changed has a leader again (it answers no
    request until then), up to ``timeout_s``; returns its latest info."""
    give_up = time.monotonic() + timeout_s
    while True:
        info = await js.stream_info(stream)
        if info.cluster is None or info.cluster.leader or time.monotonic() > give_up:
            if info.cluster is not None and not info.cluster.leader:
                logger.warning("stream %s has no leader %.0fs after changing its replicas", stream, timeout_s)
            return info
        await asyncio.sleep(0.1)


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

    Safe to call from every process at every start: existing streams are updated in place (their
    replica count included; their storage stays). The options are remembered for
    :func:`ensure_streams_once`.

    Args:
        nc: A connected NATS client.
        services: Which services' streams (``stt``, ``llm``, ``tts``).
        storage: Storage of a stream that does not exist yet.
        replicas: Replicas of each stream, 1 to 5 (more than 1 needs a NATS cluster).
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1 to {MAX_REPLICAS}, not {replicas}")
    names = list(services)
    before = _declared.get(nc)
    _declared[nc] = _Declared(
        services=frozenset(names) | (before.services if before else frozenset()), storage=storage, replicas=replicas
    )
    js = nc.jetstream()
    for name in names:
        spec = SERVICES[name]
        await _retrying(lambda spec=spec: ensure_stream(js, stream_config(spec, storage=storage, replicas=replicas)))
        try:
            await _retrying(lambda spec=spec: js.add_consumer(spec.stream, consumer_config(spec)))
        except BadRequestError as exc:
            logger.warning("consumer %s kept as it is: %s", spec.durable, exc.description)


async def _retrying(declare, timeout_s: float = DECLARE_TIMEOUT_S):
    """Runs a JetStream declaration again while the cluster cannot answer it yet (no meta leader
    elected, a replicated stream still forming under load: the API times out or nobody responds)."""
    give_up = time.monotonic() + timeout_s
    delay = 0.25
    while True:
        try:
            return await declare()
        except (NatsTimeoutError, NoRespondersError, ServiceUnavailableError) as exc:
            if time.monotonic() + delay > give_up:
                raise
            logger.info("JetStream not ready for a declaration (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_streams_once(nc: NatsClient, services: Iterable[str] | None = None) -> None:
    """Declares the work streams again, with the options ``nc`` last declared them with.

    For a process that finds a stream gone (NATS restarted with an empty store). Concurrent callers
    asking for the same services share one declaration.

    Args:
        nc: A connected NATS client.
        services: Which services' streams; default: every service ``nc`` declared, else all.
    """
    declared = _declared.get(nc) or _Declared(frozenset(SERVICES), StorageType.MEMORY, 1)
    wanted = frozenset(services) if services is not None else declared.services
    pending = _redeclaring.setdefault(nc, {})
    future = pending.get(wanted)
    if future is None:
        future = asyncio.ensure_future(
            ensure_streams(nc, sorted(wanted), storage=declared.storage, replicas=declared.replicas)
        )
        pending[wanted] = future
        future.add_done_callback(lambda done: _declared_again(pending, wanted, done))
    await asyncio.shield(future)


def _declared_again(
    pending: dict[frozenset[str], asyncio.Future], services: frozenset[str], done: asyncio.Future
) -> None:
    pending.pop(services, None)
    if not done.cancelled() and (error := done.exception()) is not None:
        logger.warning("declaring the streams of %s again failed: %s", ", ".join(sorted(services)), error)


async def publish_work(nc: NatsClient, service: str, payload: bytes, *, headers: dict[str, str]) -> PubAck:
    """Publishes one request to ``service``'s work stream, declaring the stream again if it is gone.

    Args:
        nc: A connected NATS client.
        service: ``stt``, ``llm`` or ``tts``.
        payload: The serialized request.
        headers: The request's headers.

    Returns:
        JetStream's acknowledgement (its ``seq`` locates the stored message).
    """
    spec = service_spec(service)
    js = nc.jetstream()
    try:
        return await js.publish(spec.subject, payload, headers=headers, stream=spec.stream)
    except Exception as exc:
        if not is_missing(exc):
            raise
        logger.warning("stream %s is missing (%s); declaring it again", spec.stream, type(exc).__name__)
    await ensure_streams_once(nc, [service])
    return await js.publish(spec.subject, payload, headers=headers, stream=spec.stream)

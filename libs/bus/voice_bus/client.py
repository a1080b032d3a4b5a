"""The client side of the bus: send one request to a service and iterate over its streamed events.

``async for event in bus.stream("llm", request, timeout=30):`` publishes the request to the
service's JetStream work queue and yields the events a worker streams back to a private inbox, in
order, until the final one. Failures arrive as :class:`BusError` with a code.

If the worker running a request dies, JetStream hands the request to another worker (after the
consumer's AckWait); the client keeps waiting, drops the events the new delivery repeats (as many as
it had already yielded) and goes on from there, so the caller sees every event once. If replies are
lost instead (this client moved to another NATS node, a gap in their numbering shows it) or the
worker goes silent, the client publishes the request again, up to ``MAX_PUBLICATIONS`` times, and
skips in the same way. Workers make a request's output reproducible for that (the LLM worker seeds
sampling from the request id).

Every process that sends requests (the gateway, ``voicectl``) exposes ``voice_bus_client_*``
metrics: requests in flight and finished by service and outcome, and the time to the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError
from prometheus_client import Counter, Gauge, Histogram

from voice.v1 import events_pb2
from voice_bus.catalog import (
    HEADER_DEADLINE,
    HEADER_REPLY,
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    cancel_subject,
    service_spec,
)
from voice_bus.connection import MAX_REQUEST_BYTES, publish_work
from voice_bus.errors import DEADLINE_EXCEEDED, INVALID_ARGUMENT, UNAVAILABLE, BusError
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import inject_context

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# A running worker sends a heartbeat every ACK_WAIT_S / 3 (2 s); silence for this long after it
# started means it died and nobody took the work over.
DEFAULT_STALL_TIMEOUT_S = 15.0
# A positive answer to the presence probe is trusted this long.
PRESENCE_TTL_S = 2.0
# Times one request may be published: again after its replies were lost (NATS failover) or its
# worker went silent.
MAX_PUBLICATIONS = 3

CLIENT_REQUESTS = Counter(
    "voice_bus_client_requests_total",
    "Requests this process sent on the bus, by service and outcome (ok, abandoned, or an error code)",
    ["service", "outcome"],
)
CLIENT_RESENT = Counter(
    "voice_bus_client_resent_total",
    "Requests sent again because their replies were lost (NATS failover) or their worker went silent",
    ["service"],
)
CLIENT_IN_FLIGHT = Gauge("voice_bus_client_in_flight", "Requests this process waits on, by service", ["service"])
CLIENT_FIRST_EVENT = Histogram(
    "voice_bus_client_time_to_first_event_seconds",
    "From sending a request to its first event (queueing, bus and the worker's own time to first result)",
    ["service"],
    buckets=LATENCY_BUCKETS_S,
)


class BusClient:
    """Sends requests to the workers and streams their replies back.

    Args:
        nc: A connected NATS client (see :func:`voice_bus.connection.connect`).
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._presence_seen: dict[str, float] = {}

    @property
    def nc(self) -> NatsClient:
        return self._nc

    async def workers_present(self, service: str) -> bool:
        """Whether at least one worker of ``service`` answers its presence subject."""
        spec = service_spec(service)
        seen = self._presence_seen.get(service, 0.0)
        if time.monotonic() - seen < PRESENCE_TTL_S:
            return True
        try:
            await self._nc.request(spec.presence_subject, b"", timeout=1.0)
        except (NoRespondersError, NatsTimeoutError):
            return False
        self._presence_seen[service] = time.monotonic()
        return True

    async def _still_served(self, service: str) -> bool:
        """Whether sending a request again can help: some worker answers presence, or NATS is in the
        middle of a failover and cannot say (then it is worth the try)."""
        try:
            return await self.workers_present(service)
        except Exception:
            return True

    async def cancel(self, request_id: str) -> None:
        """Asks whichever worker runs ``request_id`` to stop it (fire and forget)."""
        await self._nc.publish(cancel_subject(request_id), b"")

    async def stream(
        self,
        service: str,
        request: Message,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        session_id: str = "",
    ) -> AsyncIterator[Message]:
        """Sends ``request`` to ``service`` and yields its events until the final one.

        The request's ``request_id`` field is filled in when empty. Leaving the loop early (break,
        cancellation of the consuming task, an exception) cancels the request on the workers.

        Args:
            service: ``stt``, ``llm`` or ``tts``.
            request: The service's request message.
            timeout: Whole-request budget in seconds; it becomes the ``Voice-Deadline`` header, so
                work still queued when it expires is answered DEADLINE_EXCEEDED, never run.
            stall_timeout: Longest silence tolerated from a worker that has started the request.
            session_id: The caller's session, for logs and traces.

        Raises:
            BusError: UNAVAILABLE when no worker runs or the one running it died mid-stream,
                DEADLINE_EXCEEDED when ``timeout`` passes, or the error a worker answered.
        """
        final_field = service_spec(service).final_field
        outcome = "abandoned"
        started = time.perf_counter()
        first = True
        CLIENT_IN_FLIGHT.labels(service).inc()
        try:
            events = self._stream(service, request, timeout=timeout, stall_timeout=stall_timeout, session_id=session_id)
            async with contextlib.aclosing(events):
                async for event in events:
                    if first:
                        first = False
                        CLIENT_FIRST_EVENT.labels(service).observe(time.perf_counter() - started)
                    if event.WhichOneof("event") == final_field:
                        outcome = "ok"
                    yield event
        except BusError as exc:
            outcome = exc.code_name.lower()
            raise
        except Exception:
            outcome = "internal"
            raise
        finally:
            CLIENT_IN_FLIGHT.labels(service).dec()
            CLIENT_REQUESTS.labels(service, outcome).inc()

    async def _stream(
        self, service: str, request: Message, *, timeout: float, stall_timeout: float, session_id: str
    ) -> AsyncIterator[Message]:
        spec = service_spec(service)
        if not isinstance(request, spec.request_type):
            raise TypeError(f"{service} takes {spec.request_type.__name__}, not {type(request).__name__}")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        request_id = request.request_id
        payload = request.SerializeToString()
        if len(payload) > MAX_REQUEST_BYTES:
            raise BusError(INVALID_ARGUMENT, f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
        if not await self.workers_present(service):
            raise BusError(UNAVAILABLE, f"no {service} worker is running (nobody answers {spec.presence_subject})")

        deadline = time.monotonic() + timeout
        deadline_epoch_ms = int((time.time() + timeout) * 1000)
        yielded = 0
        finished = False
        published = None
        subscription = None
        try:
            for publication in range(1, MAX_PUBLICATIONS + 1):
                replies: asyncio.Queue[Msg] = asyncio.Queue()
                inbox = self._nc.new_inbox()
                subscription = await self._nc.subscribe(inbox, cb=_enqueue(replies))
                headers = {
                    HEADER_REPLY: inbox,
                    HEADER_REQUEST_ID: request_id,
                    HEADER_DEADLINE: str(deadline_epoch_ms),
                }
                if session_id:
                    headers[HEADER_SESSION_ID] = session_id
                inject_context(headers)
                published = await self._publish(service, payload, headers, deadline)
                try:
                    async for event, final in self._replies(
                        spec, replies, request_id, deadline, timeout, stall_timeout, skip=yielded
                    ):
                        if final:
                            finished = True
                        yielded += 1
                        yield event
                        if finished:
                            return
                except _RepliesLost as lost:
                    if (
                        publication == MAX_PUBLICATIONS
                        or time.monotonic() >= deadline
                        or not await self._still_served(service)
                    ):
                        raise BusError(UNAVAILABLE, f"{service} request {request_id}: {lost}") from None
                    logger.warning(
                        "%s request %s: %s; sending it again (%d event(s) received so far)",
                        service,
                        request_id,
                        lost,
                        yielded,
                    )
                    CLIENT_RESENT.labels(service).inc()
                    await subscription.unsubscribe()
                    subscription = None
                    with contextlib.suppress(Exception):
                        await self._js.delete_msg(spec.stream, published.seq)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            if not finished:
                await _shielded(self._abandon(request_id, spec.stream, published.seq if published else None))

    async def _publish(self, service: str, payload: bytes, headers: dict[str, str], deadline: float):
        """Publishes to the work stream, retrying what a NATS failover makes transient (no responders
        while a stream elects its leader, a timeout while the connection moves to another node)."""
        delay = 0.1
        while True:
            try:
                return await publish_work(self._nc, service, payload, headers=headers)
            except (
                NoRespondersError,
                NatsTimeoutError,
                TimeoutError,
                ConnectionClosedError,
                ServiceUnavailableError,
            ) as exc:
                if time.monotonic() + delay >= deadline:
                    raise BusError(UNAVAILABLE, f"cannot queue the {service} request: {type(exc).__name__}") from exc
                logger.info("queueing a %s request failed (%s); retrying", service, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _replies(
        self,
        spec,
        replies: asyncio.Queue[Msg],
        request_id: str,
        deadline: float,
        timeout: float,
        stall_timeout: float,
        *,
        skip: int,
    ) -> AsyncIterator[tuple[Message, bool]]:
        """One publication's events, in order, as ``(event, final)``, less the first ``skip`` non-final
        ones (what an earlier publication already yielded).

        JetStream redeliveries of the message (its worker died) restart the numbering: the events
        they repeat are skipped too. A gap in the numbering (replies lost while this client
        reconnected to another NATS node) or a worker silent past its heartbeats raises
        :class:`_RepliesLost`.
        """
        attempt = 0
        next_seq = 0
        delivered = 0
        to_skip = skip
        started = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError(DEADLINE_EXCEEDED, f"{spec.name} request {request_id} exceeded {timeout:.1f}s")
            wait = min(remaining, stall_timeout) if started else remaining
            try:
                async with asyncio.timeout(wait):
                    msg = await replies.get()
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue
                raise _RepliesLost(f"the worker went silent for {stall_timeout:.0f}s") from None
            try:
                reply = events_pb2.Reply.FromString(msg.data)
            except DecodeError:
                logger.warning("undecodable reply to %s dropped", request_id)
                continue
            if reply.attempt < attempt:
                continue
            if reply.attempt > attempt:
                if delivered:
                    logger.warning(
                        "%s worker died after %d event(s) of %s; delivery %d takes over from there",
                        spec.name,
                        delivered,
                        request_id,
                        reply.attempt,
                    )
                attempt, next_seq, to_skip = reply.attempt, 0, skip + delivered
            started = True
            if reply.seq != next_seq:
                raise _RepliesLost(f"replies lost ({next_seq} → {reply.seq})")
            next_seq += 1
            body = reply.WhichOneof("body")
            if body == "error":
                raise BusError.from_proto(reply.error)
            if body == "heartbeat":
                continue
            if not reply.final and to_skip:
                to_skip -= 1
                continue
            delivered += 1
            yield getattr(reply, spec.reply_field), reply.final
            if reply.final:
                return

    async def _abandon(self, request_id: str, stream: str, seq: int | None) -> None:
        """Stops a request the caller no longer waits for: the running worker is told to cancel, and
        the stored message is deleted so that no worker starts it, or starts it again, later."""
        await self.cancel(request_id)
        if seq is not None:
            with contextlib.suppress(Exception):
                await self._js.delete_msg(stream, seq)

    async def collect(self, service: str, request: Message, **kwargs) -> list[Message]:
        """Runs :meth:`stream` to the end and returns every event (convenient for final-only callers)."""
        return [event async for event in self.stream(service, request, **kwargs)]


_cleanups: set[asyncio.Task] = set()


async def _shielded(coro) -> None:
    """Runs ``coro`` to the end even if the caller is cancelled meanwhile; the caller's own
    cancellation still propagates (swallowing it would leave the caller running on)."""
    task = asyncio.ensure_future(coro)
    _cleanups.add(task)
    task.add_done_callback(_cleanup_done)
    with contextlib.suppress(Exception):
        await asyncio.shield(task)


class _RepliesLost(Exception):
    """A publication's reply stream broke in a way that sending the request again repairs."""


def _enqueue(queue: asyncio.Queue[Msg]):
    async def on_reply(msg: Msg) -> None:
        queue.put_nowait(msg)

    return on_reply


def _cleanup_done(task: asyncio.Task) -> None:
    _cleanups.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.debug("cancel not sent: %s", error)

"""The worker side of the bus: pull work from a service's JetStream consumer, one message per free slot.

A :class:`Worker` runs a handler (an async generator from a request message to event messages) for
each message. It fetches only while it has a free slot, so with ``concurrency`` N it never holds
more than N unacknowledged messages and the consumer's backlog is the true queue. While a handler
runs, the worker marks the message in progress and sends heartbeats to the client; it acks the
message once the final event is out. A message whose ``Voice-Deadline`` has passed is answered
DEADLINE_EXCEEDED without running the handler; ``voice.cancel.<request_id>`` stops a request. One that
JetStream gave up delivering is answered and deleted (:mod:`voice_bus.dead_letters`).

A worker outlives NATS restarts: every ``LAG_INTERVAL_S``, and at once after a reconnection, it
looks at its consumer; when the stream or consumer is gone (a restart with an empty store) it
declares them again and binds a fresh pull subscription, without a restart of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StorageType
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from voice.v1 import events_pb2
from voice_bus.catalog import (
    CANCEL_PREFIX,
    HEADER_DEADLINE,
    HEADER_REPLY,
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    ServiceSpec,
    service_spec,
)
from voice_bus.connection import ACK_WAIT_S, add_reconnect_listener, ensure_streams, is_missing
from voice_bus.dead_letters import watch_dead_letters
from voice_bus.errors import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    BusError,
    code_name,
)
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import extract_context

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_bus")

HEARTBEAT_INTERVAL_S = ACK_WAIT_S / 3
FETCH_TIMEOUT_S = 2.0
RECENT_CANCELS = 4096

LAG_INTERVAL_S = 2.0

# Outcomes of a request (``voice_worker_requests_total``); all but these two count as errors.
NOT_ERRORS = frozenset({"ok", "cancelled"})

WORK_REQUESTS = Counter(
    "voice_worker_requests_total",
    "Requests finished by this worker, by front door (bus, grpc) and outcome",
    ["service", "transport", "outcome"],
)
WORK_ERRORS = Counter(
    "voice_worker_errors_total",
    "Failed requests by kind (deadline_exceeded, invalid_argument, unavailable, internal) and bus fetch failures",
    ["service", "transport", "kind"],
)
WORK_IN_FLIGHT = Gauge(
    "voice_worker_in_flight", "Requests running in this worker, by front door (bus, grpc)", ["service", "transport"]
)
WORK_SLOTS = Gauge("voice_worker_slots", "Concurrency slots of this worker (0 while it drains)", ["service"])
WORK_QUEUE_WAIT = Histogram(
    "voice_worker_queue_wait_seconds",
    "From the request's publication to a worker picking it up",
    ["service"],
    buckets=LATENCY_BUCKETS_S,
)
WORK_DURATION = Histogram(
    "voice_worker_request_duration_seconds",
    "Time a worker spent on one request, by front door (bus, grpc)",
    ["service", "transport"],
    buckets=LATENCY_BUCKETS_S,
)
CONSUMER_PENDING = Gauge(
    "voice_worker_consumer_pending",
    "Messages waiting in the service's work queue, not yet taken by any worker (consumer lag)",
    ["service"],
)
CONSUMER_ACK_PENDING = Gauge(
    "voice_worker_consumer_ack_pending",
    "Messages taken by the service's workers and not yet acknowledged (work in progress, all workers)",
    ["service"],
)
CONSUMER_REDELIVERED = Gauge(
    "voice_worker_consumer_redelivered",
    "Unacknowledged messages of the service's consumer that were delivered more than once",
    ["service"],
)


def record_outcome(service: str, transport: str, outcome: str) -> None:
    """Counts one finished request, and an error unless the outcome is ``ok`` or ``cancelled``.

    Args:
        service: ``stt``, ``llm`` or ``tts``.
        transport: The front door: ``bus`` or ``grpc``.
        outcome: ``ok``, ``cancelled`` or an error code name in lower case (``deadline_exceeded``, …).
    """
    WORK_REQUESTS.labels(service, transport, outcome).inc()
    if outcome not in NOT_ERRORS:
        WORK_ERRORS.labels(service, transport, outcome).inc()


@dataclass
class RequestContext:
    """What a handler knows about the request it runs.

    Attributes:
        request_id: From the ``Voice-Request-Id`` header (or the request message).
        session_id: The caller's session, when it sent one.
        deadline: Epoch seconds after which nobody waits for the answer, or ``None``.
        attempt: JetStream delivery attempt, from 1.
        cancelled: Set when the request is cancelled; engines running in threads poll it.
    """

    request_id: str
    session_id: str = ""
    deadline: float | None = None
    attempt: int = 1
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def should_stop(self) -> bool:
        """Thread-safe poll for blocking engines: true once cancelled or past the deadline."""
        return self.cancelled.is_set() or (self.deadline is not None and time.time() >= self.deadline)


def stopped_error(context: RequestContext) -> BusError:
    """The error for an engine that stopped because its request was cancelled or ran out of time."""
    if context.deadline is not None and time.time() >= context.deadline:
        return BusError(DEADLINE_EXCEEDED, "deadline passed while running")
    return BusError(CANCELLED, "cancelled")


Handler = Callable[[Message, RequestContext], AsyncIterator[Message]]


class _ReplyStream:
    """Numbered replies of one delivery attempt to one inbox."""

    def __init__(self, nc: NatsClient, spec: ServiceSpec, inbox: str, request_id: str, attempt: int) -> None:
        self._nc, self._spec, self._inbox = nc, spec, inbox
        self._request_id, self._attempt = request_id, attempt
        self._seq = 0
        self.closed = False

    async def _send(self, reply: events_pb2.Reply) -> None:
        reply.seq, reply.attempt, reply.request_id = self._seq, self._attempt, self._request_id
        self._seq += 1
        self.closed = reply.final
        await self._nc.publish(self._inbox, reply.SerializeToString())

    async def event(self, event: Message) -> bool:
        final = event.WhichOneof("event") == self._spec.final_field
        reply = events_pb2.Reply(final=final)
        getattr(reply, self._spec.reply_field).CopyFrom(event)
        await self._send(reply)
        return final

    async def heartbeat(self) -> None:
        await self._send(events_pb2.Reply(heartbeat=events_pb2.Heartbeat()))

    async def error(self, code: int, message: str) -> None:
        await self._send(events_pb2.Reply(final=True, error=events_pb2.Error(code=code, message=message)))


class Worker:
    """Consumes one service's work queue and runs a handler per message.

    Args:
        nc: A connected NATS client.
        service: ``stt``, ``llm`` or ``tts``.
        handler: Async generator function ``(request, context) -> events``; it raises
            :class:`BusError` (or ``ValueError`` for bad input) to answer an error.
        concurrency: Slots: how many requests run at once.
        name: Worker name for logs and the presence answer.
        storage: Storage of the work stream when this worker creates it.
        replicas: Replicas of the work stream (more than 1 needs a NATS cluster).

    Attributes:
        max_unacked_seen: Most messages this worker held unacknowledged at once.
        recoveries: How many times it declared its stream and consumer again after NATS lost them.
    """

    def __init__(
        self,
        nc: NatsClient,
        service: str,
        handler: Handler,
        *,
        concurrency: int = 1,
        name: str = "",
        storage: StorageType = StorageType.MEMORY,
        replicas: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._storage = storage
        self._replicas = replicas
        self._nc = nc
        self._js = nc.jetstream()
        self._spec = service_spec(service)
        self._handler = handler
        self._concurrency = concurrency
        self._name = name or f"{service}-worker"
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[str, tuple[asyncio.Task, RequestContext]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._subscriptions: list = []
        self._pull = None
        self._rebind = False
        self._waiting_for_slot = False
        self._check_now = asyncio.Event()
        self._remove_reconnect_listener: Callable[[], None] | None = None
        self.max_unacked_seen = 0
        self.recoveries = 0

    @property
    def in_flight(self) -> int:
        """Messages taken from the queue and not yet acknowledged."""
        return len(self._tasks)

    async def start(self) -> None:
        """Declares the stream and consumer, subscribes to cancels and presence, and starts fetching."""
        await self._declare()
        self._pull = await self._js.pull_subscribe_bind(durable=self._spec.durable, stream=self._spec.stream)
        self._remove_reconnect_listener = add_reconnect_listener(self._nc, self._check_now.set)
        self._subscriptions.append(await self._nc.subscribe(CANCEL_PREFIX + "*", cb=self._on_cancel))
        self._subscriptions.append(await self._nc.subscribe(self._spec.presence_subject, cb=self._on_presence))
        self._subscriptions.append(await watch_dead_letters(self._nc, self._spec))
        WORK_SLOTS.labels(self._spec.name).set(self._concurrency)
        WORK_IN_FLIGHT.labels(self._spec.name, "bus")
        WORK_REQUESTS.labels(self._spec.name, "bus", "ok")
        for kind in ("deadline_exceeded", "invalid_argument", "unavailable", "internal"):
            WORK_ERRORS.labels(self._spec.name, "bus", kind)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name=f"{self._name}-fetch")
        self._lag_task = asyncio.create_task(self._lag_loop(), name=f"{self._name}-lag")
        logger.info("%s consuming %s with %d slot(s)", self._name, self._spec.subject, self._concurrency)

    async def stop(self, grace_s: float = 60.0) -> None:
        """Drains: stops fetching, lets in-flight requests finish (up to ``grace_s``), then returns.

        A request still running after ``grace_s`` is cancelled and handed back to JetStream (a NAK), so
        another worker takes it over at once and its client goes on from the events it already has.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._remove_reconnect_listener:
            self._remove_reconnect_listener()
        WORK_SLOTS.labels(self._spec.name).set(0)
        if self._lag_task:
            self._lag_task.cancel()
            self._check_now.set()
            await asyncio.wait({self._lag_task}, timeout=LAG_INTERVAL_S * 2)
        for sub in self._subscriptions[1:]:
            await sub.unsubscribe()
        while self._loop_task and not self._loop_task.done():
            if self._waiting_for_slot:
                # It holds no message while it waits for a slot, and every slot may be busy for long.
                self._loop_task.cancel()
            await asyncio.wait({self._loop_task}, timeout=0.1)
        if self._tasks:
            logger.info("%s draining %d in-flight request(s)", self._name, len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        await self._subscriptions[0].unsubscribe()
        if self._pull is not None:
            with contextlib.suppress(Exception):
                await self._pull.unsubscribe()
        logger.info("%s stopped", self._name)

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            self._waiting_for_slot = True
            try:
                await self._slots.acquire()
            finally:
                self._waiting_for_slot = False
            if self._stopping.is_set():
                self._slots.release()
                break
            if self._rebind:
                await self._bind_again()
            try:
                messages = await self._pull.fetch(1, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, NatsTimeoutError):
                self._slots.release()
                continue
            except Exception as exc:
                self._slots.release()
                WORK_ERRORS.labels(self._spec.name, "bus", "fetch").inc()
                logger.warning("%s fetch failed: %s", self._name, exc)
                self._check_now.set()
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                task = asyncio.create_task(self._run(msg))
                self._tasks.add(task)
                self.max_unacked_seen = max(self.max_unacked_seen, len(self._tasks))
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _declare(self) -> None:
        await ensure_streams(self._nc, [self._spec.name], storage=self._storage, replicas=self._replicas)

    async def _bind_again(self) -> None:
        """Swaps the pull subscription for a fresh one (the fetch loop calls it between fetches)."""
        try:
            pull = await self._js.pull_subscribe_bind(durable=self._spec.durable, stream=self._spec.stream)
        except Exception as exc:
            logger.warning("%s could not bind its consumer again: %s", self._name, exc)
            return
        old, self._pull, self._rebind = self._pull, pull, False
        with contextlib.suppress(Exception):
            await old.unsubscribe()

    async def _lag_loop(self) -> None:
        """Publishes the consumer's backlog every ``LAG_INTERVAL_S``, busy or idle, and at once after a
        reconnection; the same look at the consumer notices when NATS lost it.

        It ends when the worker stops, not only when cancelled: Python 3.11's ``asyncio.wait_for`` (inside
        every NATS request) returns the answer instead of raising when the cancellation and the answer
        arrive together, so a cancellation alone can be lost.
        """
        while not self._stopping.is_set():
            self._check_now.clear()
            await self._record_lag()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAG_INTERVAL_S):
                    await self._check_now.wait()

    async def _record_lag(self) -> None:
        try:
            info = await self._js.consumer_info(self._spec.stream, self._spec.durable, timeout=LAG_INTERVAL_S)
        except Exception as exc:
            if is_missing(exc) and not self._stopping.is_set():
                await self._recover(exc)
            return
        CONSUMER_PENDING.labels(self._spec.name).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(self._spec.name).set(info.num_ack_pending or 0)
        CONSUMER_REDELIVERED.labels(self._spec.name).set(info.num_redelivered or 0)

    async def _recover(self, cause: Exception) -> None:
        """Declares the stream and consumer again after NATS lost them, and has the fetch loop bind anew."""
        logger.warning(
            "%s: consumer %s of stream %s is gone (%s); declaring them again",
            self._name,
            self._spec.durable,
            self._spec.stream,
            getattr(cause, "description", None) or type(cause).__name__,
        )
        try:
            await self._declare()
        except Exception as exc:
            logger.warning("%s could not declare %s again (%s); will retry", self._name, self._spec.stream, exc)
            return
        self.recoveries += 1
        self._rebind = True
        logger.info("%s consuming %s again", self._name, self._spec.subject)

    async def _on_presence(self, msg: Msg) -> None:
        if msg.reply:
            await msg.respond(
                f'{{"worker":"{self._name}","slots":{self._concurrency},"in_flight":{len(self._tasks)}}}'.encode()
            )

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject[len(CANCEL_PREFIX) :]
        self._recent_cancels[request_id] = None
        while len(self._recent_cancels) > RECENT_CANCELS:
            self._recent_cancels.popitem(last=False)
        running = self._running.get(request_id)
        if running:
            task, context = running
            context.cancelled.set()
            task.cancel()

    async def _run(self, msg: Msg) -> None:
        headers = msg.headers or {}
        inbox = headers.get(HEADER_REPLY, "")
        request_id = headers.get(HEADER_REQUEST_ID, "")
        try:
            attempt = msg.metadata.num_delivered
            published = msg.metadata.timestamp
        except Exception:
            attempt, published = 1, None
        if published:
            WORK_QUEUE_WAIT.labels(self._spec.name).observe(max(0.0, time.time() - published.timestamp()))
        if not inbox:
            logger.warning("%s dropped a message without %s", self._name, HEADER_REPLY)
            record_outcome(self._spec.name, "bus", "invalid_argument")
            await msg.term()
            return
        replies = _ReplyStream(self._nc, self._spec, inbox, request_id, attempt)
        deadline_ms = headers.get(HEADER_DEADLINE, "")
        deadline = int(deadline_ms) / 1000 if deadline_ms.isdigit() else None
        span_name = f"{self._spec.name}.work"
        with tracer.start_as_current_span(
            span_name, context=extract_context(headers), kind=trace.SpanKind.CONSUMER
        ) as span:
            span.set_attribute("voice.session_id", headers.get(HEADER_SESSION_ID, ""))
            span.set_attribute("voice.request_id", request_id)
            span.set_attribute("messaging.message.delivery_attempt", attempt)
            outcome = await self._answer(msg, replies, request_id, headers, deadline, attempt)
            span.set_attribute("voice.outcome", outcome)
        record_outcome(self._spec.name, "bus", outcome)

    async def _answer(
        self,
        msg: Msg,
        replies: _ReplyStream,
        request_id: str,
        headers: dict,
        deadline: float | None,
        attempt: int,
    ) -> str:
        if deadline is not None and time.time() >= deadline:
            await replies.error(
                DEADLINE_EXCEEDED, f"deadline passed {time.time() - deadline:.3f}s before the work started"
            )
            await msg.ack()
            return "deadline_exceeded"
        if request_id in self._recent_cancels:
            await replies.error(CANCELLED, "cancelled before it started")
            await msg.ack()
            return "cancelled"
        try:
            request = self._spec.request_type.FromString(msg.data)
        except DecodeError as exc:
            await replies.error(INVALID_ARGUMENT, f"undecodable {self._spec.request_type.__name__}: {exc}")
            await msg.ack()
            return "invalid_argument"
        context = RequestContext(
            request_id=request_id or getattr(request, "request_id", ""),
            session_id=headers.get(HEADER_SESSION_ID, "") or getattr(request, "session_id", ""),
            deadline=deadline,
            attempt=attempt,
        )
        task = asyncio.current_task()
        self._running[context.request_id] = (task, context)
        keepalive = asyncio.create_task(self._keepalive(msg, replies))
        started = time.monotonic()
        requeue = False
        WORK_IN_FLIGHT.labels(self._spec.name, "bus").inc()
        try:
            await replies.heartbeat()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            async with asyncio.timeout(timeout), contextlib.aclosing(self._handler(request, context)) as events:
                async for event in events:
                    if await replies.event(event):
                        break
            if not replies.closed:
                await replies.error(INTERNAL, f"{self._spec.name} handler ended without a final event")
                return "internal"
            return "ok"
        except asyncio.CancelledError:
            if not context.cancelled.is_set():
                requeue = True
                raise
            await replies.error(CANCELLED, "cancelled")
            return "cancelled"
        except TimeoutError:
            context.cancelled.set()
            await replies.error(DEADLINE_EXCEEDED, "deadline passed while running")
            return "deadline_exceeded"
        except BusError as exc:
            await replies.error(exc.code, exc.message)
            return code_name(exc.code).lower()
        except ValueError as exc:
            await replies.error(INVALID_ARGUMENT, str(exc) or type(exc).__name__)
            return "invalid_argument"
        except Exception as exc:
            logger.exception("%s failed on %s", self._name, context.request_id)
            await replies.error(INTERNAL, f"{type(exc).__name__}: {exc}")
            return "internal"
        finally:
            context.cancelled.set()
            keepalive.cancel()
            self._running.pop(context.request_id, None)
            WORK_IN_FLIGHT.labels(self._spec.name, "bus").dec()
            WORK_DURATION.labels(self._spec.name, "bus").observe(time.monotonic() - started)
            with contextlib.suppress(Exception):
                await (msg.nak() if requeue else msg.ack())

    async def _keepalive(self, msg: Msg, replies: _ReplyStream) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()
                if not replies.closed:
                    await replies.heartbeat()

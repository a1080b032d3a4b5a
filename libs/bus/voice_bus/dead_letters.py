"""Work that ran out of deliveries: answered and removed, not left in the stream.

JetStream stops delivering a message once ``MAX_DELIVER`` deliveries went unacknowledged (each worker
that took it died, or lost it before running it), and a work-queue stream keeps such a message until
it ages out: its client would wait for an answer nobody will send until its own timeouts, and the stream
would show work that no worker will ever take. NATS announces each such message with an advisory; the
workers of a service listen to their consumer's advisories in one queue group, and the one that gets it
answers the client ``UNAVAILABLE`` and deletes the message.
"""

from __future__ import annotations

import contextlib
import json
import logging

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from voice.v1 import events_pb2
from voice_bus.catalog import HEADER_REPLY, HEADER_REQUEST_ID, ServiceSpec
from voice_bus.errors import UNAVAILABLE

logger = logging.getLogger(__name__)

MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"

DEAD_LETTERS = Counter(
    "voice_worker_dead_letters_total",
    "Work messages given up after every delivery went unacknowledged: answered UNAVAILABLE and deleted",
    ["service"],
)


async def watch_dead_letters(nc: NatsClient, spec: ServiceSpec) -> Subscription:
    """Subscribes to the max-deliveries advisories of ``spec``'s consumer, in the service's queue group.

    Args:
        nc: A connected NATS client.
        spec: The service whose work stream and consumer to watch.

    Returns:
        The subscription; unsubscribe it when the worker stops.
    """
    DEAD_LETTERS.labels(spec.name)

    async def on_advisory(advisory: Msg) -> None:
        await bury(nc, spec, advisory.data)

    subject = MAX_DELIVERIES_ADVISORY.format(stream=spec.stream, durable=spec.durable)
    return await nc.subscribe(subject, queue=f"{spec.durable}-dead-letters", cb=on_advisory)


async def bury(nc: NatsClient, spec: ServiceSpec, advisory: bytes) -> bool:
    """Answers and deletes the message one max-deliveries advisory names.

    Args:
        nc: A connected NATS client.
        spec: The service whose stream holds the message.
        advisory: The advisory's JSON body (``stream_seq``, ``deliveries``).

    Returns:
        True when the message was still there and is now answered and deleted.
    """
    try:
        event = json.loads(advisory)
        seq = int(event["stream_seq"])
        deliveries = int(event.get("deliveries", 0))
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable max-deliveries advisory for %s: %r", spec.name, advisory[:200])
        return False
    js = nc.jetstream()
    try:
        stored = await js.get_msg(spec.stream, seq)
    except Exception:
        return False
    headers = stored.headers or {}
    inbox = headers.get(HEADER_REPLY, "")
    request_id = headers.get(HEADER_REQUEST_ID, "")
    logger.warning(
        "%s request %s (message %d) went unacknowledged in %d deliveries; answering UNAVAILABLE and deleting it",
        spec.name,
        request_id or "?",
        seq,
        deliveries,
    )
    DEAD_LETTERS.labels(spec.name).inc()
    if inbox:
        # A delivery number past every real one: the client takes it as the newest, numbered from 0.
        reply = events_pb2.Reply(
            final=True,
            seq=0,
            attempt=deliveries + 1,
            request_id=request_id,
            error=events_pb2.Error(
                code=UNAVAILABLE, message=f"{spec.name} request went unanswered in {deliveries} deliveries"
            ),
        )
        with contextlib.suppress(Exception):
            await nc.publish(inbox, reply.SerializeToString())
    with contextlib.suppress(Exception):
        await js.delete_msg(spec.stream, seq)
    return True

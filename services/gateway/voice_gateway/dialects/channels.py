"""Channel pub/sub (seed 002) at ``/ws/channels``, and at ``/ws`` for a client whose first message is a
channel message (:mod:`voice_gateway.dialects.router`): dashboards follow a session's live status.

``{"channel": "subscription", "payload": {"action": "subscribe" | "unsubscribe", "channel": name}}``
subscribes a connection to a channel (acknowledged with ``action`` ``subscribed`` /
``unsubscribed``); ``{"channel": name, "payload": {...}}`` publishes to every subscriber. Errors come
back as ``{"channel": "error", "payload": {"error": …}}`` and the connection goes on; so does a
message over ``GATEWAY_MAX_FRAME_BYTES``.

There are two kinds of channel, on two NATS subject namespaces, so that subscribers on every gateway
replica receive what any of them publishes and no client can write into a session:

- **Free channels** (any name that is not a session's id): seed 002 as it is. What a client publishes
  goes on ``voice.events.<name>`` (:func:`~voice_bus.catalog.events_subject`) to every subscriber of
  the name; subscribing needs nothing.
- **A session's channel** (named after its session id) carries the session's turn statuses
  (``message``, ``timestamp``, ``status``, ``type``, ``final_message``, ``message_id``,
  ``thread_id``, ``error_details``), published by the gateway alone (``SessionStatus``) on
  ``voice.status.<id>`` (:func:`~voice_bus.catalog.status_subject`). It is **read-only** for clients:
  a publish to a channel that is a known session (its call log exists) is refused with an error
  saying so, and a publish to any other name goes on the free namespace, which no status subscriber
  listens to. **Following it needs proof** in the subscribe payload, ``"token": …``: a channel token
  the gateway issued for that channel (``channel_token`` of ``POST /api/calls/trigger``,
  ``POST /api/channels/token`` for API-key holders, ``channelToken`` of the browser's
  ``init_success``; see :class:`~voice_gateway.api.auth.ChannelTokens`) or one of
  ``GATEWAY_API_KEYS`` (also accepted as ``"api_key"``). A subscribe with proof follows the session's
  statuses, and only them; a wrong, expired or other channel's proof is refused with an error. A
  subscribe without proof to a known session is refused with an error; one to a name that is not (yet)
  a session subscribes to the free channel, and if a session of that id then publishes a status,
  the subscriber gets one error saying the statuses need proof, never the statuses.

``GATEWAY_OPEN_CHANNELS=true`` restores the old open behaviour for legacy deployments (off by
default and in the Helm chart): a subscribe without proof follows a session's statuses too (and, on a
name that is not yet a session, the free channel until the first status arrives). Publishing into a
session stays refused.

The gateway's other limits answer an error and close: 1013 when the gateway is full, 1008 past the
message rate, or when nothing went either way for ``GATEWAY_IDLE_TIMEOUT_SECONDS``: no frame from the
client and no message delivered to it. A subscriber that is receiving messages stays open however
long it only listens; one whose channels are quiet for that long is closed (WebSocket pings do not
count: they never reach the application), so a client that wants to wait longer sends something
(a repeated subscribe is harmless and acknowledged, with no proof needed again for a session's
channel this connection already follows) or reconnects and resubscribes.

Session statuses are published by :class:`~voice_gateway.dialects.channel_status.SessionStatus`, an
observer every session gets: it turns the session's neutral turn events into seed 002's status
payloads, with their English texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from starlette.websockets import WebSocket

from voice_bus.catalog import events_subject, status_subject
from voice_gateway.api.auth import Authenticator, ChannelTokens
from voice_gateway.api.limits import ConnectionGuard, Limits
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.dialects.base import Connection, Route

logger = logging.getLogger(__name__)

DIALECT = "channels"
CHANNEL = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Names the protocol itself uses for control messages; no one may publish or subscribe to them.
RESERVED = frozenset({"subscription", "error"})
MAX_SUBSCRIPTIONS = 100
# Where a subscribe payload carries its proof: a channel token or an API key (either field takes either).
PROOF_FIELDS = ("token", "api_key")
NEEDS_PROOF = (
    'send "token" in the subscribe payload: a channel token for it from the gateway (POST /api/calls/trigger, '
    "POST /api/channels/token, the browser's init_success) or an API key"
)

# How a subscription follows its channel.
FREE = "free"  # the free channel; a session's first status (if one appears) gets one error instead
STATUS = "status"  # the session's statuses only (proof given, or a known session on an open gateway)
OPEN = "open"  # GATEWAY_OPEN_CHANNELS, a name not yet a session: the free channel until its first status, then those


def _message(channel: str, payload: dict) -> str:
    return json.dumps({"channel": channel, "payload": payload})


@dataclass(frozen=True)
class ChannelAccess:
    """What decides who may follow a session's channel.

    Attributes:
        calls: The call-log store (``get(id)``): a channel with a call log is a session's. ``None``
            knows no session (every name looks free; statuses still need proof).
        authenticator: Accepts ``GATEWAY_API_KEYS`` as proof; ``None`` accepts no key.
        tokens: Checks channel tokens; ``None`` accepts no token.
        open_channels: ``GATEWAY_OPEN_CHANNELS``: sessions' statuses need no proof.
    """

    calls: Any = None
    authenticator: Authenticator | None = None
    tokens: ChannelTokens | None = None
    open_channels: bool = False

    async def is_session(self, channel: str) -> bool:
        """Whether ``channel`` is a known session's id. A store that cannot answer says no: the answer only
        decides which error a client gets, never whether a session's statuses reach it."""
        if self.calls is None:
            return False
        try:
            return await self.calls.get(channel) is not None
        except Exception:
            logger.warning("channels: could not look up call log %r", channel, exc_info=True)
            return False

    def check_proof(self, proof: object, channel: str) -> tuple[bool, str]:
        """``(True, "")`` when ``proof`` (an API key or a channel token) gives the right to ``channel``."""
        if not isinstance(proof, str) or not proof:
            return False, "the token must be a non-empty string"
        if self.authenticator is not None and self.authenticator.check_api_key(proof)[0]:
            return True, ""
        if proof.count(".") == 1 and self.tokens is not None:
            return self.tokens.check(proof, channel)
        return False, f"invalid token: neither a channel token for {channel!r} nor an API key"


@dataclass
class _Subscription:
    """One channel of a connection: its NATS subscriptions on the free and the status subject."""

    mode: str
    free: Any = None
    status: Any = None
    # Whether a session of this id has published a status since: from then on the free channel's messages
    # are not delivered (the name is the session's); FREE: the error was sent.
    session_seen: bool = False

    async def unsubscribe(self) -> None:
        free, status, self.free, self.status = self.free, self.status, None, None
        for subscription in (free, status):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()


class ChannelConnection(Connection):
    """One WebSocket bridged to NATS subjects.

    Args:
        websocket: The accepted socket.
        nc: The NATS connection.
        guard: The connection's limits.
        access: Who may follow which session's statuses; by default no session is known and no proof
            is accepted.
    """

    dialect = DIALECT
    OBJECT_EXPECTED = 'a message is {"channel": name, "payload": {...}}'

    def __init__(self, websocket: WebSocket, nc, guard: ConnectionGuard, access: ChannelAccess | None = None) -> None:
        super().__init__(websocket, guard)
        self._nc = nc
        self._access = access or ChannelAccess()
        self._subscriptions: dict[str, _Subscription] = {}
        # Channels known to be sessions' (a call log never goes away while a client could care).
        self._sessions: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str:
        return _message("error", {"error": message})

    async def send(self, channel: str, payload: dict) -> None:
        await self.send_text(_message(channel, payload))

    async def finished(self) -> None:
        for channel in list(self._subscriptions):
            await self._drop(channel)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def on_message(self, message: dict) -> None:
        if not isinstance(message.get("payload"), dict):
            await self.error(self.OBJECT_EXPECTED)
            return
        channel, payload = message.get("channel"), message["payload"]
        if channel == "subscription":
            await self._subscription(payload)
        elif isinstance(channel, str) and CHANNEL.fullmatch(channel) and channel not in RESERVED:
            await self._publish(channel, payload)
        else:
            await self.error("channel names are 1-128 letters, digits, '-' or '_', and not 'error'")

    async def _is_session(self, channel: str) -> bool:
        if channel in self._sessions:
            return True
        if await self._access.is_session(channel):
            self._sessions.add(channel)
            return True
        return False

    async def _publish(self, channel: str, payload: dict) -> None:
        if await self._is_session(channel):
            await self.error(
                f"cannot publish to {channel!r}: it is a session's channel, read-only for clients "
                "(only the gateway publishes its statuses); publish on a channel name of your own"
            )
            return
        await self._nc.publish(events_subject(channel), json.dumps(payload).encode())

    async def _subscription(self, payload: dict) -> None:
        action, channel = payload.get("action"), payload.get("channel")
        if not isinstance(channel, str) or not CHANNEL.fullmatch(channel) or channel in RESERVED:
            await self.error(
                f"subscription: cannot {action} {channel!r}: channel names are 1-128 letters, digits, '-' or '_', "
                "and not 'subscription' or 'error'"
            )
            return
        if action == "subscribe":
            await self._subscribe(channel, payload)
        elif action == "unsubscribe":
            await self._drop(channel)
            await self.send("subscription", {"action": "unsubscribed", "channel": channel})
        else:
            await self.error("subscription: action must be 'subscribe' or 'unsubscribe'")

    async def _mode(self, channel: str, payload: dict) -> str | None:
        """How a subscribe may follow ``channel``; ``None`` after answering a refusal with an error."""
        proof = next((payload[name] for name in PROOF_FIELDS if payload.get(name) is not None), None)
        current = self._subscriptions.get(channel)
        if proof is None and current is not None and current.mode == STATUS:
            return STATUS  # proven on this connection already: a repeated subscribe only keeps it
        if proof is not None:
            ok, reason = self._access.check_proof(proof, channel)
            if not ok:
                await self.error(f"subscription: cannot subscribe to {channel!r}: {reason}")
                return None
            return STATUS
        if await self._is_session(channel):
            if self._access.open_channels:
                return STATUS
            await self.error(
                f"subscription: cannot subscribe to {channel!r}: it is a session's channel, whose statuses "
                f"need proof: {NEEDS_PROOF}"
            )
            return None
        return OPEN if self._access.open_channels else FREE

    async def _subscribe(self, channel: str, payload: dict) -> None:
        mode = await self._mode(channel, payload)
        if mode is None:
            return
        current = self._subscriptions.get(channel)
        if current is None or current.mode != mode:
            if current is None and len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                await self.error(f"subscription: at most {MAX_SUBSCRIPTIONS} channels per connection")
                return
            await self._drop(channel)
            subscription = _Subscription(mode)
            self._subscriptions[channel] = subscription
            if mode in (FREE, OPEN):
                subscription.free = await self._nc.subscribe(
                    events_subject(channel), cb=self._free(channel, subscription)
                )
            subscription.status = await self._nc.subscribe(
                status_subject(channel), cb=self._status(channel, subscription)
            )
            await self._nc.flush()
        await self.send("subscription", {"action": "subscribed", "channel": channel})

    def _free(self, channel: str, subscription: _Subscription):
        async def forward(msg: Msg) -> None:
            if subscription.session_seen:
                return
            await self._deliver(channel, msg)

        return forward

    def _status(self, channel: str, subscription: _Subscription):
        async def forward(msg: Msg) -> None:
            if subscription.mode == FREE:
                if not subscription.session_seen:
                    subscription.session_seen = True
                    self._sessions.add(channel)
                    await self.error(
                        f"{channel!r} is now a session's channel: its statuses are not sent to this subscription; "
                        f"{NEEDS_PROOF}"
                    )
                    self._spawn(self._stop_watching(subscription))
                return
            subscription.session_seen = True
            await self._deliver(channel, msg)

        return forward

    async def _deliver(self, channel: str, msg: Msg) -> None:
        try:
            data = parse_json(msg.data)
        except InvalidJson:
            return
        if isinstance(data, dict):
            await self.send(channel, data)
            self.guard.activity()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_watching(self, subscription: _Subscription) -> None:
        """Ends a free subscription's watch on the session's statuses (outside the NATS callback, which an
        unsubscribe from inside would cancel)."""
        watch, subscription.status = subscription.status, None
        if watch is not None:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _drop(self, channel: str) -> None:
        subscription = self._subscriptions.pop(channel, None)
        if subscription is not None:
            await subscription.unsubscribe()


def route(websocket: WebSocket, nc, access: ChannelAccess | None = None) -> Route:
    """How to serve ``websocket`` as a channels connection (here, or on ``/ws`` after its first message)."""
    return Route(ChannelConnection, lambda guard: ChannelConnection(websocket, nc, guard, access), handshake=False)


async def serve_channels(websocket: WebSocket, nc, limits: Limits, access: ChannelAccess | None = None) -> None:
    """Accepts and serves one channels connection; a full gateway answers an error and closes 1013."""
    await route(websocket, nc, access).serve(websocket, limits)

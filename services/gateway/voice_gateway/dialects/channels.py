"""Channel pub/sub (seed 002) at ``/ws/channels``: dashboards follow a session's live status.

``{"channel": "subscription", "payload": {"action": "subscribe" | "unsubscribe", "channel": name}}``
subscribes a connection to a channel (acknowledged with ``action`` ``subscribed`` /
``unsubscribed``); ``{"channel": name, "payload": {...}}`` publishes to every subscriber. A channel
is the NATS subject ``voice.events.<name>``, so subscribers on every gateway replica receive what
any of them publishes, and every session publishes its turns' status payloads (``message``,
``timestamp``, ``status``, ``type``, ``final_message``, ``message_id``, ``thread_id``,
``error_details``) on the channel named after its session id. Errors come back as
``{"channel": "error", "payload": {"error": …}}`` and the connection goes on; so does a message over
``GATEWAY_MAX_FRAME_BYTES``. The gateway's other limits answer an error and close: 1013 when the
gateway is full, 1008 past the message rate, or when a connection without subscriptions sends
nothing for the idle timeout (a subscriber that only listens is kept; WebSocket pings check it).

Session statuses are published by :class:`SessionStatus`, an observer every session gets: it turns the
session's neutral turn events into seed 002's status payloads, with their English texts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid

from nats.aio.msg import Msg
from starlette.websockets import WebSocket

from voice_bus.catalog import events_subject
from voice_gateway.api.limits import ConnectionGuard, Limits
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.conversation.events import (
    Event,
    FallbackUsed,
    LlmCompleted,
    LlmDelta,
    StageStarted,
    ToolCalled,
    ToolFinished,
    TurnFailed,
)
from voice_gateway.conversation.session import Session
from voice_gateway.dialects.base import Connection, serve

logger = logging.getLogger(__name__)

DIALECT = "channels"
CHANNEL = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Names the protocol itself uses for control messages; no one may publish or subscribe to them.
RESERVED = frozenset({"subscription", "error"})
MAX_SUBSCRIPTIONS = 100


def _message(channel: str, payload: dict) -> str:
    return json.dumps({"channel": channel, "payload": payload})


class ChannelConnection(Connection):
    """One WebSocket bridged to NATS subjects."""

    dialect = DIALECT
    OBJECT_EXPECTED = 'a message is {"channel": name, "payload": {...}}'

    def __init__(self, websocket: WebSocket, nc, guard: ConnectionGuard) -> None:
        super().__init__(websocket, guard)
        self._nc = nc
        self._subscriptions: dict[str, object] = {}

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str:
        return _message("error", {"error": message})

    async def send(self, channel: str, payload: dict) -> None:
        await self.send_text(_message(channel, payload))

    async def finished(self) -> None:
        for subscription in self._subscriptions.values():
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def on_message(self, message: dict) -> None:
        if not isinstance(message.get("payload"), dict):
            await self.error(self.OBJECT_EXPECTED)
            return
        channel, payload = message.get("channel"), message["payload"]
        if channel == "subscription":
            await self._subscription(payload)
        elif isinstance(channel, str) and CHANNEL.fullmatch(channel) and channel not in RESERVED:
            await self._nc.publish(events_subject(channel), json.dumps(payload).encode())
        else:
            await self.error("channel names are 1-128 letters, digits, '-' or '_', and not 'error'")

    async def _subscription(self, payload: dict) -> None:
        action, channel = payload.get("action"), payload.get("channel")
        if not isinstance(channel, str) or not CHANNEL.fullmatch(channel) or channel in RESERVED:
            await self.error(
                f"subscription: cannot {action} {channel!r}: channel names are 1-128 letters, digits, '-' or '_', "
                "and not 'subscription' or 'error'"
            )
            return
        if action == "subscribe":
            if channel not in self._subscriptions:
                if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                    await self.error(f"subscription: at most {MAX_SUBSCRIPTIONS} channels per connection")
                    return

                async def forward(msg: Msg, name: str = channel) -> None:
                    try:
                        data = parse_json(msg.data)
                    except InvalidJson:
                        return
                    if isinstance(data, dict):
                        await self.send(name, data)

                self._subscriptions[channel] = await self._nc.subscribe(events_subject(channel), cb=forward)
                self.guard.listening = True
                await self._nc.flush()
            await self.send("subscription", {"action": "subscribed", "channel": channel})
        elif action == "unsubscribe":
            subscription = self._subscriptions.pop(channel, None)
            if subscription is not None:
                await subscription.unsubscribe()
            self.guard.listening = bool(self._subscriptions)
            await self.send("subscription", {"action": "unsubscribed", "channel": channel})
        else:
            await self.error("subscription: action must be 'subscribe' or 'unsubscribe'")


class SessionStatus:
    """Publishes a session's turns as seed 002 status payloads on the channel named after its id, where
    ``/ws/channels`` subscribers and any observer on any gateway replica receive them.

    Args:
        nc: The NATS connection to publish on.
        session: The session to follow.
    """

    def __init__(self, nc, session: Session) -> None:
        self._nc = nc
        self._subject = events_subject(session.id)
        self._session_id = session.id
        self._message_id = uuid.uuid4().hex
        # False before the first token of an answer, True after it, None for the fallback message.
        self._responding: bool | None = False

    async def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted) and event.kind == "llm_start":
            self._message_id = uuid.uuid4().hex
            self._responding = False
            await self._publish("Assistant is processing your request...", "started", "status")
        elif isinstance(event, LlmDelta):
            if self._responding is None:
                return
            if not self._responding:
                self._responding = True
                await self._publish("Assistant is responding...", "responding", "status")
            await self._publish(event.full_text, "in_progress", "response")
        elif isinstance(event, LlmCompleted):
            await self._publish(event.text, "completed", "response", final=True)
        elif isinstance(event, ToolCalled):
            await self._publish(f"Executing {event.name}...", "processing", "tool")
        elif isinstance(event, ToolFinished):
            if event.successful:
                await self._publish(f"{event.name} finished", "completed", "tool")
            else:
                await self._publish(f"{event.name} failed", "error", "tool", error_details=event.content)
        elif isinstance(event, FallbackUsed):
            self._responding = None
            await self._publish(event.error, "error", "error", error_details=event.details)
        elif isinstance(event, TurnFailed) and event.code != "NO_SPEECH":
            await self._publish(event.error, "error", "error", error_details=event.details or event.error)

    async def _publish(
        self, message: str, status: str, type_: str, *, final: bool = False, error_details: str | None = None
    ) -> None:
        payload = {
            "message": message,
            "timestamp": time.time(),
            "status": status,
            "type": type_,
            "final_message": final,
            "message_id": self._message_id,
            "thread_id": self._session_id,
        }
        if error_details is not None:
            payload["error_details"] = error_details
        with contextlib.suppress(Exception):
            await self._nc.publish(self._subject, json.dumps(payload).encode())


async def serve_channels(websocket: WebSocket, nc, limits: Limits) -> None:
    """Accepts and serves one channels connection; a full gateway answers an error and closes 1013."""
    await serve(
        websocket, limits, ChannelConnection, lambda guard: ChannelConnection(websocket, nc, guard), handshake=False
    )

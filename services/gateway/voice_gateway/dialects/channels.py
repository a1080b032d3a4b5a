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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

from nats.aio.msg import Msg
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_gateway.call import BAD_FRAMES
from voice_gateway.limits import ConnectionGuard, LimitExceeded, Limits, MessageTooLarge, refuse
from voice_gateway.messages import InvalidJson, parse_json
from voice_gateway.turns import EVENTS_PREFIX

logger = logging.getLogger(__name__)

DIALECT = "channels"
CHANNEL = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Names the protocol itself uses for control messages; no one may publish or subscribe to them.
RESERVED = frozenset({"subscription", "error"})
MAX_SUBSCRIPTIONS = 100


class ChannelConnection:
    """One WebSocket bridged to NATS subjects."""

    def __init__(self, websocket: WebSocket, nc, guard: ConnectionGuard) -> None:
        self._ws = websocket
        self._nc = nc
        self._guard = guard
        self._subscriptions: dict[str, object] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, channel: str, payload: dict) -> None:
        async with self._send_lock:
            if self._ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self._ws.send_text(_message(channel, payload))

    async def error(self, message: str) -> None:
        await self.send("error", {"error": message})

    async def run(self) -> None:
        try:
            while True:
                try:
                    frame = await self._guard.receive()
                except MessageTooLarge as exc:
                    BAD_FRAMES.labels(DIALECT, "oversized_frame").inc()
                    await self.error(exc.reason)
                    continue
                except LimitExceeded as exc:
                    async with self._send_lock:
                        await refuse(self._ws, exc, _message("error", {"error": exc.reason}))
                    break
                except WebSocketDisconnect:
                    break
                if frame["type"] == "websocket.disconnect":
                    break
                await self._handle(frame)
        finally:
            for subscription in self._subscriptions.values():
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _handle(self, frame: dict) -> None:
        if frame.get("bytes") is not None:
            BAD_FRAMES.labels(DIALECT, "binary_frame").inc()
            await self.error("binary frames are not part of this protocol; send JSON text")
            return
        try:
            message = parse_json(frame.get("text") or "")
        except InvalidJson as exc:
            BAD_FRAMES.labels(DIALECT, "invalid_json").inc()
            await self.error(f"invalid JSON: {exc}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("payload"), dict):
            await self.error('a message is {"channel": name, "payload": {...}}')
            return
        channel, payload = message.get("channel"), message["payload"]
        if channel == "subscription":
            await self._subscription(payload)
        elif isinstance(channel, str) and CHANNEL.fullmatch(channel) and channel not in RESERVED:
            await self._nc.publish(EVENTS_PREFIX + channel, json.dumps(payload).encode())
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

                self._subscriptions[channel] = await self._nc.subscribe(EVENTS_PREFIX + channel, cb=forward)
                self._guard.listening = True
                await self._nc.flush()
            await self.send("subscription", {"action": "subscribed", "channel": channel})
        elif action == "unsubscribe":
            subscription = self._subscriptions.pop(channel, None)
            if subscription is not None:
                await subscription.unsubscribe()
            self._guard.listening = bool(self._subscriptions)
            await self.send("subscription", {"action": "unsubscribed", "channel": channel})
        else:
            await self.error("subscription: action must be 'subscribe' or 'unsubscribe'")


def _message(channel: str, payload: dict) -> str:
    return json.dumps({"channel": channel, "payload": payload})


async def serve(websocket: WebSocket, nc, limits: Limits) -> None:
    """Accepts and serves one channels connection; a full gateway answers an error and closes 1013."""
    await websocket.accept()
    try:
        guard = limits.admit(websocket, DIALECT, handshake=False)
    except LimitExceeded as exc:
        await refuse(websocket, exc, _message("error", {"error": exc.reason}))
        return
    async with guard:
        await ChannelConnection(websocket, nc, guard).run()

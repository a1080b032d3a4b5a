"""One socket, two dialects: ``/ws`` serves seed 001's browser clients and seed 002's channel clients alike.

The two are told apart by the socket's first message, read under the gateway's limits like any other:

- ``{"type": …, …}`` (a string ``type``): seed 001, the browser voice protocol
  (:mod:`voice_gateway.dialects.browser`);
- ``{"channel": …, "payload": {...}}``: seed 002, channel pub/sub (:mod:`voice_gateway.dialects.channels`,
  with its rules: a session's channel needs proof to follow and is read-only).

The socket is then handed to that dialect with its first message replayed, and from there on it is that
dialect's in every respect: its frame limit, its handshake (the browser's ``init`` is still due within
``GATEWAY_HANDSHAKE_TIMEOUT_SECONDS`` of connecting; a channel client has only the idle timeout from then
on), its error events, and its label in the metrics and ``/readyz``'s ``by_dialect``. Until then the
socket counts as the browser's (``/ws`` was seed 001's socket first), waits at most the handshake timeout
for a message that fits, and takes frames up to the larger of the two dialects' limits.

A first message that fits neither envelope (invalid JSON, not an object, a binary frame, an object
with neither a string ``type`` nor a ``channel`` with a ``payload`` object) gets an error in the format
of the envelope it most resembles (``{"channel": "error", "payload": {"error": …}}`` when it names
``channel`` or ``payload`` more than ``type`` or ``data``, else ``{"type": "error", "data": {"error": …}}``)
and the socket waits for the next one. A refusal by a limit before the first message (the gateway is
full or draining, the handshake timeout passed, the message rate) is answered as the browser's.
"""

from __future__ import annotations

import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_gateway.api.limits import ConnectionGuard, LimitExceeded, Limits, MessageTooLarge, close_socket, refuse
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.conversation.metrics import BAD_FRAMES
from voice_gateway.dialects.base import BINARY_NOT_ALLOWED, SERVER_ERROR, Route

logger = logging.getLogger(__name__)

BROWSER_KEYS = ("type", "data")
CHANNEL_KEYS = ("channel", "payload")
ENVELOPES = (
    'this socket takes seed 001 messages {"type": "init" | "audio" | "text" | "end", "data": {...}} '
    'or channel messages {"channel": name, "payload": {...}}'
)


def _fits(message: object) -> str | None:
    """``"channels"`` or ``"browser"`` when ``message`` is that dialect's envelope, else ``None``."""
    if not isinstance(message, dict):
        return None
    if "channel" in message and isinstance(message.get("payload"), dict):
        return "channels"
    if isinstance(message.get("type"), str):
        return "browser"
    return None


def _resembles_channels(frame: dict, message: object) -> bool:
    """Whether a frame that fits neither envelope looks more like a channel message than a browser one."""
    if isinstance(message, dict):
        keys = message.keys()
        return sum(k in keys for k in CHANNEL_KEYS) > sum(k in keys for k in BROWSER_KEYS)
    text = frame.get("text") or ""
    return sum(f'"{k}"' in text for k in CHANNEL_KEYS) > sum(f'"{k}"' in text for k in BROWSER_KEYS)


def _read(frame: dict) -> tuple[object, str, str]:
    """The parsed message (``None`` when it is not JSON) and, should it fit no envelope, the bad-frame kind
    and what is wrong with it."""
    if frame.get("bytes") is not None:
        return None, "binary_frame", BINARY_NOT_ALLOWED
    try:
        message = parse_json(frame.get("text") or "")
    except InvalidJson as exc:
        return None, "invalid_json", f"invalid JSON: {exc}; {ENVELOPES}"
    if not isinstance(message, dict):
        return message, "not_an_object", f"a message must be a JSON object: {ENVELOPES}"
    return message, "unknown_envelope", f"neither a 'type' nor a 'channel' with a 'payload' object: {ENVELOPES}"


async def _say(websocket: WebSocket, text: str) -> None:
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await websocket.send_text(text)


async def _first_message(websocket: WebSocket, guard: ConnectionGuard, routes: dict[str, Route]) -> Route | None:
    """Reads frames until one fits a route (replayed to it), answering the others; ``None`` when the socket
    is gone or a limit closed it."""
    default = routes["browser"]
    while True:
        try:
            frame = await guard.receive()
        except MessageTooLarge as exc:
            BAD_FRAMES.labels(guard.dialect, "oversized_frame").inc()
            await _say(websocket, default.connection.error_frame(exc.reason, "too_large"))
            continue
        except LimitExceeded as exc:
            logger.info("%s connection closed before its first message: %s", guard.dialect, exc.reason)
            await refuse(websocket, exc, default.connection.error_frame(exc.reason, "limit"))
            return None
        except WebSocketDisconnect:
            return None
        if frame["type"] == "websocket.disconnect":
            return None
        message, kind, detail = _read(frame)
        name = _fits(message)
        if name is not None:
            guard.replay(frame)
            return routes[name]
        route = routes["channels"] if _resembles_channels(frame, message) else default
        BAD_FRAMES.labels(route.connection.dialect, kind).inc()
        logger.warning("%s: %s first frame ignored", route.connection.dialect, kind)
        await _say(websocket, route.connection.error_frame(detail))


async def serve_first_message(websocket: WebSocket, limits: Limits, *, browser: Route, channels: Route) -> None:
    """Accepts ``websocket``, admits it through ``limits`` and serves it as ``browser`` or ``channels``,
    whichever its first message speaks (see the module's docstring)."""
    if websocket.client_state == WebSocketState.CONNECTING:
        await websocket.accept()
    default_limit = limits.settings.max_frame_bytes
    largest = max(browser.max_frame_bytes or default_limit, channels.max_frame_bytes or default_limit)
    dialect = browser.connection.dialect
    try:
        guard = limits.admit(websocket, dialect, max_frame_bytes=largest, handshake=True)
    except LimitExceeded as exc:
        await refuse(websocket, exc, browser.connection.error_frame(exc.reason, "capacity"))
        return
    async with guard:
        try:
            route = await _first_message(websocket, guard, {"browser": browser, "channels": channels})
        except Exception as exc:
            logger.exception("%s connection failed before its first message", dialect)
            await close_socket(websocket, SERVER_ERROR, f"server error: {type(exc).__name__}")
            return
        if route is None:
            return
        guard.relabel(route.connection.dialect)
        guard.max_frame_bytes = route.max_frame_bytes or default_limit
        if not route.handshake:
            guard.handshake_done()
        await route.make(guard).run()

"""The one dialect seam: a base that owns a WebSocket's loop, and dialects that only translate.

:class:`Connection` receives every frame through the gateway's limits, parses JSON text strictly, counts
and answers bad frames, serialises sends, and closes with the right code; a dialect subclasses it and
maps wire messages to session inputs (:meth:`Connection.on_message`, :meth:`Connection.on_binary`) and
session events to wire messages (the ``emit`` it gives each turn). :func:`serve` accepts a socket, admits
it through the limits (a refusal is answered in the dialect's terms) and runs the connection.

A dialect with an error event (:meth:`Connection.error_frame`) answers bad frames with it and goes on,
and survives a frame over its size limit; one without (carriers, Retell) counts bad frames and skips
them, and closes on an oversized frame with 1009. A limit that is hit closes the socket with its code
after the dialect's error event; a crash in the dialect closes it with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_gateway.api.limits import ConnectionGuard, LimitExceeded, Limits, MessageTooLarge, close_socket, refuse
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.conversation.metrics import BAD_FRAMES, ERRORS

logger = logging.getLogger(__name__)

SERVER_ERROR = 1011
NORMAL = 1000
BINARY_NOT_ALLOWED = "binary frames are not part of this protocol; send JSON text messages"


class Connection:
    """One client socket of one dialect; subclasses translate, this class runs the socket.

    Args:
        websocket: The accepted socket.
        guard: The connection's limits (frame size, rate, timeouts, session slot).
    """

    dialect: ClassVar[str] = ""
    # What a JSON message that is not an object is told (dialects with an error event).
    OBJECT_EXPECTED: ClassVar[str] = "a message must be a JSON object with a 'type'"

    def __init__(self, websocket: WebSocket, guard: ConnectionGuard) -> None:
        self.ws = websocket
        self.guard = guard
        self._send_lock = asyncio.Lock()
        self._close: tuple[int, str] | None = None

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str | None:
        """The dialect's error event carrying ``message``; ``None`` when its protocol has none."""
        return None

    async def send_text(self, text: str) -> None:
        """Sends one text frame, after any send in progress; dropped once the socket is gone."""
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await self.ws.send_text(text)

    async def send_json(self, message: dict) -> None:
        await self.send_text(json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        """Sends one binary frame, after any send in progress; dropped once the socket is gone."""
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await self.ws.send_bytes(data)

    async def error(self, message: str, code: str = "bad_request") -> None:
        """Tells the client ``message`` in the dialect's error event (nothing when it has none)."""
        frame = self.error_frame(message, code)
        if frame is not None:
            await self.send_text(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Ends the loop; the socket is closed with ``code`` and ``reason`` once the dialect has finished."""
        if self._close is None:
            self._close = (code, reason)

    async def bad_frame(self, kind: str, detail: str) -> None:
        """A malformed or unexpected frame: counted, logged, answered with the error event; the connection goes on."""
        BAD_FRAMES.labels(self.dialect, kind).inc()
        logger.warning("%s: %s frame ignored", self.dialect, kind)
        await self.error(detail)

    async def opened(self) -> None:
        """Runs once before the first frame is read."""

    async def on_message(self, message: dict) -> None:
        """Translates one JSON object from the client."""

    async def on_binary(self, data: bytes) -> None:
        """Translates one binary frame; by default a bad frame."""
        await self.bad_frame("binary_frame", BINARY_NOT_ALLOWED)

    async def on_limit(self, error: LimitExceeded) -> None:
        """A limit was hit: the dialect's error event, then the close with the limit's code."""
        await self.error(error.reason, "limit")
        self.close(error.close_code, error.reason)

    async def finished(self) -> None:
        """Runs once after the loop, whatever ended it: close the sessions here."""

    async def handle_frame(self, frame: dict) -> None:
        """Parses one received frame and hands it to the dialect (bad frames are answered here)."""
        if frame.get("bytes") is not None:
            await self.on_binary(frame["bytes"])
            return
        try:
            message = parse_json(frame.get("text") or "")
        except InvalidJson as exc:
            await self.bad_frame("invalid_json", f"invalid JSON: {exc}")
            return
        if not isinstance(message, dict):
            await self.bad_frame("not_an_object", self.OBJECT_EXPECTED)
            return
        await self.on_message(message)

    async def run(self) -> None:
        """Serves the socket until the client leaves, the dialect or a limit closes it, or it crashes."""
        try:
            await self.opened()
            while self._close is None:
                try:
                    frame = await self.guard.receive()
                except MessageTooLarge as exc:
                    if self.error_frame("") is None:
                        logger.warning("%s: %s", self.dialect, exc.reason)
                        self.close(exc.close_code, exc.reason)
                        break
                    BAD_FRAMES.labels(self.dialect, "oversized_frame").inc()
                    await self.error(exc.reason, "too_large")
                    continue
                except LimitExceeded as exc:
                    logger.info("%s connection closed: %s", self.dialect, exc.reason)
                    await self.on_limit(exc)
                    break
                except WebSocketDisconnect:
                    break
                if frame["type"] == "websocket.disconnect":
                    break
                await self.handle_frame(frame)
        except Exception as exc:
            logger.exception("%s connection failed", self.dialect)
            ERRORS.labels(self.dialect, "connection_crashed").inc()
            self.close(SERVER_ERROR, f"server error: {type(exc).__name__}")
        finally:
            await self.finished()
            code, reason = self._close or (NORMAL, "")
            async with self._send_lock:
                await close_socket(self.ws, code, reason)


@dataclass(frozen=True)
class Route:
    """How to serve one dialect on an accepted socket: what :func:`serve` takes, for a socket that several
    dialects share (:mod:`voice_gateway.dialects.router`).

    Attributes:
        connection: The dialect's class (its ``dialect`` label and error event).
        make: Builds the connection on the socket's guard.
        max_frame_bytes: The dialect's frame limit; ``None``: the gateway's.
        handshake: Whether the dialect waits for an opening message (else only the idle timeout applies).
    """

    connection: type[Connection]
    make: Callable[[ConnectionGuard], Connection]
    max_frame_bytes: int | None = None
    handshake: bool = True

    async def serve(self, websocket: WebSocket, limits: Limits) -> None:
        """Serves ``websocket`` as this dialect alone (:func:`serve`)."""
        await serve(
            websocket,
            limits,
            self.connection,
            self.make,
            max_frame_bytes=self.max_frame_bytes,
            handshake=self.handshake,
        )


async def serve(
    websocket: WebSocket,
    limits: Limits,
    connection: type[Connection],
    make: Callable[[ConnectionGuard], Connection],
    *,
    max_frame_bytes: int | None = None,
    handshake: bool = True,
) -> None:
    """Accepts ``websocket`` (unless the dialect already did), admits it through ``limits`` and runs the
    connection ``make`` builds.

    A refusal (the gateway is full or draining) is answered with the dialect's error event, if it has
    one, and the refusal's close code.
    """
    if websocket.client_state == WebSocketState.CONNECTING:
        await websocket.accept()
    try:
        guard = limits.admit(websocket, connection.dialect, max_frame_bytes=max_frame_bytes, handshake=handshake)
    except LimitExceeded as exc:
        await refuse(websocket, exc, connection.error_frame(exc.reason, "capacity"))
        return
    async with guard:
        await make(guard).run()

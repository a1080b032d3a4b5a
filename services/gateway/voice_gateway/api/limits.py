"""Limits every dialect shares: concurrent sessions per gateway and per credential, frame size, message
rate, handshake and idle timeouts.

A dialect asks :meth:`Limits.admit` for a :class:`ConnectionGuard` right after accepting its socket and
reads every frame through :meth:`ConnectionGuard.receive`. A limit that is hit raises
:class:`LimitExceeded`, which carries the limit's name, the close code and a reason; the dialect
answers it in its own protocol (an ``error`` event where it has one) and closes the socket with that
code. :class:`MessageTooLarge` is the one refusal that dialects with an error event may survive: the
message is refused and the connection goes on. Every refusal is counted in
``voice_gateway_limit_refusals_total{dialect, limit}``.

Close codes: 1013 (try again later) for capacity, 1009 for a frame that is too big, 1008 (policy
violation) for the rest, unless the dialect's protocol defines its own (the chat stream's 4401 for a
missing ``authorize``). A gateway that drains before it exits (:meth:`Limits.close_all`) closes its
sockets with 1012 (service restart) and refuses new handshakes
(:class:`~voice_gateway.api.middleware.RefuseWhileDraining`), so clients reconnect elsewhere.

A call that reaches the maximum call length (``GATEWAY_MAX_CALL_SECONDS``) ends the way a limit ends
it, through the dialect's own answer to a limit (its error event, if it has one), with the normal close
1000: a carrier then ends the stream as after the agent's ``end_call`` (Twilio's ``<Connect action>``
answers ``<Hangup/>``). The cap bounds how long a draining gateway waits for its calls (the Helm chart
ties its preStop wait and grace period to it). Channels subscribers observe calls rather than carry
one: the cap does not apply to them (a drain closes them with 1012).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
# A close frame's payload is at most 125 bytes: the 2-byte code and the reason.
MAX_CLOSE_REASON_BYTES = 123

SESSIONS = "sessions"
SESSIONS_PER_KEY = "sessions_per_key"
FRAME_SIZE = "frame_size"
MESSAGE_RATE = "message_rate"
HANDSHAKE = "handshake"
IDLE = "idle"
RESTARTING = "restarting"
MAX_CALL = "max_call"
# Connections that observe sessions rather than carry a call: the maximum call length does not apply.
UNCAPPED_DIALECTS = frozenset({"channels"})
RESTART_REASON = "the gateway is restarting; connect again to continue"

REFUSALS = Counter(
    "voice_gateway_limit_refusals_total",
    "Connections closed or messages refused by a limit, by dialect and limit",
    ["dialect", "limit"],
)
CONNECTIONS = Gauge("voice_gateway_connections", "WebSocket connections open, by dialect", ["dialect"])


class LimitExceeded(Exception):
    """A connection went past a limit.

    Attributes:
        limit: Which one: ``sessions``, ``sessions_per_key``, ``frame_size``, ``message_rate``,
            ``handshake``, ``idle``, ``max_call`` or ``restarting``.
        close_code: The WebSocket close code that answers it.
        reason: What happened, for the client (error event and close reason).
    """

    def __init__(self, limit: str, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.limit = limit
        self.close_code = close_code
        self.reason = reason


class MessageTooLarge(LimitExceeded):
    """One message was over the frame size limit; dialects with an error event refuse it and go on."""

    def __init__(self, size: int, limit_bytes: int) -> None:
        super().__init__(FRAME_SIZE, CLOSE_TOO_BIG, f"message of {size} bytes exceeds the limit of {limit_bytes}")


def close_reason(reason: str) -> str:
    """``reason`` cut to what a close frame can carry (123 bytes of UTF-8), never splitting a character."""
    encoded = reason.encode("utf-8", "replace")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


async def close_socket(websocket: WebSocket, code: int, reason: str = "") -> None:
    """Closes ``websocket`` with ``code`` and ``reason`` (shortened to fit) unless it is already closed."""
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await websocket.close(code=code, reason=close_reason(reason))


def frame_size(frame: dict, limit: int) -> int:
    """Size of a received frame's payload in bytes, exact where it matters for ``limit``.

    A text frame's UTF-8 length is computed only when its character count cannot decide alone (a
    character is 1 to 4 bytes), so large ASCII messages are not encoded again just to be measured.
    """
    data = frame.get("bytes")
    if data is not None:
        return len(data)
    text = frame.get("text") or ""
    if len(text) > limit or len(text) * 4 <= limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


async def refuse(websocket: WebSocket, error: LimitExceeded, notice: str | None = None) -> None:
    """Answers a refusal in the dialect's terms: its error message ``notice`` first (for dialects that have
    one), then the close with the refusal's code and reason."""
    if notice is not None and websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await websocket.send_text(notice)
    await close_socket(websocket, error.close_code, error.reason)


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst`` at once.

    Args:
        rate: Tokens added per second.
        burst: Capacity of the bucket (it starts full).
        clock: Monotonic time source, in seconds.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def take(self) -> bool:
        """Takes one token; False (and nothing taken) when the bucket is empty."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass(frozen=True)
class LimitSettings:
    """The limits' values (``GATEWAY_*`` variables, see :class:`voice_gateway.config.Settings`).

    Attributes:
        max_sessions: Concurrent WebSocket connections of any dialect on this gateway process.
        max_sessions_per_key: Concurrent connections per credential (API key or signed-token subject).
        max_frame_bytes: Largest frame of every dialect but the browser's (which has its own).
        max_messages_per_second: Sustained inbound messages per second on one connection.
        message_burst: Messages one connection may send at once above the sustained rate.
        handshake_timeout_s: Time from connect to the dialect's opening message.
        idle_timeout_s: Longest silence (no inbound frame) once the handshake is done.
        max_call_s: Longest connection (a call), from admission; 0: no cap.
    """

    max_sessions: int = 500
    max_sessions_per_key: int = 100
    max_frame_bytes: int = 1024 * 1024
    max_messages_per_second: float = 200.0
    message_burst: int = 400
    handshake_timeout_s: float = 30.0
    idle_timeout_s: float = 300.0
    max_call_s: float = 0.0


class Limits:
    """This gateway's sessions, counted in total and per credential.

    Args:
        settings: The limits' values.
        clock: Monotonic time source (message rate, handshake deadline).
    """

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._active = 0
        self._per_key: Tally[str] = Tally()
        self._guards: set[ConnectionGuard] = set()
        self.draining = False

    @property
    def active(self) -> int:
        """Connections open now."""
        return self._active

    def by_dialect(self) -> dict[str, int]:
        """Connections open now, per dialect."""
        return dict(Tally(guard.dialect for guard in self._guards))

    def active_for(self, key: str) -> int:
        """Connections open now under credential ``key``."""
        return self._per_key[key]

    def check_key_capacity(self, dialect: str, key: str) -> None:
        """Raises :class:`LimitExceeded` (counted) when ``key`` already has its maximum of sessions."""
        if self._per_key[key] >= self.settings.max_sessions_per_key:
            REFUSALS.labels(dialect, SESSIONS_PER_KEY).inc()
            raise LimitExceeded(
                SESSIONS_PER_KEY,
                CLOSE_TRY_AGAIN_LATER,
                f"this credential already has {self.settings.max_sessions_per_key} sessions open; try again later",
            )

    def admit(
        self, websocket: WebSocket, dialect: str, *, max_frame_bytes: int | None = None, handshake: bool = True
    ) -> ConnectionGuard:
        """A guard holding one of this gateway's session slots for an accepted socket.

        Args:
            websocket: The accepted socket.
            dialect: For metrics and messages.
            max_frame_bytes: The dialect's own frame limit; the gateway's ``max_frame_bytes`` if ``None``.
            handshake: Whether the dialect has an opening message to wait for (else only the idle
                timeout applies from the start).

        Raises:
            LimitExceeded: ``sessions`` (1013) when the gateway is full, ``restarting`` (1012) while it drains.
        """
        if self.draining:
            REFUSALS.labels(dialect, RESTARTING).inc()
            raise LimitExceeded(RESTARTING, CLOSE_SERVICE_RESTART, RESTART_REASON)
        if self._active >= self.settings.max_sessions:
            REFUSALS.labels(dialect, SESSIONS).inc()
            raise LimitExceeded(
                SESSIONS, CLOSE_TRY_AGAIN_LATER, f"the gateway is at its limit of {self.settings.max_sessions} sessions"
            )
        self._active += 1
        CONNECTIONS.labels(dialect).inc()
        guard = ConnectionGuard(
            self,
            websocket,
            dialect,
            max_frame_bytes=max_frame_bytes or self.settings.max_frame_bytes,
            handshake=handshake,
        )
        self._guards.add(guard)
        return guard

    async def close_all(self, timeout_s: float = 5.0) -> int:
        """Closes every open socket with 1012 (service restart) and waits up to ``timeout_s`` for the
        dialects to finish with them; new sockets are refused from now on.

        Returns:
            How many sockets were closed.
        """
        self.draining = True
        guards = list(self._guards)
        for guard in guards:
            REFUSALS.labels(guard.dialect, RESTARTING).inc()
            await close_socket(guard.websocket, CLOSE_SERVICE_RESTART, RESTART_REASON)
        give_up = self.clock() + timeout_s
        while self._guards and self.clock() < give_up:
            await asyncio.sleep(0.05)
        return len(guards)

    def _bind(self, dialect: str, key: str) -> None:
        self.check_key_capacity(dialect, key)
        self._per_key[key] += 1

    def _release(self, guard: ConnectionGuard, key: str | None) -> None:
        self._guards.discard(guard)
        self._active -= 1
        if key is not None:
            self._per_key[key] -= 1
            if self._per_key[key] <= 0:
                del self._per_key[key]


class ConnectionGuard:
    """One connection's session slot and its per-message limits; made by :meth:`Limits.admit`.

    Use it as an async context manager (or call :meth:`release`) so the slot is given back.

    Attributes:
        dialect: For metrics and messages.
        max_frame_bytes: This connection's frame limit.

    The idle timeout counts inbound frames only, unless the dialect also reports what it sends with
    :meth:`activity` (the channels dialect does, for the messages it delivers): then a connection is
    idle only when nothing went either way for the timeout. It does not run while the client waits on
    an answer the dialect reports with :meth:`answering` (the chat stream's turns).
    """

    def __init__(
        self, limits: Limits, websocket: WebSocket, dialect: str, *, max_frame_bytes: int, handshake: bool
    ) -> None:
        self._limits = limits
        self._ws = websocket
        self.dialect = dialect
        self.max_frame_bytes = max_frame_bytes
        settings = limits.settings
        self._bucket = TokenBucket(settings.max_messages_per_second, settings.message_burst, limits.clock)
        self._awaiting_handshake = handshake
        self._handshake_deadline = limits.clock() + settings.handshake_timeout_s
        self._call_deadline = limits.clock() + settings.max_call_s if settings.max_call_s > 0 else None
        self._key: str | None = None
        self._released = False
        self._replayed: dict | None = None
        # The timeout of the receive in progress while it waits on the idle timeout, for activity().
        self._idle_scope: asyncio.Timeout | None = None
        self._answering = False

    @property
    def settings(self) -> LimitSettings:
        """The limits' values."""
        return self._limits.settings

    @property
    def websocket(self) -> WebSocket:
        """The connection's socket."""
        return self._ws

    @property
    def key(self) -> str | None:
        """The credential this connection counts against, once bound."""
        return self._key

    def bind_key(self, key: str) -> None:
        """Counts this connection against credential ``key`` (once; later calls are ignored).

        Raises:
            LimitExceeded: ``sessions_per_key`` (1013) when ``key`` already has its maximum.
        """
        if self._key is not None or self._released:
            return
        self._limits._bind(self.dialect, key)
        self._key = key

    def handshake_done(self) -> None:
        """The dialect's opening message has arrived: from now on only the idle timeout applies."""
        self._awaiting_handshake = False

    def relabel(self, dialect: str) -> None:
        """Counts this connection under ``dialect`` from now on: a socket that several dialects share is
        admitted under one and handed to the dialect its first message speaks (:mod:`voice_gateway.dialects.router`)."""
        if dialect == self.dialect:
            return
        if not self._released:
            CONNECTIONS.labels(self.dialect).dec()
            CONNECTIONS.labels(dialect).inc()
        self.dialect = dialect

    def replay(self, frame: dict) -> None:
        """Makes the next :meth:`receive` return ``frame`` (a frame already received, and counted against the
        message rate, by a router that read it to choose the dialect), checked then against the frame limit."""
        self._replayed = frame

    def activity(self) -> None:
        """The dialect sent the client something it counts as activity: the idle timeout starts again, as if
        a frame had been received. Safe to call from any task of the connection's event loop."""
        scope = self._idle_scope
        if scope is not None and not scope.expired():
            # The scope exists only after the handshake, where the timeout is the idle one (or the call's end).
            wait, _ = self._timeout()
            scope.reschedule(None if wait is None else asyncio.get_running_loop().time() + wait)

    def answering(self, busy: bool) -> None:
        """Whether the client waits on an answer the server is producing (a turn in flight): meanwhile the
        idle timeout does not run (the maximum call length still does), and it starts again when the
        answer ends. Safe to call from any task of the connection's event loop."""
        self._answering = busy
        self.activity()

    def _refuse(self, error: LimitExceeded) -> LimitExceeded:
        REFUSALS.labels(self.dialect, error.limit).inc()
        return error

    def _timeout(self) -> tuple[float | None, LimitExceeded]:
        settings = self._limits.settings
        if self._awaiting_handshake:
            reason = f"no opening message within {settings.handshake_timeout_s:g} s of connecting"
            remaining = max(0.0, self._handshake_deadline - self._limits.clock())
            timeout, error = remaining, LimitExceeded(HANDSHAKE, CLOSE_POLICY_VIOLATION, reason)
        else:
            reason = f"idle: no message for {settings.idle_timeout_s:g} s"
            timeout = None if self._answering else settings.idle_timeout_s
            error = LimitExceeded(IDLE, CLOSE_POLICY_VIOLATION, reason)
        call_left = self.call_time_left()
        if call_left is not None and (timeout is None or call_left <= timeout):
            return call_left, self._max_call()
        return timeout, error

    def call_time_left(self) -> float | None:
        """Seconds until the maximum call length (``None``: no cap, or a channels observer)."""
        if self._call_deadline is None or self.dialect in UNCAPPED_DIALECTS:
            return None
        return max(0.0, self._call_deadline - self._limits.clock())

    def _max_call(self) -> LimitExceeded:
        reason = f"the call reached the maximum call length of {self._limits.settings.max_call_s:g} s"
        return LimitExceeded(MAX_CALL, CLOSE_NORMAL, reason)

    async def receive(self) -> dict:
        """The next ASGI frame of the socket, after the limits' checks.

        Returns:
            The frame (``websocket.receive`` with ``text`` or ``bytes``, or ``websocket.disconnect``).

        Raises:
            MessageTooLarge: The frame is over the frame size limit.
            LimitExceeded: The handshake or idle timeout or the maximum call length passed, or the message
                rate was exceeded.
            WebSocketDisconnect: As ``WebSocket.receive``.
        """
        if self._replayed is not None:
            frame, self._replayed = self._replayed, None
            return self._check_size(frame)
        if self.call_time_left() == 0.0:
            raise self._refuse(self._max_call())
        timeout, on_timeout = self._timeout()
        try:
            async with asyncio.timeout(timeout) as scope:
                if on_timeout.limit == IDLE:
                    self._idle_scope = scope
                try:
                    frame = await self._ws.receive()
                finally:
                    self._idle_scope = None
        except TimeoutError:
            if self.call_time_left() == 0.0:
                raise self._refuse(self._max_call()) from None
            raise self._refuse(on_timeout) from None
        if frame["type"] != "websocket.receive":
            return frame
        if not self._bucket.take():
            settings = self._limits.settings
            raise self._refuse(
                LimitExceeded(
                    MESSAGE_RATE,
                    CLOSE_POLICY_VIOLATION,
                    f"more than {settings.max_messages_per_second:g} messages per second "
                    f"(bursts of {settings.message_burst})",
                )
            )
        return self._check_size(frame)

    def _check_size(self, frame: dict) -> dict:
        size = frame_size(frame, self.max_frame_bytes)
        if size > self.max_frame_bytes:
            raise self._refuse(MessageTooLarge(size, self.max_frame_bytes))
        return frame

    def release(self) -> None:
        """Gives the session slot (and the credential's) back; idempotent."""
        if not self._released:
            self._released = True
            self._limits._release(self, self._key)
            CONNECTIONS.labels(self.dialect).dec()

    async def __aenter__(self) -> ConnectionGuard:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()

"""ASGI middleware in front of every route: refuse WebSocket handshakes while the gateway drains, and
HTTP bodies over the size limit before any endpoint reads them."""

from __future__ import annotations

from voice_gateway.api.limits import CLOSE_SERVICE_RESTART, FRAME_SIZE, REFUSALS, RESTART_REASON, RESTARTING, Limits


class RefuseWhileDraining:
    """ASGI middleware: while the gateway drains, a WebSocket handshake is refused before it completes
    (HTTP 403), so a reconnecting client sees a failed attempt and retries, elsewhere, instead of a
    connection that opens and closes at once.

    Args:
        app: The application.
        limits: The gateway's limits, whose ``draining`` flag it reads.
    """

    def __init__(self, app, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket" and self.limits.draining:
            REFUSALS.labels("websocket", RESTARTING).inc()
            await send({"type": "websocket.close", "code": CLOSE_SERVICE_RESTART, "reason": RESTART_REASON})
            return
        await self.app(scope, receive, send)


class RequestBodyLimit:
    """ASGI middleware: an HTTP request whose body is over ``max_bytes`` is answered 413 before any
    endpoint reads it (the REST API and the Twilio webhooks read whole bodies into memory).

    Args:
        app: The application.
        max_bytes: Largest body accepted.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body"):
                break
        buffered = iter(messages)

        async def replay() -> dict:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        REFUSALS.labels("http", FRAME_SIZE).inc()
        body = f'{{"detail": "request body over {self.max_bytes} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

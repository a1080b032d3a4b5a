"""HTTP hardening in front of every route: the Host a request names, the headers every response
carries, redirects that never echo a client's Host, and a true ``Allow`` on 405 answers.

- **Host.** With ``GATEWAY_ALLOWED_HOSTS`` set, a request (HTTP or WebSocket handshake) naming any
  other ``Host`` is refused: HTTP 400, or a refused handshake. Probes and scrapes (``/healthz``,
  ``/readyz``, ``/metrics``) are exempt, since kubelets and Prometheus name the pod's address.
  Without the setting every syntactically valid host is accepted (a development default; the
  gateway warns about it on a non-loopback address), and a malformed one (quotes, spaces, a path)
  is still refused everywhere.
- **Headers.** Every HTTP response gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options:
  DENY``, ``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy`` allowing only the
  gateway's own scripts, styles and sockets; the page needs no more.
- **Redirects.** A ``Location`` the framework builds from the request's ``Host`` (``/metrics`` →
  ``/metrics/``) is sent relative, so a forged ``Host`` cannot send a client elsewhere.
- **405.** Routes of one path are registered per method, and the framework answers a wrong method
  with the ``Allow`` of the first route only; the header is replaced by every method the path takes.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable

from starlette.routing import BaseRoute, Match

from voice_gateway.api.limits import REFUSALS

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
)
# A host name or IPv4 address, or a bracketed IPv6 address, with an optional port.
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
INVALID_HOST = "invalid Host header"


def host_name(host: str) -> str:
    """``host`` without its port, lower-cased (``[::1]:8000`` → ``[::1]``)."""
    if host.startswith("["):
        return host.split("]", 1)[0].lower() + "]"
    return host.rsplit(":", 1)[0].lower() if ":" in host else host.lower()


def valid_host(host: str) -> bool:
    """Whether ``host`` is a well-formed ``Host`` header value (name or address, optional port)."""
    return bool(_HOST.fullmatch(host))


class HttpSecurity:
    """ASGI middleware applying the rules of the module docstring.

    Args:
        app: The application.
        routes: Returns the application's routes (for the methods a path takes).
        allowed_hosts: Host names (no port) requests may name; empty allows every valid one.
        any_host_paths: Paths served whatever valid host they name (probes and scrapes).
    """

    def __init__(
        self,
        app,
        routes: Callable[[], Iterable[BaseRoute]],
        allowed_hosts: Iterable[str] = (),
        any_host_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self._routes = routes
        self._allowed = frozenset(host.lower() for host in allowed_hosts)
        self._any_host = frozenset(any_host_paths)

    def host_allowed(self, host: str, path: str = "") -> bool:
        """Whether a request naming ``host`` is served at ``path``."""
        if not valid_host(host):
            return False
        return not self._allowed or host_name(host) in self._allowed or path in self._any_host

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
        if not self.host_allowed(host, scope.get("path", "")):
            REFUSALS.labels(scope["type"], "host").inc()
            await self._refuse(scope, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self._headers(scope, message)}
            await send(message)

        await self.app(scope, receive, send_secured)

    def _headers(self, scope, message: dict) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in {k for k, _ in SECURITY_HEADERS}]
        headers += SECURITY_HEADERS
        status = message["status"]
        if 300 <= status < 400:
            headers = [(k, _relative(v) if k.lower() == b"location" else v) for k, v in headers]
        elif status == 405:
            allowed = self._allowed_methods(scope)
            if allowed:
                headers = [(k, v) for k, v in headers if k.lower() != b"allow"]
                headers.append((b"allow", ", ".join(sorted(allowed)).encode()))
        return headers

    def _allowed_methods(self, scope) -> set[str]:
        methods: set[str] = set()
        pending = list(self._routes())
        while pending:
            route = pending.pop()
            included = getattr(route, "original_router", None)
            if included is not None:
                pending.extend(included.routes)
                continue
            route_methods = getattr(route, "methods", None)
            if route_methods and route.matches({**scope, "method": "GET"})[0] != Match.NONE:
                methods |= set(route_methods)
        return methods

    async def _refuse(self, scope, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": INVALID_HOST})
            return
        body = f'{{"detail": "{INVALID_HOST}"}}'.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers + list(SECURITY_HEADERS)})
        await send({"type": "http.response.body", "body": body})


def _relative(location: bytes) -> bytes:
    """An absolute redirect target made relative (path, query and fragment kept)."""
    parts = urllib.parse.urlsplit(location.decode("latin-1"))
    if not parts.scheme and not parts.netloc:
        return location
    relative = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))
    return relative.encode("latin-1")

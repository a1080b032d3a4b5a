"""The HTTP client of webhook tools, which enforces the egress policy (:mod:`voice_gateway.agents.egress`).

- **Pinning**: each request goes to an address the policy checked; the transport never resolves the
  name again, while the URL's host name stays the ``Host`` header, the TLS SNI and the name the
  certificate is verified against. An answer that changes between the check and the connection (DNS
  rebinding) cannot move the request.
- **Redirects** are followed by hand, at most :data:`MAX_REDIRECTS`, each hop checked the same way; the
  tool's own headers go only to the origin of its URL.
- **Bodies** are read up to a cap (decompression included) and the rest is never read.
- No cookies, no proxies from the environment, no unix sockets.
"""

from __future__ import annotations

import codecs
import contextvars
import email.message
import ssl
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from voice_gateway.agents.egress import Destination, EgressError, EgressPolicy, EgressRefused

MAX_REDIRECTS = 3
# Characters of a webhook's body kept for the model; at most four bytes a character are read.
MAX_BODY_CHARS = 4000
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_HEADERS = {"User-Agent": "voice-gateway-webhook", "Accept-Encoding": "gzip, deflate"}

# The destination of the request being sent in this task: (host, port, the checked address to connect to).
_PINNED: contextvars.ContextVar[tuple[str, int, str] | None] = contextvars.ContextVar("egress_pinned", default=None)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to the checked address of the request in flight; never resolves a name itself."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pinned = _PINNED.get()
        if pinned is None or pinned[:2] != (host, port):
            raise httpcore.ConnectError(f"no checked address for {host}:{port}")
        return await self._backend.connect_tcp(
            pinned[2], port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks may not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


@dataclass(frozen=True)
class WebhookResponse:
    """A webhook's answer: its status and at most ``max_chars`` characters of its body."""

    status_code: int
    text: str

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400


class EgressClient:
    """The HTTP client of webhook tools: every hop checked by ``policy``, connections pinned to the checked
    address, redirects followed by hand, bodies capped while they are read (see the module's docstring).

    Args:
        policy: What may be reached; the default policy (no allow-list) when not given.
        max_redirects: Redirects followed before the request fails.
        max_chars: Characters of a body kept; at most four bytes a character are read.
        ssl_context: Certificates trusted for ``https`` webhooks; when not given, httpx's default (the
            certifi bundle, or ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set), as before this client.
    """

    def __init__(
        self,
        policy: EgressPolicy | None = None,
        *,
        max_redirects: int = MAX_REDIRECTS,
        max_chars: int = MAX_BODY_CHARS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy or EgressPolicy()
        self._max_redirects = max_redirects
        self._max_chars = max_chars
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_PinnedBackend(),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        json: Any = None,
    ) -> WebhookResponse:
        """Sends one webhook request, following redirects; the caller bounds the time it takes.

        Raises:
            EgressRefused: The policy refuses the URL or a redirect's target.
            EgressError: Any other failure (unreachable, too many redirects, an unreadable body).
        """
        own_headers = headers or {}
        try:
            # Merged into the URL's own query (Request(params=…) would replace it).
            target = httpx.URL(url).copy_merge_params(params) if params else httpx.URL(url)
            current = httpx.Request(method, target, headers=_headers(own_headers), json=json)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise EgressError(f"has an invalid URL ({exc})") from exc
        origin = _origin(current.url)
        for hop in range(self._max_redirects + 1):
            try:
                destination = await self.policy.check(current.url)
            except EgressRefused as exc:
                raise (exc.redirect() if hop else exc) from None
            except httpcore.ConnectError as exc:
                raise EgressError("could not be reached (its host name does not resolve)") from exc
            status, response_headers, body = await self._send(current, destination)
            location = response_headers.get("location")
            if status not in REDIRECT_STATUSES or not location:
                return WebhookResponse(status, _decode(body, response_headers, self._max_chars))
            current = self._follow(current, status, location, origin, own_headers, json)
        raise EgressError(f"redirected more than {self._max_redirects} times")

    async def _send(self, request: httpx.Request, destination: Destination) -> tuple[int, httpx.Headers, bytes]:
        url = request.url
        target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        failure: Exception | None = None
        for address in destination.addresses:
            token = _PINNED.set((destination.host, destination.port, address))
            try:
                async with self._pool.stream(
                    request.method, target, headers=request.headers.raw, content=request.content or None
                ) as response:
                    headers = httpx.Headers(response.headers)
                    return response.status, headers, await self._read(response, headers)
            except httpcore.ConnectError as exc:
                failure = exc
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException) as exc:
                raise EgressError(f"could not be reached ({type(exc).__name__})") from exc
            finally:
                _PINNED.reset(token)
        raise EgressError(f"could not be reached ({type(failure).__name__})") from failure

    async def _read(self, response: httpcore.Response, headers: httpx.Headers) -> bytes:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            decompressor = None
        elif encoding in ("gzip", "x-gzip", "deflate"):
            decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)
        else:
            raise EgressError(f"answered in an unsupported content encoding {encoding!r}")
        limit = 4 * self._max_chars
        body = bytearray()
        async for chunk in response.aiter_stream():
            try:
                body += (
                    decompressor.decompress(chunk, limit - len(body)) if decompressor else chunk[: limit - len(body)]
                )
            except zlib.error as exc:
                raise EgressError(f"answered a body that does not decompress ({exc})") from exc
            if len(body) >= limit:
                break
        return bytes(body)

    def _follow(
        self,
        request: httpx.Request,
        status: int,
        location: str,
        origin: tuple[str, str, int],
        headers: dict[str, str],
        json: Any,
    ) -> httpx.Request:
        try:
            url = request.url.join(location)
        except httpx.InvalidURL as exc:
            raise EgressError(f"redirected to an invalid URL ({exc})") from exc
        if url.scheme not in ("http", "https"):
            raise EgressRefused(f"a {url.scheme}: URL", "only http and https are followed", None, redirected=True)
        method = request.method
        if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
            method = "GET"
        keep_body = method == request.method and json is not None
        own = headers if _origin(url) == origin else {}
        return httpx.Request(method, url, headers=_headers(own), json=json if keep_body else None)


def _headers(own: dict[str, str]) -> httpx.Headers:
    headers = httpx.Headers(DEFAULT_HEADERS)
    headers.update(own)
    return headers


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _decode(body: bytes, headers: httpx.Headers, max_chars: int) -> str:
    message = email.message.Message()
    message["content-type"] = headers.get("content-type", "")
    charset = message.get_content_charset() or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return body.decode(charset, errors="replace")[:max_chars]

"""Where simulated callers connect: the WebSocket URL of each dialect, and the PCM trigger request.

Every function takes the gateway as a base URL (``http://127.0.0.1:8000``, ``ws://`` too) or, for the
carriers, the full URL to dial.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from voicectl.callers.result import CallError
from voicectl.gateway_api import http_base

__all__ = ["BROWSER_PATH", "DEFAULT_PATHS", "browser_url", "dialect_url", "trigger"]

DEFAULT_PATHS = {
    "twilio": "/twilio/media",
    "exotel": "/exotel/media",
    "plivo": "/plivo/media",
    "telnyx": "/telnyx/media",
    "vonage": "/vonage/media",
}
BROWSER_PATH = "/ws"
TRIGGER_PATH = "/api/calls/trigger"

_HTTP_TIMEOUT_S = 10.0


def _split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    return parts


def _ws_scheme(scheme: str) -> str:
    return {"http": "ws", "https": "wss"}.get(scheme, scheme)


def _ws_base(url: str) -> str:
    """``ws(s)://host:port`` of the gateway, from any of its URLs."""
    parts = urllib.parse.urlsplit(http_base(url))
    return urllib.parse.urlunsplit((_ws_scheme(parts.scheme), parts.netloc, "", "", ""))


def dialect_url(dialect: str, url: str, *, sample_rate: int = 8000, parameters: Mapping[str, str] | None = None) -> str:
    """The WebSocket URL a carrier of ``dialect`` would dial, from a base or full URL.

    A URL with no path (``http://127.0.0.1:8000``) gets the dialect's default path; a path given is kept.
    Twilio URLs carry no query string (Twilio does not support one). Exotel URLs get ``sample-rate`` and
    the custom ``parameters`` (Exotel passes custom parameters in the query string) unless already there;
    Plivo URLs get the ``parameters`` (the gateway's answer XML puts ``agent_id`` there). Telnyx URLs are
    kept as given (its custom parameters travel in ``start``).

    Args:
        dialect: ``"twilio"``, ``"exotel"`` or ``"plivo"``.
        url: ``http(s)://`` or ``ws(s)://`` URL.
        sample_rate: Exotel's sample rate.
        parameters: Exotel's custom parameters, e.g. ``{"agent_id": "default"}``.

    Returns:
        The ``ws://`` or ``wss://`` URL.
    """
    parts = _split_url(url)
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATHS[dialect]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if dialect == "twilio":
        query = []
    elif dialect != "telnyx":
        keys = {key for key, _ in query}
        if dialect == "exotel" and "sample-rate" not in keys and "sample_rate" not in keys:
            query.append(("sample-rate", str(sample_rate)))
        query += [(key, str(value)) for key, value in (parameters or {}).items() if key not in keys]
    return urllib.parse.urlunsplit((_ws_scheme(parts.scheme), parts.netloc, path, urllib.parse.urlencode(query), ""))


def browser_url(url: str) -> str:
    """The browser protocol's WebSocket URL (``ws(s)://host:port/ws``) of the gateway at ``url``.

    Raises:
        ValueError: For a URL scheme other than http(s) or ws(s).
    """
    return _ws_base(url) + BROWSER_PATH


def trigger(url: str, fields: dict[str, Any], api_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """``POST /api/calls/trigger`` (blocking): start a raw PCM call.

    Args:
        url: The gateway (only the scheme, host and port are used).
        fields: The request body: ``agent_id`` and the call's template variables.
        api_key: Sent as ``Authorization: Bearer``; None or empty sends no header.

    Returns:
        The absolute WebSocket URL to dial and the whole answer.

    Raises:
        CallError: If the request fails or the answer has no ``websocket_url``.
    """
    base = http_base(url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        base + TRIGGER_PATH, data=json.dumps(fields).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            body = json.loads(response.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise CallError(f"POST {base}{TRIGGER_PATH}: HTTP {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CallError(f"POST {base}{TRIGGER_PATH} failed: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("websocket_url"), str):
        raise CallError(f"POST {base}{TRIGGER_PATH} returned no websocket_url: {body!r}")
    ws_url = body["websocket_url"]
    if "://" in ws_url:
        ws_parts = urllib.parse.urlsplit(ws_url)
        ws_url = urllib.parse.urlunsplit((_ws_scheme(ws_parts.scheme), *ws_parts[1:]))
    else:
        ws_url = urllib.parse.urljoin(_ws_base(url) + "/", ws_url)
    return ws_url, body

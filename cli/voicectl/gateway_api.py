"""The gateway's REST API for the CLI and the benchmarks: agents, call logs, with the API key.

Every request carries ``Authorization: Bearer <key>``: ``--api-key``, else ``$GATEWAY_API_KEY``, else
``dev-key`` (the key ``voicectl up`` / ``make run`` configures).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["DEFAULT_API_KEY", "GatewayApiError", "call_log", "default_api_key", "http_base", "put_agent", "request"]

DEFAULT_API_KEY = "dev-key"
_TIMEOUT_S = 10.0


class GatewayApiError(RuntimeError):
    """A REST request failed: no connection, or an HTTP error status (``status``, else None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def default_api_key() -> str:
    """``$GATEWAY_API_KEY``, or ``dev-key`` when it is unset or empty."""
    return os.environ.get("GATEWAY_API_KEY") or DEFAULT_API_KEY


def http_base(url: str) -> str:
    """``scheme://host:port`` of the gateway, as HTTP(S), from any of its URLs (``ws://`` ones too)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, "", "", ""))


def request(
    url: str, method: str, path: str, body: Any = None, *, api_key: str | None = None, timeout: float = _TIMEOUT_S
) -> Any:
    """One JSON request to the gateway's REST API (blocking).

    Args:
        url: The gateway (any URL of it; only scheme, host and port are used).
        method: ``GET``, ``PUT``, ``POST`` or ``DELETE``.
        path: The path, e.g. ``/api/agents/default``.
        body: JSON-serializable request body, or None for none.
        api_key: Sent as ``Authorization: Bearer``; None or empty sends no header.
        timeout: Seconds to wait for the answer.

    Returns:
        The decoded JSON answer (None for an empty one).

    Raises:
        GatewayApiError: If the gateway cannot be reached or answers with an error status.
    """
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    target = http_base(url) + path
    req = urllib.request.Request(target, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise GatewayApiError(f"{method} {target}: HTTP {exc.code} {detail}", exc.code) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise GatewayApiError(f"{method} {target} failed: {exc}") from exc
    try:
        return json.loads(text) if text else None
    except ValueError as exc:
        raise GatewayApiError(f"{method} {target}: the answer is not JSON: {text[:200]!r}") from exc


def put_agent(url: str, agent_id: str, agent: dict[str, Any], *, api_key: str | None = None) -> dict[str, Any]:
    """Create or replace an agent (``PUT /api/agents/{id}``); returns the stored agent."""
    return request(url, "PUT", f"/api/agents/{urllib.parse.quote(agent_id)}", agent, api_key=api_key)


def call_log(url: str, call_id: str, *, api_key: str | None = None) -> dict[str, Any]:
    """A call's log (``GET /api/calls/{id}``): status, turns with their timings, transcript."""
    return request(url, "GET", f"/api/calls/{urllib.parse.quote(call_id)}", api_key=api_key)

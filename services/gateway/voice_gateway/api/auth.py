"""Client credentials: static API keys and HMAC-signed, expiring tokens.

A signed token is ``<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, first part))>`` with
claims ``{"sub": <user>, "exp": <epoch seconds>}``; :func:`sign_token` makes one.

Static keys (``GATEWAY_API_KEYS``) are the operators' credentials: they open the REST API
(``Authorization: Bearer <key>`` or ``X-API-Key: <key>``) and the chat stream. Signed tokens are for
end users of the chat stream only. A credential is known elsewhere (limits, logs, the call registry)
only by its :func:`identity`, never by its value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time

from fastapi import HTTPException, Request

API_KEY_HEADER = "x-api-key"
BEARER = "bearer "


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(secret: str, subject: str, ttl_s: float = 3600.0) -> str:
    """A signed token for ``subject`` valid ``ttl_s`` seconds."""
    claims = _b64(json.dumps({"sub": subject, "exp": int(time.time() + ttl_s)}).encode())
    signature = _b64(hmac.new(secret.encode(), claims.encode(), hashlib.sha256).digest())
    return f"{claims}.{signature}"


def key_identity(key: str) -> str:
    """A static key's name for limits and logs: ``key:`` and the first 12 hex digits of its SHA-256."""
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _encoded(text: str) -> bytes | None:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None


class Authenticator:
    """Accepts a configured API key, or a token signed with the configured secret and not expired.

    Args:
        api_keys: Accepted static keys.
        token_secret: HMAC secret of signed tokens, or ``None``.
    """

    def __init__(self, api_keys: tuple[str, ...], token_secret: str | None) -> None:
        self._api_keys = tuple(key.encode() for key in api_keys)
        self._secret = token_secret

    @property
    def configured(self) -> bool:
        """Whether any credential can be accepted at all."""
        return bool(self._api_keys or self._secret)

    def check_api_key(self, key: object) -> tuple[bool, str]:
        """``(True, identity)`` for one of the static keys, else ``(False, reason)``; signed tokens are refused."""
        if not isinstance(key, str) or not key:
            return False, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        if not self._api_keys:
            return False, "no API keys are configured on this gateway: set GATEWAY_API_KEYS"
        encoded = _encoded(key)
        matched = False
        for candidate in self._api_keys:
            # Every key is compared, so the time taken does not say which one (or whether one) matched.
            matched |= encoded is not None and hmac.compare_digest(encoded, candidate)
        return (True, key_identity(key)) if matched else (False, "invalid API key")

    def check(self, token: object) -> tuple[bool, str]:
        """``(True, identity)`` for a valid static key or signed token, else ``(False, reason)``.

        The identity is :func:`key_identity` for a static key and ``sub:<subject>`` for a signed token.
        """
        if not isinstance(token, str) or not token:
            return False, "missing token"
        if not self.configured:
            return False, "no credentials are configured on this gateway (GATEWAY_API_KEYS or GATEWAY_TOKEN_SECRET)"
        ok, identity = self.check_api_key(token)
        if ok:
            return True, identity
        if self._secret and token.count(".") == 1 and _encoded(token) is not None:
            return self._check_signed(token)
        return False, "invalid token"

    def _check_signed(self, token: str) -> tuple[bool, str]:
        claims_part, signature = token.split(".")
        expected = _b64(hmac.new(self._secret.encode(), claims_part.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return False, "invalid token"
        try:
            claims = json.loads(_unb64(claims_part))
        except (ValueError, binascii.Error):
            return False, "malformed token"
        if not isinstance(claims, dict):
            return False, "malformed token"
        expires = claims.get("exp")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
            return False, "malformed token: 'exp' must be a number"
        if expires < time.time():
            return False, "token expired"
        subject = claims.get("sub")
        return True, "sub:" + (subject if isinstance(subject, str) else json.dumps(subject))


def api_key_dependency(authenticator: Authenticator):
    """A FastAPI dependency that admits requests with a static API key and returns the key's identity.

    The key is read from ``Authorization: Bearer <key>`` or ``X-API-Key``; a missing or wrong key, or a
    gateway without ``GATEWAY_API_KEYS``, is answered 401 with the reason.
    """

    async def require_api_key(request: Request) -> str:
        authorization = request.headers.get("authorization", "")
        key = authorization[len(BEARER) :].strip() if authorization[: len(BEARER)].lower() == BEARER else ""
        key = key or request.headers.get(API_KEY_HEADER, "").strip()
        ok, detail = authenticator.check_api_key(key)
        if not ok:
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
        return detail

    return require_api_key

"""Client credentials: static API keys and HMAC-signed, expiring tokens.

A signed token is ``<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, first part))>`` with
claims ``{"sub": <user>, "exp": <epoch seconds>}``; :func:`sign_token` makes one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(secret: str, subject: str, ttl_s: float = 3600.0) -> str:
    """A signed token for ``subject`` valid ``ttl_s`` seconds."""
    claims = _b64(json.dumps({"sub": subject, "exp": int(time.time() + ttl_s)}).encode())
    signature = _b64(hmac.new(secret.encode(), claims.encode(), hashlib.sha256).digest())
    return f"{claims}.{signature}"


class Authenticator:
    """Accepts a configured API key, or a token signed with the configured secret and not expired.

    Args:
        api_keys: Accepted static keys.
        token_secret: HMAC secret of signed tokens, or ``None``.
    """

    def __init__(self, api_keys: tuple[str, ...], token_secret: str | None) -> None:
        self._api_keys = api_keys
        self._secret = token_secret

    @property
    def configured(self) -> bool:
        return bool(self._api_keys or self._secret)

    def check(self, token: object) -> tuple[bool, str]:
        """``(True, subject)`` for a valid token, else ``(False, reason)``."""
        if not isinstance(token, str) or not token:
            return False, "missing token"
        if not self.configured:
            return False, "no credentials are configured on this gateway (GATEWAY_API_KEYS or GATEWAY_TOKEN_SECRET)"
        for key in self._api_keys:
            if hmac.compare_digest(token.encode(), key.encode()):
                return True, "api-key"
        if self._secret and token.count(".") == 1:
            claims_part, signature = token.split(".")
            expected = _b64(hmac.new(self._secret.encode(), claims_part.encode(), hashlib.sha256).digest())
            if hmac.compare_digest(signature, expected):
                try:
                    claims = json.loads(_unb64(claims_part))
                except (ValueError, json.JSONDecodeError):
                    return False, "malformed token"
                if not isinstance(claims, dict) or float(claims.get("exp", 0)) < time.time():
                    return False, "token expired"
                return True, str(claims.get("sub", ""))
        return False, "invalid token"

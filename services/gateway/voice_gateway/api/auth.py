"""Client credentials: static API keys and HMAC-signed, expiring tokens.

A signed token is ``<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, first part))>`` with
claims ``{"sub": <user>, "exp": <epoch seconds>}``; :func:`sign_token` makes one.

Static keys (``GATEWAY_API_KEYS``) are the operators' credentials: they open the REST API
(``Authorization: Bearer <key>`` or ``X-API-Key: <key>``), the chat stream, and every channel of
``/ws/channels``. Signed tokens are for end users of the chat stream only. Channel tokens
(:class:`ChannelTokens`) are another kind, signed with a key of their own: each is the right to follow
one session's statuses on ``/ws/channels``, and nothing else. A credential is known elsewhere (limits,
logs, the call registry) only by its :func:`identity`, never by its value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import secrets
import time

from fastapi import HTTPException, Request

logger = logging.getLogger(__name__)

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
        claims, reason = verified_claims(token, self._secret.encode(), "token")
        if claims is None:
            return False, reason
        subject = claims.get("sub")
        return True, "sub:" + (subject if isinstance(subject, str) else json.dumps(subject))


def verified_claims(token: str, key: bytes, kind: str) -> tuple[dict | None, str]:
    """The claims of a ``<claims>.<signature>`` token signed with ``key`` and not expired.

    Args:
        token: The token (exactly one ``.``, encodable text).
        key: The HMAC-SHA256 key it must be signed with.
        kind: What to call it in a refusal (``token``, ``channel token``).

    Returns:
        ``(claims, "")``, or ``(None, reason)`` for a bad signature, malformed claims or an expired token.
    """
    claims_part, signature = token.split(".")
    expected = _b64(hmac.new(key, claims_part.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None, f"invalid {kind}"
    try:
        claims = json.loads(_unb64(claims_part))
    except (ValueError, binascii.Error):
        return None, f"malformed {kind}"
    if not isinstance(claims, dict):
        return None, f"malformed {kind}"
    expires = claims.get("exp")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        return None, f"malformed {kind}: 'exp' must be a number"
    if expires < time.time():
        return None, f"{kind} expired"
    return claims, ""


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


# -- channel tokens ---------------------------------------------------------------------------------------

CHANNEL_TOKEN_TTL_S = 24 * 3600
# Channel tokens are signed with a key derived for them alone, so that a channel token is never a chat
# token (or the other way round), even though both come from GATEWAY_TOKEN_SECRET.
_CHANNEL_KEY_LABEL = b"voice-gateway/channel-token/v1"


class ChannelTokens:
    """Issues and checks channel tokens: the right to follow one session's statuses on ``/ws/channels``.

    A channel token is ``<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, first part))>`` with claims
    ``{"ch": <channel>, "exp": <epoch seconds>}``; it is good for that channel only, until it expires.
    The key is derived (HMAC-SHA256 with a label of its own) from, in order:

    1. ``GATEWAY_TOKEN_SECRET``: tokens verify on every replica that shares it;
    2. else the sorted ``GATEWAY_API_KEYS``: every replica of a deployment has the same keys, so tokens
       still verify everywhere, and only one who holds every key could forge one (a key holder may
       follow any channel with the key anyway); changing the keys voids the tokens issued before;
    3. else a random per-process key (with a warning): tokens verify only on the gateway process that
       issued them. Such a gateway has no API keys, so only the browser's ``init_success`` issues them.

    Args:
        key: The signing key (see :meth:`from_settings`).
        shared: Whether every replica derives the same key (false for a random per-process one).
    """

    def __init__(self, key: bytes, *, shared: bool = True) -> None:
        self._key = key
        self.shared = shared

    @classmethod
    def from_settings(cls, token_secret: str | None, api_keys: tuple[str, ...]) -> ChannelTokens:
        """The gateway's channel tokens, from ``GATEWAY_TOKEN_SECRET`` or ``GATEWAY_API_KEYS`` (see the class)."""
        if token_secret:
            material = token_secret.encode("utf-8", "surrogatepass")
        elif api_keys:
            material = b"\x00".join(sorted(key.encode("utf-8", "surrogatepass") for key in set(api_keys)))
        else:
            logger.warning(
                "neither GATEWAY_TOKEN_SECRET nor GATEWAY_API_KEYS is set: channel tokens are signed with a random "
                "key of this process and verify only on this gateway replica"
            )
            return cls(secrets.token_bytes(32), shared=False)
        return cls(hmac.new(material, _CHANNEL_KEY_LABEL, hashlib.sha256).digest())

    def _sign(self, claims_part: str) -> str:
        return _b64(hmac.new(self._key, claims_part.encode(), hashlib.sha256).digest())

    def issue(self, channel: str, ttl_s: float = CHANNEL_TOKEN_TTL_S) -> tuple[str, int]:
        """A token for ``channel`` and when it expires (epoch seconds)."""
        expires = int(time.time() + ttl_s)
        claims = _b64(json.dumps({"ch": channel, "exp": expires}, separators=(",", ":")).encode())
        return f"{claims}.{self._sign(claims)}", expires

    def check(self, token: object, channel: str) -> tuple[bool, str]:
        """``(True, "")`` when ``token`` is a valid, unexpired token for ``channel``, else ``(False, reason)``."""
        if not isinstance(token, str) or token.count(".") != 1 or _encoded(token) is None:
            return False, "invalid channel token"
        claims, reason = verified_claims(token, self._key, "channel token")
        if claims is None:
            if reason == "invalid channel token" and not self.shared:
                reason += " (this gateway's tokens verify only on the replica that issued them)"
            return False, reason
        if claims.get("ch") != channel:
            return False, "the channel token is for another channel"
        return True, ""

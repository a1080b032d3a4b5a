"""Gateway settings, read from the environment at start-up."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from voice_gateway.api.http_security import host_name, valid_host
from voice_gateway.api.limits import LimitSettings
from voice_runtime.config import ConfigError, StreamSettings, env_float, env_int, env_str

DEFAULT_AGENT_FILE = Path(__file__).parent / "agents" / "default.json"
DEFAULT_RETELL_WS_PATH = "ws-default"
# Routes GATEWAY_OPEN_ROUTES may open to clients without credentials (docs/security.md, "Legacy clients").
OPEN_ROUTE_NAMES = ("trigger", "channels")
# Real-time carrier media arrives as 50 frames per second (20 ms each); the rate limit must let it through.
MIN_MESSAGES_PER_SECOND = 50.0


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its environment.

    Attributes:
        nats_url: ``NATS_URL``.
        host: ``GATEWAY_HOST``.
        port: ``GATEWAY_PORT``.
        default_agent_file: ``GATEWAY_DEFAULT_AGENT_FILE``: JSON agent stored in KV ``agents`` at start.
        max_message_bytes: ``GATEWAY_MAX_MESSAGE_BYTES``: larger client messages get an error event.
        max_utterance_s: ``GATEWAY_MAX_UTTERANCE_SECONDS``: cap on one utterance's audio.
        stt_timeout_s, llm_timeout_s, tts_timeout_s: ``GATEWAY_<STAGE>_TIMEOUT_SECONDS``: bus request budgets.
        twilio_auth_token: ``TWILIO_AUTH_TOKEN``: when set, Twilio webhooks must carry a valid signature.
        plivo_auth_token: ``PLIVO_AUTH_TOKEN``: when set, Plivo's answer webhook must carry a valid V3 signature.
        vonage_signature_secret: ``VONAGE_SIGNATURE_SECRET``: when set, Vonage's answer webhook must carry a
            valid signed-callback JWT.
        telnyx_public_key: ``TELNYX_PUBLIC_KEY`` (base64, 32 bytes): when set, Telnyx's voice webhook must carry a
            valid, fresh Ed25519 signature.
        api_keys: ``GATEWAY_API_KEYS``: comma-separated keys accepted by the chat stream's ``authorize``.
        token_secret: ``GATEWAY_TOKEN_SECRET``: HMAC secret of signed tokens (see ``voice_gateway.api.auth``).
        open_channels: ``GATEWAY_OPEN_CHANNELS``: ``true`` lets any ``/ws/channels`` client follow any session's
            statuses without a channel token or API key (legacy deployments; off by default, see
            ``voice_gateway.dialects.channels``); ``channels`` in ``GATEWAY_OPEN_ROUTES`` sets it too.
        open_routes: ``GATEWAY_OPEN_ROUTES``: comma-separated names from :data:`OPEN_ROUTE_NAMES` that unchanged
            legacy clients may use without credentials: ``trigger`` is ``POST /api/calls/trigger`` (its calls count
            against the pseudo-identity ``open:<client address>``), ``channels`` is ``GATEWAY_OPEN_CHANNELS``.
            Refused at start unless the gateway listens on loopback or ``trusted_network`` is set.
        trusted_network: ``GATEWAY_TRUSTED_NETWORK``: ``true`` lets ``GATEWAY_OPEN_ROUTES`` apply on a
            non-loopback listen address (only where every client that can reach the port is trusted).
        chat_ping_interval_s: ``GATEWAY_CHAT_PING_INTERVAL_SECONDS``: how often the chat stream pings.
        chat_pong_timeout_s: ``GATEWAY_CHAT_PONG_TIMEOUT_SECONDS``: how long past a ping without a pong closes it.
        realtime_protocol: ``GATEWAY_REALTIME_PROTOCOL``: ``auto`` (default: beta for clients that send
            ``OpenAI-Beta: realtime=v1`` or the ``openai-beta.realtime-v1`` subprotocol, else GA), ``ga`` or
            ``beta``: the OpenAI Realtime protocol ``/v1/realtime`` speaks.
        retell_ws_path: ``OBFUSCATED_WS_PATH`` (seed 000's name; ``RETELL_WS_PATH`` is an alias): the
            path segment of Retell's socket, ``/{path}/{call_id}``. Retell sends no credentials, so this
            segment is the secret that guards the socket.
        limits: ``GATEWAY_MAX_SESSIONS``, ``GATEWAY_MAX_SESSIONS_PER_KEY``, ``GATEWAY_MAX_FRAME_BYTES``,
            ``GATEWAY_MAX_MESSAGES_PER_SECOND``, ``GATEWAY_MESSAGE_BURST``,
            ``GATEWAY_HANDSHAKE_TIMEOUT_SECONDS``, ``GATEWAY_IDLE_TIMEOUT_SECONDS`` and
            ``GATEWAY_MAX_CALL_SECONDS`` (the longest call, 0: no cap; see
            :class:`voice_gateway.api.limits.LimitSettings`).
        streams: ``NATS_STREAM_REPLICAS`` and ``NATS_WORK_STORAGE``: how the work streams, KV ``agents``,
            KV ``sessions`` and stream ``CALLS`` are declared (see :class:`voice_runtime.config.StreamSettings`).
        drain_timeout_s: ``GATEWAY_DRAIN_TIMEOUT_SECONDS``: after SIGTERM, how long the turns in flight
            may run on before the sockets are closed with 1012 for their clients to reconnect elsewhere;
            also uvicorn's graceful shutdown timeout once they are closed.
        allowed_hosts: ``GATEWAY_ALLOWED_HOSTS``: comma-separated host names requests may name in
            ``Host``; empty accepts any well-formed host (see ``voice_gateway.api.http_security``).
        public_url: ``GATEWAY_PUBLIC_URL``: the gateway's public base URL (``https://voice.example.com``);
            when set, TwiML and Twilio's signature check use it instead of the request's Host.
        api_docs: ``GATEWAY_API_DOCS``: ``true`` serves ``/docs``, ``/redoc`` and ``/openapi.json``.
        tool_allowed_networks: ``GATEWAY_TOOL_ALLOWED_NETWORKS``: comma-separated CIDRs that webhook tools may
            reach although they are loopback, private, link-local… (see ``voice_gateway.agents.egress``).
        tool_allowed_hosts: ``GATEWAY_TOOL_ALLOWED_HOSTS``: comma-separated host names that webhook tools may
            reach whatever they resolve to.
        max_pending_triggers_per_key: ``GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY``: calls one API key may
            have triggered and not yet connected, on this gateway process (429 beyond).
    """

    nats_url: str
    host: str
    port: int
    default_agent_file: Path
    max_message_bytes: int
    max_utterance_s: float
    stt_timeout_s: float
    llm_timeout_s: float
    tts_timeout_s: float
    twilio_auth_token: str | None = None
    plivo_auth_token: str | None = None
    vonage_signature_secret: str | None = None
    telnyx_public_key: bytes | None = None
    retell_ws_path: str = DEFAULT_RETELL_WS_PATH
    api_keys: tuple[str, ...] = ()
    token_secret: str | None = None
    open_channels: bool = False
    open_routes: tuple[str, ...] = ()
    trusted_network: bool = False
    chat_ping_interval_s: float = 20.0
    chat_pong_timeout_s: float = 10.0
    realtime_protocol: str = "auto"
    limits: LimitSettings = field(default_factory=LimitSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    drain_timeout_s: float = 20.0
    allowed_hosts: tuple[str, ...] = ()
    public_url: str | None = None
    api_docs: bool = False
    max_pending_triggers_per_key: int = 100
    tool_allowed_networks: tuple[str, ...] = ()
    tool_allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        """Reads every setting; raises ConfigError naming the first bad variable."""
        agent_file = Path(env_str("GATEWAY_DEFAULT_AGENT_FILE", str(DEFAULT_AGENT_FILE)))
        if not agent_file.is_file():
            raise ConfigError(f"GATEWAY_DEFAULT_AGENT_FILE={str(agent_file)!r}: no such file")
        host = env_str("GATEWAY_HOST", "0.0.0.0")
        trusted_network = env_str("GATEWAY_TRUSTED_NETWORK", "false", choices=("true", "false")) == "true"
        open_routes = _open_routes(host, trusted_network)
        return cls(
            nats_url=env_str("NATS_URL", "nats://127.0.0.1:4222"),
            host=host,
            port=env_int("GATEWAY_PORT", 8000, minimum=0, maximum=65535),
            default_agent_file=agent_file,
            max_message_bytes=env_int("GATEWAY_MAX_MESSAGE_BYTES", 6 * 1024 * 1024, minimum=1024),
            max_utterance_s=_finite("GATEWAY_MAX_UTTERANCE_SECONDS", 60.0, minimum=1.0),
            stt_timeout_s=_finite("GATEWAY_STT_TIMEOUT_SECONDS", 30.0, minimum=1.0),
            llm_timeout_s=_finite("GATEWAY_LLM_TIMEOUT_SECONDS", 60.0, minimum=1.0),
            tts_timeout_s=_finite("GATEWAY_TTS_TIMEOUT_SECONDS", 30.0, minimum=1.0),
            twilio_auth_token=env_str("TWILIO_AUTH_TOKEN", "") or None,
            plivo_auth_token=env_str("PLIVO_AUTH_TOKEN", "") or None,
            vonage_signature_secret=env_str("VONAGE_SIGNATURE_SECRET", "") or None,
            telnyx_public_key=_telnyx_public_key(),
            api_keys=tuple(key.strip() for key in env_str("GATEWAY_API_KEYS", "").split(",") if key.strip()),
            token_secret=env_str("GATEWAY_TOKEN_SECRET", "") or None,
            open_channels=env_str("GATEWAY_OPEN_CHANNELS", "false", choices=("true", "false")) == "true"
            or "channels" in open_routes,
            open_routes=open_routes,
            trusted_network=trusted_network,
            chat_ping_interval_s=_finite("GATEWAY_CHAT_PING_INTERVAL_SECONDS", 20.0, minimum=0.1),
            chat_pong_timeout_s=_finite("GATEWAY_CHAT_PONG_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            realtime_protocol=env_str("GATEWAY_REALTIME_PROTOCOL", "auto", choices=("auto", "ga", "beta")),
            retell_ws_path=_path_segment(
                "OBFUSCATED_WS_PATH",
                env_str("OBFUSCATED_WS_PATH", "") or env_str("RETELL_WS_PATH", DEFAULT_RETELL_WS_PATH),
            ),
            limits=_limits_from_env(),
            streams=StreamSettings.from_env(),
            drain_timeout_s=_finite("GATEWAY_DRAIN_TIMEOUT_SECONDS", 20.0, minimum=0.0),
            allowed_hosts=_allowed_hosts(),
            public_url=_public_url(),
            api_docs=env_str("GATEWAY_API_DOCS", "false", choices=("true", "false")) == "true",
            max_pending_triggers_per_key=env_int("GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY", 100, minimum=1),
            tool_allowed_networks=_tool_allowed_networks(),
            tool_allowed_hosts=_tool_allowed_hosts(),
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_routes(host: str, trusted_network: bool) -> tuple[str, ...]:
    """``GATEWAY_OPEN_ROUTES``, checked: known names only, and only on loopback or a trusted network."""
    names = tuple(dict.fromkeys(name.strip() for name in env_str("GATEWAY_OPEN_ROUTES", "").split(",") if name.strip()))
    for name in names:
        if name not in OPEN_ROUTE_NAMES:
            raise ConfigError(
                f"GATEWAY_OPEN_ROUTES: unknown route {name!r} (choose from {', '.join(OPEN_ROUTE_NAMES)})"
            )
    if names and not is_loopback(host) and not trusted_network:
        raise ConfigError(
            f"GATEWAY_OPEN_ROUTES={','.join(names)} opens routes without credentials, but GATEWAY_HOST={host!r} is not "
            "a loopback address: listen on 127.0.0.1, or set GATEWAY_TRUSTED_NETWORK=true if every client that can "
            "reach the port is trusted (docs/security.md, Legacy clients)"
        )
    return names


def _finite(name: str, default: float, *, minimum: float) -> float:
    """``env_float``, refusing ``nan`` and ``inf`` too."""
    value = env_float(name, default, minimum=minimum)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value}: must be a finite number")
    return value


def _tool_allowed_networks() -> tuple[str, ...]:
    networks = []
    for value in env_str("GATEWAY_TOOL_ALLOWED_NETWORKS", "").split(","):
        if value.strip():
            try:
                networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
            except ValueError:
                raise ConfigError(f"GATEWAY_TOOL_ALLOWED_NETWORKS: {value.strip()!r} is not a CIDR") from None
    return tuple(networks)


def _tool_allowed_hosts() -> tuple[str, ...]:
    values = env_str("GATEWAY_TOOL_ALLOWED_HOSTS", "").split(",")
    hosts = tuple(value.strip().lower().rstrip(".") for value in values if value.strip())
    for host in hosts:
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|[0-9a-f:.]+", host):
            raise ConfigError(f"GATEWAY_TOOL_ALLOWED_HOSTS: {host!r} is not a host name (no port, scheme or path)")
    return hosts


def _allowed_hosts() -> tuple[str, ...]:
    hosts = tuple(host.strip().lower() for host in env_str("GATEWAY_ALLOWED_HOSTS", "").split(",") if host.strip())
    for host in hosts:
        if not valid_host(host) or host_name(host) != host:
            raise ConfigError(f"GATEWAY_ALLOWED_HOSTS: {host!r} is not a host name (no port, scheme or path)")
    return hosts


def _telnyx_public_key() -> bytes | None:
    value = env_str("TELNYX_PUBLIC_KEY", "").strip()
    if not value:
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError("TELNYX_PUBLIC_KEY: expected the base64 32-byte Ed25519 public key from the Telnyx portal")
    return key


def _public_url() -> str | None:
    value = env_str("GATEWAY_PUBLIC_URL", "").rstrip("/")
    if not value:
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not valid_host(parts.netloc) or parts.path or parts.query:
        raise ConfigError(f"GATEWAY_PUBLIC_URL={value!r}: must be http(s)://host[:port], with no path")
    return value


def _limits_from_env() -> LimitSettings:
    defaults = LimitSettings()
    return LimitSettings(
        max_sessions=env_int("GATEWAY_MAX_SESSIONS", defaults.max_sessions, minimum=1),
        max_sessions_per_key=env_int("GATEWAY_MAX_SESSIONS_PER_KEY", defaults.max_sessions_per_key, minimum=1),
        max_frame_bytes=env_int("GATEWAY_MAX_FRAME_BYTES", defaults.max_frame_bytes, minimum=1024),
        max_messages_per_second=_finite(
            "GATEWAY_MAX_MESSAGES_PER_SECOND", defaults.max_messages_per_second, minimum=MIN_MESSAGES_PER_SECOND
        ),
        message_burst=env_int("GATEWAY_MESSAGE_BURST", defaults.message_burst, minimum=1),
        handshake_timeout_s=_finite("GATEWAY_HANDSHAKE_TIMEOUT_SECONDS", defaults.handshake_timeout_s, minimum=0.1),
        idle_timeout_s=_finite("GATEWAY_IDLE_TIMEOUT_SECONDS", defaults.idle_timeout_s, minimum=1.0),
        max_call_s=_finite("GATEWAY_MAX_CALL_SECONDS", defaults.max_call_s, minimum=0.0),
    )


def _path_segment(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._~-]{1,200}", value) or value in (
        "api",
        "ws",
        "static",
        "twilio",
        "exotel",
        "telnyx",
        "plivo",
        "vonage",
        "metrics",
    ):
        raise ConfigError(
            f"{name}={value!r}: one URL path segment of letters, digits, '.', '_', '~' or '-', not a reserved one"
        )
    return value

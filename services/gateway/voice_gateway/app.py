"""The gateway's FastAPI application: wiring (NATS, the stores, the turn engine, the sessions' observers),
the WebSocket routes of every dialect, the REST API (:mod:`voice_gateway.api.rest`), the test page,
health, readiness, draining and metrics.

Every WebSocket dialect goes through the gateway's limits (:mod:`voice_gateway.api.limits`); the REST
API needs an API key. See docs/security.md and docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Histogram, make_asgi_app

from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_gateway.agents import AgentStore
from voice_gateway.agents.egress import EgressPolicy
from voice_gateway.agents.egress_client import EgressClient
from voice_gateway.api.auth import Authenticator, ChannelTokens
from voice_gateway.api.http_security import HttpSecurity
from voice_gateway.api.limits import Limits
from voice_gateway.api.middleware import RefuseWhileDraining, RequestBodyLimit
from voice_gateway.api.redaction import install_log_redaction
from voice_gateway.api.rest import rest_router
from voice_gateway.api.triggers import PendingTriggers
from voice_gateway.config import DEFAULT_RETELL_WS_PATH, Settings, is_loopback
from voice_gateway.conversation.engine import TurnEngine
from voice_gateway.conversation.metrics import TURNS_IN_FLIGHT
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects import (
    browser,
    channel_status,
    channels,
    chat,
    exotel,
    pcm,
    plivo,
    realtime,
    retell,
    telnyx,
    twilio,
    vonage,
)
from voice_gateway.dialects.router import serve_first_message
from voice_gateway.storage.call_log import CallLogStore
from voice_gateway.storage.registry import CallRegistry
from voice_telemetry.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
LAG_PROBE_S = 0.05

EVENT_LOOP_LAG = Histogram(
    "voice_gateway_event_loop_lag_seconds",
    "How late the event loop ran a timer: what every frame waits before it is handled",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)


async def monitor_event_loop_lag() -> None:
    """Samples the event loop's scheduling delay every 50 ms (the signal of an overloaded gateway)."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        EVENT_LOOP_LAG.observe(max(0.0, time.perf_counter() - started - LAG_PROBE_S))


def http_only(app):
    """An ASGI app that serves ``app`` over HTTP and closes WebSocket handshakes (403) instead of crashing
    an HTTP-only app (metrics, static files) with them."""

    async def guarded(scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await app(scope, receive, send)

    return guarded


def warn_about_unsafe_settings(settings: Settings) -> None:
    """Logs what makes this configuration unsafe to expose (docs/security.md, the operator checklist)."""
    if settings.retell_ws_path == DEFAULT_RETELL_WS_PATH and not is_loopback(settings.host):
        logger.warning(
            "Retell's socket is at the default path /%s/{call_id} and the gateway listens on %s: anyone who can "
            "reach it can open Retell calls. Set OBFUSCATED_WS_PATH to a long random secret (docs/security.md)",
            DEFAULT_RETELL_WS_PATH,
            settings.host,
        )
    if not settings.api_keys:
        logger.warning("GATEWAY_API_KEYS is not set: the REST API (/api/agents, /api/calls) refuses every request")
    if not settings.twilio_auth_token and not is_loopback(settings.host):
        logger.warning("TWILIO_AUTH_TOKEN is not set: Twilio webhooks are accepted without checking their signature")
    if not settings.telnyx_public_key and not is_loopback(settings.host):
        logger.warning("TELNYX_PUBLIC_KEY is not set: Telnyx webhooks are accepted without checking their signature")
    if not settings.plivo_auth_token and not is_loopback(settings.host):
        logger.warning("PLIVO_AUTH_TOKEN is not set: Plivo's answer webhook is accepted without checking its signature")
    if not settings.vonage_signature_secret and not is_loopback(settings.host):
        logger.warning("VONAGE_SIGNATURE_SECRET is not set: Vonage's answer webhook is accepted unsigned")
    if "trigger" in settings.open_routes:
        logger.warning(
            "GATEWAY_OPEN_ROUTES=%s: POST /api/calls/trigger accepts calls without an API key on %s (legacy clients); "
            "they count against the pseudo-identity open:<client address>",
            ",".join(settings.open_routes),
            settings.host if is_loopback(settings.host) else f"{settings.host} (GATEWAY_TRUSTED_NETWORK=true)",
        )
    if settings.open_channels:
        logger.warning(
            "open channels (GATEWAY_OPEN_CHANNELS=true or GATEWAY_OPEN_ROUTES=channels): anyone who can reach "
            "/ws/channels can follow any session's live statuses without a channel token or API key"
        )
    if not settings.allowed_hosts and not is_loopback(settings.host):
        logger.warning(
            "GATEWAY_ALLOWED_HOSTS is not set: requests naming any Host are served; set it to the gateway's public "
            "host names (and GATEWAY_PUBLIC_URL for Twilio's TwiML)"
        )


PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/metrics/"})


class QuietProbes(logging.Filter):
    """Drops access-log lines of successful probes and scrapes (balancers and kubelets probe every second)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 5 and isinstance(args[4], int):
            return not (str(args[2]).split("?")[0] in PROBE_PATHS and args[4] < 400)
        return True


def create_app(settings: Settings) -> FastAPI:
    """Builds the gateway; NATS is connected and the stores opened when the app starts."""
    install_log_redaction([settings.retell_ws_path])
    logging.getLogger("uvicorn.access").addFilter(QuietProbes())
    warn_about_unsafe_settings(settings)
    limits = Limits(settings.limits)
    triggers = PendingTriggers(settings.max_pending_triggers_per_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_tracing("voice-gateway")
        nc = await connect(settings.nats_url, name="voice-gateway")
        streams = settings.streams
        await ensure_streams(nc, storage=streams.work_storage, replicas=streams.replicas)
        js = nc.jetstream()
        agents = await AgentStore.open(js, replicas=streams.replicas)
        await agents.load_default(settings.default_agent_file)
        bus = BusClient(nc)
        egress = EgressClient(EgressPolicy(settings.tool_allowed_networks, settings.tool_allowed_hosts))
        app.state.context = GatewayContext(
            bus=bus,
            agents=agents,
            calls=await CallLogStore.open(js, replicas=streams.replicas),
            engine=TurnEngine(
                bus,
                stt_timeout_s=settings.stt_timeout_s,
                llm_timeout_s=settings.llm_timeout_s,
                tts_timeout_s=settings.tts_timeout_s,
                egress=egress,
            ),
            registry=await CallRegistry.open(js, replicas=streams.replicas),
            observers=[functools.partial(channel_status.SessionStatus, nc)],
        )
        app.state.nc = nc
        app.state.registry = app.state.context.registry
        app.state.registry.on_claim = triggers.connected
        lag_monitor = asyncio.create_task(monitor_event_loop_lag())
        logger.info("gateway ready on :%d (NATS %s)", settings.port, settings.nats_url)
        try:
            yield
        finally:
            lag_monitor.cancel()
            await egress.aclose()
            with contextlib.suppress(Exception):
                await nc.drain()
            shutdown_tracing()

    docs = {} if settings.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Voice platform gateway", version="0.1.0", lifespan=lifespan, **docs)
    app.add_middleware(RequestBodyLimit, max_bytes=settings.limits.max_frame_bytes)
    app.add_middleware(RefuseWhileDraining, limits=limits)
    app.add_middleware(
        HttpSecurity, routes=lambda: app.routes, allowed_hosts=settings.allowed_hosts, any_host_paths=PROBE_PATHS
    )
    app.state.limits = limits
    app.mount("/metrics", http_only(make_asgi_app()))
    if STATIC.is_dir():
        app.mount("/static", http_only(StaticFiles(directory=STATIC)), name="static")
    authenticator = Authenticator(settings.api_keys, settings.token_secret)
    channel_tokens = ChannelTokens.from_settings(settings.token_secret, settings.api_keys)
    app.include_router(
        rest_router(authenticator, limits, triggers, channel_tokens=channel_tokens, open_routes=settings.open_routes)
    )

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page)
        return JSONResponse({"service": "voice-gateway", "websocket": "/ws"})

    def nats_connected() -> bool:
        return bool(getattr(app.state, "nc", None) and app.state.nc.is_connected)

    @app.get("/healthz")
    async def healthz():
        connected = nats_connected()
        return JSONResponse({"status": "ok" if connected else "degraded", "nats": connected}, 200 if connected else 503)

    @app.get("/readyz")
    async def readyz():
        """Whether to route new sessions here: NATS connected and not draining."""
        connected = nats_connected()
        ready = connected and not limits.draining
        status = "ok" if ready else ("draining" if limits.draining else "degraded")
        return JSONResponse(
            {"status": status, "nats": connected, "sessions": limits.active, "by_dialect": limits.by_dialect()},
            200 if ready else 503,
        )

    async def drain() -> None:
        """Stops taking sessions, lets the turns in flight finish, then hands the sessions off (1012)."""
        limits.draining = True
        logger.info("draining: %d session(s), %d turn(s) in flight", limits.active, TURNS_IN_FLIGHT.count)
        if not await TURNS_IN_FLIGHT.wait_idle(settings.drain_timeout_s):
            logger.warning(
                "draining: %d turn(s) still running after %.0f s", TURNS_IN_FLIGHT.count, settings.drain_timeout_s
            )
        context = getattr(app.state, "context", None)
        if context is not None:
            context.draining = True
        closed = await limits.close_all()
        logger.info("drained: %d socket(s) closed with 1012 for their clients to reconnect", closed)

    app.state.drain = drain

    @app.post("/twilio/voice")
    async def twilio_voice(request: Request):
        return await twilio.voice_webhook(request, settings.twilio_auth_token, settings.public_url)

    @app.post("/twilio/after-stream")
    async def twilio_after_stream(request: Request):
        return await twilio.after_stream_webhook(
            request, settings.twilio_auth_token, app.state.context.registry, settings.public_url
        )

    @app.websocket("/twilio/media")
    async def twilio_media(websocket: WebSocket) -> None:
        await twilio.serve_twilio(websocket, app.state.context, limits)

    @app.api_route("/plivo/answer", methods=["GET", "POST"])
    async def plivo_answer(request: Request):
        return await plivo.answer_webhook(request, settings.plivo_auth_token, settings.public_url)

    @app.websocket("/plivo/media")
    async def plivo_media(websocket: WebSocket) -> None:
        await plivo.serve_plivo(websocket, app.state.context, limits)

    @app.api_route("/vonage/answer", methods=["GET", "POST"])
    async def vonage_answer(request: Request):
        return await vonage.answer_webhook(request, settings.vonage_signature_secret, settings.public_url)

    @app.websocket("/vonage/media")
    async def vonage_media(websocket: WebSocket) -> None:
        await vonage.serve_vonage(websocket, app.state.context, limits)

    @app.websocket("/exotel/media")
    async def exotel_media(websocket: WebSocket) -> None:
        await exotel.serve_exotel(websocket, app.state.context, limits)

    @app.get("/exotel/transfer")
    async def exotel_transfer(request: Request):
        return await exotel.transfer_webhook(request, app.state.context.registry)

    @app.post("/telnyx/voice")
    async def telnyx_voice(request: Request):
        return await telnyx.voice_webhook(request, settings.telnyx_public_key, settings.public_url)

    @app.websocket("/telnyx/media")
    async def telnyx_media(websocket: WebSocket) -> None:
        await telnyx.serve_telnyx(websocket, app.state.context, limits)

    @app.websocket("/ws/pcm/{session_id}")
    async def pcm_media(websocket: WebSocket, session_id: str) -> None:
        await pcm.serve_pcm(websocket, app.state.context, app.state.registry, limits, session_id)

    @app.websocket("/api/pipecat/websocket/{session_id}")
    async def pipecat_media(websocket: WebSocket, session_id: str) -> None:
        await pcm.serve_pcm(websocket, app.state.context, app.state.registry, limits, session_id)

    @app.websocket("/v1/chat/stream")
    async def chat_stream(websocket: WebSocket) -> None:
        await chat.serve_chat(
            websocket,
            app.state.context,
            authenticator,
            limits,
            ping_interval_s=settings.chat_ping_interval_s,
            pong_timeout_s=settings.chat_pong_timeout_s,
        )

    @app.websocket("/v1/realtime")
    async def realtime_socket(websocket: WebSocket) -> None:
        await realtime.serve_realtime(
            websocket, app.state.context, authenticator, limits, protocol=settings.realtime_protocol
        )

    def channel_access() -> channels.ChannelAccess:
        return channels.ChannelAccess(
            calls=app.state.context.calls,
            authenticator=authenticator,
            tokens=channel_tokens,
            open_channels=settings.open_channels,
        )

    @app.websocket("/ws/channels")
    async def channels_socket(websocket: WebSocket) -> None:
        await channels.serve_channels(websocket, app.state.nc, limits, channel_access())

    # Seed 001's browser clients and seed 002's channel clients, told apart by their first message.
    @app.websocket("/ws")
    async def shared_socket(websocket: WebSocket) -> None:
        browser_route = browser.route(
            websocket,
            app.state.context,
            max_message_bytes=settings.max_message_bytes,
            max_utterance_s=settings.max_utterance_s,
            channel_tokens=channel_tokens,
        )
        channels_route = channels.route(websocket, app.state.nc, channel_access())
        await serve_first_message(websocket, limits, browser=browser_route, channels=channels_route)

    retell_path_secret = settings.retell_ws_path.encode()

    # Registered last, since it matches any two-segment WebSocket path. The route's template holds no
    # secret, so neither do the traces' ``http.route`` attributes; the segment is compared in constant time.
    @app.websocket("/{retell_path}/{call_id}")
    async def retell_socket(websocket: WebSocket, retell_path: str, call_id: str) -> None:
        if not hmac.compare_digest(retell_path.encode("utf-8", "surrogatepass"), retell_path_secret):
            await websocket.close(code=1008)
            return
        await retell.serve_retell(websocket, app.state.context, limits, call_id)

    return app

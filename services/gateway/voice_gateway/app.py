"""The gateway's FastAPI application: WebSocket dialects, the agents and calls REST API, the test page,
health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import Body, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Histogram, make_asgi_app
from pydantic import ValidationError

from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_gateway.agents import AGENT_ID, Agent, AgentStore
from voice_gateway.auth import Authenticator
from voice_gateway.call_registry import CallRegistry
from voice_gateway.calls import CallLogStore
from voice_gateway.config import Settings
from voice_gateway.dialects import browser, channels, chat, exotel, pcm, retell, twilio
from voice_gateway.session import GatewayContext
from voice_gateway.turns import TurnEngine
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


def create_app(settings: Settings) -> FastAPI:
    """Builds the gateway; NATS is connected and the stores opened when the app starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_tracing("voice-gateway")
        nc = await connect(settings.nats_url, name="voice-gateway")
        await ensure_streams(nc)
        js = nc.jetstream()
        agents = await AgentStore.open(js)
        await agents.load_default(settings.default_agent_file)
        bus = BusClient(nc)
        http = httpx.AsyncClient(follow_redirects=False)
        app.state.context = GatewayContext(
            bus=bus,
            agents=agents,
            calls=await CallLogStore.open(js),
            engine=TurnEngine(
                bus,
                stt_timeout_s=settings.stt_timeout_s,
                llm_timeout_s=settings.llm_timeout_s,
                tts_timeout_s=settings.tts_timeout_s,
                http=http,
            ),
            registry=await CallRegistry.open(js),
        )
        app.state.nc = nc
        app.state.registry = app.state.context.registry
        lag_monitor = asyncio.create_task(monitor_event_loop_lag())
        logger.info("gateway ready on :%d (NATS %s)", settings.port, settings.nats_url)
        try:
            yield
        finally:
            lag_monitor.cancel()
            await http.aclose()
            with contextlib.suppress(Exception):
                await nc.drain()
            shutdown_tracing()

    app = FastAPI(title="Voice platform gateway", version="0.1.0", lifespan=lifespan)
    app.mount("/metrics", make_asgi_app())
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page)
        return JSONResponse({"service": "voice-gateway", "websocket": "/ws"})

    @app.get("/healthz")
    async def healthz():
        connected = bool(getattr(app.state, "nc", None) and app.state.nc.is_connected)
        return JSONResponse({"status": "ok" if connected else "degraded", "nats": connected}, 200 if connected else 503)

    @app.get("/api/agents/{agent_id}")
    async def get_agent(agent_id: str) -> dict:
        agent = await app.state.context.agents.get(agent_id)
        if agent is None:
            raise HTTPException(404, f"no agent {agent_id!r}")
        return agent.model_dump()

    @app.put("/api/agents/{agent_id}")
    async def put_agent(agent_id: str, body: dict = Body(...)) -> dict:
        if not AGENT_ID.match(agent_id):
            raise HTTPException(400, "agent id must be 1-64 letters, digits, '-' or '_'")
        if body.get("id", agent_id) != agent_id:
            raise HTTPException(400, f"body id {body.get('id')!r} does not match the path's {agent_id!r}")
        try:
            agent = Agent.model_validate({**body, "id": agent_id})
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None
        await app.state.context.agents.put(agent)
        return agent.model_dump()

    @app.delete("/api/agents/{agent_id}", status_code=204)
    async def delete_agent(agent_id: str) -> None:
        if not await app.state.context.agents.delete(agent_id):
            raise HTTPException(404, f"no agent {agent_id!r}")

    @app.get("/api/calls/{call_log_id}")
    async def get_call(call_log_id: str) -> dict:
        log = await app.state.context.calls.get(call_log_id)
        if log is None:
            raise HTTPException(404, f"no call log {call_log_id!r}")
        return log.model_dump(by_alias=True)

    @app.post("/api/calls/trigger")
    async def trigger_call(body: dict = Body(...)) -> dict:
        """Seed 003: announces a raw PCM call; extra body fields become the agent's template variables."""
        agent_id = body.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise HTTPException(422, "agent_id (string) is required")
        if await app.state.context.agents.get(agent_id) is None:
            raise HTTPException(404, f"no agent {agent_id!r}")
        variables = {k: v for k, v in body.items() if k != "agent_id"}
        if any(not isinstance(v, (str, int, float, bool)) for v in variables.values()):
            raise HTTPException(422, "template variables must be strings, numbers or booleans")
        session_id = str(uuid.uuid4())
        await app.state.registry.announce(session_id, agent_id, variables)
        return {
            "session_id": session_id,
            "websocket_url": f"/api/pipecat/websocket/{session_id}",
            "status": "initialized",
        }

    @app.post("/twilio/voice")
    async def twilio_voice(request: Request):
        return await twilio.voice_webhook(request, settings.twilio_auth_token)

    @app.post("/twilio/after-stream")
    async def twilio_after_stream(request: Request):
        return await twilio.after_stream_webhook(request, settings.twilio_auth_token, app.state.context.registry)

    @app.websocket("/twilio/media")
    async def twilio_media(websocket: WebSocket) -> None:
        await twilio.serve(websocket, app.state.context)

    @app.websocket("/exotel/media")
    async def exotel_media(websocket: WebSocket) -> None:
        await exotel.serve(websocket, app.state.context)

    @app.websocket("/ws/pcm/{session_id}")
    async def pcm_media(websocket: WebSocket, session_id: str) -> None:
        await pcm.serve(websocket, app.state.context, app.state.registry, session_id)

    @app.websocket("/api/pipecat/websocket/{session_id}")
    async def pipecat_media(websocket: WebSocket, session_id: str) -> None:
        await pcm.serve(websocket, app.state.context, app.state.registry, session_id)

    @app.websocket(f"/{settings.retell_ws_path}/{{call_id}}")
    async def retell_socket(websocket: WebSocket, call_id: str) -> None:
        await retell.serve(websocket, app.state.context, call_id)

    authenticator = Authenticator(settings.api_keys, settings.token_secret)

    @app.websocket("/v1/chat/stream")
    async def chat_stream(websocket: WebSocket) -> None:
        await chat.serve(
            websocket,
            app.state.context,
            authenticator,
            ping_interval_s=settings.chat_ping_interval_s,
            pong_timeout_s=settings.chat_pong_timeout_s,
        )

    @app.websocket("/ws/channels")
    async def channels_socket(websocket: WebSocket) -> None:
        await channels.serve(websocket, app.state.nc)

    @app.websocket("/ws")
    async def browser_socket(websocket: WebSocket) -> None:
        await browser.serve(
            websocket,
            app.state.context,
            max_message_bytes=settings.max_message_bytes,
            max_utterance_s=settings.max_utterance_s,
        )

    return app

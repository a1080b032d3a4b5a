"""The REST API: agents (``GET/PUT/DELETE /api/agents/{id}``), call logs (``GET /api/calls/{id}``),
seed 003's trigger (``POST /api/calls/trigger``, whose answer carries the session's ``channel_token``)
and channel tokens (``POST /api/channels/token``, see :mod:`voice_gateway.dialects.channels`). Every
route needs one of ``GATEWAY_API_KEYS`` as ``Authorization: Bearer <key>`` or ``X-API-Key`` (but the trigger
when ``GATEWAY_OPEN_ROUTES`` names ``trigger``, see :func:`open_trigger_identity`); bodies are parsed strictly
(:mod:`voice_gateway.api.messages`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from voice_gateway.agents import AGENT_ID, Agent
from voice_gateway.api.auth import API_KEY_HEADER, Authenticator, ChannelTokens, api_key_dependency
from voice_gateway.api.limits import LimitExceeded, Limits
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.api.triggers import PendingTriggers
from voice_gateway.dialects.channels import CHANNEL as CHANNEL_NAME
from voice_gateway.dialects.channels import RESERVED as RESERVED_CHANNELS

PCM_DIALECT = "pcm"
# The pseudo-identity of calls triggered without a key (GATEWAY_OPEN_ROUTES=trigger), followed by the client's address.
OPEN_IDENTITY = "open:"


async def json_object_body(request: Request) -> dict:
    """The request's body as a JSON object, parsed strictly (no ``NaN``, bounded nesting); 422 otherwise."""
    try:
        body = parse_json(await request.body())
    except InvalidJson as exc:
        raise HTTPException(422, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "the body must be a JSON object")
    return body


def open_trigger_identity(authenticator: Authenticator):
    """The trigger's dependency when ``GATEWAY_OPEN_ROUTES`` names ``trigger`` (unchanged seed 003 clients).

    A request that presents a key is checked as everywhere else (a wrong key is still a 401, never a
    silent downgrade); one that presents none is admitted under the pseudo-identity
    ``open:<client address>``, so its calls still count against ``GATEWAY_MAX_SESSIONS_PER_KEY`` and
    ``GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY``.
    """
    require_api_key = api_key_dependency(authenticator)

    async def identity(request: Request) -> str:
        if "authorization" in request.headers or API_KEY_HEADER in request.headers:
            return await require_api_key(request)
        return OPEN_IDENTITY + (request.client.host if request.client else "unknown")

    return identity


def rest_router(
    authenticator: Authenticator,
    limits: Limits,
    triggers: PendingTriggers,
    *,
    channel_tokens: ChannelTokens,
    open_routes: tuple[str, ...] = (),
) -> APIRouter:
    """The REST routes; they read the stores from ``request.app.state.context``.

    Args:
        authenticator: Checks the API keys.
        limits: The gateway's session limits (a trigger counts against its key's sessions).
        triggers: Triggered calls not yet connected, per key (429 beyond its limit).
        channel_tokens: Issues the channel tokens of ``/ws/channels`` (trigger and ``/api/channels/token``).
        open_routes: ``GATEWAY_OPEN_ROUTES``: with ``trigger``, the trigger needs no key
            (:func:`open_trigger_identity`).
    """
    router = APIRouter()
    api_key = Depends(api_key_dependency(authenticator))
    trigger_identity = Depends(open_trigger_identity(authenticator)) if "trigger" in open_routes else api_key

    @router.get("/api/agents/{agent_id}")
    async def get_agent(request: Request, agent_id: str, _: str = api_key) -> dict:
        agent = await request.app.state.context.agents.get(agent_id)
        if agent is None:
            raise HTTPException(404, f"no agent {agent_id!r}")
        return agent.model_dump()

    @router.put("/api/agents/{agent_id}")
    async def put_agent(
        request: Request, agent_id: str, body: dict = Depends(json_object_body), _: str = api_key
    ) -> dict:
        if not AGENT_ID.fullmatch(agent_id):
            raise HTTPException(400, "agent id must be 1-64 letters, digits, '-' or '_'")
        if body.get("id", agent_id) != agent_id:
            raise HTTPException(400, f"body id {body.get('id')!r} does not match the path's {agent_id!r}")
        try:
            agent = Agent.model_validate({**body, "id": agent_id})
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None
        if any(tool.client for tool in agent.tools):
            # No client of a stored agent's other dialects would run them: they belong to a realtime session.
            raise HTTPException(422, "client tools are set per session by OpenAI Realtime clients, not stored")
        await request.app.state.context.agents.put(agent)
        return agent.model_dump()

    @router.delete("/api/agents/{agent_id}", status_code=204)
    async def delete_agent(request: Request, agent_id: str, _: str = api_key) -> None:
        if not await request.app.state.context.agents.delete(agent_id):
            raise HTTPException(404, f"no agent {agent_id!r}")

    @router.get("/api/calls/{call_log_id}")
    async def get_call(request: Request, call_log_id: str, _: str = api_key) -> dict:
        log = await request.app.state.context.calls.get(call_log_id)
        if log is None:
            raise HTTPException(404, f"no call log {call_log_id!r}")
        return log.model_dump(by_alias=True)

    @router.post("/api/calls/trigger")
    async def trigger_call(
        request: Request, body: dict = Depends(json_object_body), identity: str = trigger_identity
    ) -> dict:
        """Seed 003: announces a raw PCM call; extra body fields become the agent's template variables.

        The call will count against the caller's API key (or, without one on an open trigger, against
        ``open:<client address>``); one already at its maximum of sessions on this gateway is answered 429.
        """
        try:
            limits.check_key_capacity(PCM_DIALECT, identity)
        except LimitExceeded as exc:
            raise HTTPException(429, exc.reason, headers={"Retry-After": "5"}) from None
        if triggers.full(identity):
            raise HTTPException(
                429,
                f"this {'client' if identity.startswith(OPEN_IDENTITY) else 'API key'} already has {triggers.limit} "
                "triggered calls waiting to connect; connect or let "
                "them expire first",
                headers={"Retry-After": "5"},
            )
        agent_id = body.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise HTTPException(422, "agent_id (string) is required")
        if await request.app.state.context.agents.get(agent_id) is None:
            raise HTTPException(404, f"no agent {agent_id!r}")
        variables = {k: v for k, v in body.items() if k != "agent_id"}
        if any(not isinstance(v, (str, int, float, bool)) for v in variables.values()):
            raise HTTPException(422, "template variables must be strings, numbers or booleans")
        session_id = str(uuid.uuid4())
        await request.app.state.registry.announce(session_id, agent_id, variables, owner=identity)
        triggers.add(identity, session_id)
        channel_token, _ = channel_tokens.issue(session_id)
        return {
            "session_id": session_id,
            "websocket_url": f"/api/pipecat/websocket/{session_id}",
            "channel_token": channel_token,
            "status": "initialized",
        }

    @router.post("/api/channels/token")
    async def issue_channel_token(body: dict = Depends(json_object_body), _: str = api_key) -> dict:
        """A channel token for ``channel`` (a session id): the right to follow that session's statuses on
        ``/ws/channels`` without the API key, e.g. for a dashboard; valid on every replica (see
        :class:`~voice_gateway.api.auth.ChannelTokens`). Any valid channel name may be asked for, so a
        token can be handed out before the session starts."""
        channel = body.get("channel")
        if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel) or channel in RESERVED_CHANNELS:
            raise HTTPException(422, "channel (string) is required: 1-128 letters, digits, '-' or '_'")
        token, expires = channel_tokens.issue(channel)
        return {"channel": channel, "token": token, "expires_at": expires}

    return router

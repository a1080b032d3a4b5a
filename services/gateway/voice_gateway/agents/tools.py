"""Agent tools: what the gateway runs when the model calls a function.

An agent's tools are built-ins that act on the call (``end_call``, ``transfer_call``, ``press_digit``)
and HTTP webhook tools. Every run ends in a :class:`ToolOutcome` whose ``content`` goes back to the model as
the ``tool`` message: a webhook that fails, answers an error status or takes longer than its
``timeout_s`` yields an error result (``successful`` false), never an exception or a stuck turn.

Webhook tools are called with ``POST`` (or ``PUT``/``PATCH``) and a JSON body::

    {"name": "get_order", "arguments": {...}, "tool_call_id": "...", "session_id": "...", "agent_id": "..."}

or with ``GET``/``DELETE`` and the arguments as query parameters. The response body (JSON or text,
at most :data:`MAX_RESULT_CHARS` characters; the rest is never read) is the result the model sees.
Requests go through :class:`~voice_gateway.agents.egress_client.EgressClient`: a URL (or a redirect) to a
loopback, private, link-local or cluster-internal destination is refused with an error result, unless
the gateway's allow-list (``GATEWAY_TOOL_ALLOWED_NETWORKS``, ``GATEWAY_TOOL_ALLOWED_HOSTS``) admits it.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from voice.v1 import llm_pb2
from voice_gateway.agents.egress import EgressError, EgressRefused
from voice_gateway.agents.egress_client import MAX_BODY_CHARS, EgressClient
from voice_gateway.agents.store import Agent, Tool

logger = logging.getLogger(__name__)

MAX_RESULT_CHARS = MAX_BODY_CHARS
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class CallAction:
    """Something a built-in tool asks of the call, done once the answer has been spoken.

    When one turn's tools ask for several, the first in :data:`ACTION_PRECEDENCE` wins (Retell's rule:
    ``end_call`` > ``transfer_number`` > ``digit_to_press``); among equals, the first asked.

    Attributes:
        kind: ``end_call``, ``transfer_call`` or ``press_digit``.
        number: The number to transfer to (``transfer_call`` only).
        reason: Why, in the model's words (for the call log).
        digit: The key to press (``press_digit`` only).
        show_transferee_as_caller: The transferee sees the caller's number (``transfer_call``, Retell).
    """

    kind: str
    number: str = ""
    reason: str = ""
    digit: str = ""
    show_transferee_as_caller: bool = False

    @property
    def ends_call(self) -> bool:
        """Whether the call ends with it (``press_digit`` goes on)."""
        return self.kind in ("end_call", "transfer_call")

    def outranks(self, other: CallAction | None) -> bool:
        """Whether this action wins over ``other`` (which was asked first) by :data:`ACTION_PRECEDENCE`."""
        return other is None or ACTION_PRECEDENCE.index(self.kind) < ACTION_PRECEDENCE.index(other.kind)


ACTION_PRECEDENCE = ("end_call", "transfer_call", "press_digit")
KEYPAD = frozenset("0123456789*#")


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool call, as the model will read it."""

    content: str
    successful: bool
    action: CallAction | None = None


@dataclass(frozen=True)
class Invocation:
    """One tool call of the model, with the session it belongs to."""

    tool_call_id: str
    name: str
    arguments: dict[str, Any]
    session_id: str
    agent_id: str


class AgentTool(abc.ABC):
    """A tool the model may call.

    Args:
        config: The tool's entry in the agent.
    """

    def __init__(self, config: Tool) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def spec(self) -> llm_pb2.Tool:
        """The tool as the LLM request describes it."""
        return llm_pb2.Tool(
            name=self.config.name,
            description=self.config.description,
            parameters_json=json.dumps(self.config.parameters),
        )

    @abc.abstractmethod
    async def run(self, invocation: Invocation) -> ToolOutcome:
        """Runs one call; errors are results, not exceptions."""


class EndCallTool(AgentTool):
    """Hangs up once the agent's answer has been spoken."""

    async def run(self, invocation: Invocation) -> ToolOutcome:
        reason = str(invocation.arguments.get("reason") or "")
        return ToolOutcome("The call will end after your reply.", True, CallAction("end_call", reason=reason))


class TransferCallTool(AgentTool):
    """Transfers the caller to the agent's configured number, or the number the model gives."""

    async def run(self, invocation: Invocation) -> ToolOutcome:
        number = self.config.transfer_number or str(invocation.arguments.get("number") or "").strip()
        if not number:
            return ToolOutcome(json.dumps({"error": "no number to transfer to"}), False)
        reason = str(invocation.arguments.get("reason") or "")
        action = CallAction(
            "transfer_call",
            number=number,
            reason=reason,
            show_transferee_as_caller=self.config.show_transferee_as_caller,
        )
        return ToolOutcome(f"The caller will be transferred to {number} after your reply.", True, action)


class PressDigitTool(AgentTool):
    """Presses one keypad key (``0``-``9``, ``*``, ``#``) once the agent's answer has been spoken."""

    async def run(self, invocation: Invocation) -> ToolOutcome:
        digit = str(invocation.arguments.get("digit") or "").strip()
        if digit not in KEYPAD:
            return _error(f"digit must be one key: 0-9, * or #, not {digit!r}")
        return ToolOutcome(
            f"The key {digit} will be pressed after your reply.", True, CallAction("press_digit", digit=digit)
        )


class ClientTool(AgentTool):
    """A tool the client runs (OpenAI Realtime's function tools): the engine hands the call to the dialect
    and ends the turn; the client sends the result and asks for the next answer."""

    async def run(self, invocation: Invocation) -> ToolOutcome:
        return _error(f"{invocation.name} runs on the client")


class WebhookTool(AgentTool):
    """Calls the tool's URL and returns the response body.

    Args:
        config: The tool's entry in the agent (``url``, ``method``, ``headers``, ``timeout_s``).
        egress: The gateway's client for webhooks, which enforces its egress policy.
    """

    def __init__(self, config: Tool, egress: EgressClient) -> None:
        super().__init__(config)
        self._egress = egress

    async def run(self, invocation: Invocation) -> ToolOutcome:
        config = self.config
        method = config.method.upper()
        request: dict[str, Any] = {"headers": config.headers}
        name = invocation.name
        if method in BODY_METHODS:
            request["json"] = {
                "name": invocation.name,
                "arguments": invocation.arguments,
                "tool_call_id": invocation.tool_call_id,
                "session_id": invocation.session_id,
                "agent_id": invocation.agent_id,
            }
        else:
            request["params"] = {k: _query_value(v) for k, v in invocation.arguments.items()}
        try:
            async with asyncio.timeout(config.timeout_s):
                response = await self._egress.request(method, config.url, **request)
        except TimeoutError:
            return _error(f"the {name} service did not answer within {config.timeout_s:g} s")
        except EgressRefused as exc:
            message = exc.describe(name)
            logger.warning("agent %s, session %s: %s", invocation.agent_id, invocation.session_id, message)
            return _error(message)
        except EgressError as exc:
            return _error(f"the {name} service {exc}")
        if response.is_error:
            return _error(f"the {name} service answered HTTP {response.status_code}", response.text)
        return ToolOutcome(response.text or json.dumps({"status": response.status_code}), True)


def _query_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _error(message: str, detail: str = "") -> ToolOutcome:
    payload = {"error": message}
    if detail:
        payload["detail"] = detail
    return ToolOutcome(json.dumps(payload), False)


class Toolbox:
    """The tools of one agent, ready to describe to the model and to run.

    Args:
        agent: The agent whose ``tools`` are used.
        egress: The gateway's client for webhook tools.
    """

    def __init__(self, agent: Agent, egress: EgressClient) -> None:
        self._agent = agent
        self._tools: dict[str, AgentTool] = {}
        for config in agent.tools:
            if config.client:
                self._tools[config.name] = ClientTool(config)
            elif config.url:
                self._tools[config.name] = WebhookTool(config, egress)
            elif config.name == "end_call":
                self._tools[config.name] = EndCallTool(config)
            elif config.name == "transfer_call":
                self._tools[config.name] = TransferCallTool(config)
            elif config.name == "press_digit":
                self._tools[config.name] = PressDigitTool(config)

    def __bool__(self) -> bool:
        return bool(self._tools)

    def specs(self) -> list[llm_pb2.Tool]:
        return [tool.spec() for tool in self._tools.values()]

    def runs_on_client(self, name: str) -> bool:
        """Whether tool ``name`` is the client's to run (:class:`ClientTool`): the turn ends at its call."""
        return isinstance(self._tools.get(name), ClientTool)

    def exposes_result(self, name: str) -> bool:
        """Whether the agent lets unauthenticated clients see the results of tool ``name`` (``expose_result``)."""
        tool = self._tools.get(name)
        return tool is not None and tool.config.expose_result

    async def run(self, call: llm_pb2.ToolCall, session_id: str) -> ToolOutcome:
        """Runs one of the model's tool calls; unknown tools and bad arguments are error results."""
        tool = self._tools.get(call.name)
        if tool is None:
            return _error(f"there is no tool named {call.name!r}; available: {', '.join(self._tools) or 'none'}")
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return _error(f"the arguments are not valid JSON ({exc.msg})")
        if not isinstance(arguments, dict):
            return _error("the arguments must be a JSON object")
        invocation = Invocation(call.id, call.name, arguments, session_id, self._agent.id)
        try:
            return await tool.run(invocation)
        except Exception as exc:
            logger.exception("tool %s failed in session %s", call.name, session_id)
            return _error(f"the tool failed ({type(exc).__name__})")

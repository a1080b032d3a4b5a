"""Streaming chat completions: the engine interface, its events and the request validation.

An engine turns a chat request into :class:`TokenDelta` events, one per content delta as it arrives,
followed by exactly one :class:`Completion` that carries the full text, the assembled tool calls, the
finish reason, token usage (when the backend reports it) and timings. :mod:`voice_llm.openai_engine`
is the engine that speaks the OpenAI Chat Completions protocol through the ``openai`` client.

Errors are reduced to two kinds: :class:`InvalidRequest` for requests that can never succeed
(rejected locally or by the backend with a 4xx) and :class:`BackendUnavailable` for everything
that might succeed later (connection failures, timeouts, 5xx, streams cut short).
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
TOOL_CHOICE_MODES = frozenset({"auto", "none", "required"})
MAX_STOP_SEQUENCES = 4
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class InvalidRequest(ValueError):
    """The request can never succeed as given: rejected locally or by the backend with a 4xx."""


class BackendUnavailable(Exception):
    """The backend could not serve the request: unreachable, timed out, 5xx or a broken stream."""


@dataclass(frozen=True)
class ToolCall:
    """A function call requested by the model.

    Attributes:
        id: The backend's identifier for the call, echoed back in the ``tool`` message.
        name: The function name.
        arguments: The arguments as JSON text, exactly as the model produced them.
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Token accounting for one completion, as reported by the backend."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenDelta:
    """A piece of assistant text, yielded as soon as the backend streams it."""

    text: str


@dataclass(frozen=True)
class Completion:
    """The final event of a stream.

    Attributes:
        text: The whole assistant text (the concatenation of all deltas).
        tool_calls: The assembled tool calls, in the backend's index order.
        finish_reason: ``"stop"``, ``"length"``, ``"tool_calls"``, ``"content_filter"``...
        usage: Token counts, or ``None`` when the backend does not report them in streaming mode.
        model: The model name reported by the backend (or the one requested).
        time_to_first_token_s: Seconds from sending the request to the first content or
            tool-call delta; equals ``total_time_s`` when none arrived.
        total_time_s: Seconds from sending the request to the end of the stream.
    """

    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    usage: Usage | None
    model: str
    time_to_first_token_s: float
    total_time_s: float


class ToolCallAssembler:
    """Rebuilds tool calls from streamed ``choice.delta.tool_calls`` fragments.

    OpenAI sends each call's ``id`` and ``name`` once, in the first fragment for its ``index``,
    and the ``arguments`` JSON in pieces across later fragments. Some backends (llama-cpp-python)
    repeat ``id`` and ``name`` in every fragment, so the first non-empty value wins.
    """

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def feed(self, fragments: Iterable[Any] | None) -> None:
        """Adds one delta's tool-call fragments.

        Args:
            fragments: ``ChoiceDeltaToolCall`` objects (or mappings of the same shape); ``None``
                is accepted and ignored.
        """
        for fragment in fragments or ():
            index = _field(fragment, "index")
            if index is None:
                index = max(self._calls, default=0)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            call_id = _field(fragment, "id")
            if call_id and not call["id"]:
                call["id"] = call_id
            function = _field(fragment, "function")
            if function is None:
                continue
            name = _field(function, "name")
            if name and not call["name"]:
                call["name"] = name
            arguments = _field(function, "arguments")
            if arguments:
                call["arguments"].append(arguments)

    def result(self) -> tuple[ToolCall, ...]:
        """Returns the calls assembled so far, ordered by index."""
        return tuple(
            ToolCall(id=call["id"], name=call["name"], arguments="".join(call["arguments"]))
            for _, call in sorted(self._calls.items())
        )


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class ChatEngine(abc.ABC):
    """A source of streamed chat completions."""

    async def start(self) -> None:
        """Acquires resources (clients, connections). Idempotent."""

    async def close(self) -> None:
        """Releases resources. Idempotent."""

    @abc.abstractmethod
    def stream(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[TokenDelta | Completion]:
        """Streams one chat completion.

        Args:
            messages: OpenAI chat messages (``{"role": ..., "content": ...}``).
            tools: OpenAI function tools: ``{"type": "function", "function": {...}}``.
            tool_choice: ``"auto"``, ``"none"``, ``"required"``, the name of one of ``tools``
                (forces that function) or ``{"type": "function", "function": {"name": ...}}``.
            model: Overrides the engine's default model.
            max_tokens: Upper bound on generated tokens (at least 1).
            temperature: Sampling temperature in [0, 2].
            top_p: Nucleus sampling mass in [0, 1].
            stop: Up to four stop sequences.
            seed: Sampling seed: the same request with the same seed streams the same answer
                (where the backend honours it: llama.cpp, vLLM; OpenAI on a best-effort basis).

        Yields:
            A :class:`TokenDelta` per content delta as it arrives, then exactly one
            :class:`Completion`. Closing the iterator (or cancelling its consumer) closes the
            upstream stream.

        Raises:
            InvalidRequest: The request is malformed or the backend rejected it (4xx).
            BackendUnavailable: The backend is unreachable, failed (5xx) or cut the stream short.
        """

    @abc.abstractmethod
    async def ready(self) -> bool:
        """Returns whether the backend answers requests right now."""


def validate_request(
    messages: Any,
    *,
    tools: Any = None,
    tool_choice: Any = None,
    model: Any = None,
    max_tokens: Any = None,
    temperature: Any = None,
    top_p: Any = None,
    stop: Any = None,
) -> str | dict | None:
    """Checks a chat request before it goes to a backend.

    Args:
        messages: See :meth:`ChatEngine.stream`; the other arguments likewise.
        tools: See :meth:`ChatEngine.stream`.
        tool_choice: See :meth:`ChatEngine.stream`.
        model: See :meth:`ChatEngine.stream`.
        max_tokens: See :meth:`ChatEngine.stream`.
        temperature: See :meth:`ChatEngine.stream`.
        top_p: See :meth:`ChatEngine.stream`.
        stop: See :meth:`ChatEngine.stream`.

    Returns:
        ``tool_choice`` in OpenAI wire form: a bare function name becomes
        ``{"type": "function", "function": {"name": name}}``.

    Raises:
        InvalidRequest: Describing the first problem found.
    """
    _validate_messages(messages)
    tool_names = _validate_tools(tools)
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("model must be a non-empty string")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise InvalidRequest(f"temperature must be a number in [0, 2], got {temperature!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise InvalidRequest(f"top_p must be a number in [0, 1], got {top_p!r}")
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"stop must be a list of at most {MAX_STOP_SEQUENCES} strings")
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop sequences must be non-empty strings")
    return _normalize_tool_choice(tool_choice, tool_names)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{i}] must be a dict")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}")
        content = message.get("content")
        has_tool_calls = bool(message.get("tool_calls"))
        if content is None:
            if not (role == "assistant" and has_tool_calls):
                raise InvalidRequest(f"messages[{i}] ({role}) has no content")
        elif not isinstance(content, (str, list)):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        if has_tool_calls and role != "assistant":
            raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequest(f"messages[{i}]: a tool message needs a tool_call_id")


def _validate_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequest(f"tools[{i}].function must be a dict")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must match {_TOOL_NAME.pattern}")
        if name in names:
            raise InvalidRequest(f"tools[{i}]: duplicate function name {name!r}")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, Mapping):
                raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object")
            schema_type = parameters.get("type", "object")
            if schema_type != "object":
                raise InvalidRequest(f'tools[{i}].function.parameters must have "type": "object", got {schema_type!r}')
            properties = parameters.get("properties")
            if properties is not None and not isinstance(properties, Mapping):
                raise InvalidRequest(f"tools[{i}].function.parameters.properties must be a dict")
    return names


def _normalize_tool_choice(tool_choice: Any, tool_names: set[str]) -> str | dict | None:
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICE_MODES:
        if tool_choice == "required" and not tool_names:
            raise InvalidRequest('tool_choice "required" needs tools')
        return tool_choice
    if isinstance(tool_choice, str):
        name = tool_choice
    elif (
        isinstance(tool_choice, Mapping)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), Mapping)
    ):
        name = tool_choice["function"].get("name")
    else:
        raise InvalidRequest(
            'tool_choice must be "auto", "none", "required", a tool name or '
            '{"type": "function", "function": {"name": ...}}'
        )
    if name not in tool_names:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools")
    return {"type": "function", "function": {"name": name}}

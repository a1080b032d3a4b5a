"""The embedded backend's chat handler: ChatML with OpenAI tool calls that a voice agent's tool loop can use.

llama-cpp-python's own ``chatml-function-calling`` handler cannot run a tool loop: its template drops
``tool`` messages (the model never sees a tool's result), with ``tool_choice="auto"`` it generates the
text answer under a grammar that only admits another call or an empty reply, it cannot stream an
``auto`` tool call, and it has no ``"required"`` mode. This module registers a replacement under
:data:`HANDLER_NAME`; ``python -m voice_llm.embedded_server`` imports it so that the server can select
it with ``--chat_format``. The prompt it renders and the grammars it samples under are
:mod:`voice_llm.chatml_tools`'s.

What each ``tool_choice`` does (``None`` means ``"auto"`` when tools are given, as in OpenAI):

* ``"none"``, or no tools: the plain prompt, streamed as free text with the request's sampling,
  ``stop``, ``max_tokens``, ``grammar`` and ``response_format``.
* ``"auto"``: a decision pass at temperature 0 on the tool prompt, constrained by the grammar
  ``"message:" | "functions." <name> ":"``; then either the text answer as for ``"none"`` or one call
  of the chosen function as for a forced tool.
* ``"required"``: the same decision without the ``message:`` branch (no pass at all for one tool).
* ``{"type": "function", "function": {"name": ...}}``: the tool prompt followed by
  ``functions.<name>:`` and a newline, and the arguments generated under a grammar built from the
  tool's JSON schema (any JSON object when the schema cannot be converted). Strings may not hold raw
  control characters, so complete arguments always parse.

A call is streamed the OpenAI way: a role chunk, a chunk with ``tool_calls[0]`` carrying ``index``,
``id``, ``type`` and ``function.name`` (and empty ``arguments``), chunks with argument pieces, then
``finish_reason="tool_calls"`` (``"length"`` when ``max_tokens`` cut the arguments short). At most
one call is made per completion. The decision and the arguments are sampled without repetition
penalties: arguments copy words from the conversation by design. The request's ``stop`` sequences
apply to text answers only.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import register_chat_completion_handler

from voice_llm.chatml_tools import (
    CALL_PREFIX,
    END_OF_TURN,
    arguments_grammar,
    decision_grammar,
    render_call,
    render_prompt,
    tool_functions,
)
from voice_llm.embedded import CHAT_FORMAT

logger = logging.getLogger(__name__)

HANDLER_NAME = CHAT_FORMAT
# Arguments of a request that sets no max_tokens stop here rather than at the end of the context.
DEFAULT_ARGUMENT_TOKENS = 512
_NEUTRAL_PENALTIES = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _forced_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return function["name"]
        raise ValueError(f"unsupported tool_choice {tool_choice!r}")
    return None


def _legacy_to_tools(functions: Any, function_call: Any, tools: Any, tool_choice: Any) -> tuple[Any, Any]:
    if functions and not tools:
        tools = [{"type": "function", "function": function} for function in functions]
    if function_call is not None and tool_choice is None:
        if isinstance(function_call, str):
            tool_choice = function_call
        elif isinstance(function_call, Mapping) and "name" in function_call:
            tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    return tools, tool_choice


def _chunk(chat_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


class _Request:
    """One chat completion request: its passes over the model and their OpenAI-shaped results."""

    def __init__(self, llama: Any, model: str | None, sampling: dict[str, Any]) -> None:
        self.llama = llama
        self.model = model
        self.sampling = sampling
        self.chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def complete(self, prompt: str, **options: Any) -> Any:
        """Runs ``llama.create_completion`` with the request's sampling overridden by ``options``."""
        return self.llama.create_completion(prompt=prompt, model=self.model, **{**self.sampling, **options})

    def decide(self, prompt: str, names: Sequence[str], allow_message: bool) -> str | None:
        """Runs the decision pass; returns the chosen function name, or ``None`` for a text answer."""
        grammar = llama_grammar.LlamaGrammar.from_string(
            decision_grammar(names, allow_message), verbose=self.llama.verbose
        )
        completion = self.complete(
            prompt,
            grammar=grammar,
            temperature=0.0,
            max_tokens=len(CALL_PREFIX) + max(len(name) for name in names) + 2,  # one token a character at worst
            stop=[":"],
            stream=False,
            **_NEUTRAL_PENALTIES,
        )
        text = completion["choices"][0]["text"].strip()
        name = text.removeprefix(CALL_PREFIX) if text.startswith(CALL_PREFIX) else None
        if name is not None and name not in names:
            logger.warning("decision pass produced %r; answering in words", text)
            name = None
        if name is None and not allow_message:
            name = names[0]
        logger.debug("decision: %s", name or "message")
        return name

    def message(self, prompt: str, stream: bool, **options: Any) -> Any:
        """Generates a text answer; returns an OpenAI chat completion or an iterator of chunks."""
        result = self.complete(prompt, stream=stream, **options)
        if stream:
            return self._stream_message(result)
        choice = result["choices"][0]
        return self._completion(
            {"role": "assistant", "content": choice["text"]}, choice["finish_reason"], result["usage"], result
        )

    def _stream_message(self, chunks: Iterator[dict]) -> Iterator[dict]:
        model = self.model or ""
        started = False
        for chunk in chunks:  # drained to the end, so that llama.cpp saves the state to its cache
            model = chunk.get("model") or model
            if not started:
                started = True
                yield _chunk(self.chat_id, self.created, model, {"role": "assistant", "content": ""})
            choice = chunk["choices"][0]
            if choice["text"]:
                yield _chunk(self.chat_id, self.created, model, {"content": choice["text"]})
            if choice["finish_reason"] is not None:
                yield _chunk(self.chat_id, self.created, model, {}, choice["finish_reason"])

    def call(self, prompt: str, function: Mapping[str, Any], stream: bool, max_tokens: int | None) -> Any:
        """Generates one call of ``function``; returns an OpenAI chat completion or an iterator of chunks."""
        name = function["name"]
        grammar = llama_grammar.LlamaGrammar.from_string(
            arguments_grammar(function.get("parameters")), verbose=self.llama.verbose
        )
        result = self.complete(
            prompt + render_call(name, ""),
            grammar=grammar,
            stream=stream,
            stop=[END_OF_TURN],
            max_tokens=max_tokens or DEFAULT_ARGUMENT_TOKENS,
            **_NEUTRAL_PENALTIES,
        )
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        if stream:
            return self._stream_call(result, name, call_id)
        choice = result["choices"][0]
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": choice["text"]}}
            ],
        }
        return self._completion(message, _call_finish_reason(choice["finish_reason"]), result["usage"], result)

    def _stream_call(self, chunks: Iterator[dict], name: str, call_id: str) -> Iterator[dict]:
        model = self.model or ""
        started = False
        for chunk in chunks:
            model = chunk.get("model") or model
            if not started:
                started = True
                yield _chunk(self.chat_id, self.created, model, {"role": "assistant", "content": None})
                opening = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                yield _chunk(self.chat_id, self.created, model, {"tool_calls": [opening]})
            choice = chunk["choices"][0]
            if choice["text"]:
                piece = {"index": 0, "function": {"arguments": choice["text"]}}
                yield _chunk(self.chat_id, self.created, model, {"tool_calls": [piece]})
            if choice["finish_reason"] is not None:
                yield _chunk(self.chat_id, self.created, model, {}, _call_finish_reason(choice["finish_reason"]))

    def _completion(self, message: dict, finish_reason: str, usage: dict, result: Mapping[str, Any]) -> dict:
        return {
            "id": self.chat_id,
            "object": "chat.completion",
            "created": self.created,
            "model": result.get("model") or self.model or "",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage,
        }


def _call_finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "tool_calls"


@register_chat_completion_handler(HANDLER_NAME)
def voice_chatml_tools(
    llama: Any,
    messages: list[dict[str, Any]],
    functions: list[dict[str, Any]] | None = None,
    function_call: Any = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    stream: bool = False,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    response_format: Any = None,
    max_tokens: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_penalty: float = 1.1,
    tfs_z: float = 1.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    model: str | None = None,
    logits_processor: Any = None,
    grammar: Any = None,
    logit_bias: dict[str, float] | None = None,
    **kwargs: Any,
) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Serves one chat completion for llama-cpp-python (a ``LlamaChatCompletionHandler``).

    Args:
        llama: The ``llama_cpp.Llama`` model.
        messages: OpenAI chat messages.
        functions: Legacy OpenAI functions, turned into ``tools``.
        function_call: Legacy OpenAI function choice, turned into ``tool_choice``.
        tools: OpenAI function tools.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function":
            {"name": ...}}``; ``None`` means ``"auto"`` with tools and ``"none"`` without.
        temperature: Sampling temperature of text answers and arguments.
        top_p: Nucleus sampling mass.
        top_k: Top-k sampling.
        min_p: Min-p sampling.
        typical_p: Typical sampling.
        stream: Whether to return an iterator of ``chat.completion.chunk`` dicts.
        stop: Stop sequences of text answers (``<|im_end|>`` is always one).
        seed: Sampling seed.
        response_format: ``{"type": "json_object"}``, optionally with a ``schema``, for text answers.
        max_tokens: Cap on generated tokens (of the text or of the arguments).
        presence_penalty: Presence penalty of text answers.
        frequency_penalty: Frequency penalty of text answers.
        repeat_penalty: Repetition penalty of text answers.
        tfs_z: Tail-free sampling.
        mirostat_mode: Mirostat mode.
        mirostat_tau: Mirostat target entropy.
        mirostat_eta: Mirostat learning rate.
        model: The model name to report.
        logits_processor: Extra logits processors.
        grammar: A grammar for text answers.
        logit_bias: Token biases.
        **kwargs: Other options, ignored (``logprobs`` is not supported).

    Returns:
        An OpenAI chat completion dict, or an iterator of chunk dicts when ``stream`` is true.

    Raises:
        ValueError: ``tool_choice`` names a missing tool, or is ``"required"`` without tools.
    """
    tools, tool_choice = _legacy_to_tools(functions, function_call, tools, tool_choice)
    available = tool_functions(tools)
    forced = _forced_name(tool_choice)
    if tool_choice is None:
        tool_choice = "auto" if available else "none"
    if (forced is not None or tool_choice == "required") and not available:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if forced is not None and forced not in {function["name"] for function in available}:
        raise ValueError(f"tool_choice names {forced!r}, which is not among the tools")

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    request = _Request(
        llama,
        model,
        {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "typical_p": typical_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "repeat_penalty": repeat_penalty,
            "tfs_z": tfs_z,
            "mirostat_mode": mirostat_mode,
            "mirostat_tau": mirostat_tau,
            "mirostat_eta": mirostat_eta,
            "seed": seed,
            "logits_processor": logits_processor,
            "logit_bias": logit_bias,
        },
    )

    def answer() -> Any:
        text_grammar = grammar
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_object":
            text_grammar = llama_grammar.LlamaGrammar.from_string(
                arguments_grammar(response_format.get("schema"), any_json=True), verbose=llama.verbose
            )
        return request.message(
            render_prompt(messages),
            stream,
            grammar=text_grammar,
            stop=[*stops, END_OF_TURN],
            max_tokens=max_tokens,
        )

    if not available or tool_choice == "none":
        return answer()

    prompt = render_prompt(messages, tools)
    if forced is not None:
        name: str | None = forced
    elif tool_choice == "required" and len(available) == 1:
        name = available[0]["name"]
    elif tool_choice in {"auto", "required"}:
        name = request.decide(prompt, [function["name"] for function in available], tool_choice == "auto")
    else:
        raise ValueError(f"unsupported tool_choice {tool_choice!r}")
    if name is None:
        return answer()
    function = next(function for function in available if function["name"] == name)
    return request.call(prompt, function, stream, max_tokens)

"""The embedded backend's chat handler: ChatML with OpenAI tool calls that a voice agent's tool loop can use.

llama-cpp-python's own ``chatml-function-calling`` handler cannot run a tool loop: its template drops
``tool`` messages (the model never sees a tool's result), with ``tool_choice="auto"`` it generates the
text answer under a grammar that only admits another call or an empty reply, it cannot stream an
``auto`` tool call, and it has no ``"required"`` mode. This module registers a replacement under
:data:`HANDLER_NAME`; ``python -m voice_llm.embedded_server`` imports it so that the server can select
it with ``--chat_format``.

Prompt format (ChatML, which SmolLM2 was tuned on)::

    <|im_start|>system
    {system prompt}

    You can call these functions:
    functions.get_weather: Get the current weather for a city.
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    To call a function, reply with "functions.<name>:" and its JSON arguments on the next line.
    To answer in words, reply with "message:" and your answer on the next line.<|im_end|>
    <|im_start|>user
    What is the weather in Paris?<|im_end|>
    <|im_start|>assistant
    functions.get_weather:
    {"city": "Paris"}<|im_end|>
    <|im_start|>tool
    {"temperature": 18, "sky": "sunny"}<|im_end|>
    <|im_start|>assistant

* ``system`` (and ``developer``), ``user`` and text ``assistant`` messages are ChatML turns holding their
  text; list contents keep their text parts.
* An assistant message's tool calls follow its text in the same turn, one ``functions.<name>:`` line
  and one line of JSON arguments per call: the very form the model is asked to produce.
* A ``tool`` (or legacy ``function``) message is a ``tool`` turn holding the result text as is.
  SmolLM2-135M answers from a bare result better than from one wrapped in a label or in a ``user``
  turn, and the results follow their calls in order.
* The function list and the reply instructions, the *tool prompt*, are appended to the first system
  message (one is added when there is none) only for the passes that may call a function. Text
  answers are always generated from the *plain prompt*, without them: a 135M model shown JSON schemas
  keeps answering in JSON. llama.cpp reuses the evaluated prefix of the last prompt, and the
  embedded server's RAM prompt cache keeps the state of both prompts, so alternating between them
  costs no re-evaluation of the conversation.

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

import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import register_chat_completion_handler

from voice_llm.embedded import CHAT_FORMAT

logger = logging.getLogger(__name__)

HANDLER_NAME = CHAT_FORMAT
END_OF_TURN = "<|im_end|>"
MESSAGE_MARKER = "message:"
CALL_PREFIX = "functions."
TOOL_INSTRUCTIONS = (
    'To call a function, reply with "functions.<name>:" and its JSON arguments on the next line.\n'
    'To answer in words, reply with "message:" and your answer on the next line.'
)
# Arguments of a request that sets no max_tokens stop here rather than at the end of the context.
DEFAULT_ARGUMENT_TOKENS = 512
_NEUTRAL_PENALTIES = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
_ROLE_TURNS = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# JSON forbids raw control characters in strings; the schema converter's character rule allows them.
_SCHEMA_CHAR_RULE = 'char ::= [^"\\\\]'
_STRICT_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


def message_text(content: Any) -> str:
    """Returns the text of a message's ``content``: a string, ``None`` or a list of content parts.

    Args:
        content: The OpenAI ``content`` field.

    Returns:
        The text, with the text parts of a list joined by newlines (other parts are dropped).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            parts.append(part)
    return "\n".join(parts)


def tool_functions(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """Returns the ``function`` objects of OpenAI function tools, skipping anything else."""
    return [
        tool["function"]
        for tool in tools or ()
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function" and "function" in tool
    ]


def tools_section(functions: Sequence[Mapping[str, Any]]) -> str:
    """Renders the function list and the reply instructions that the tool prompt adds to the system turn.

    Args:
        functions: OpenAI function definitions (``name``, optional ``description`` and ``parameters``).

    Returns:
        The text, starting with "You can call these functions:".
    """
    lines = ["You can call these functions:"]
    for function in functions:
        description = function.get("description")
        header = f"{CALL_PREFIX}{function['name']}:"
        lines.append(f"{header} {description}" if description else header)
        lines.append(json.dumps(function.get("parameters") or {"type": "object", "properties": {}}))
    return "\n".join(lines) + "\n\n" + TOOL_INSTRUCTIONS


def render_call(name: str, arguments: str) -> str:
    """Renders one function call the way the model is asked to write it."""
    return f"{CALL_PREFIX}{name}:\n{arguments}"


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Renders OpenAI chat messages as a ChatML prompt (see the module docstring for the format).

    Args:
        messages: OpenAI chat messages, including assistant ``tool_calls`` and ``tool`` results.
        tools: OpenAI function tools; when given, the prompt is the tool prompt, which lists them and
            says how to call them. ``None`` or empty gives the plain prompt.
        add_generation_prompt: Whether to end with the opening of an assistant turn.

    Returns:
        The prompt text.
    """
    functions = tool_functions(tools)
    turns: list[tuple[str, str]] = []
    for message in messages:
        role = message.get("role")
        text = message_text(message.get("content"))
        if role == "assistant":
            calls = [
                render_call(call["function"]["name"], call["function"].get("arguments") or "{}")
                for call in message.get("tool_calls") or ()
                if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping)
            ]
            legacy_call = message.get("function_call")
            if isinstance(legacy_call, Mapping) and legacy_call.get("name"):
                calls.append(render_call(legacy_call["name"], legacy_call.get("arguments") or "{}"))
            text = "\n".join([text, *calls] if text else calls)
        turns.append((_ROLE_TURNS.get(role, "tool"), text))
    if functions:
        section = tools_section(functions)
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{turns[0][1]}\n\n{section}" if turns[0][1] else section)
        else:
            turns.insert(0, ("system", section))
    prompt = "".join(f"<|im_start|>{role}\n{text}{END_OF_TURN}\n" for role, text in turns)
    if add_generation_prompt:
        prompt += "<|im_start|>assistant\n"
    return prompt


def decision_grammar(names: Sequence[str], allow_message: bool) -> str:
    """Returns the GBNF grammar of the decision pass: ``message:`` or ``functions.<name>:``.

    Args:
        names: The function names the model may choose.
        allow_message: Whether answering in words is allowed (``"auto"``) or not (``"required"``).
    """
    choices = [json.dumps(f"{CALL_PREFIX}{name}:") for name in names]
    if allow_message:
        choices.insert(0, json.dumps(MESSAGE_MARKER))
    return "root ::= " + " | ".join(choices) + "\n"


def arguments_grammar(parameters: Any, any_json: bool = False) -> str:
    """Returns the GBNF grammar for a function's arguments: its JSON schema, or any JSON object.

    Args:
        parameters: The function's ``parameters`` JSON schema (``None`` for none).
        any_json: Whether a missing schema admits any JSON object rather than ``{}`` only.
    """
    if not isinstance(parameters, Mapping):
        if any_json:
            return llama_grammar.JSON_GBNF
        parameters = {"type": "object", "properties": {}}
    schema = parameters
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises all sorts on schemas it does not support
        logger.warning("tool schema not convertible to a grammar (%s); arguments are any JSON object", exc)
        return llama_grammar.JSON_GBNF
    return gbnf.replace(_SCHEMA_CHAR_RULE, _STRICT_CHAR_RULE)


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

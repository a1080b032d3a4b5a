"""What the embedded model sees and may write: the ChatML prompt, with or without the tool prompt, and the
GBNF grammars of a tool decision and of a call's arguments (:mod:`voice_llm.embedded_chat` runs the passes).

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp import llama_grammar

logger = logging.getLogger(__name__)

END_OF_TURN = "<|im_end|>"
MESSAGE_MARKER = "message:"
CALL_PREFIX = "functions."
TOOL_INSTRUCTIONS = (
    'To call a function, reply with "functions.<name>:" and its JSON arguments on the next line.\n'
    'To answer in words, reply with "message:" and your answer on the next line.'
)
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

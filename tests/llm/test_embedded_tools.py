"""The embedded backend's tool calling: our ChatML handler, unit-tested and against the real server.

The server runs SmolLM2-135M on CPU, so the tests assert protocol and structure (streamed chunks,
tool-call deltas, arguments that satisfy the schema), not the quality of what the model says. The two
``auto`` decisions asserted exactly were stable across cache states and server restarts; their
first-token log-probability margins are about 3.3 nats (the weather question) and 0.9 nats (the
greeting), far beyond numerical noise.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from voice_llm.chatml_tools import TOOL_INSTRUCTIONS, arguments_grammar, decision_grammar, render_prompt
from voice_llm.embedded import CHAT_FORMAT, MODEL_ALIAS, SERVER_MODULE, llama_server_command
from voice_llm.embedded_chat import HANDLER_NAME, voice_chatml_tools
from voice_llm.embedded_server import normalize_chat_request
from voice_llm.engine import Completion, TokenDelta
from voice_llm.openai_engine import OpenAIChatEngine

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
BOOKING_TOOL = {
    "type": "function",
    "function": {
        "name": "book_table",
        "description": "Book a table at the restaurant.",
        "parameters": {
            "type": "object",
            "properties": {
                "people": {"type": "integer"},
                "name": {"type": "string"},
                "terrace": {"type": "boolean"},
                "day": {"type": "string", "enum": ["friday", "saturday"]},
            },
            "required": ["people", "name", "terrace", "day"],
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SYSTEM = {
    "role": "system",
    "content": "You are a voice assistant. When the user asks about the weather, call the get_weather function.",
}
WEATHER_QUESTION = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]
GREETING = [SYSTEM, {"role": "user", "content": "Hello, who are you?"}]
BOOKING = [{"role": "user", "content": "A table for two on Friday on the terrace, for Ann please."}]
TOOL_RESULT = '{"temperature": 18, "sky": "sunny"}'
CALL_ID = "call_weather_1"
AFTER_TOOL_RESULT = [
    *WEATHER_QUESTION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": TOOL_RESULT},
]
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


def assert_matches_schema(arguments: Any, schema: dict) -> None:
    """Checks the required keys, the property types and the enums of a flat object schema."""
    assert isinstance(arguments, dict)
    for key in schema.get("required", []):
        assert key in arguments, f"missing {key!r} in {arguments}"
    for key, value in arguments.items():
        assert key in schema["properties"], f"unexpected {key!r} in {arguments}"
        prop = schema["properties"][key]
        expected = JSON_TYPES[prop["type"]]
        assert isinstance(value, expected), f"{key}={value!r} is not {prop['type']}"
        if prop["type"] in {"integer", "number"}:
            assert not isinstance(value, bool)
        if "enum" in prop:
            assert value in prop["enum"]


# ---------------------------------------------------------------------------------------------
# Pure Python: the prompt, the grammars, the request fix-ups and the chunks (no model).


def test_plain_prompt_is_chatml() -> None:
    prompt = render_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])

    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tool_calls_and_tool_results_are_rendered_in_the_prompt() -> None:
    prompt = render_prompt(AFTER_TOOL_RESULT)

    assert prompt == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\nfunctions.get_weather:\n{"city": "Paris", "unit": "celsius"}<|im_end|>\n'
        f"<|im_start|>tool\n{TOOL_RESULT}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_assistant_text_and_several_calls_share_one_turn() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Tokyo?"}]},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "JST"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
        {"role": "tool", "tool_call_id": "b", "content": "09:00"},
    ]

    prompt = render_prompt(messages, add_generation_prompt=False)

    assert prompt == (
        "<|im_start|>user\nWeather and time in Tokyo?<|im_end|>\n"
        "<|im_start|>assistant\nLet me check.\n"
        'functions.get_weather:\n{"city": "Tokyo"}\n'
        'functions.get_time:\n{"timezone": "JST"}<|im_end|>\n'
        "<|im_start|>tool\nrain<|im_end|>\n"
        "<|im_start|>tool\n09:00<|im_end|>\n"
    )


def test_tool_prompt_lists_the_functions_in_the_first_system_turn() -> None:
    prompt = render_prompt(WEATHER_QUESTION, TOOLS)

    system_turn = prompt.split("<|im_end|>")[0]
    assert system_turn.startswith(f"<|im_start|>system\n{SYSTEM['content']}\n\nYou can call these functions:\n")
    assert "functions.get_weather: Get the current weather for a city.\n" in system_turn
    assert json.dumps(WEATHER_TOOL["function"]["parameters"]) in system_turn
    assert "functions.get_time: Get the current time in a timezone.\n" in system_turn
    assert system_turn.endswith(TOOL_INSTRUCTIONS)
    assert prompt.count("<|im_start|>system") == 1


def test_tool_prompt_adds_a_system_turn_when_there_is_none() -> None:
    prompt = render_prompt([{"role": "user", "content": "Hi"}], [TIME_TOOL])

    assert prompt.startswith("<|im_start|>system\nYou can call these functions:\nfunctions.get_time:")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_decision_grammars() -> None:
    assert decision_grammar(["a", "b"], allow_message=True) == 'root ::= "message:" | "functions.a:" | "functions.b:"\n'
    assert decision_grammar(["a", "b"], allow_message=False) == 'root ::= "functions.a:" | "functions.b:"\n'


def test_arguments_grammar_follows_the_schema_and_forbids_raw_control_characters() -> None:
    grammar = arguments_grammar(WEATHER_TOOL["function"]["parameters"])

    assert '"\\"celsius\\""' in grammar
    assert '"\\"city\\""' in grammar
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in grammar


def test_arguments_grammar_falls_back_to_any_json_object() -> None:
    from llama_cpp.llama_grammar import JSON_GBNF

    unconvertible = {"type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}
    assert arguments_grammar(unconvertible) == JSON_GBNF
    assert arguments_grammar(None, any_json=True) == JSON_GBNF


def test_openai_requests_are_normalized_for_llama_cpp_python() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ]
    }

    normalize_chat_request(body)

    assert body["messages"] == [
        {"role": "system", "content": "Be\nbrief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"},
    ]
    assert normalize_chat_request([1, 2]) == [1, 2]


def test_server_command_runs_our_module_with_our_handler_and_a_prompt_cache() -> None:
    command = llama_server_command("m.gguf", "127.0.0.1", 8080, n_threads=2)

    assert command[1:3] == ["-m", SERVER_MODULE]
    assert command[command.index("--chat_format") + 1] == CHAT_FORMAT == HANDLER_NAME
    assert command[command.index("--n_threads") + 1] == "2"
    assert command[command.index("--n_threads_batch") + 1] == "2"
    split = llama_server_command("m.gguf", "127.0.0.1", 8080, n_threads=1, n_threads_batch=4)
    assert split[split.index("--n_threads") + 1] == "1" and split[split.index("--n_threads_batch") + 1] == "4"
    assert command[command.index("--cache") + 1] == "True"
    assert "--cache" not in llama_server_command("m.gguf", "127.0.0.1", 8080, cache_mib=0)


@dataclass
class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: replays scripted texts, records every completion request."""

    texts: list[str]
    calls: list[dict] = field(default_factory=list)
    verbose: bool = False

    def create_completion(self, prompt: str, stream: bool = False, **options: Any) -> Any:
        self.calls.append({"prompt": prompt, "stream": stream, **options})
        text = self.texts.pop(0)
        if not stream:
            return {
                "model": "fake",
                "choices": [{"text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        return self._stream(text)

    @staticmethod
    def _stream(text: str) -> Iterator[dict]:
        for i in range(0, len(text), 4):
            yield {"model": "fake", "choices": [{"text": text[i : i + 4], "finish_reason": None}]}
        yield {"model": "fake", "choices": [{"text": "", "finish_reason": "stop"}]}


def test_auto_message_decision_answers_from_the_plain_prompt() -> None:
    llama = FakeLlama(["message", "Hello there."])

    chunks = list(voice_chatml_tools(llama=llama, messages=GREETING, tools=TOOLS, tool_choice="auto", stream=True))

    decision, answer = llama.calls
    assert decision["prompt"] == render_prompt(GREETING, TOOLS)
    assert decision["temperature"] == 0.0
    assert decision["grammar"]._grammar == decision_grammar(["get_weather", "get_time"], allow_message=True)
    assert answer["prompt"] == render_prompt(GREETING)
    assert answer["grammar"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello there."
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert len({c["id"] for c in chunks}) == 1


def test_auto_call_decision_streams_an_openai_tool_call() -> None:
    llama = FakeLlama(["functions.get_time", '{"timezone": "JST"}'])

    chunks = list(voice_chatml_tools(llama=llama, messages=GREETING, tools=TOOLS, tool_choice=None, stream=True))

    arguments_call = llama.calls[1]
    assert arguments_call["prompt"] == render_prompt(GREETING, TOOLS) + "functions.get_time:\n"
    assert "timezone" in arguments_call["grammar"]._grammar
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    opening = deltas[1]["tool_calls"][0]
    assert opening["index"] == 0
    assert opening["id"].startswith("call_")
    assert opening["type"] == "function"
    assert opening["function"] == {"name": "get_time", "arguments": ""}
    pieces = [d["tool_calls"][0] for d in deltas[2:-1]]
    assert all(piece["index"] == 0 and set(piece) == {"index", "function"} for piece in pieces)
    assert "".join(piece["function"]["arguments"] for piece in pieces) == '{"timezone": "JST"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_with_one_tool_skips_the_decision_and_none_ignores_the_tools() -> None:
    llama = FakeLlama(['{"timezone": "UTC"}', "Fine."])

    called = voice_chatml_tools(llama=llama, messages=GREETING, tools=[TIME_TOOL], tool_choice="required")
    answered = voice_chatml_tools(llama=llama, messages=GREETING, tools=[TIME_TOOL], tool_choice="none")

    assert called["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": '{"timezone": "UTC"}',
    }
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert answered["choices"][0]["message"] == {"role": "assistant", "content": "Fine."}
    assert [call["prompt"] for call in llama.calls] == [
        render_prompt(GREETING, [TIME_TOOL]) + "functions.get_time:\n",
        render_prompt(GREETING),
    ]


def test_json_response_format_constrains_the_text_answer() -> None:
    from llama_cpp.llama_grammar import JSON_GBNF

    llama = FakeLlama(['{"ok": true}'])

    voice_chatml_tools(llama=llama, messages=GREETING, response_format={"type": "json_object"})

    assert llama.calls[0]["grammar"]._grammar == JSON_GBNF


@pytest.mark.parametrize(
    "options",
    [
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ],
    ids=["required-without-tools", "unknown-forced-tool"],
)
def test_impossible_tool_choices_are_value_errors(options: dict) -> None:
    with pytest.raises(ValueError):
        voice_chatml_tools(llama=FakeLlama([]), messages=GREETING, **options)


# ---------------------------------------------------------------------------------------------
# The real server.


@pytest.fixture
async def client(llama_server: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=llama_server, api_key="sk-no-key", max_retries=0) as api:
        yield api


@dataclass
class Streamed:
    """What a streamed chat completion carried."""

    text: str
    tool_call_deltas: list[Any]
    finish_reason: str | None

    def calls(self) -> list[dict]:
        """The tool calls, assembled by index."""
        calls: dict[int, dict] = {}
        for delta in self.tool_call_deltas:
            call = calls.setdefault(delta.index, {"id": None, "type": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["type"] = call["type"] or delta.type
            if delta.function is not None:
                call["name"] = call["name"] or delta.function.name
                call["arguments"] += delta.function.arguments or ""
        return [calls[index] for index in sorted(calls)]


async def stream_chat(client: openai.AsyncOpenAI, messages: list[dict], **options: Any) -> Streamed:
    stream = await client.chat.completions.create(
        model=MODEL_ALIAS, messages=messages, stream=True, temperature=0.0, **options
    )
    text: list[str] = []
    deltas: list[Any] = []
    finish_reason = None
    async for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            deltas.extend(choice.delta.tool_calls or ())
            finish_reason = choice.finish_reason or finish_reason
    return Streamed("".join(text), deltas, finish_reason)


def assert_one_valid_call(streamed: Streamed, tools: list[dict]) -> dict:
    """Checks the stream made exactly one well-formed call of one of ``tools``; returns it."""
    assert streamed.finish_reason == "tool_calls"
    assert streamed.text == ""
    (call,) = streamed.calls()
    assert call["id"] and call["type"] == "function"
    # The first fragment names the call; the others only carry arguments.
    assert streamed.tool_call_deltas[0].id == call["id"]
    assert streamed.tool_call_deltas[0].function.name == call["name"]
    assert all(delta.id is None and delta.function.name is None for delta in streamed.tool_call_deltas[1:])
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    assert call["name"] in schemas
    call["parsed"] = json.loads(call["arguments"])
    assert_matches_schema(call["parsed"], schemas[call["name"]])
    return call


async def test_none_streams_a_text_answer(client: openai.AsyncOpenAI) -> None:
    streamed = await stream_chat(client, WEATHER_QUESTION, tools=TOOLS, tool_choice="none", max_tokens=32)

    assert streamed.text.strip()
    assert streamed.tool_call_deltas == []
    assert streamed.finish_reason in {"stop", "length"}


@pytest.mark.parametrize(
    ("messages", "tool"), [(WEATHER_QUESTION, WEATHER_TOOL), (BOOKING, BOOKING_TOOL)], ids=["weather", "booking"]
)
async def test_forced_tool_streams_a_call_matching_its_schema(
    client: openai.AsyncOpenAI, messages: list[dict], tool: dict
) -> None:
    name = tool["function"]["name"]
    streamed = await stream_chat(
        client, messages, tools=[*TOOLS, BOOKING_TOOL], tool_choice={"type": "function", "function": {"name": name}}
    )

    call = assert_one_valid_call(streamed, [tool])
    assert call["name"] == name
    assert len(streamed.tool_call_deltas) >= 2, "the arguments were not streamed"


async def test_required_calls_one_of_the_tools(client: openai.AsyncOpenAI) -> None:
    streamed = await stream_chat(client, GREETING, tools=TOOLS, tool_choice="required", max_tokens=64)

    assert_one_valid_call(streamed, TOOLS)


async def test_auto_calls_the_tool_the_system_prompt_asks_for(client: openai.AsyncOpenAI) -> None:
    streamed = await stream_chat(client, WEATHER_QUESTION, tools=TOOLS, tool_choice="auto", max_tokens=64)

    call = assert_one_valid_call(streamed, TOOLS)
    assert call["name"] == "get_weather"
    assert isinstance(call["parsed"]["city"], str)


async def test_auto_answers_a_greeting_in_words(client: openai.AsyncOpenAI) -> None:
    streamed = await stream_chat(client, GREETING, tools=TOOLS, tool_choice="auto", max_tokens=32)

    assert streamed.tool_call_deltas == []
    assert streamed.text.strip()
    assert not streamed.text.startswith(("message:", "functions."))
    assert streamed.finish_reason in {"stop", "length"}


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
async def test_a_conversation_with_a_tool_result_is_accepted(client: openai.AsyncOpenAI, tool_choice: str) -> None:
    streamed = await stream_chat(client, AFTER_TOOL_RESULT, tools=TOOLS, tool_choice=tool_choice, max_tokens=32)

    if tool_choice == "none" or not streamed.tool_call_deltas:
        assert streamed.text.strip()
        assert streamed.finish_reason in {"stop", "length"}
    else:
        assert_one_valid_call(streamed, TOOLS)


async def test_non_streaming_requests(client: openai.AsyncOpenAI) -> None:
    called = await client.chat.completions.create(
        model=MODEL_ALIAS, messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", temperature=0.0
    )
    answered = await client.chat.completions.create(
        model=MODEL_ALIAS, messages=AFTER_TOOL_RESULT, tools=TOOLS, tool_choice="none", max_tokens=24
    )

    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function"
    schema = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}[call.function.name]
    assert_matches_schema(json.loads(call.function.arguments), schema)
    assert called.usage is not None and called.usage.completion_tokens > 0
    assert answered.choices[0].message.content.strip()
    assert answered.choices[0].message.tool_calls is None
    assert answered.choices[0].finish_reason in {"stop", "length"}


async def test_the_engine_runs_a_tool_loop(llama_server: str) -> None:
    engine = OpenAIChatEngine(llama_server, MODEL_ALIAS)
    messages: list[dict] = [*WEATHER_QUESTION]
    try:
        first = [e async for e in engine.stream(messages, tools=TOOLS, tool_choice="get_weather", temperature=0)]
        completion = first[-1]
        assert isinstance(completion, Completion)
        assert completion.finish_reason == "tool_calls"
        (call,) = completion.tool_calls
        assert_matches_schema(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])

        # What the LLM worker's handler sends back: content None beside the calls, one tool message each.
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
        last = [event async for event in engine.stream(messages, tools=TOOLS, tool_choice="none", max_tokens=32)]
    finally:
        await engine.close()

    completion = last[-1]
    assert isinstance(completion, Completion)
    assert completion.finish_reason in {"stop", "length"}
    assert completion.tool_calls == ()
    assert completion.text.strip()
    assert completion.text == "".join(event.text for event in last if isinstance(event, TokenDelta))

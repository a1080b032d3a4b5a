"""ToolCallAssembler on chat.completion.chunk streams recorded in OpenAI's wire format."""

from __future__ import annotations

import json
from pathlib import Path

from openai.types.chat import ChatCompletionChunk

from voice_llm.engine import ToolCall, ToolCallAssembler

DATA = Path(__file__).parent / "data"


def load_chunks(name: str) -> list[ChatCompletionChunk]:
    """Parses a recorded stream, one chat.completion.chunk object per list item."""
    raw = json.loads((DATA / name).read_text())
    return [ChatCompletionChunk.model_validate(item) for item in raw]


def replay(chunks: list[ChatCompletionChunk]) -> tuple[ToolCallAssembler, str, str | None]:
    """Feeds every choice delta to an assembler; returns it, the text and the finish reason."""
    assembler = ToolCallAssembler()
    text = []
    finish_reason = None
    for chunk in chunks:
        for choice in chunk.choices:
            assembler.feed(choice.delta.tool_calls)
            text.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    return assembler, "".join(text), finish_reason


def test_parallel_tool_calls_are_assembled_in_index_order() -> None:
    chunks = load_chunks("tool_call_stream.json")

    assembler, text, finish_reason = replay(chunks)

    assert assembler.result() == (
        ToolCall(
            id="call_Wm2fTqz8XbNcR4kLp0sVd7Hj",
            name="get_weather",
            arguments='{"location": "Paris, France", "unit": "celsius"}',
        ),
        ToolCall(
            id="call_7YhGd1sQeKxA3nVb9ZpLc2Uo",
            name="get_time",
            arguments='{"timezone": "Europe/Paris"}',
        ),
    )
    assert [json.loads(call.arguments) for call in assembler.result()] == [
        {"location": "Paris, France", "unit": "celsius"},
        {"timezone": "Europe/Paris"},
    ]
    assert text == ""
    assert finish_reason == "tool_calls"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 160


def test_fragments_arriving_out_of_index_order_still_sort_by_index() -> None:
    assembler = ToolCallAssembler()
    assembler.feed([{"index": 1, "id": "b", "function": {"name": "second", "arguments": "{}"}}])
    assembler.feed([{"index": 0, "id": "a", "function": {"name": "first", "arguments": "{"}}])
    assembler.feed([{"index": 0, "function": {"arguments": "}"}}])

    assert assembler.result() == (
        ToolCall(id="a", name="first", arguments="{}"),
        ToolCall(id="b", name="second", arguments="{}"),
    )


def test_id_and_name_repeated_in_every_fragment_are_not_duplicated() -> None:
    # llama-cpp-python repeats id and name alongside every arguments piece.
    assembler = ToolCallAssembler()
    for piece in ['{"city', '": "Oslo', '"}']:
        assembler.feed(
            [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": piece}}]
        )

    assert assembler.result() == (ToolCall(id="call_0", name="get_weather", arguments='{"city": "Oslo"}'),)


def test_text_only_stream_has_no_tool_calls() -> None:
    assembler, text, finish_reason = replay(load_chunks("text_stream.json"))

    assert assembler.result() == ()
    assert text == "It's sunny in Paris right now."
    assert finish_reason == "stop"


def test_none_and_empty_fragments_are_ignored() -> None:
    assembler = ToolCallAssembler()
    assembler.feed(None)
    assembler.feed([])

    assert assembler.result() == ()

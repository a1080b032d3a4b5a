"""Retell's transcript as the LLM's chat history (protocols.md §1.3).

Retell sends ``transcript`` (utterances) and, because the gateway's ``config`` asks for it,
``transcript_with_tool_calls``: the same utterances with the tool calls the gateway reported
(``tool_call_invocation`` / ``tool_call_result`` response events) and, in newer versions, DTMF and
node-transition items. The richer one is the history whenever it is there, so the model sees its own
earlier tool calls and their results instead of calling the tools again.

The result is always a well-formed chat for any input: ``user``, ``assistant`` and ``tool`` messages;
an assistant message with ``tool_calls`` is followed at once by one ``tool`` message per call, in the
calls' order. Consecutive invocations (one round of parallel calls) share one assistant message, which
also takes the agent's words said just before them. A call without a result (a tool still running, a
turn cut off) is dropped with its message, and so is a result without its call; a repeated
``tool_call_id`` counts once.
"""

from __future__ import annotations

INVOCATION = "tool_call_invocation"
RESULT = "tool_call_result"
DTMF = "dtmf"


def history_from_transcript(transcript: object) -> list[dict]:
    """Chat messages from Retell's transcript: ``agent`` → assistant, anything else with text → user.

    ``transcript_with_tool_calls`` items are understood too: ``tool_call_invocation`` items become an
    assistant message carrying the calls, each ``tool_call_result`` the ``tool`` message answering its
    call; a ``dtmf`` item is the caller's key press. Items that are not objects, or carry no text, are skipped.
    """
    items = [item for item in transcript if isinstance(item, dict)] if isinstance(transcript, list) else []
    results: dict[str, str] = {}
    for item in items:
        if item.get("role") == RESULT:
            call_id = _text(item.get("tool_call_id"))
            if call_id and call_id not in results:
                results[call_id] = _text(item.get("content"))
    messages: list[dict] = []
    seen: set[str] = set()
    block: list[dict] = []

    def close_block() -> None:
        for call in block:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": results[call["id"]]})
        block.clear()

    for item in items:
        role = item.get("role")
        if role == INVOCATION:
            call = {
                "id": _text(item.get("tool_call_id")),
                "name": _text(item.get("name")),
                "arguments": _text(item.get("arguments")) or "{}",
            }
            if not call["id"] or not call["name"] or call["id"] in seen or call["id"] not in results:
                continue
            seen.add(call["id"])
            last = messages[-1] if messages else None
            if block:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and "tool_calls" not in last:
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            block.append(call)
            continue
        if role == RESULT:
            close_block()
            continue
        if role == DTMF:
            digit = _text(item.get("digit")).strip()
            content = f"[The caller pressed {digit} on the keypad]" if digit else ""
        else:
            content = item.get("content").strip() if isinstance(item.get("content"), str) else ""
        if not content:
            continue
        close_block()
        speaker = "assistant" if role == "agent" else "user"
        if messages and messages[-1]["role"] == speaker and "tool_calls" not in messages[-1]:
            messages[-1]["content"] += " " + content
        else:
            messages.append({"role": speaker, "content": content})
    close_block()
    return messages


def _text(value: object) -> str:
    """A field as text: strings as they are, anything else (a number, ``null``) as its ``str``, ``None`` as ``""``."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)

"""The items of an OpenAI Realtime conversation, and where each lives in the core's history.

The conversation core keeps one chat history per session (OpenAI-shaped messages); a realtime client sees
it as items with ids. :class:`Items` keeps the items in order and, for each that is in the history, the
history entry itself, so ``conversation.item.delete`` removes that entry and
``conversation.item.truncate`` trims the assistant's message to what the client played (as a barge-in
on a call does), in the history and in the call log. Typed user messages wait (:attr:`Items.pending`)
until a response answers them: they become that turn's user message.
"""

from __future__ import annotations

import re
from typing import Any

from voice_gateway.conversation.playout import words_heard
from voice_gateway.conversation.session import Session
from voice_gateway.dialects.realtime_events import Wire, function_call_item, function_output_item, new_id
from voice_gateway.dialects.realtime_session import ConfigError

ITEM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TEXT_CHARS = 20_000
TEXT_PARTS = ("input_text", "text", "output_text")


def _text(content: Any, param: str) -> tuple[str, str]:
    """The text of a message's content parts and the type of its first part."""
    if not isinstance(content, list) or not content or not all(isinstance(part, dict) for part in content):
        raise ConfigError(f"{param} must be a non-empty list of content parts", param)
    first = content[0].get("type")
    texts = []
    for part in content:
        value = part.get("text") if part.get("type") in TEXT_PARTS else part.get("transcript")
        if part.get("type") == "input_audio" and len(content) == 1:
            return "", "input_audio"
        if not isinstance(value, str):
            raise ConfigError(f"{param}: each part needs its text (input_text, output_text) or transcript", param)
        texts.append(value)
    text = " ".join(texts)
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"{param}: at most {MAX_TEXT_CHARS} characters", param)
    return text, first


def heard_text(spoken: list[tuple[str, float, bool]], end_ms: float) -> str:
    """What the first ``end_ms`` of an answer's audio says: the sentences played whole, and the played part
    of the one cut, as a barge-in on a call keeps (``spoken``: each sentence's text, milliseconds of audio
    and whether all of it came)."""
    parts, elapsed = [], 0.0
    for text, ms, complete in spoken:
        if complete and elapsed + ms <= end_ms:
            parts.append(text)
            elapsed += ms
            continue
        parts.append(words_heard(text, end_ms - elapsed, ms, complete=complete))
        break
    return " ".join(part for part in parts if part).strip()


class Items:
    """One connection's conversation items (see the module's docstring)."""

    def __init__(self) -> None:
        self._items: dict[str, dict] = {}
        self._entries: dict[str, dict] = {}
        self._spoken: dict[str, list[tuple[str, float, bool]]] = {}
        self._truncations: dict[str, int] = {}
        self.pending: list[tuple[str, str]] = []
        self._turn_start = 0
        self._outputs: list[dict] = []

    def last_id(self) -> str | None:
        return next(reversed(self._items), None)

    def add(self, item: dict) -> None:
        self._items[item["id"]] = item

    def get(self, item_id: Any) -> dict:
        """The item ``item_id``.

        Raises:
            ConfigError: There is no such item.
        """
        if not isinstance(item_id, str) or item_id not in self._items:
            raise ConfigError(f"Item with item_id not found: {str(item_id)[:64]}", "item_id")
        return self._items[item_id]

    def output_item(self, item: dict, response_id: str) -> None:
        """An item a response produced (its message or function call), once it is done."""
        self.add(item)
        self._outputs.append(item)

    def transcribed(self, item_id: str, text: str) -> None:
        item = self._items.get(item_id)
        if item is not None and item.get("content"):
            item["content"][0]["transcript"] = text

    def append_history(self, history: list[dict], entry: dict, item_id: str | None = None) -> None:
        history.append(entry)
        if item_id is not None:
            self._entries[item_id] = entry

    def turn_started(self, history: list[dict]) -> None:
        self._turn_start = len(history)
        self._outputs = []

    def turn_ended(self, session: Session, user_item_id: str | None, spoken: list[tuple[str, float, bool]]) -> None:
        """Links the items the turn produced to its history entries, and applies a truncation that came
        while the answer was still being produced."""
        history = session.conversation.history
        added = history[self._turn_start :]
        users = [entry for entry in added if entry["role"] == "user"]
        if user_item_id and users:
            self._entries[user_item_id] = users[-1]
        answers = [entry for entry in added if entry["role"] == "assistant" and not entry.get("tool_calls")]
        for item in self._outputs:
            if item["type"] == "message" and answers:
                self._entries[item["id"]] = answers[-1]
                self._spoken[item["id"]] = spoken
                if item["id"] in self._truncations:
                    self._trim(item["id"], self._truncations.pop(item["id"]), session)
            elif item["type"] == "function_call":
                calls = [e for e in added if any(c.get("id") == item["call_id"] for c in e.get("tool_calls", ()))]
                if calls:
                    self._entries[item["id"]] = calls[-1]
        self._outputs = []

    def from_client(self, raw: Any, wire: Wire) -> tuple[dict, dict | None, str | None]:
        """A ``conversation.item.create``'s item: the item as the server shows it, its history entry (or
        ``None``), and the text of a typed user message (which waits for a response instead).

        Raises:
            ConfigError: The item is malformed.
        """
        if not isinstance(raw, dict):
            raise ConfigError("item must be an object", "item")
        item_id = raw.get("id") or new_id("item")
        if not isinstance(item_id, str) or not ITEM_ID.fullmatch(item_id):
            raise ConfigError("item.id must be 1-64 letters, digits, '-' or '_'", "item.id")
        if item_id in self._items:
            raise ConfigError(f"an item with id {item_id} already exists", "item.id")
        kind = raw.get("type", "message")
        if kind == "function_call_output":
            call_id, output = raw.get("call_id"), raw.get("output")
            if not isinstance(call_id, str) or not call_id or not isinstance(output, str):
                raise ConfigError("a function_call_output needs a call_id and an output string", "item")
            names = [
                i["name"] for i in self._items.values() if i["type"] == "function_call" and i["call_id"] == call_id
            ]
            entry = {"role": "tool", "tool_call_id": call_id, "name": names[-1] if names else "", "content": output}
            return function_output_item(item_id, call_id, output), entry, None
        if kind == "function_call":
            call_id, name, arguments = raw.get("call_id"), raw.get("name"), raw.get("arguments", "")
            if not all(isinstance(v, str) for v in (call_id, name, arguments)) or not call_id or not name:
                raise ConfigError("a function_call needs call_id, name and arguments strings", "item")
            entry = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": call_id, "name": name, "arguments": arguments}],
            }
            return function_call_item(item_id, call_id, name, arguments, "completed"), entry, None
        role = raw.get("role")
        if kind != "message" or role not in ("user", "assistant", "system"):
            raise ConfigError(
                "item.type must be message (role user, assistant or system), function_call or function_call_output",
                "item.type",
            )
        text, first = _text(raw.get("content"), "item.content")
        if role == "user":
            if first == "input_audio":
                return wire.user_item(item_id, transcript=None) | {"content": [dict(raw["content"][0])]}, None, None
            return wire.user_item(item_id, text=text), None, text
        if role == "system":
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "role": "system",
                "status": "completed",
                "content": [{"type": "input_text", "text": text}],
            }
            return item, {"role": "system", "content": text}, None
        audio = first in ("output_audio", "audio")
        return wire.assistant_item(item_id, "completed", audio, text), {"role": "assistant", "content": text}, None

    def delete(self, item_id: Any, history: list[dict]) -> None:
        """Removes the item and its history entry.

        Raises:
            ConfigError: There is no such item.
        """
        self.get(item_id)
        del self._items[item_id]
        self.pending = [(pending_id, text) for pending_id, text in self.pending if pending_id != item_id]
        entry = self._entries.pop(item_id, None)
        for index, candidate in enumerate(history):
            if candidate is entry:
                del history[index]
                break

    def truncate(self, item_id: Any, end_ms: Any, session: Session, *, spoken: list | None) -> None:
        """Trims an assistant's audio message to the first ``end_ms`` of its audio (now, or when the answer
        in progress, whose sentences so far are ``spoken``, is done).

        Raises:
            ConfigError: No such assistant audio item, or ``end_ms`` is not within its audio.
        """
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ConfigError("audio_end_ms must be a non-negative integer", "audio_end_ms")
        if spoken is None:
            item = self.get(item_id)
            if item.get("role") != "assistant" or item_id not in self._spoken:
                raise ConfigError("only an assistant's audio message can be truncated", "item_id")
            spoken = self._spoken[item_id]
        audio_ms = sum(ms for _, ms, _ in spoken)
        if end_ms > audio_ms + 1:
            raise ConfigError(
                f"audio_end_ms ({end_ms}) is longer than the item's audio ({int(audio_ms)} ms)", "audio_end_ms"
            )
        if item_id in self._entries:
            self._trim(item_id, end_ms, session)
        else:
            self._truncations[item_id] = end_ms

    def _trim(self, item_id: str, end_ms: int, session: Session) -> None:
        entry, original = self._entries[item_id], self._entries[item_id]["content"]
        heard = heard_text(self._spoken.get(item_id, []), end_ms)
        entry["content"] = heard
        item = self._items.get(item_id)
        if item is not None and item.get("content"):
            item["content"][0]["transcript"] = heard
        for turn in reversed(session.call_log.turns):
            if turn.assistant == original:
                turn.assistant, turn.interrupted = heard, True
                break

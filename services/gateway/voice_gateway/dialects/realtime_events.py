"""OpenAI Realtime's wire shapes: server events, conversation items, responses and errors, in the GA
protocol or the beta one (protocols.md §6; field names as in the ``openai`` SDK's ``types/realtime``).

:class:`Wire` builds every server event with an ``event_id`` and renames the GA events whose beta names
differ (``response.output_audio.delta`` → ``response.audio.delta``, ``conversation.item.added`` →
``conversation.item.created``, ...); GA events the beta protocol does not have (``conversation.item.done``)
are not sent to a beta client. Inbound, both names are accepted (:data:`INBOUND_ALIASES`).
"""

from __future__ import annotations

import json
import uuid

from voice_gateway.dialects.realtime_session import GA_TO_BETA_FORMAT, PCM_RATE, RealtimeConfig

BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
# GA events a beta client would not know.
NOT_IN_BETA = frozenset({"conversation.item.done"})
# Client events under another name: the beta protocol's, mapped to the GA ones this gateway handles.
INBOUND_ALIASES = {"transcription_session.update": "session.update"}
BETA_CONTENT = {"output_audio": "audio", "output_text": "text"}
GA_CONTENT = {"audio": "output_audio", "text": "output_text"}


def new_id(prefix: str) -> str:
    """An id like OpenAI's: ``prefix_`` and 22 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` as usage reports them (an estimate: about four characters a token)."""
    return (len(text) + 3) // 4 if text else 0


class Wire:
    """The server events of one connection, in its protocol (``beta`` or GA)."""

    def __init__(self, beta: bool) -> None:
        self.beta = beta

    def event(self, type_: str, **fields) -> str | None:
        """One server event as JSON text, or ``None`` when the connection's protocol has no such event."""
        if self.beta:
            if type_ in NOT_IN_BETA:
                return None
            type_ = BETA_NAMES.get(type_, type_)
        return json.dumps({"type": type_, "event_id": new_id("event"), **fields}, separators=(",", ":"))

    def error(self, message: str, *, code: str | None = None, param: str | None = None, event_id=None) -> str:
        """The ``error`` event (``invalid_request_error`` unless ``code`` says the server failed)."""
        kind = "server_error" if code == "server_error" else "invalid_request_error"
        error = {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
        return self.event("error", error=error) or ""

    def content_type(self, ga_type: str) -> str:
        return BETA_CONTENT.get(ga_type, ga_type) if self.beta else ga_type

    def assistant_item(self, item_id: str, status: str, audio: bool, text: str, content: bool = True) -> dict:
        """The assistant's message of a response; ``content``: with its content part (once it is added)."""
        part = self.part(audio, text) if content else None
        return {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [part] if part else [],
        }

    def part(self, audio: bool, text: str) -> dict:
        if audio:
            return {"type": self.content_type("output_audio"), "transcript": text}
        return {"type": self.content_type("output_text"), "text": text}

    def user_item(self, item_id: str, *, text: str | None = None, transcript: str | None = None) -> dict:
        """A user's message: typed ``text``, or audio with its ``transcript`` (``None`` until transcribed)."""
        part = (
            {"type": "input_text", "text": text}
            if text is not None
            else {"type": "input_audio", "transcript": transcript}
        )
        return {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [part],
        }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def function_output_item(item_id: str, call_id: str, output: str) -> dict:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }


def usage(input_text: str, output_text: str, audio: bool) -> dict:
    """``response.done``'s usage, estimated from the text in and out (the LLM's own counts are not carried)."""
    tokens_in, tokens_out = estimate_tokens(input_text), estimate_tokens(output_text)
    return {
        "total_tokens": tokens_in + tokens_out,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "input_token_details": {"cached_tokens": 0, "text_tokens": tokens_in, "audio_tokens": 0},
        "output_token_details": {"text_tokens": tokens_out, "audio_tokens": 0 if not audio else tokens_out},
    }


def response_object(
    response_id: str,
    status: str,
    *,
    output: list[dict],
    modalities: list[str],
    conversation_id: str,
    details: dict | None = None,
    usage_: dict | None = None,
    beta: bool = False,
) -> dict:
    """The ``response`` of ``response.created`` and ``response.done``."""
    response = {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": details,
        "output": output,
        "conversation_id": conversation_id,
        "usage": usage_,
        "metadata": None,
    }
    if beta:
        response["modalities"] = ["text", "audio"] if "audio" in modalities else ["text"]
    else:
        response["output_modalities"] = modalities
    return response


def to_wire(config: RealtimeConfig, session_id: str, model: str, beta: bool) -> dict:
    """The ``session`` object of ``session.created`` and ``session.updated``, in the connection's layout."""
    tool_choice = config.tool_choice
    max_tokens = config.max_output_tokens
    if beta:
        return {
            "id": session_id,
            "object": "realtime.session",
            "model": model,
            "modalities": ["text", "audio"] if config.speaks else ["text"],
            "instructions": config.instructions,
            "voice": config.voice,
            "input_audio_format": GA_TO_BETA_FORMAT[config.input_format],
            "output_audio_format": GA_TO_BETA_FORMAT[config.output_format],
            "input_audio_transcription": config.transcription,
            "turn_detection": config.turn_detection,
            "tools": config.tools,
            "tool_choice": tool_choice,
            "temperature": config.temperature if config.temperature is not None else 0.8,
            "max_response_output_tokens": max_tokens,
        }

    def fmt(kind: str) -> dict:
        return {"type": kind, "rate": PCM_RATE} if kind == "audio/pcm" else {"type": kind}

    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": list(config.output_modalities),
        "instructions": config.instructions,
        "audio": {
            "input": {
                "format": fmt(config.input_format),
                "transcription": config.transcription,
                "noise_reduction": None,
                "turn_detection": config.turn_detection,
            },
            "output": {"format": fmt(config.output_format), "voice": config.voice, "speed": 1.0},
        },
        "tools": config.tools,
        "tool_choice": tool_choice,
        "max_output_tokens": max_tokens,
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
    }

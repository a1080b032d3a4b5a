"""Names on the bus: work subjects, streams, consumers, headers, and each service's message types."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from voice.v1 import llm_pb2, stt_pb2, tts_pb2

HEADER_REPLY = "Voice-Reply"
HEADER_REQUEST_ID = "Voice-Request-Id"
HEADER_DEADLINE = "Voice-Deadline"
HEADER_SESSION_ID = "Voice-Session-Id"

CANCEL_PREFIX = "voice.cancel."
PRESENCE_PREFIX = "voice.workers."
# What channel clients publish (``/ws/channels`` free channels) on ``voice.events.<name>``.
EVENTS_PREFIX = "voice.events."
# A session's status payloads on ``voice.status.<session id>``: published by the gateway alone, never by a client.
STATUS_PREFIX = "voice.status."


@dataclass(frozen=True)
class ServiceSpec:
    """How one worker service appears on the bus.

    Attributes:
        name: Short name (``stt``, ``llm``, ``tts``), also the durable consumer name.
        stream: JetStream work-queue stream.
        subject: Work subject the stream captures.
        request_type: Protobuf request message.
        event_type: Protobuf event message streamed back.
        reply_field: Field of ``voice.v1.Reply`` that carries the event.
        final_field: Event oneof member that ends a stream.
    """

    name: str
    stream: str
    subject: str
    request_type: type[Message]
    event_type: type[Message]
    reply_field: str
    final_field: str

    @property
    def durable(self) -> str:
        return self.name

    @property
    def presence_subject(self) -> str:
        return PRESENCE_PREFIX + self.name


SERVICES: dict[str, ServiceSpec] = {
    "stt": ServiceSpec(
        "stt",
        "VOICE_STT",
        "voice.stt.work",
        stt_pb2.TranscribeRequest,
        stt_pb2.TranscribeEvent,
        "stt",
        "transcript",
    ),
    "llm": ServiceSpec(
        "llm",
        "VOICE_LLM",
        "voice.llm.work",
        llm_pb2.GenerateRequest,
        llm_pb2.GenerateEvent,
        "llm",
        "completion",
    ),
    "tts": ServiceSpec(
        "tts",
        "VOICE_TTS",
        "voice.tts.work",
        tts_pb2.SynthesizeRequest,
        tts_pb2.SynthesizeEvent,
        "tts",
        "summary",
    ),
}


def service_spec(name: str) -> ServiceSpec:
    """Returns the spec of a worker service, or raises ``KeyError`` naming the known ones."""
    try:
        return SERVICES[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(SERVICES)}") from None


def cancel_subject(request_id: str) -> str:
    """Core NATS subject that cancels one in-flight request."""
    return CANCEL_PREFIX + request_id


def events_subject(channel: str) -> str:
    """Core NATS subject of a free channel of the channels dialect: what its clients publish to each other."""
    return EVENTS_PREFIX + channel


def status_subject(session_id: str) -> str:
    """Core NATS subject of a session's statuses (seed 002 payloads). Only the gateway publishes there, so no
    channel client's publish can reach a session's status subscribers (a separate namespace from
    :func:`events_subject`)."""
    return STATUS_PREFIX + session_id

"""Agents: what a session's assistant is (prompt, greeting, voice, models, tools, pipeline options),
stored in the JetStream KV bucket ``agents``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from voice_gateway.storage.buckets import Bucket

logger = logging.getLogger(__name__)

BUCKET = "agents"
AGENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The longest a semantic turn waits in silence when the end-of-turn model says the caller goes on.
SEMANTIC_MAX_SILENCE_MS = 1000
DEFAULT_FALLBACK_MESSAGE = "Sorry, I'm having trouble answering right now. Please try again in a moment."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LlmOptions(_Strict):
    """LLM settings; empty model means the LLM worker's default."""

    model: str = ""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int = Field(default=150, ge=1, le=4096)
    tool_choice: str = Field(default="auto", description='"auto", "required", "none" or a tool name; first round only')
    max_tool_rounds: int = Field(default=3, ge=1, le=8, description="LLM rounds with tool calls before a plain answer")


class SttOptions(_Strict):
    """STT settings; empty language lets the model detect it."""

    language: str = ""


class TtsOptions(_Strict):
    """TTS settings beyond the agent's voice."""

    speed: float = Field(default=1.0, gt=0.25, le=4.0)
    speaker: str = ""
    language: str = ""


BUILTIN_TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "end_call": (
        "End the call. Use it when the caller says goodbye or the conversation is over.",
        {"type": "object", "properties": {"reason": {"type": "string"}}},
    ),
    "transfer_call": (
        "Transfer the caller to a human agent.",
        {"type": "object", "properties": {"reason": {"type": "string"}}},
    ),
    "press_digit": (
        "Press a key on the phone keypad, to navigate an automated phone menu (IVR).",
        {
            "type": "object",
            "properties": {"digit": {"type": "string", "description": "One key: 0-9, * or #"}},
            "required": ["digit"],
        },
    ),
}
TRANSFER_NUMBER_PARAMETERS = {
    "type": "object",
    "properties": {"number": {"type": "string", "description": "E.164 number, e.g. +14155550100"}},
    "required": ["number"],
}


class Tool(_Strict):
    """A tool the model may call: a built-in (``end_call``, ``transfer_call``, ``press_digit``: no ``url``)
    or an HTTP webhook (``url``). Built-ins get a description and parameters when none are given.
    ``press_digit`` presses a keypad key after the answer is spoken; only Retell's socket can (elsewhere
    it is recorded in the call log and nothing is pressed).

    A tool's result is for the model. ``expose_result`` also shows it to the clients of the browser
    socket (``/ws``, unauthenticated): its ``llm_tool_result`` then carries the result itself instead of
    ``{"successful": …}``. Set it only for tools whose answers any caller may read."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = Field(default="", max_length=2000)
    parameters: dict[str, Any] = Field(default_factory=dict)
    url: str = ""
    method: str = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    transfer_number: str = Field(default="", max_length=32)
    show_transferee_as_caller: bool = Field(
        default=False, description="transfer_call only: the transferee sees the caller's number (Retell)"
    )
    expose_result: bool = Field(default=False, description="show the result to unauthenticated /ws clients")
    client: bool = Field(
        default=False, description="the client runs it (OpenAI Realtime's function tools): the answer ends at the call"
    )

    @model_validator(mode="after")
    def _builtin_or_webhook(self) -> Tool:
        if self.client:
            if self.url or self.transfer_number or self.show_transferee_as_caller:
                raise ValueError(f"tool {self.name!r}: a client tool has no url, transfer_number or transfer options")
        elif self.url:
            if not re.match(r"^https?://[^\s/]+", self.url):
                raise ValueError(f"tool {self.name!r}: url must be an http:// or https:// URL")
            if self.method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                raise ValueError(f"tool {self.name!r}: method must be GET, POST, PUT, PATCH or DELETE")
        elif self.name not in BUILTIN_TOOLS:
            raise ValueError(
                f"tool {self.name!r} has no url: a webhook tool needs one, and the built-ins are "
                + ", ".join(BUILTIN_TOOLS)
            )
        else:
            description, parameters = BUILTIN_TOOLS[self.name]
            if self.name == "transfer_call" and not self.transfer_number:
                parameters = TRANSFER_NUMBER_PARAMETERS
            self.description = self.description or description
            self.parameters = self.parameters or parameters
        if self.show_transferee_as_caller and (self.url or self.name != "transfer_call"):
            raise ValueError(f"tool {self.name!r}: show_transferee_as_caller is an option of transfer_call only")
        if not self.parameters:
            self.parameters = {"type": "object", "properties": {}}
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type object")
        return self


class TurnDetection(_Strict):
    """How the end of a caller's turn is decided on real-time calls. The names follow OpenAI Realtime's
    ``turn_detection``: ``semantic`` is its ``semantic_vad``, ``silence`` its ``server_vad``.

    - ``semantic``: after a short pause (``pause_ms``) an end-of-turn model (Smart Turn v3.2) hears the
      utterance; the turn ends at once when it says the caller has finished, else after
      ``silence_duration_ms`` of silence. Transcription starts speculatively after 100 ms of non-speech
      (or at the pause, if sooner), so that it is done or nearly when the model answers.
    - ``silence``: the turn ends after ``silence_duration_ms`` of silence; its transcription starts after
      100 ms of it.

    ``eagerness`` sets how sure the model must be: ``high`` ends turns soonest (probability ≥ 0.3),
    ``low`` latest (≥ 0.7), ``medium`` and ``auto`` at ≥ 0.5.
    """

    type: Literal["semantic", "silence"] = "semantic"
    silence_duration_ms: int | None = Field(default=None, ge=100, le=5000)
    pause_ms: int = Field(default=150, ge=100, le=1000)
    prefix_padding_ms: int = Field(default=300, ge=0, le=1000)
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"

    @property
    def threshold(self) -> float:
        """The end-of-turn probability from which a pause ends the turn."""
        return {"low": 0.7, "high": 0.3}.get(self.eagerness, 0.5)

    def silence_ms(self, pipeline: PipelineOptions) -> int:
        """The silence that ends a turn: ``silence_duration_ms``, else the pipeline's
        ``endpointing_silence_ms`` (``silence``) or the longer of it and 1000 ms (``semantic``)."""
        if self.silence_duration_ms is not None:
            return self.silence_duration_ms
        if self.type == "semantic":
            return max(SEMANTIC_MAX_SILENCE_MS, pipeline.endpointing_silence_ms)
        return pipeline.endpointing_silence_ms

    @model_validator(mode="after")
    def _pause_shorter_than_silence(self) -> TurnDetection:
        if self.silence_duration_ms is not None and self.pause_ms >= self.silence_duration_ms:
            raise ValueError("turn_detection.pause_ms must be shorter than silence_duration_ms")
        return self


class PipelineOptions(_Strict):
    """How turns are taken (seed 003's ``pipeline_config`` names where they exist)."""

    transport: str = "websocket"
    enable_interruptions: bool = True
    vad_enabled: bool = True
    endpointing_silence_ms: int = Field(default=600, ge=100, le=5000)
    min_speech_ms: int = Field(default=200, ge=0, le=2000)
    max_utterance_s: float = Field(default=30.0, gt=0, le=120)
    respond_with_audio: bool = True


class Agent(_Strict):
    """One agent configuration.

    ``fallback_message`` is what the caller hears (or reads) when the LLM fails before answering (its
    backend is down, no LLM worker runs, the deadline passes); the call goes on. Empty turns the
    fallback off: the turn then fails with the dialect's error event, as a TTS failure does.
    """

    id: str = Field(pattern=AGENT_ID.pattern)
    name: str = Field(default="Assistant", min_length=1, max_length=100)
    system_prompt: str = Field(default="You are a helpful voice assistant.", max_length=20_000)
    greeting: str = Field(default="", max_length=2000)
    fallback_message: str = Field(
        default=DEFAULT_FALLBACK_MESSAGE,
        max_length=500,
        description="Said instead of an answer when the LLM fails before answering; empty: no fallback",
    )
    voice: str = ""
    avatar_url: str = ""
    background_url: str = ""
    llm: LlmOptions = Field(default_factory=LlmOptions)
    stt: SttOptions = Field(default_factory=SttOptions)
    tts: TtsOptions = Field(default_factory=TtsOptions)
    tools: list[Tool] = Field(default_factory=list)
    pipeline: PipelineOptions = Field(default_factory=PipelineOptions)
    turn_detection: TurnDetection = Field(default_factory=TurnDetection)

    @model_validator(mode="before")
    @classmethod
    def _accept_pipeline_config(cls, data: Any) -> Any:
        """Seed 003 agents carry ``pipeline_config`` (``stt_config``, ``llm_config``, ``tts_config``,
        ``transport``, ``enable_interruptions``, ``vad_enabled``); they are mapped onto this model's
        fields so a migrating user's agent loads unchanged. Other providers' ``service``, ``model`` and
        ``voice_id`` values name services this platform replaces, so they are not used."""
        if not isinstance(data, dict) or "pipeline_config" not in data:
            return data
        data = dict(data)
        legacy = data.pop("pipeline_config") or {}
        if not isinstance(legacy, dict):
            raise ValueError("pipeline_config must be an object")
        pipeline = dict(data.get("pipeline") or {})
        for key in ("transport", "enable_interruptions", "vad_enabled", "endpointing_silence_ms", "max_utterance_s"):
            if key in legacy:
                pipeline.setdefault(key, legacy[key])
        data["pipeline"] = pipeline
        llm_config = legacy.get("llm_config") or {}
        llm = dict(data.get("llm") or {})
        for key in ("temperature", "max_tokens"):
            if key in llm_config:
                llm.setdefault(key, llm_config[key])
        data["llm"] = llm
        stt_config = legacy.get("stt_config") or {}
        if stt_config.get("language"):
            data.setdefault("stt", {"language": stt_config["language"]})
        data.pop("voice_system", None)
        return data

    @field_validator("fallback_message")
    @classmethod
    def _fallback_is_text_or_empty(cls, message: str) -> str:
        """Surrounding whitespace goes; a message of only whitespace is refused rather than read as "off"."""
        if message and not message.strip():
            raise ValueError('fallback_message must contain text, or be "" to turn the fallback off')
        return message.strip()

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[Tool]) -> list[Tool]:
        names = [t.name for t in tools]
        if len(names) != len(set(names)):
            raise ValueError("tool names must be unique")
        return tools

    @model_validator(mode="after")
    def _tool_choice_names_a_mode_or_tool(self) -> Agent:
        choice = self.llm.tool_choice
        if choice not in ("auto", "required", "none") and choice not in {t.name for t in self.tools}:
            raise ValueError(f'llm.tool_choice must be "auto", "required", "none" or a tool name, not {choice!r}')
        return self


class AgentStore:
    """Agents in the KV bucket ``agents`` (file storage), one JSON document per agent id.

    When NATS lost the bucket (a restart with an empty store), the store creates it again and puts
    back the default agent (:meth:`load_default`); other agents are gone with the store.
    """

    def __init__(self, bucket: Bucket) -> None:
        self._kv = bucket
        self._default: Agent | None = None
        bucket.on_recreate = self._restore_default

    @classmethod
    async def open(cls, js, *, replicas: int = 1) -> AgentStore:
        """Opens the bucket, creating it the first time.

        Args:
            js: A JetStream context.
            replicas: Replicas of the bucket (``NATS_STREAM_REPLICAS``).
        """
        config = KeyValueConfig(bucket=BUCKET, storage=StorageType.FILE, history=5, replicas=replicas)
        return cls(await Bucket.open(js, config))

    async def get(self, agent_id: str) -> Agent | None:
        if not AGENT_ID.fullmatch(agent_id):
            return None
        entry = await self._kv.get(agent_id)
        if entry is None or entry.value is None:
            return None
        return Agent.model_validate_json(entry.value)

    async def put(self, agent: Agent) -> None:
        await self._kv.put(agent.id, agent.model_dump_json().encode())

    async def delete(self, agent_id: str) -> bool:
        if await self.get(agent_id) is None:
            return False
        await self._kv.delete(agent_id)
        return True

    async def load_default(self, path: Path) -> Agent:
        """Stores the agent in ``path`` (JSON), replacing the stored one with the same id."""
        try:
            agent = Agent.model_validate(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"default agent file {path}: {exc}") from exc
        await self.put(agent)
        self._default = agent
        logger.info("default agent %r loaded from %s", agent.id, path)
        return agent

    async def _restore_default(self, kv: KeyValue) -> None:
        if self._default is not None:
            await kv.put(self._default.id, self._default.model_dump_json().encode())
            logger.info("default agent %r stored again", self._default.id)

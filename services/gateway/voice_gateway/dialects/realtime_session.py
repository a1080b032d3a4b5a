"""OpenAI Realtime's session configuration, mapped onto the platform's agent and audio formats.

A realtime session starts from the agent its ``model`` names (or the default agent): its prompt is the
``instructions``, its voice the ``audio.output.voice``, its turn detection the ``turn_detection``
(``semantic`` is ``semantic_vad``, ``silence`` is ``server_vad``). ``session.update`` changes
:class:`RealtimeConfig`; :func:`agent_for` makes the agent a turn answers as, :func:`media_formats` the
call's audio formats. Both field layouts are read: GA (``audio.input.format`` ...) and beta
(``input_audio_format``, ``modalities``, ...), whichever the client sends; :func:`to_wire` writes the
one the connection speaks. Fields the platform does not support are accepted and reported back as
notes (logged, never an error); a value that is wrong raises :class:`ConfigError`, which the dialect
answers with the protocol's ``error`` event.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from voice_audio import Encoding
from voice_gateway.agents import Agent
from voice_gateway.conversation.playout import MediaFormat

# The voices of OpenAI's own models: a client that names one gets the agent's voice.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"}
)
PCM_RATE = 24000
# Audio deltas are sent as soon as they are synthesized (the client buffers), so the lead is unbounded.
SEND_AT_ONCE_S = 3600.0
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
GA_TO_BETA_FORMAT = {value: key for key, value in BETA_FORMATS.items()}
ENCODINGS = {"audio/pcm": Encoding.PCM16, "audio/pcmu": Encoding.MULAW, "audio/pcma": Encoding.ALAW}
MIN_SILENCE_MS = 200
# Fields a client sends back as session.created gave them: accepted without a note. Any other
# field this module does not read is accepted with a note (logged), never an error.
ECHOED = frozenset({"type", "object", "id", "model", "expires_at"})


class ConfigError(ValueError):
    """A session or response setting with a wrong value; ``param`` names it as the ``error`` event does."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class RealtimeConfig:
    """What a realtime session is configured to do (GA field names)."""

    instructions: str
    voice: str
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    turn_detection: dict | None = None
    transcription: dict | None = field(default_factory=lambda: {"model": "whisper-1"})
    tools: list[dict] = field(default_factory=list)
    tool_choice: Any = "auto"
    temperature: float | None = None
    max_output_tokens: int | str = "inf"

    @property
    def speaks(self) -> bool:
        return "audio" in self.output_modalities

    @property
    def create_response(self) -> bool:
        return bool(self.turn_detection and self.turn_detection.get("create_response", True))

    @classmethod
    def from_agent(cls, agent: Agent) -> RealtimeConfig:
        detection = agent.turn_detection
        interrupt = agent.pipeline.enable_interruptions
        if detection.type == "semantic":
            wire: dict = {"type": "semantic_vad", "eagerness": detection.eagerness}
        else:
            wire = {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": detection.prefix_padding_ms,
                "silence_duration_ms": detection.silence_ms(agent.pipeline),
                "idle_timeout_ms": None,
            }
        wire.update(create_response=True, interrupt_response=interrupt)
        choice = agent.llm.tool_choice
        return cls(
            instructions=agent.system_prompt,
            voice=agent.voice or "default",
            turn_detection=wire,
            tool_choice=choice if choice in ("auto", "none", "required") else {"type": "function", "name": choice},
        )


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{param} must be a number from {low:g} to {high:g}", param)
    return float(value)


def _format(value: Any, param: str) -> str:
    """A GA format object or a beta format string, as the GA ``type``."""
    if isinstance(value, str) and value in BETA_FORMATS:
        return BETA_FORMATS[value]
    if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] in ENCODINGS:
        rate = value.get("rate", PCM_RATE if value["type"] == "audio/pcm" else 8000)
        if (value["type"] == "audio/pcm" and rate != PCM_RATE) or (value["type"] != "audio/pcm" and rate != 8000):
            raise ConfigError(f"{param}: {value['type']} is served at {rate} Hz only", param)
        return value["type"]
    raise ConfigError(f"{param} must be audio/pcm (24 kHz), audio/pcmu or audio/pcma", param)


def _turn_detection(value: Any, param: str, notes: list[str]) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise ConfigError(f"{param}.type must be server_vad or semantic_vad (or the setting null)", param)
    wire: dict = {"type": value["type"]}
    for flag in ("create_response", "interrupt_response"):
        if not isinstance(value.get(flag, True), bool):
            raise ConfigError(f"{param}.{flag} must be a boolean", f"{param}.{flag}")
        wire[flag] = value.get(flag, True)
    if value["type"] == "semantic_vad":
        eagerness = value.get("eagerness", "auto")
        if eagerness not in ("low", "medium", "high", "auto"):
            raise ConfigError(f"{param}.eagerness must be low, medium, high or auto", f"{param}.eagerness")
        wire["eagerness"] = eagerness
    else:
        wire["threshold"] = _number(value.get("threshold", 0.5), f"{param}.threshold", 0.0, 1.0)
        wire["prefix_padding_ms"] = int(
            _number(value.get("prefix_padding_ms", 300), f"{param}.prefix_padding_ms", 0, 1000)
        )
        silence = int(_number(value.get("silence_duration_ms", 500), f"{param}.silence_duration_ms", 0, 5000))
        if silence < MIN_SILENCE_MS:
            notes.append(f"{param}.silence_duration_ms below {MIN_SILENCE_MS} ms is served as {MIN_SILENCE_MS} ms")
        wire["silence_duration_ms"] = max(MIN_SILENCE_MS, silence)
        wire["idle_timeout_ms"] = None
        if value.get("threshold", 0.5) != 0.5:
            notes.append(f"{param}.threshold: the gateway's VAD keeps its own threshold")
        if value.get("idle_timeout_ms") is not None:
            notes.append(f"{param}.idle_timeout_ms is not supported")
    return wire


def _tools(value: Any, param: str, notes: list[str]) -> list[dict]:
    if not isinstance(value, list):
        raise ConfigError(f"{param} must be a list", param)
    tools = []
    for index, tool in enumerate(value):
        if not isinstance(tool, dict) or not isinstance(tool.get("name", ""), str):
            raise ConfigError(f"{param}[{index}] must be a function tool object", f"{param}[{index}]")
        if tool.get("type", "function") != "function":
            notes.append(f"{param}[{index}]: tools of type {str(tool.get('type'))[:32]!r} are not supported")
            continue
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        description = tool.get("description", "")
        if not isinstance(parameters, dict) or not isinstance(description, str):
            raise ConfigError(f"{param}[{index}]: parameters must be a JSON schema object", f"{param}[{index}]")
        tools.append(
            {"type": "function", "name": tool.get("name", ""), "description": description, "parameters": parameters}
        )
    return tools


def _modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(v in ("audio", "text") for v in value):
        raise ConfigError(f'{param} must be ["audio"] or ["text"]', param)
    return ["audio"] if "audio" in value else ["text"]


def _max_tokens(value: Any, param: str) -> int | str:
    if value == "inf":
        return "inf"
    return int(_number(value, param, 1, 4096))


def apply_update(config: RealtimeConfig, session: Any) -> tuple[RealtimeConfig, list[str]]:
    """``config`` with a ``session.update``'s ``session`` applied (GA or beta layout), and notes on what was
    ignored. Nothing changes when a value is wrong.

    Raises:
        ConfigError: A value is wrong; its ``param`` says which.
    """
    if not isinstance(session, dict):
        raise ConfigError("session must be an object", "session")
    new, notes = copy.deepcopy(config), []
    audio = session.get("audio", {})
    if not isinstance(audio, dict):
        raise ConfigError("session.audio must be an object", "session.audio")
    audio_in = audio.get("input", {}) if isinstance(audio.get("input", {}), dict) else None
    audio_out = audio.get("output", {}) if isinstance(audio.get("output", {}), dict) else None
    if audio_in is None or audio_out is None:
        raise ConfigError("session.audio.input and .output must be objects", "session.audio")
    for key, value in session.items():
        if key == "instructions":
            if not isinstance(value, str) or len(value) > 20_000:
                raise ConfigError("instructions must be a string of at most 20000 characters", "session.instructions")
            new.instructions = value
        elif key in ("output_modalities", "modalities"):
            new.output_modalities = _modalities(value, f"session.{key}")
        elif key in ("input_audio_format", "output_audio_format"):
            setattr(new, key.replace("_audio", ""), _format(value, f"session.{key}"))
        elif key == "turn_detection":
            new.turn_detection = _turn_detection(value, "session.turn_detection", notes)
        elif key == "input_audio_transcription":
            new.transcription = _transcription(value, "session.input_audio_transcription")
        elif key == "voice":
            new.voice = _voice(value, "session.voice", notes)
        elif key == "tools":
            new.tools = _tools(value, "session.tools", notes)
        elif key == "tool_choice":
            new.tool_choice = value
        elif key == "temperature":
            new.temperature = _number(value, "session.temperature", 0.0, 2.0)
        elif key in ("max_output_tokens", "max_response_output_tokens"):
            new.max_output_tokens = _max_tokens(value, f"session.{key}")
        elif key != "audio" and key not in ECHOED:
            notes.append(f"session.{key} is not supported and was ignored")
    for key, value in audio_in.items():
        param = f"session.audio.input.{key}"
        if key == "format":
            new.input_format = _format(value, param)
        elif key == "turn_detection":
            new.turn_detection = _turn_detection(value, param, notes)
        elif key == "transcription":
            new.transcription = _transcription(value, param)
        else:
            notes.append(f"{param} is not supported and was ignored")
    for key, value in audio_out.items():
        param = f"session.audio.output.{key}"
        if key == "format":
            new.output_format = _format(value, param)
        elif key == "voice":
            new.voice = _voice(value, param, notes)
        else:
            notes.append(f"{param} is not supported and was ignored")
    _check_tool_choice(new.tool_choice, None, "session.tool_choice")
    return new, notes


def _transcription(value: Any, param: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("language", ""), str):
        raise ConfigError(f"{param} must be an object (model, language, prompt) or null", param)
    return {k: v for k, v in value.items() if k in ("model", "language", "prompt") and isinstance(v, str)}


def _voice(value: Any, param: str, notes: list[str]) -> str:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        value = value["id"]
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ConfigError(f"{param} must be a voice name", param)
    if value in OPENAI_VOICES:
        notes.append(f"{param} {value!r} is an OpenAI voice: the agent's voice speaks instead")
    return value


def _check_tool_choice(choice: Any, names: set[str] | None, param: str) -> str:
    """The agent's ``llm.tool_choice`` for an OpenAI ``tool_choice``; a function must be among ``names`` (the
    session's and the agent's tools) unless ``names`` is ``None``."""
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if names is not None and choice["name"] not in names:
            raise ConfigError(f"{param} names a function that is not among the tools", param)
        return choice["name"]
    raise ConfigError(f'{param} must be "auto", "none", "required" or {{"type": "function", "name": ...}}', param)


def agent_for(config: RealtimeConfig, base: Agent, prefix: str = "session") -> Agent:
    """The agent a turn answers as: ``base`` with the session's prompt, voice, tools and limits (``prefix``
    names the event's field in an error: ``session`` or ``response``).

    Raises:
        ConfigError: The result is not a valid agent (a bad tool name, say).
    """
    data = base.model_dump()
    data["system_prompt"] = config.instructions
    if config.voice not in OPENAI_VOICES and config.voice != "default":
        data["voice"] = config.voice
    client_tools = [
        {"name": t["name"], "description": t["description"], "parameters": t["parameters"], "client": True}
        for t in config.tools
    ]
    names = {t["name"] for t in client_tools}
    data["tools"] = [t for t in data["tools"] if t["name"] not in names] + client_tools
    llm = data["llm"]
    llm["tool_choice"] = _check_tool_choice(
        config.tool_choice, {t["name"] for t in data["tools"]}, f"{prefix}.tool_choice"
    )
    if config.temperature is not None:
        llm["temperature"] = config.temperature
    if config.max_output_tokens != "inf":
        llm["max_tokens"] = config.max_output_tokens
    if config.transcription is not None and config.transcription.get("language"):
        data["stt"]["language"] = config.transcription["language"]
    detection = config.turn_detection
    if detection is not None:
        data["pipeline"]["enable_interruptions"] = detection.get("interrupt_response", True)
        if detection["type"] == "semantic_vad":
            data["turn_detection"].update(type="semantic", eagerness=detection["eagerness"], silence_duration_ms=None)
        else:
            silence = detection["silence_duration_ms"]
            pause = min(data["turn_detection"]["pause_ms"], silence - 100)
            data["turn_detection"].update(
                type="silence",
                silence_duration_ms=silence,
                prefix_padding_ms=detection["prefix_padding_ms"],
                pause_ms=max(100, pause),
            )
    data["pipeline"]["vad_enabled"] = detection is not None
    try:
        return Agent.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"invalid {prefix}: {first['msg']}", f"{prefix}." + ".".join(map(str, first["loc"]))
        ) from None


def response_config(config: RealtimeConfig, response: Any) -> tuple[RealtimeConfig, list[str]]:
    """``config`` with a ``response.create``'s per-response overrides (``instructions``, ``output_modalities``,
    ``tools``, ``tool_choice``, ``temperature``, ``max_output_tokens``, ``audio.output``).

    Raises:
        ConfigError: A value is wrong.
    """
    if response is None:
        return config, []
    if not isinstance(response, dict):
        raise ConfigError("response must be an object", "response")
    known = {
        "instructions",
        "output_modalities",
        "modalities",
        "tools",
        "tool_choice",
        "temperature",
        "max_output_tokens",
        "max_response_output_tokens",
        "voice",
        "output_audio_format",
        "audio",
    }
    overrides = {k: v for k, v in response.items() if k in known}
    try:
        new, notes = apply_update(config, overrides)
    except ConfigError as exc:
        raise ConfigError(
            str(exc).replace("session.", "response."), exc.param.replace("session", "response", 1)
        ) from None
    notes += [f"response.{k} is not supported and was ignored" for k in response if k not in known]
    return new, [note.replace("session.", "response.") for note in notes]


def media_formats(config: RealtimeConfig) -> tuple[MediaFormat, MediaFormat]:
    """The call's input and output audio formats."""

    def media(kind: str) -> MediaFormat:
        encoding = ENCODINGS[kind]
        rate = PCM_RATE if encoding == Encoding.PCM16 else 8000
        width = 2 if encoding == Encoding.PCM16 else 1
        return MediaFormat(encoding=encoding, sample_rate=rate, chunk_bytes=rate * width, lead_s=SEND_AT_ONCE_S)

    return media(config.input_format), media(config.output_format)

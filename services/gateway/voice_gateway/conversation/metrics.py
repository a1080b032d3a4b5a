"""The gateway's Prometheus metrics of sessions, turns, calls and frames, in one place for the
conversation core and every dialect, and the count of turns in flight that a draining gateway waits on."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge, Histogram

from voice_telemetry.metrics import LATENCY_BUCKETS_S

ACTIVE_SESSIONS = Gauge("voice_gateway_active_sessions", "Sessions open on this gateway", ["dialect"])
TURNS = Counter("voice_gateway_turns_total", "Turns finished, by kind and outcome", ["dialect", "kind", "outcome"])
TURNS_RUNNING = Gauge("voice_gateway_turns_in_flight", "Turns running on this gateway now")
FIRST_AUDIO = Histogram(
    "voice_gateway_time_to_first_audio_seconds",
    "From the user's complete input to the first audio of the answer",
    ["dialect", "kind"],
    buckets=LATENCY_BUCKETS_S,
)
ERRORS = Counter(
    "voice_gateway_errors_total", "Unexpected failures outside the turns' own outcomes", ["dialect", "kind"]
)
# Turn timings observed per stage (``voice_gateway_stage_seconds{stage="stt"|"llm_first_token"|…}``).
OBSERVED_STAGES = frozenset({"endpointing_s", "stt_s", "llm_first_token_s", "llm_s", "tts_first_chunk_s"})
STAGE = Histogram("voice_gateway_stage_seconds", "Duration of each turn stage", ["stage"], buckets=LATENCY_BUCKETS_S)

TOOL_CALLS = Counter(
    "voice_gateway_tool_calls_total", "Tool calls run for the model, by tool and outcome", ["tool", "outcome"]
)
TOOL_SECONDS = Histogram("voice_gateway_tool_seconds", "Duration of one tool call", buckets=LATENCY_BUCKETS_S)
FALLBACKS = Counter(
    "voice_gateway_fallbacks_total",
    "Turns answered with the agent's fallback message because the LLM failed, by the failure's code",
    ["reason"],
)

BARGE_INS = Counter("voice_gateway_barge_ins_total", "Caller speech that interrupted the agent", ["dialect"])
BARGE_IN_LATENCY = Histogram(
    "voice_gateway_barge_in_latency_seconds",
    "Caller speech onset to the agent's audio stopped (clear sent)",
    ["dialect"],
    buckets=LATENCY_BUCKETS_S,
)
VOICE_TO_VOICE = Histogram(
    "voice_gateway_voice_to_voice_seconds",
    "Caller's last voiced sample to the first byte of the answer's audio sent",
    ["dialect"],
    buckets=LATENCY_BUCKETS_S,
)
INBOUND_FRAME = Histogram(
    "voice_gateway_inbound_frame_seconds",
    "Time to handle one inbound media frame (decode, resample, VAD)",
    ["dialect"],
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
)
TURN_ENDINGS = Counter(
    "voice_gateway_turn_endings_total",
    "How the ends of callers' spoken turns were decided: semantic (the end-of-turn model at a pause), "
    "max_silence, silence, max_utterance or hang_up (the call ended first)",
    ["dialect", "decision"],
)
SPECULATIONS = Counter(
    "voice_gateway_speculative_transcripts_total",
    "Transcriptions started at a gap in the speech, by what became of them: used, or discarded (the caller went on)",
    ["outcome"],
)
TURNS_CONTINUED = Counter(
    "voice_gateway_turns_continued_total",
    "Spoken turns given up because the caller went on speaking before any of the answer was sent; "
    "the utterance joins the one that follows",
    ["dialect"],
)
BAD_FRAMES = Counter("voice_gateway_bad_frames_total", "Malformed or unexpected frames, by kind", ["dialect", "kind"])


class TurnsInFlight:
    """Counts the turns queued or running on this gateway, so a draining gateway can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        TURNS_RUNNING.set(self.count)
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        TURNS_RUNNING.set(self.count)
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no turn is queued or runs; returns whether that happened within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


TURNS_IN_FLIGHT = TurnsInFlight()

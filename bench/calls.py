"""Real-time call figures: voice-to-voice latency per dialect with its breakdown, barge-in latency,
and how many concurrent Twilio calls one gateway process holds; and spoken turns through the browser
dialect, timed by the events the gateway sends back.

The callers, the browser client, the per-turn voice-to-voice measurement and the REST helpers are
``voicectl``'s (the same ones ``voicectl load`` drives). The density figure keeps a lighter Twilio
streamer of its own: hundreds of calls that only stream μ-law frames, so that the load generator's own
work on the same cores stays small.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
import urllib.request
from typing import Any

import numpy as np
import websockets

from voice_audio import resample, ulaw_encode
from voicectl import gateway_api
from voicectl.callers import BrowserClient, call
from voicectl.speech import speak

BENCH_AGENT = {
    "name": "Bench",
    "system_prompt": "You are a phone assistant. Answer in one short sentence.",
    "greeting": "Hello, how can I help?",
    "llm": {"temperature": 0.0, "max_tokens": 40},
}
LONG_GREETING = (
    "Good evening and welcome to the Riverside restaurant reservation line. "
    "Tonight we are serving a special menu of seasonal dishes from the coast. "
    "Our kitchen is open until eleven and the terrace is heated."
)
INTERRUPTION = "Wait, stop, I have a question."
TURN_SPACING_S = 12.0
# How long the browser session waits for the greeting, and for each turn to complete.
BROWSER_TIMEOUT_S = 120.0
# Calls are connected (handshake, session, call log) before the steady-state window is measured.
WARM_UP_S = 4.0


def _put_agent(base_url: str, agent_id: str, agent: dict) -> None:
    gateway_api.put_agent(base_url, agent_id, agent, api_key=gateway_api.default_api_key())


def _call_log(base_url: str, call_id: str) -> dict:
    return gateway_api.call_log(base_url, call_id, api_key=gateway_api.default_api_key())


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": float("nan"), "p95": float("nan")}
    return {"n": len(values), "median": statistics.median(values), "p95": float(np.percentile(values, 95))}


# The stages of an answered spoken turn in the call log, one after the other: endpointing's wait after the
# arrival of the VAD's last voiced frame, STT (turn start → transcript), the LLM to its first sentence (first
# token included), and the TTS worker's first chunk of that sentence. Before them, ``HEARD_END``: from the
# caller's last voiced sample to the end of the last frame the gateway's VAD called voiced (the carrier's
# framing and the VAD's reading of the word's end). The rest of the voice-to-voice latency is the platform's
# own (gateway, bus, network, playout).
STAGES = ("endpointing_s", "stt_s", "llm_first_sentence_s", "tts_first_chunk_s")
HEARD_END = "speech_end_heard_s"


def stage_timings(
    latencies: list[float | None], turns_log: list[dict], speech_ends: list[float] | None = None
) -> list[tuple[float, dict[str, float]]]:
    """Pairs the caller's measured turns with the call log's, in order, and keeps the answered ones.

    Args:
        latencies: Voice-to-voice latency of each caller utterance in order (None or NaN: unanswered).
        turns_log: The call log's spoken turns (``kind == "audio"``) in order.
        speech_ends: The caller's last voiced sample of each utterance, on the call's clock
            (``CallResult.caller_speech_ends``); with it, each pair whose log has ``speech_end_s`` also gets
            ``HEARD_END``: how much later the VAD's last voiced frame ended.

    Returns:
        ``(latency, timings)`` of each pair whose latency was measured, whose turn did not fail and whose
        timings hold every one of ``STAGES``.
    """
    ends: list[float | None] = list(speech_ends) if speech_ends is not None else [None] * len(latencies)
    paired = []
    for latency, turn, end in zip(latencies, turns_log, ends, strict=False):
        timings = dict(turn.get("timings") or {})
        if latency is None or np.isnan(latency) or turn.get("error") or not all(name in timings for name in STAGES):
            continue
        if end is not None and turn.get("speech_end_s") is not None:
            timings[HEARD_END] = turn["speech_end_s"] - end
        paired.append((latency, timings))
    return paired


def platform_s(latency: float, timings: dict[str, float]) -> float:
    """What of one paired turn's voice-to-voice latency is neither a stage nor ``HEARD_END``."""
    return latency - sum(timings[name] for name in STAGES) - timings.get(HEARD_END, 0.0)


async def voice_to_voice(base_url: str, dialect: str, utterances: list[tuple[np.ndarray, int]], turns: int) -> dict:
    """``turns`` spoken turns in one call; voice-to-voice measured at the simulated carrier."""
    await asyncio.to_thread(_put_agent, base_url, "bench", BENCH_AGENT)
    first, rate = utterances[0]
    extra = [(4.0 + TURN_SPACING_S * i, resample(*utterances[i % len(utterances)], rate)) for i in range(1, turns)]
    result = await call(
        dialect,
        base_url,
        first,
        rate,
        agent_id="bench",
        speech_at_s=4.0,
        extra_speech=extra,
        listen_s=8.0,
        sample_rate=16000 if dialect == "exotel" else 8000,
        api_key=gateway_api.default_api_key(),
    )
    latencies = [float("nan") if latency is None else latency for latency in result.turn_latencies()]
    if result.session_id is None:
        raise RuntimeError("no call id")
    log = await asyncio.to_thread(_call_log, base_url, result.session_id)
    turns_log = [t for t in log["turns"] if t["kind"] == "audio" and not t["error"]]
    stages: dict[str, list[float]] = {name: [] for name in (HEARD_END, *STAGES)}
    other = []
    for latency, timings in stage_timings(latencies, turns_log, result.caller_speech_ends()):
        for name in stages:
            if name in timings:
                stages[name].append(timings[name])
        other.append(platform_s(latency, timings))
    valid = [v for v in latencies if not np.isnan(v)]
    return {
        "voice_to_voice_s": _summary(valid),
        "breakdown_s": {
            **{name: _summary(values) for name, values in stages.items()},
            "other (gateway, bus, network)": _summary(other),
        },
        "turns_answered": len(valid),
        "turns": turns,
    }


class BrowserSession:
    """One browser-dialect session (seed 001 at ``/ws``) that plays spoken turns one at a time.

    Use it as an async context manager: entering opens the session and waits for the greeting.

    Args:
        base_url: The gateway's HTTP base URL.
        agent_id: The agent to talk to.
    """

    def __init__(self, base_url: str, agent_id: str = "default") -> None:
        self.client = BrowserClient(base_url)
        self.agent_id = agent_id

    async def __aenter__(self) -> BrowserSession:
        await self.client.open()
        await self.client.send("init", agentId=self.agent_id)
        await self.client.until("audio_response", timeout=BROWSER_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.close()

    async def turn(self, clip: str) -> dict[str, float]:
        """Sends the user's ``audio`` message and waits until the turn's ``processing_complete``.

        Args:
            clip: A WAV file, base64-encoded.

        Returns:
            When each kind of event first arrived, in seconds after the audio was sent, by event type
            (``stt_complete``, ``llm_chunk``, ``audio_response``, …).
        """
        sent = self.client.clock()
        await self.client.send("audio", audio=clip)
        seen: dict[str, float] = {}
        for at, event in await self.client.timed_until("processing_complete", timeout=BROWSER_TIMEOUT_S):
            seen.setdefault(event["type"], at - sent)
        return seen


async def browser_turns(base_url: str, clips: list[str], turns: int, agent_id: str = "default") -> list[dict]:
    """Spoken turns through the browser dialect, one after the other in one session, after one warm-up
    turn that is not reported.

    Args:
        base_url: The gateway's HTTP base URL.
        clips: WAV files, base64-encoded, sent in turn as the user's ``audio`` message.
        turns: How many turns to report.
        agent_id: The agent to talk to.

    Returns:
        Each turn's event times (see :meth:`BrowserSession.turn`).
    """
    async with BrowserSession(base_url, agent_id) as session:
        measured = [await session.turn(clips[index % len(clips)]) for index in range(turns + 1)]
    return measured[1:]


def interruption() -> tuple[np.ndarray, int]:
    """``INTERRUPTION`` rendered by Piper without its generator's noise, as PCM16 at 16 kHz.

    Every run hears the same audio: with the noise, 4 of 30 renderings voiced "Wait," for less than the
    endpointer's ``min_speech_ms`` (200 ms) before the comma's pause, so those barge-ins came with "stop",
    0.5 s later, and one rendering set the figure of all the run's barge-ins.
    """
    samples, rate = speak(INTERRUPTION)
    return resample(samples, rate, 16000), 16000


async def barge_in(base_url: str, interruption: tuple[np.ndarray, int], runs: int) -> dict:
    """Caller speech while the agent reads a long greeting: speech onset → ``clear`` received."""
    await asyncio.to_thread(_put_agent, base_url, "bench-long", {**BENCH_AGENT, "greeting": LONG_GREETING})
    samples, rate = interruption
    frame = rate // 100
    onset = next(
        (i / rate for i in range(0, len(samples) - frame, frame) if np.abs(samples[i : i + frame]).mean() > 300), 0.0
    )
    latencies = []
    for _ in range(runs):
        result = await call("twilio", base_url, samples, rate, agent_id="bench-long", speech_at_s=4.0, listen_s=1.0)
        clears = result.timeline.times("clear received")
        if clears:
            latencies.append(clears[0] - (4.0 + onset))
    return {"speech_onset_to_clear_s": _summary(latencies), "runs": runs}


def _scrape(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics/", timeout=10) as response:
        return response.read().decode()


def _histogram(metrics: str, name: str) -> dict[float, float]:
    buckets = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = buckets.get(
                float("inf") if le == "+Inf" else float(le), 0.0
            ) + float(line.rsplit(" ", 1)[1])
    return buckets


def _p99(before: dict[float, float], after: dict[float, float]) -> float:
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return le
    return float("inf")


async def _load_call(url: str, frames: list[str], stop: asyncio.Event, send_lag: list[float], index: int) -> None:
    sid = f"MZload{index:05d}"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "streamSid": sid,
            "callSid": f"CAload{index}",
            "customParameters": {"agent_id": "bench-density"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": start}))

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        began = time.perf_counter() + (index % 50) * 0.0004
        sequence = 0
        while not stop.is_set():
            due = began + sequence * 0.02
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                send_lag.append(-delay)
            payload = frames[sequence % len(frames)]
            sequence += 1
            await ws.send(
                f'{{"event":"media","sequenceNumber":"{sequence + 1}","streamSid":"{sid}","media":{{"track":"inbound",'
                f'"chunk":"{sequence}","timestamp":"{sequence * 20}","payload":"{payload}"}}}}'
            )
        reader.cancel()
        await ws.send(json.dumps({"event": "stop", "streamSid": sid, "stop": {}}))


async def density(base_url: str, speech: tuple[np.ndarray, int], steps: list[int], step_s: float = 10.0) -> dict:
    """Concurrent Twilio calls streaming real μ-law speech (turn-taking held off by a long endpointing
    silence, so only the gateway's per-frame work is measured): p99 event-loop lag and frame handling."""
    _put_agent(
        base_url,
        "bench-density",
        {
            "name": "Density",
            "greeting": "",
            "pipeline": {"endpointing_silence_ms": 5000, "max_utterance_s": 120, "enable_interruptions": False},
        },
    )
    samples, rate = speech
    mulaw = ulaw_encode(resample(samples, rate, 8000))
    frames = [base64.b64encode(mulaw[i : i + 160]).decode() for i in range(0, len(mulaw) - 160, 160)]
    url = base_url.replace("http://", "ws://") + "/twilio/media"
    results = []
    for calls in steps:
        stop = asyncio.Event()
        send_lag: list[float] = []
        tasks = [asyncio.create_task(_load_call(url, frames, stop, send_lag, i)) for i in range(calls)]
        await asyncio.sleep(WARM_UP_S)
        send_lag.clear()
        before = await asyncio.to_thread(_scrape, base_url)
        await asyncio.sleep(step_s)
        after = await asyncio.to_thread(_scrape, base_url)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        lag = _p99(
            _histogram(before, "voice_gateway_event_loop_lag_seconds"),
            _histogram(after, "voice_gateway_event_loop_lag_seconds"),
        )
        frame = _p99(
            _histogram(before, "voice_gateway_inbound_frame_seconds"),
            _histogram(after, "voice_gateway_inbound_frame_seconds"),
        )
        client_late = float(np.percentile(send_lag, 99)) if send_lag else 0.0
        results.append(
            {
                "calls": calls,
                "p99_event_loop_lag_s": lag,
                "p99_frame_handling_s": frame,
                "p99_client_send_lag_s": client_late,
            }
        )
        if lag + frame > 0.02:
            break
        await asyncio.sleep(2.0)
    held = [r["calls"] for r in results if r["p99_event_loop_lag_s"] + r["p99_frame_handling_s"] <= 0.02]
    return {"steps": results, "max_calls_with_p99_frame_handling_under_20ms": max(held) if held else 0}

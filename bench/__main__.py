"""``python -m bench``: measures the workers and the bus on this machine and writes bench/results.json.

Starts its own nats-server, llama.cpp server and one worker per service (one slot each, so every
figure is an unloaded, single-request latency), then reports:

- STT real-time factor on a 5 s utterance;
- LLM time to first token and generation speed;
- TTS time to the first audio chunk and real-time factor;
- bus overhead: p50/p99 of a trivial request through JetStream and its streamed reply, on loopback;
- the gateway (seed 001 at /ws): time from the ``audio`` message to the first ``audio_response``
  over 20 spoken turns, with the breakdown by stage;
- real-time calls: voice-to-voice latency per dialect (Twilio, Exotel, raw PCM) with its breakdown,
  barge-in latency, how many concurrent Twilio calls one gateway process holds, and OpenAI Realtime's
  ``speech_stopped`` → first ``response.output_audio.delta`` with the ``openai`` SDK as the client;
- tracing: the gateway's spoken-turn latency (as above) on a stack whose every process exports its
  spans to a local OTLP receiver, against the same turns, interleaved, on a stack started with
  ``OTEL_SDK_DISABLED=true`` (``bench/tracing.py``);
- peer: voice-to-voice latency of our gateway against a Pipecat 1.14 bot with the same models behind a
  Twilio media-stream WebSocket, called alternately by the same simulated Twilio caller, with our stage
  breakdown (``bench/peer_compare.py``; the bot runs in ``.venv-peer``, ``make bench-peer-install``).

``--only`` picks sections: bus, workers, gateway, calls, density, tracing, peer (``make bench-peer``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import calls as call_bench
from bench import peer_compare as peer_bench
from bench import realtime as realtime_bench
from bench import tracing as tracing_bench
from voice.v1 import audio_pb2, llm_pb2, stt_pb2, tts_pb2
from voice_audio import wav_bytes
from voice_bus.client import BusClient
from voice_bus.connection import connect, ensure_streams
from voice_bus.worker import Worker
from voice_llm.embedded import llama_server_command, smollm2_model_path, wait_until_ready
from voicectl.gateway_api import default_api_key
from voicectl.local import GatewayProcess, NatsServer, WorkerProcess, free_port, prompt_threads, shared_core_threads

RESULTS = Path(__file__).with_name("results.json")
PROMPT = "Explain in three sentences why the sky is blue."
TTS_TEXT = "Thanks for calling. Your order has shipped and should arrive on Tuesday."
STT_TEXT = "Hello, I am calling about my order. It was supposed to arrive yesterday, but it has not come yet."


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
        "min": min(values),
        "max": max(values),
    }


async def bench_stt(bus: BusClient, runs: int) -> dict:
    events = await bus.collect(
        "tts",
        tts_pb2.SynthesizeRequest(text=STT_TEXT, output_format=audio_pb2.AudioFormat(sample_rate=16000)),
        timeout=60,
    )
    pcm = np.frombuffer(b"".join(e.chunk.audio for e in events if e.HasField("chunk")), dtype="<i2")
    five_s = np.zeros(5 * 16000, dtype=np.int16)
    five_s[: min(pcm.size, five_s.size)] = pcm[: five_s.size]
    request = stt_pb2.TranscribeRequest(
        audio=five_s.tobytes(), format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=16000)
    )
    rtf, latency = [], []
    await bus.collect("stt", request, timeout=60)
    for _ in range(runs):
        started = time.perf_counter()
        transcript = (await bus.collect("stt", request, timeout=60))[-1].transcript
        latency.append(time.perf_counter() - started)
        rtf.append(transcript.processing_time_s / 5.0)
    return {"real_time_factor": summary(rtf), "latency_s": summary(latency), "audio_s": 5.0, "text": transcript.text}


async def bench_llm(bus: BusClient, runs: int) -> dict:
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content=PROMPT)], max_tokens=96, temperature=0.0
    )
    ttft, tokens_per_s = [], []
    await bus.collect("llm", request, timeout=120)
    for _ in range(runs):
        started = time.perf_counter()
        first = None
        count = 0
        async for event in bus.stream("llm", request, timeout=120):
            if event.HasField("delta"):
                count += 1
                first = first or time.perf_counter()
            else:
                completion = event.completion
        done = time.perf_counter()
        ttft.append((first or done) - started)
        tokens = completion.usage.completion_tokens or count
        if first and tokens > 1:
            tokens_per_s.append((tokens - 1) / (done - first))
    return {"time_to_first_token_s": summary(ttft), "tokens_per_s": summary(tokens_per_s), "max_tokens": 96}


async def bench_tts(bus: BusClient, runs: int) -> dict:
    request = tts_pb2.SynthesizeRequest(text=TTS_TEXT)
    first_chunk, rtf = [], []
    await bus.collect("tts", request, timeout=60)
    for _ in range(runs):
        started = time.perf_counter()
        first = None
        async for event in bus.stream("tts", request, timeout=60):
            if event.HasField("chunk") and first is None:
                first = time.perf_counter() - started
            elif event.HasField("summary"):
                rtf.append(event.summary.processing_time_s / event.summary.audio_duration_s)
        first_chunk.append(first)
    return {"time_to_first_chunk_s": summary(first_chunk), "real_time_factor": summary(rtf)}


async def bench_bus(runs: int) -> dict:
    """A trivial request and one-event reply through JetStream, on a nats-server of its own."""
    with NatsServer() as nats:
        nc = await connect(nats.url, name="bench-bus")
        await ensure_streams(nc)

        async def trivial(request, context):
            yield llm_pb2.GenerateEvent(completion=llm_pb2.Completion(text="ok"))

        worker = Worker(nc, "llm", trivial, concurrency=4)
        await worker.start()
        bus = BusClient(nc)
        request = llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="ping")])
        for _ in range(50):
            await bus.collect("llm", llm_pb2.GenerateRequest(messages=request.messages), timeout=10)
        latencies = []
        for _ in range(runs):
            started = time.perf_counter()
            await bus.collect("llm", llm_pb2.GenerateRequest(messages=request.messages), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        concurrent = 400
        await asyncio.gather(
            *(
                bus.collect("llm", llm_pb2.GenerateRequest(messages=request.messages), timeout=30)
                for _ in range(concurrent)
            )
        )
        throughput = concurrent / (time.perf_counter() - started)
        await worker.stop()
        await nc.close()
    return {
        "round_trip_ms": {
            "n": runs,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "mean": statistics.mean(latencies),
        },
        "throughput_rps_4_slots": throughput,
    }


GATEWAY_QUESTIONS = [
    "What time do you open tomorrow?",
    "Can you help me with my order?",
    "What is the weather like today?",
    "I would like to book a table for two.",
]


async def spoken(bus: BusClient, text: str) -> np.ndarray:
    """``text`` spoken by the TTS worker, as PCM16 at 16 kHz."""
    events = await bus.collect(
        "tts", tts_pb2.SynthesizeRequest(text=text, output_format=audio_pb2.AudioFormat(sample_rate=16000)), timeout=60
    )
    return np.frombuffer(b"".join(e.chunk.audio for e in events if e.HasField("chunk")), dtype="<i2")


async def spoken_clips(bus: BusClient) -> list[str]:
    """The gateway questions spoken by the TTS worker, as base64 WAV files for the browser dialect."""
    return [base64.b64encode(wav_bytes(await spoken(bus, q), 16000)).decode() for q in GATEWAY_QUESTIONS]


async def bench_gateway(url: str, clips: list[str], turns: int) -> dict:
    """Spoken turns through the browser dialect: the user's complete audio → the first agent audio."""
    first_audio, stt, first_token, llm_to_audio = [], [], [], []
    for seen in await call_bench.browser_turns(url, clips, turns):
        if "audio_response" not in seen:
            continue
        first_text = seen.get("llm_chunk", seen["llm_complete"])
        first_audio.append(seen["audio_response"])
        stt.append(seen["stt_complete"])
        first_token.append(first_text - seen["stt_complete"])
        llm_to_audio.append(seen["audio_response"] - first_text)
    return {
        "audio_to_first_audio_response_s": summary(first_audio),
        "breakdown_s": {
            "stt (audio sent → stt_complete)": summary(stt),
            "llm first token (stt_complete → first llm_chunk)": summary(first_token),
            "first sentence + tts (first llm_chunk → first audio_response)": summary(llm_to_audio),
        },
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


SECTIONS = ("bus", "workers", "gateway", "calls", "density", "tracing", "peer")
DIALECTS = ("twilio", "exotel", "pcm")


def _row(name: str, figure: dict) -> str:
    return f"{name:<60} {figure['median']:>9.3f} {figure['p95']:>9.3f} {figure['n']:>4}"


def table(results: dict) -> str:
    """The figures as a text table (median, p95, count)."""
    lines = [f"{'figure':<60} {'median':>9} {'p95':>9} {'n':>4}", "-" * 85]
    if "stt" in results:
        lines += [
            _row("STT real-time factor (5 s utterance, tiny.en int8)", results["stt"]["real_time_factor"]),
            _row("STT request latency via bus (s)", results["stt"]["latency_s"]),
            _row("LLM time to first token (s)", results["llm"]["time_to_first_token_s"]),
            _row("LLM tokens/s", results["llm"]["tokens_per_s"]),
            _row("TTS time to first chunk (s)", results["tts"]["time_to_first_chunk_s"]),
            _row("TTS real-time factor", results["tts"]["real_time_factor"]),
        ]
    if "gateway" in results:
        lines.append(
            _row(
                "gateway: audio message → first audio_response (s)",
                results["gateway"]["audio_to_first_audio_response_s"],
            )
        )
        lines += [_row("  " + stage, figure) for stage, figure in results["gateway"]["breakdown_s"].items()]
    if "tracing" in results:
        figures = results["tracing"]["time_to_first_audio_s"]
        lines.append(_row("gateway turn, tracing off (OTEL_SDK_DISABLED=true) (s)", figures["tracing_off"]))
        lines.append(_row("gateway turn, tracing on, spans to a local receiver (s)", figures["tracing_on"]))
        difference = results["tracing"]["difference_s"]
        label = "  tracing on − off (ms): median / p95 / median of pairs"
        lines.append(
            f"{label:<60} {difference['median'] * 1000:>9.1f} {difference['p95'] * 1000:>9.1f}"
            f" {difference['median_of_paired'] * 1000:>6.1f}"
        )
        cpu = results["tracing"].get("cpu_s_per_turn")
        if cpu:
            label = "  CPU s per turn, 4 processes: off / on"
            lines.append(f"{label:<60} {cpu['tracing_off']:>9.3f} {cpu['tracing_on']:>9.3f}")
    for dialect, figures in results.get("calls", {}).get("voice_to_voice", {}).items():
        lines.append(_row(f"{dialect}: voice-to-voice (s)", figures["voice_to_voice_s"]))
        lines += [_row("  " + stage, figure) for stage, figure in figures["breakdown_s"].items()]
    if "realtime" in results.get("calls", {}):
        figures = results["calls"]["realtime"]["speech_stopped_to_first_audio_s"]
        lines.append(_row("realtime (openai SDK): speech_stopped → first audio delta (s)", figures))
    if "barge_in" in results.get("calls", {}):
        lines.append(
            _row("barge-in: speech onset → clear (s)", results["calls"]["barge_in"]["speech_onset_to_clear_s"])
        )
    if "density" in results:
        for step in results["density"]["steps"]:
            label = f"density: {step['calls']} Twilio calls, p99 loop lag / frame handling (ms)"
            lines.append(
                f"{label:<60} {step['p99_event_loop_lag_s'] * 1000:>9.1f} {step['p99_frame_handling_s'] * 1000:>9.2f}"
            )
        held = results["density"]["max_calls_with_p99_frame_handling_under_20ms"]
        lines.append(f"{'density: calls held with p99 frame handling < 20 ms':<60} {held:>9}")
    if "peer" in results:
        lines += peer_bench.table(results["peer"])
    if "bus" in results:
        bus = results["bus"]["round_trip_ms"]
        label = "bus round trip, trivial request (ms) p50 / p99"
        lines.append(f"{label:<60} {bus['p50']:>9.3f} {bus['p99']:>9.3f} {bus['n']:>4}")
        lines.append(f"{'bus throughput, 4 slots (requests/s)':<60} {results['bus']['throughput_rps_4_slots']:>9.0f}")
    return "\n".join(lines)


async def run(args: argparse.Namespace, sections: set[str]) -> dict:
    results: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine()}
    if "bus" in sections:
        results["bus"] = await bench_bus(args.bus_runs)
    if not sections & {"workers", "gateway", "calls", "density", "tracing", "peer"}:
        return results
    with NatsServer() as nats:
        port = free_port()
        threads = shared_core_threads()
        llama = subprocess.Popen(
            llama_server_command(
                smollm2_model_path(), "127.0.0.1", port, n_threads=threads, n_threads_batch=prompt_threads()
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}/v1"
        quiet = open(os.devnull, "w")
        workers = [
            WorkerProcess("stt", nats.url, {"OTEL_TRACES_EXPORTER": "none"}, sink=quiet),
            WorkerProcess(
                "tts",
                nats.url,
                {"OTEL_TRACES_EXPORTER": "none", "TTS_CPU_THREADS": os.environ.get("TTS_CPU_THREADS", str(threads))},
                sink=quiet,
            ),
            WorkerProcess("llm", nats.url, {"OTEL_TRACES_EXPORTER": "none", "LLM_BASE_URL": base_url}, sink=quiet),
        ]
        # The REST API (agents, call logs, the PCM trigger) takes the key the callers send.
        gateway_env = {"OTEL_TRACES_EXPORTER": "none", "GATEWAY_API_KEYS": default_api_key()}
        # The density sweep opens more calls than the gateway's default GATEWAY_MAX_SESSIONS (500) allows.
        gateway_env["GATEWAY_MAX_SESSIONS"] = str(max([*args.density_steps, 0]) + 100)
        gateway = GatewayProcess(nats.url, gateway_env, sink=quiet)
        try:
            wait_until_ready(base_url, 120, process=llama)
            for worker in workers:
                worker.start()
            gateway.start()
            nc = await connect(nats.url, name="bench")
            bus = BusClient(nc)
            if "workers" in sections:
                results["stt"] = await bench_stt(bus, args.runs)
                results["llm"] = await bench_llm(bus, args.runs)
                results["tts"] = await bench_tts(bus, args.runs)
            if sections & {"gateway", "tracing"}:
                clips = await spoken_clips(bus)
            if "gateway" in sections:
                results["gateway"] = await bench_gateway(gateway.url, clips, args.gateway_turns)
            utterances = [(await spoken(bus, question), 16000) for question in GATEWAY_QUESTIONS]
            if "calls" in sections:
                results["calls"] = {
                    "voice_to_voice": {
                        dialect: await call_bench.voice_to_voice(gateway.url, dialect, utterances, args.call_turns)
                        for dialect in DIALECTS
                    },
                    "barge_in": await call_bench.barge_in(
                        gateway.url, await asyncio.to_thread(call_bench.interruption), args.barge_ins
                    ),
                    "realtime": await realtime_bench.speech_stopped_to_audio(gateway.url, utterances, args.call_turns),
                }
            if "peer" in sections:
                results["peer"] = {
                    **await peer_bench.compare(gateway.url, base_url, args.peer_turns),
                    "machine": machine(),
                }
            if "density" in sections:
                results["density"] = await call_bench.density(gateway.url, utterances[0], args.density_steps)
            if "tracing" in sections:
                results["tracing"] = await tracing_bench.on_vs_off(base_url, clips, args.tracing_turns)
            await nc.close()
        finally:
            gateway.stop()
            for worker in workers:
                worker.stop()
            llama.terminate()
            llama.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="measured runs per model figure")
    parser.add_argument("--bus-runs", type=int, default=2000, help="measured trivial bus requests")
    parser.add_argument("--gateway-turns", type=int, default=20, help="measured spoken turns through the gateway")
    parser.add_argument("--call-turns", type=int, default=20, help="spoken turns per dialect in the call figures")
    parser.add_argument("--barge-ins", type=int, default=10, help="measured barge-ins")
    parser.add_argument(
        "--tracing-turns", type=int, default=20, help="spoken turns per setting in the tracing on/off figure"
    )
    parser.add_argument(
        "--peer-turns", type=int, default=24, help="questions asked of each system in the Pipecat comparison, at least"
    )
    parser.add_argument(
        "--density-steps",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[50, 100, 200, 300, 400, 500],
        help="concurrent call counts to try, comma-separated",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = {section.strip() for section in args.only.split(",") if section.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    results = asyncio.run(run(args, sections))
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = {**previous, **results}
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print(table(merged))
    print(f"\nwritten to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

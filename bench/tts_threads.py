"""``python -m bench.tts_threads``: how many ONNX threads should Piper use beside llama.cpp?

On one machine the first clause of an answer is synthesized while llama.cpp is still generating the
rest of it. This times Piper's ``joe`` voice (the TTS worker's engine, in-process) on short first
clauses with onnxruntime's default threads and with ``--threads``, alternating the two, first on an
idle machine, then while a llama.cpp server (the embedded SmolLM2, ``--llama-threads``) generates
without pause. It reports the median and the maximum of each; no figure is asserted. Results are in
docs/latency.md ("Piper beside llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
import urllib.request

from voice_llm.embedded import llama_server_command, smollm2_model_path, wait_until_ready
from voice_tts.piper_engine import PiperEngine
from voicectl.local import free_port

CLAUSES = (
    "Sure,",
    "The weather on Mars is very cold,",
    "I'd recommend the pasta,",
    "Hello there,",
    "Well, let me think,",
    "A good name for a black cat is Shadow.",
)


def synthesis_s(engine: PiperEngine, text: str) -> float:
    """Seconds to synthesize ``text`` whole."""
    started = time.perf_counter()
    for _ in engine.synthesize(text):
        pass
    return time.perf_counter() - started


def measure(engines: dict[str, PiperEngine], rounds: int) -> dict[str, dict[str, float]]:
    """Median and maximum synthesis time of each engine over ``rounds`` passes of the clauses."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(rounds):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for text in CLAUSES:
            for name in order:
                times[name].append(synthesis_s(engines[name], text))
                time.sleep(0.05)
    return {name: {"median_s": statistics.median(t), "max_s": max(t), "n": len(t)} for name, t in times.items()}


def keep_generating(base_url: str, stop: threading.Event) -> None:
    """Asks the llama.cpp server for long answers, one after another, until ``stop`` is set."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Tell me a long story about a cat."}], "max_tokens": 200}
    ).encode()
    while not stop.is_set():
        request = urllib.request.Request(
            f"{base_url}/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tts_threads", description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="Piper's ONNX threads to compare with the default")
    parser.add_argument("--llama-threads", type=int, default=1, help="llama.cpp's generation threads")
    parser.add_argument("--rounds", type=int, default=4, help="passes over the clauses per condition")
    args = parser.parse_args()
    engines = {"default threads": PiperEngine(), f"{args.threads} thread(s)": PiperEngine(cpu_threads=args.threads)}
    for engine in engines.values():
        synthesis_s(engine, "Warming up.")
    results = {"idle": measure(engines, args.rounds)}
    port = free_port()
    command = llama_server_command(smollm2_model_path(), "127.0.0.1", port, n_threads=args.llama_threads)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(base_url, 120, process=server)
        generator = threading.Thread(target=keep_generating, args=(base_url, stop), daemon=True)
        generator.start()
        time.sleep(2)
        results["beside llama.cpp generating"] = measure(engines, args.rounds)
    finally:
        stop.set()
        server.terminate()
        server.wait(10)
    for condition, figures in results.items():
        for name, figure in figures.items():
            print(
                f"{condition:<28} {name:<18} median {figure['median_s']:.3f} s  max {figure['max_s']:.3f} s"
                f"  (n={figure['n']})"
            )


if __name__ == "__main__":
    main()

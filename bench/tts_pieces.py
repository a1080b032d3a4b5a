"""``python -m bench.tts_pieces``: how much sooner does a first clause's audio start when Piper decodes it in
pieces?

Times Piper's ``joe`` voice (the TTS worker's engine, in-process, ``--threads`` ONNX threads as the stacks
give it) from the request to the first chunk of a first clause, with the voice's model cut at its decoder
(the worker's default) and run whole (one chunk per clause, as before), alternating the two, ``--rounds``
times over the clauses. It reports the median and p90 of each; no figure is asserted. Results are in
docs/latency.md ("Piper in pieces").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from voice_tts.piper_engine import PiperEngine
from voice_tts.piper_stream import SplitVoice

CLAUSES = (
    "I'm sorry for any misunderstanding,",
    "It's a beautiful day,",
    "Sure, I can help with that.",
    "The restaurant opens at nine on Sundays,",
    "Penguins are fascinating birds,",
    "I'd recommend the pasta,",
)


def first_chunk_s(engine: PiperEngine, text: str) -> float:
    """Seconds from the request to the first chunk of ``text`` (the rest is synthesized, untimed)."""
    started = time.perf_counter()
    chunks = engine.synthesize(text)
    next(chunks)
    elapsed = time.perf_counter() - started
    for _ in chunks:
        pass
    return elapsed


def whole_engine(threads: int) -> PiperEngine:
    """An engine whose voice is run whole, as when its model cannot be cut."""
    load = SplitVoice.load
    SplitVoice.load = classmethod(lambda cls, *args: None)  # type: ignore[method-assign]
    try:
        engine = PiperEngine(cpu_threads=threads)
        engine.load()
    finally:
        SplitVoice.load = load  # type: ignore[method-assign]
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="Piper's ONNX threads (the stacks give it half)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pieces = PiperEngine(cpu_threads=args.threads)
    pieces.load()
    whole = whole_engine(args.threads)
    for engine in (pieces, whole):
        first_chunk_s(engine, CLAUSES[0])
    times: dict[str, list[float]] = {"pieces": [], "whole": []}
    for _ in range(args.rounds):
        for clause in CLAUSES:
            times["pieces"].append(first_chunk_s(pieces, clause))
            times["whole"].append(first_chunk_s(whole, clause))
    report = {
        name: {
            "median_s": round(statistics.median(values), 4),
            "p90_s": round(sorted(values)[int(0.9 * (len(values) - 1))], 4),
            "n": len(values),
        }
        for name, values in times.items()
    }
    print(json.dumps({"threads": args.threads, "first_chunk": report}, indent=2))


if __name__ == "__main__":
    main()

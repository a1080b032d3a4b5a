"""GPU check of the Coqui TTS engine (voice_tts.coqui_engine.CoquiEngine) on CUDA.

Not a pytest module: run it directly on a machine with an NVIDIA GPU and the
coqui extra's packages (coqui-tts 0.28, torch) importable:

    PYTHONUNBUFFERED=1 python3 tests/gpu/coqui_cuda_check.py

It builds randomly initialised VITS models with Coqui's own API (the tiny one
of tests/tts/test_coqui_engine.py, and one of the default, real-model size),
loads each into a CoquiEngine on "cuda" and on "cpu", checks the model really
sits on the GPU, checks a 3-sentence text comes out as one int16 chunk per
sentence, and times load, first chunk and real-time factor on both devices.
A JSON summary is printed and written to $OUT/coqui_cuda.json (or
.gpu/out/coqui_cuda.json when OUT is unset). Exit status 0 means every
required check passed.

Options: --no-cuda runs the CPU half only (a dry run of the script's logic on a
machine without a GPU); --reps N sets the timed repetitions (default 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _src in (ROOT, ROOT / "libs" / "text", ROOT / "services" / "tts"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.support.vits import TINY_ARGS, build_vits  # noqa: E402
from voice_text import split_sentences  # noqa: E402
from voice_tts.coqui_engine import CoquiEngine  # noqa: E402

TEXT = "Hello there. How are you today? I am fine, thanks."
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog near the river bank this morning. "
    "Streaming speech one sentence at a time lets playback start long before the whole reply is ready. "
    "Latency to the first chunk matters most for a voice agent."
)

# Coqui's VitsArgs defaults are the size of the released VITS models
# (hidden 192, 6 text-encoder layers, 4 flows, HiFi-GAN decoder of 512 channels, SDP).
LARGE_ARGS: dict[str, Any] = dict(init_discriminator=False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_devices(engine: CoquiEngine) -> dict[str, Any]:
    model = engine._tts.synthesizer.tts_model
    params = list(model.parameters())
    buffers = list(model.buffers())
    devs = sorted({str(p.device) for p in params} | {str(b.device) for b in buffers})
    return {
        "devices": devs,
        "n_params": int(sum(p.numel() for p in params)),
        "all_params_on_cuda": bool(params) and all(p.is_cuda for p in params),
        "n_buffers": len(buffers),
        "all_buffers_on_cuda": all(b.is_cuda for b in buffers) if buffers else None,
        "model_device_attr": str(getattr(model, "device", None)),
        "synthesizer_use_cuda": bool(getattr(engine._tts.synthesizer, "use_cuda", False)),
    }


def timed_run(engine: CoquiEngine, text: str, device: str, **kwargs: Any) -> dict[str, Any]:
    """Synthesize text; time the first chunk and the whole run (output is copied to the host, so wall time is exact)."""
    _sync(device)
    start = time.perf_counter()
    first = None
    chunks = []
    for chunk in engine.synthesize(text, **kwargs):
        if first is None:
            first = time.perf_counter() - start
        chunks.append(chunk)
    total = time.perf_counter() - start
    audio_s = sum(c.duration for c in chunks)
    return {
        "first_chunk_s": first,
        "total_s": total,
        "audio_s": audio_s,
        "rtf": total / audio_s if audio_s else None,
        "n_chunks": len(chunks),
        "chunks": chunks,
    }


def check_chunks(chunks: list[Any], text: str, sample_rate: int) -> list[str]:
    problems = []
    if [c.sentence_index for c in chunks] != list(range(len(split_sentences(text)))):
        problems.append(f"sentence indices {[c.sentence_index for c in chunks]}")
    if [c.text for c in chunks] != split_sentences(text):
        problems.append("chunk texts differ from the sentences")
    for c in chunks:
        if c.samples.dtype != np.int16:
            problems.append(f"chunk {c.sentence_index} dtype {c.samples.dtype}")
        if c.samples.ndim != 1 or c.samples.size == 0:
            problems.append(f"chunk {c.sentence_index} shape {c.samples.shape}")
        elif not np.any(c.samples != 0):
            problems.append(f"chunk {c.sentence_index} is all zeros")
        if c.sample_rate != sample_rate:
            problems.append(f"chunk {c.sentence_index} rate {c.sample_rate}")
    return problems


def bench_engine(model_dir: Path, device: str, text: str, reps: int) -> dict[str, Any]:
    """Load a CoquiEngine on a device, run a cold synthesis, then `reps` timed warm ones."""
    out: dict[str, Any] = {"device": device}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = CoquiEngine(str(model_dir), device=device)
    engine.load()
    _sync(device)
    out["load_s"] = time.perf_counter() - t0
    out["placement"] = model_devices(engine)
    voice = engine.voices()[0]
    cold = timed_run(engine, text, device)
    out["cold_first_chunk_s"] = cold["first_chunk_s"]
    out["cold_total_s"] = cold["total_s"]
    out["chunk_problems"] = check_chunks(cold["chunks"], text, voice.sample_rate)
    out["n_chunks"] = cold["n_chunks"]
    out["chunk_samples"] = [int(c.samples.size) for c in cold["chunks"]]
    out["chunk_dtypes"] = sorted({str(c.samples.dtype) for c in cold["chunks"]})
    warm = [timed_run(engine, text, device) for _ in range(reps)]
    firsts = [w["first_chunk_s"] for w in warm]
    rtfs = [w["rtf"] for w in warm]
    out["warm_first_chunk_s_median"] = statistics.median(firsts)
    out["warm_first_chunk_s_min"] = min(firsts)
    out["warm_total_s_median"] = statistics.median(w["total_s"] for w in warm)
    out["audio_s_median"] = statistics.median(w["audio_s"] for w in warm)
    out["rtf_median"] = statistics.median(rtfs)
    out["rtf_min"] = min(rtfs)
    out["reps"] = reps
    # Speed control goes through model.length_scale; check it still works on this device.
    slow = timed_run(engine, "Speaking rate should follow the speed setting.", device, speed=0.5)["audio_s"]
    fast = timed_run(engine, "Speaking rate should follow the speed setting.", device, speed=2.0)["audio_s"]
    out["speed_0.5_vs_2.0_audio_s"] = [slow, fast]
    out["speed_ok"] = slow > fast * 1.5
    if device.startswith("cuda"):
        out["cuda_peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del engine
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def multi_speaker_check(model_dir: Path, device: str) -> dict[str, Any]:
    """Speaker and language embeddings must be looked up on the model's device."""
    engine = CoquiEngine(str(model_dir), device=device, speaker="bob")
    engine.load()
    placement = model_devices(engine)
    chunks = list(engine.synthesize("Bonjour. Salut.", speaker="alice", language="fr"))
    more = list(engine.synthesize("Hello.", language="en-US"))
    ok = (
        [c.text for c in chunks] == ["Bonjour.", "Salut."]
        and len(more) == 1
        and all(c.samples.dtype == np.int16 and c.samples.size > 0 for c in chunks + more)
    )
    return {"ok": ok, "placement": placement, "n_chunks": len(chunks) + len(more)}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    for dist in ("coqui-tts", "coqui-tts-trainer", "numpy", "numba", "librosa", "scipy", "torchaudio", "transformers"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    return env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cuda", action="store_true", help="CPU half only (dry run without a GPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-large", action="store_true")
    opts = parser.parse_args()

    out_dir = Path(os.environ.get("OUT") or ROOT / ".gpu" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"environment": environment(), "text": TEXT, "checks": {}, "errors": {}}
    devices = ["cpu"] if opts.no_cuda else ["cuda", "cpu"]
    if not opts.no_cuda and not torch.cuda.is_available():
        summary["errors"]["cuda"] = "torch.cuda.is_available() is False"
        devices = ["cpu"]

    def attempt(key: str, fn: Any) -> Any:
        try:
            result = fn()
            summary.setdefault("results", {})[key] = result
            return result
        except Exception as exc:
            summary["errors"][key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
            print(f"[{key}] FAILED: {exc}", flush=True)
            return None

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        t = time.perf_counter()
        tiny = build_vits(tmp_dir / "tiny-vits", TINY_ARGS)
        multi = build_vits(tmp_dir / "tiny-multi", TINY_ARGS, multi=True)
        large = None if opts.skip_large else build_vits(tmp_dir / "large-vits", LARGE_ARGS)
        summary["build_models_s"] = time.perf_counter() - t

        for device in devices:
            print(f"== tiny VITS on {device}", flush=True)
            attempt(f"tiny_{device}", lambda d=device: bench_engine(tiny, d, TEXT, opts.reps))
            print(f"== multi-speaker tiny VITS on {device}", flush=True)
            attempt(f"multi_{device}", lambda d=device: multi_speaker_check(multi, d))
        if large is not None:
            for device in devices:
                print(f"== large VITS on {device}", flush=True)
                attempt(f"large_{device}", lambda d=device: bench_engine(large, d, LONG_TEXT, 3))

    res = summary.get("results", {})
    checks = summary["checks"]
    for device in devices:
        tiny_r = res.get(f"tiny_{device}")
        checks[f"tiny_{device}_one_int16_chunk_per_sentence"] = bool(
            tiny_r and tiny_r["n_chunks"] == 3 and not tiny_r["chunk_problems"]
        )
        checks[f"tiny_{device}_speed_ok"] = bool(tiny_r and tiny_r["speed_ok"])
        checks[f"multi_{device}_ok"] = bool(res.get(f"multi_{device}") and res[f"multi_{device}"]["ok"])
        if large is not None:
            large_r = res.get(f"large_{device}")
            checks[f"large_{device}_chunks_ok"] = bool(large_r and not large_r["chunk_problems"])
    if "cuda" in devices:
        tiny_c = res.get("tiny_cuda")
        checks["tiny_cuda_params_on_gpu"] = bool(tiny_c and tiny_c["placement"]["all_params_on_cuda"])
        checks["multi_cuda_params_on_gpu"] = bool(
            res.get("multi_cuda") and res["multi_cuda"]["placement"]["all_params_on_cuda"]
        )
        if large is not None:
            checks["large_cuda_params_on_gpu"] = bool(
                res.get("large_cuda") and res["large_cuda"]["placement"]["all_params_on_cuda"]
            )
        comparison = {}
        for name in ("tiny", "large"):
            g, c = res.get(f"{name}_cuda"), res.get(f"{name}_cpu")
            if g and c:
                comparison[name] = {
                    "n_params": g["placement"]["n_params"],
                    "cold_first_chunk_s": {"cuda": g["cold_first_chunk_s"], "cpu": c["cold_first_chunk_s"]},
                    "warm_first_chunk_s_median": {
                        "cuda": g["warm_first_chunk_s_median"],
                        "cpu": c["warm_first_chunk_s_median"],
                    },
                    "rtf_median": {"cuda": g["rtf_median"], "cpu": c["rtf_median"]},
                    "load_s": {"cuda": g["load_s"], "cpu": c["load_s"]},
                    "audio_s_median": {"cuda": g["audio_s_median"], "cpu": c["audio_s_median"]},
                    "chunk_samples": {"cuda": g["chunk_samples"], "cpu": c["chunk_samples"]},
                    "cpu_over_cuda_first_chunk": c["warm_first_chunk_s_median"] / g["warm_first_chunk_s_median"],
                    "cpu_over_cuda_rtf": c["rtf_median"] / g["rtf_median"],
                }
        summary["gpu_vs_cpu"] = comparison
    else:
        checks["cuda_ran"] = False
    summary["passed"] = all(checks.values()) and not summary["errors"]
    text = json.dumps(summary, indent=2, default=str)
    print(text, flush=True)
    (out_dir / "coqui_cuda.json").write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

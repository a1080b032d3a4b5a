"""Workers validate their environment at start and fail fast with a message naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("voice_stt", {"STT_DEVICE": "banana"}, "STT_DEVICE='banana'"),
    ("voice_stt", {"STT_CONCURRENCY": "zero"}, "STT_CONCURRENCY='zero': expected an integer"),
    ("voice_llm", {"LLM_BASE_URL": "not a url"}, "LLM_BASE_URL='not a url'"),
    ("voice_llm", {"LLM_CONNECT_TIMEOUT_SECONDS": "0"}, "LLM_CONNECT_TIMEOUT_SECONDS=0.0: must be at least 0.1"),
    ("voice_tts", {"TTS_ENGINE": "espeak"}, "TTS_ENGINE='espeak'"),
    ("voice_tts", {"GRPC_PORT": "70000"}, "GRPC_PORT=70000: must be at most 65535"),
    ("voice_tts", {"TTS_ENGINE": "coqui"}, "TTS_VOICE is required with TTS_ENGINE=coqui"),
    ("voice_tts", {"TTS_CPU_THREADS": "-1"}, "TTS_CPU_THREADS=-1: must be at least 0"),
]


@pytest.mark.parametrize(("module", "env", "message"), CASES, ids=[f"{m}:{next(iter(e))}" for m, e, _ in CASES])
def test_bad_environment_exits_2_with_a_clear_message(module, env, message):
    result = subprocess.run(
        [sys.executable, "-m", module], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and message in result.stderr, result.stderr

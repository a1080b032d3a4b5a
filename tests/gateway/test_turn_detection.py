"""Semantic turn detection on real-time calls: a short pause asks the end-of-turn model (Smart Turn v3.2)
whether the caller has finished and starts the transcription at once; a caller who goes on speaking
keeps the turn whole, and nothing speculative reaches the LLM, the history or the bus. Silence detection
transcribes while its silence runs, too.

The caller is Piper speech played in real time by the simulated carriers. Assertions are on the
decision path the gateway took (the call log's ``endpointing``, the speculation metrics), never on a
clock; the caller hangs up once the answer has played, however long the answer took.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest

from tests.gateway.test_calls import bus_is_idle, call_log, session_id_of
from tests.gateway.test_drain import metric, metrics
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak, word_error_rate
from voicectl.callers import HangUpWhenAnswered, call

SENTENCE = "I would like to book a table for two people tonight."
# Where "table" ends in Piper's reading of SENTENCE: the quietest 20 ms in this span (seconds).
CUT_SPAN_S = (1.18, 1.34)
MID_PAUSE_S = 0.5
FIRST_PART = "I would like to book a table."
SECOND_PART = "For two people tonight, at eight."
# Long enough for a 200 ms silence to end the first part's turn, too short for its answer to be spoken.
GO_ON_AFTER_S = 0.35
# The longest the caller waits for the answer; it hangs up once the answer has played.
LISTEN_S = 30.0


def paused_sentence() -> tuple[np.ndarray, int]:
    """SENTENCE read in one breath, with a 500 ms pause inserted after "table": the first half keeps the
    intonation of a sentence going on, as a caller's does who stops to think."""
    samples, rate = speak(SENTENCE)
    window = rate // 50
    start, end = (int(t * rate) for t in CUT_SPAN_S)
    levels = [np.sqrt(np.mean(samples[i : i + window].astype(np.float64) ** 2)) for i in range(start, end, window // 2)]
    cut = start + int(np.argmin(levels)) * (window // 2) + window // 2
    pause = np.zeros(int(MID_PAUSE_S * rate), dtype=np.int16)
    return np.concatenate([samples[:cut], pause, samples[cut:]]), rate


async def put_listener(gateway_url: str, turn_detection: dict | None = None) -> str:
    """An agent with no greeting that answers in one short sentence, with ``turn_detection`` (semantic)."""
    agent_id = f"listener_{uuid.uuid4().hex[:6]}"
    agent = {
        "name": "Bookings",
        "system_prompt": "You take restaurant bookings. Answer in one short sentence.",
        "greeting": "",
        "llm": {"temperature": 0.0, "max_tokens": 24},
        "turn_detection": turn_detection or {"type": "semantic"},
    }
    async with api_client(gateway_url) as http:
        response = await http.put(f"/api/agents/{agent_id}", json=agent)
        assert response.status_code == 200, response.text
    return agent_id


async def turns_continued(gateway_url: str) -> float:
    return metric(await metrics(gateway_url), "voice_gateway_turns_continued_total", dialect="twilio")


async def speculations(gateway_url: str, outcome: str) -> float:
    return metric(await metrics(gateway_url), "voice_gateway_speculative_transcripts_total", outcome=outcome)


async def answered_call(gateway_url: str, dialect: str, agent_id: str, samples: np.ndarray, rate: int):
    """Calls the agent, hangs up once it has answered; returns the call's result and its spoken turns."""
    result = await call(
        dialect,
        gateway_url,
        samples,
        rate,
        agent_id=agent_id,
        listen_s=LISTEN_S,
        api_key=API_KEY,
        script=HangUpWhenAnswered(),
    )
    log = await call_log(gateway_url, session_id_of(result, dialect))
    return result, [t for t in log["turns"] if t["kind"] == "audio"]


@pytest.mark.parametrize("dialect", ["twilio", "exotel", "pcm"])
async def test_a_pause_in_the_middle_of_a_sentence_is_one_turn(gateway_url, nats_url, dialect):
    agent_id = await put_listener(gateway_url)
    samples, rate = paused_sentence()
    discarded = await speculations(gateway_url, "discarded")
    _, turns = await answered_call(gateway_url, dialect, agent_id, samples, rate)
    assert len(turns) == 1, [(t["user"], t["endpointing"]) for t in turns]
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert turns[0]["assistant"], turns[0]
    assert await speculations(gateway_url, "discarded") > discarded, "the pause started a transcription"
    assert await bus_is_idle(nats_url)


@pytest.mark.parametrize("dialect", ["twilio", "pcm"])
async def test_a_finished_sentence_ends_the_turn_before_the_maximum_silence(gateway_url, nats_url, dialect):
    agent_id = await put_listener(gateway_url)
    samples, rate = speak(SENTENCE)
    used = await speculations(gateway_url, "used")
    result, turns = await answered_call(gateway_url, dialect, agent_id, samples, rate)
    assert [t["endpointing"] for t in turns] == ["semantic"], turns
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    hung_up = result.timeline.first("hang up")
    assert hung_up is not None and hung_up < result.timeline.first("caller speech end") + LISTEN_S / 2, (
        "the caller hung up once the answer had played"
    )
    assert await speculations(gateway_url, "used") > used, "the transcript started at the pause was used"
    # The call log places the utterance in the call's audio, on the caller's clock (the VAD reads the last
    # word's fading end to within a few frames of the caller's last voiced sample).
    (speech_start,) = [d["at_ms"] / 1000 for _, what, d in result.timeline.events if what == "caller speech start"]
    (last_voiced,) = result.caller_speech_ends()
    assert speech_start <= turns[0]["speech_start_s"] < turns[0]["speech_end_s"], turns[0]
    assert abs(turns[0]["speech_end_s"] - last_voiced) <= 0.2, (turns[0]["speech_end_s"], last_voiced)
    assert await bus_is_idle(nats_url)


async def test_silence_detection_transcribes_while_the_silence_runs(gateway_url, nats_url):
    agent_id = await put_listener(gateway_url, {"type": "silence", "silence_duration_ms": 800})
    samples, rate = speak(SENTENCE)
    used = await speculations(gateway_url, "used")
    _, turns = await answered_call(gateway_url, "twilio", agent_id, samples, rate)
    assert [t["endpointing"] for t in turns] == ["silence"], turns
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert turns[0]["assistant"], turns[0]
    assert await speculations(gateway_url, "used") > used, "the transcript started in the silence was used"
    assert await bus_is_idle(nats_url)


async def test_a_caller_who_goes_on_before_the_answer_is_one_turn(gateway_url, nats_url):
    # A short silence ends the first sentence's turn at once; the caller goes on before any of its answer
    # is spoken, so that turn is given up and its audio joins the utterance that follows.
    agent_id = await put_listener(gateway_url, {"type": "silence", "silence_duration_ms": 200})
    first, rate = speak(FIRST_PART)
    second, _ = speak(SECOND_PART)
    gap = np.zeros(int(GO_ON_AFTER_S * rate), dtype=np.int16)
    continued = await turns_continued(gateway_url)
    _, turns = await answered_call(gateway_url, "twilio", agent_id, np.concatenate([first, gap, second]), rate)
    assert len(turns) == 1, [(t["user"], t["endpointing"], t["assistant"]) for t in turns]
    assert word_error_rate(f"{FIRST_PART} {SECOND_PART}", turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert turns[0]["assistant"] and not turns[0]["interrupted"], turns[0]
    assert await turns_continued(gateway_url) > continued, "the first turn was given up for the second"
    assert await bus_is_idle(nats_url)


async def test_silence_turn_detection_waits_for_the_silence(gateway_url):
    agent_id = await put_listener(gateway_url, {"type": "silence", "silence_duration_ms": 700})
    samples, rate = speak(SENTENCE)
    result = await call(
        "twilio", gateway_url, samples, rate, agent_id=agent_id, listen_s=LISTEN_S, script=HangUpWhenAnswered()
    )
    log = await call_log(gateway_url, session_id_of(result, "twilio"))
    turns = [t for t in log["turns"] if t["kind"] == "audio"]
    assert [t["endpointing"] for t in turns] == ["silence"], turns
    assert turns[0]["timings"]["endpointing_s"] >= 0.7


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"type": "vad"}, "turn_detection"),
        ({"eagerness": "eager"}, "eagerness"),
        ({"pause_ms": 800, "silence_duration_ms": 500}, "pause_ms"),
    ],
)
async def test_bad_turn_detection_is_refused_with_a_reason(gateway_url, body, reason):
    async with api_client(gateway_url) as http:
        response = await http.put("/api/agents/bad_detection", json={"turn_detection": body})
    assert response.status_code == 422 and reason in response.text, response.text


def test_a_missing_model_fails_start_up_naming_its_package(monkeypatch, caplog):
    from voice_gateway import __main__ as entry
    from voice_gateway.conversation import turn_model

    def missing(**_options):
        install = f"pip install --no-deps {turn_model.SMART_TURN_PACKAGE}"
        raise turn_model.ModelMissing("Smart Turn v3.2", "/nowhere/smart-turn-v3.2-cpu.onnx", install)

    monkeypatch.setattr(entry, "check_models", missing)
    monkeypatch.setattr(entry, "setup_logging", lambda: None)
    with caplog.at_level(logging.ERROR, logger="voice_gateway"), pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 2
    assert "missing model" in caplog.text
    assert "pipecat-ai==1.14.0" in caplog.text and "smart-turn-v3.2-cpu.onnx" in caplog.text

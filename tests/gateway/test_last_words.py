"""A caller who hangs up before the answer keeps their last words in the call log.

The call can end while the caller's utterance is still in progress (its end not yet decided) or while
the turn it became is being transcribed; either way the session lets the transcription finish and records
the turn with the caller's words, no answer and the error saying the call ended first, and leaves no work
on the bus. The caller is Piper speech played in real time by the simulated carriers.
"""

from __future__ import annotations

import pytest

from tests.gateway.test_calls import bus_is_idle, call_log, session_id_of
from tests.gateway.test_turn_detection import SENTENCE, put_listener
from tests.support.gateway import API_KEY
from tests.support.speech import speak, word_error_rate
from voice_gateway.conversation.runner import CUT_OFF
from voicectl.callers import call
from voicectl.callers.audio import last_voiced_s

SPEECH_AT_S = 1.0


async def spoken_turns(gateway_url: str, dialect: str, agent_id: str, hang_up_after_speech_s: float) -> list[dict]:
    """Says SENTENCE and hangs up ``hang_up_after_speech_s`` after its last voiced sample; returns the log's
    spoken turns."""
    samples, rate = speak(SENTENCE)
    hang_up = SPEECH_AT_S + last_voiced_s(samples, rate) + hang_up_after_speech_s
    result = await call(
        dialect,
        gateway_url,
        samples,
        rate,
        agent_id=agent_id,
        speech_at_s=SPEECH_AT_S,
        hang_up_after_s=hang_up,
        api_key=API_KEY,
    )
    assert result.timeline.first("hang up") is not None, "the caller hung up"
    log = await call_log(gateway_url, session_id_of(result, dialect))
    assert log["status"] == "completed", log["status"]
    return [t for t in log["turns"] if t["kind"] == "audio"]


@pytest.mark.parametrize("dialect", ["twilio", "pcm"])
async def test_words_said_just_before_hanging_up_are_in_the_call_log(gateway_url, nats_url, dialect):
    # Three seconds of silence end a turn; the caller hangs up half a second after speaking.
    agent_id = await put_listener(gateway_url, {"type": "silence", "silence_duration_ms": 3000})
    turns = await spoken_turns(gateway_url, dialect, agent_id, 0.5)
    assert [(t["endpointing"], t["error"], t["assistant"], t["interrupted"]) for t in turns] == [
        ("hang_up", CUT_OFF, "", True)
    ], turns
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert turns[0]["speech_start_s"] < turns[0]["speech_end_s"], turns[0]
    assert await bus_is_idle(nats_url)


async def test_a_caller_who_hangs_up_as_their_turn_ends_keeps_their_words(gateway_url, nats_url):
    # Semantic turn detection ends the turn a few hundred milliseconds after the sentence; the caller hangs
    # up about then, before the answer, while the turn is being transcribed or its end being decided.
    agent_id = await put_listener(gateway_url, {"type": "semantic"})
    turns = await spoken_turns(gateway_url, "twilio", agent_id, 0.3)
    assert len(turns) == 1, turns
    assert turns[0]["endpointing"] in ("semantic", "hang_up"), turns[0]
    assert (turns[0]["error"], turns[0]["interrupted"]) == (CUT_OFF, True), turns[0]
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert await bus_is_idle(nats_url)

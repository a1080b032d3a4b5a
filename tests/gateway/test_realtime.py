"""OpenAI Realtime at ``/v1/realtime``, driven by the official ``openai`` SDK's realtime client against the real
gateway, workers and models: text and audio sessions, server VAD and push-to-talk, a function call answered by
the client, cancel and truncate mid-answer, G.711 μ-law, the beta protocol, and API keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak, word_error_rate
from voice.v1 import audio_pb2, stt_pb2
from voice_audio import resample, ulaw_decode, ulaw_encode
from voice_bus.client import BusClient
from voice_bus.connection import connect
from voice_text import split_sentences

SENTENCE = "I would like to book a table for two people."
REPLY_ORDER = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]


def sdk(gateway_url: str, key: str = API_KEY) -> AsyncOpenAI:
    """The SDK as an existing app makes it, with only its base URL changed."""
    return AsyncOpenAI(api_key=key, base_url=gateway_url + "/v1")


async def until(connection, kind: str, timeout: float = 90.0) -> list:
    """The server events up to and including the first of type ``kind``."""
    events = []
    async with asyncio.timeout(timeout):
        async for event in connection:
            events.append(event)
            if event.type == kind:
                return events
    raise AssertionError(f"the connection closed before {kind}: {[e.type for e in events]}")


def types(events) -> list[str]:
    return [event.type for event in events]


def collapsed(events) -> list[str]:
    """Event types with runs of the same delta type collapsed."""
    out: list[str] = []
    for kind in types(events):
        if not (out and out[-1] == kind and kind.endswith(".delta")):
            out.append(kind)
    return out


def audio_of(events) -> bytes:
    return b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")


async def transcribe(nats_url: str, pcm: bytes, rate: int) -> str:
    nc = await connect(nats_url, name="realtime-test")
    try:
        request = stt_pb2.TranscribeRequest(
            audio=pcm, format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=rate)
        )
        events = await BusClient(nc).collect("stt", request, timeout=60)
        return next(e.transcript.text for e in events if e.HasField("transcript"))
    finally:
        await nc.close()


async def call_log(gateway_url: str, session_id: str) -> dict:
    async with api_client(gateway_url) as http:
        for _ in range(100):
            response = await http.get(f"/api/calls/{session_id}")
            if response.status_code == 200 and response.json()["status"] != "active":
                return response.json()
            await asyncio.sleep(0.1)
    return response.json()


def speech_at(rate: int, text: str = SENTENCE, silence_s: float = 1.5) -> np.ndarray:
    samples, voice_rate = speak(text)
    samples = resample(samples, voice_rate, rate).astype(np.int16)
    pad = np.zeros(int(rate * 0.3), dtype=np.int16)
    return np.concatenate([pad, samples, np.zeros(int(rate * silence_s), dtype=np.int16)])


async def append_audio(connection, payload: bytes, chunk: int) -> None:
    for offset in range(0, len(payload), chunk):
        await connection.input_audio_buffer.append(audio=base64.b64encode(payload[offset : offset + chunk]).decode())


async def test_a_text_session_answers_in_the_documented_order(gateway_url):
    async with sdk(gateway_url).realtime.connect(model="default") as connection:
        created = await until(connection, "session.created")
        session_id = created[-1].session.id
        await connection.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "instructions": "Answer in one sentence."}
        )
        updated = (await until(connection, "session.updated"))[-1]
        assert updated.session.output_modalities == ["text"]
        assert updated.session.audio.input.format.type == "audio/pcm"
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}
        )
        await connection.response.create()
        events = await until(connection, "response.done")
    order = collapsed(events)
    assert order[:2] == ["conversation.item.added", "conversation.item.done"], order
    assert order[2:6] == REPLY_ORDER, order
    assert order[6:] == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ], order
    assert all(event.event_id for event in events)
    done = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert done.status == "completed" and done.usage.output_tokens > 0
    assert text.strip() and done.output[0].content[0].text == text.strip()
    log = await call_log(gateway_url, session_id)
    assert log["dialect"] == "realtime" and log["turns"][0]["user"] == "Say hello."
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gateway_url + "/metrics/")).text.splitlines()
    turns = [line for line in metrics if line.startswith("voice_gateway_turns_total{")]
    assert any('dialect="realtime"' in line and 'kind="text"' in line and 'outcome="ok"' in line for line in turns)


STORY = "Tell a long story of at least ten sentences."


async def ask(connection, turn_detection, *, instructions: str = STORY, text: str = "Tell me a story.", tokens=300):
    """Sets the session's instructions and turn detection, adds ``text`` as the user's message and asks for a
    response (``tokens``: its maximum output tokens, ``None`` for the default); returns the events up to
    ``session.updated``."""
    session = {"type": "realtime", "instructions": instructions, "audio": {"input": {"turn_detection": turn_detection}}}
    if tokens is not None:
        session["max_output_tokens"] = tokens
    await connection.session.update(session=session)
    updated = await until(connection, "session.updated")
    await connection.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    await connection.response.create()
    return updated


async def test_server_vad_hears_piper_speech_and_the_answer_transcribes_back(gateway_url, nats_url):
    async with sdk(gateway_url).realtime.connect(model="default") as connection:
        await until(connection, "session.created")
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": "Answer in one short sentence.",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                        "transcription": {"model": "whisper-1"},
                    }
                },
            }
        )
        await until(connection, "session.updated")
        speech = speech_at(24000).tobytes()
        await append_audio(connection, speech, 4800)
        events = await until(connection, "response.done")
    order = types(events)
    for first, second in [
        ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
        ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"),
        ("input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"),
        ("response.created", "response.output_audio.delta"),
        ("response.output_audio.delta", "response.output_audio.done"),
        ("response.output_audio_transcript.done", "response.done"),
    ]:
        assert order.index(first) < order.index(second), order
    transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert word_error_rate(SENTENCE, transcript.transcript) <= 0.2, transcript.transcript
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    assert 150 <= started.audio_start_ms <= 900
    answer = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
    heard = await transcribe(nats_url, audio_of(events), 24000)
    assert answer and word_error_rate(answer, heard) <= 0.35, (answer, heard)
    assert events[-1].response.status == "completed"


async def test_clearing_the_input_buffer_drops_the_utterance_the_vad_is_in(gateway_url):
    async with sdk(gateway_url).realtime.connect(model="default") as connection:
        await until(connection, "session.created")
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                        "transcription": {"model": "whisper-1"},
                    }
                },
            }
        )
        await until(connection, "session.updated")
        dropped, voice_rate = speak("Tell me everything about the weather on Mars and on Jupiter.")
        dropped = resample(dropped, voice_rate, 24000).astype(np.int16)
        await append_audio(connection, dropped[: len(dropped) // 2].tobytes(), 4800)
        await until(connection, "input_audio_buffer.speech_started")
        await connection.input_audio_buffer.clear()
        await until(connection, "input_audio_buffer.cleared")
        await append_audio(connection, speech_at(24000).tobytes(), 4800)
        events = await until(connection, "conversation.item.input_audio_transcription.completed")
    assert types(events).count("input_audio_buffer.committed") == 1, types(events)
    transcript = events[-1].transcript
    assert word_error_rate(SENTENCE, transcript) <= 0.2, transcript


async def test_push_to_talk_commits_by_hand_and_answers_on_response_create(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        await connection.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}
        )
        assert (await until(connection, "session.updated"))[-1].session.audio.input.turn_detection is None
        await append_audio(connection, speech_at(24000, silence_s=0.3).tobytes(), 9600)
        await connection.input_audio_buffer.commit()
        committed = (await until(connection, "input_audio_buffer.committed"))[-1]
        await connection.response.create()
        events = await until(connection, "response.done")
    assert "input_audio_buffer.speech_started" not in types(events)
    transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert transcript.item_id == committed.item_id
    assert word_error_rate(SENTENCE, transcript.transcript) <= 0.2
    assert events[-1].response.status == "completed"
    assert any(e.type == "response.output_text.delta" for e in events)


async def test_a_function_call_goes_to_the_client_and_its_output_continues_the_answer(gateway_url):
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "tools": [tool],
                "tool_choice": {"type": "function", "name": "get_weather"},
                "instructions": "You tell the weather. Use the get_weather tool.",
            }
        )
        await until(connection, "session.updated")
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
        )
        await connection.response.create()
        events = await until(connection, "response.done")
        order = types(events)
        call = next(e for e in events if e.type == "response.function_call_arguments.done")
        added = [e for e in events if e.type == "conversation.item.added" and e.item.type == "function_call"]
        assert added and added[0].item.call_id == call.call_id
        assert order.index("conversation.item.added", order.index("response.output_item.added")) < order.index(
            "response.function_call_arguments.done"
        )
        assert call.name == "get_weather" and call.call_id
        assert events[-1].response.output[-1].type == "function_call"
        await connection.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": '{"weather": "sunny, 24 C"}'}
        )
        await until(connection, "conversation.item.added")
        await connection.response.create(response={"tool_choice": "none"})
        answer = await until(connection, "response.done")
    assert answer[-1].response.status == "completed"
    text = "".join(e.delta for e in answer if e.type == "response.output_text.delta")
    assert text.strip()


async def test_cancel_and_truncate_mid_answer_trim_the_history_to_what_was_played(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        created = await until(connection, "session.created")
        session_id = created[-1].session.id
        await ask(connection, None)
        first = (await until(connection, "response.output_audio.delta"))[-1]
        await connection.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=200)
        await connection.response.cancel()
        events = await until(connection, "response.done")
        assert "conversation.item.truncated" in types(events)
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.status_details.reason == "client_cancelled"
        # The session lives on: another response is answered.
        await connection.response.create(response={"output_modalities": ["text"]})
        assert (await until(connection, "response.done"))[-1].response.status == "completed"
    log = await call_log(gateway_url, session_id)
    story = log["turns"][0]
    assert story["interrupted"] and len(story["assistant"].split()) <= 3, story


async def test_mulaw_8_khz_in_and_out(gateway_url, nats_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        await connection.session.update(
            session={
                "type": "realtime",
                "instructions": "Answer in one short sentence.",
                "max_output_tokens": 40,
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
                    "output": {"format": {"type": "audio/pcmu"}},
                },
            }
        )
        updated = (await until(connection, "session.updated"))[-1]
        assert updated.session.audio.output.format.type == "audio/pcmu"
        await append_audio(connection, ulaw_encode(speech_at(8000)), 1600)
        events = await until(connection, "response.done")
    transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert word_error_rate(SENTENCE, transcript.transcript) <= 0.25, transcript.transcript
    answer = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
    pcm = ulaw_decode(audio_of(events)).astype("<i2").tobytes()
    heard = await transcribe(nats_url, pcm, 8000)
    # The first sentence, word for word: what follows it may be a URL or markup that speech renders freely.
    first = split_sentences(answer)[0]
    assert word_error_rate(first, " ".join(heard.split()[: len(first.split())])) <= 0.4, (answer, heard)


async def test_a_beta_client_gets_the_beta_event_names(gateway_url):
    client = AsyncOpenAI(api_key=API_KEY, base_url=gateway_url + "/v1")
    headers = {"OpenAI-Beta": "realtime=v1"}
    async with client.realtime.connect(model="default", extra_headers=headers) as connection:
        created = (await until(connection, "session.created"))[-1]
        await connection.send(
            {"type": "session.update", "session": {"modalities": ["text"], "input_audio_format": "g711_ulaw"}}
        )
        await until(connection, "session.updated")
        await connection.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
            }
        )
        await connection.send({"type": "response.create"})
        events = await until(connection, "response.done")
    assert created.session.model == "default"
    order = types(events)
    assert "response.text.delta" in order and "response.text.done" in order
    assert "conversation.item.created" in order and "conversation.item.done" not in order
    assert "response.output_text.delta" not in order


async def test_a_wrong_key_is_an_error_and_a_policy_close(gateway_url):
    async with sdk(gateway_url, key="wrong").realtime.connect() as connection:
        event = await connection.recv()
        assert event.type == "error" and event.error.code == "invalid_api_key"
        with pytest.raises(Exception) as closed:
            await connection.recv()
    assert "1008" in str(closed.value)


async def test_a_browser_key_in_the_subprotocol_is_accepted(gateway_url):
    import websockets

    url = gateway_url.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
    protocols = ["realtime", f"openai-insecure-api-key.{API_KEY}"]
    async with websockets.connect(url, subprotocols=protocols) as ws:
        assert ws.subprotocol == "realtime"
        assert '"session.created"' in await ws.recv()
        with contextlib.suppress(Exception):
            await ws.close()


async def test_barge_in_with_semantic_vad_cancels_the_answer_and_answers_the_caller(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        detection = {"type": "semantic_vad", "eagerness": "high", "interrupt_response": True}
        updated = await ask(connection, detection)
        assert updated[-1].session.audio.input.turn_detection.eagerness == "high"
        story = (await until(connection, "response.output_audio.delta"))[-1].response_id
        await append_audio(connection, speech_at(24000, "Wait, stop please.").tobytes(), 4800)
        events = await until(connection, "input_audio_buffer.speech_started")
        events += await until(connection, "response.done")
        while events[-1].response.id != story:
            events += await until(connection, "response.done")
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.status_details.reason == "turn_detected"
        answer = await until(connection, "response.done")
    assert "conversation.item.input_audio_transcription.completed" in types(answer)
    assert answer[-1].response.status == "completed" and answer[-1].response.id != story


async def test_speech_after_a_finished_response_leaves_its_item_to_the_client(gateway_url):
    """The client plays the audio, so only its ``conversation.item.truncate`` may shorten a finished answer."""
    async with sdk(gateway_url).realtime.connect() as connection:
        session_id = (await until(connection, "session.created"))[-1].session.id
        detection = {"type": "server_vad", "silence_duration_ms": 600}
        await ask(connection, detection, instructions="Answer in two sentences.", text="Describe the sea.", tokens=None)
        first = await until(connection, "response.done")
        assert first[-1].response.status == "completed"
        answer = next(e for e in first if e.type == "response.output_audio_transcript.done")
        # Its seconds of audio reached the client at once; the caller speaks before they could have played.
        await append_audio(connection, speech_at(24000).tobytes(), 4800)
        second = await until(connection, "response.done")
        assert "input_audio_buffer.speech_started" in types(second)
        assert second[-1].response.status == "completed"
        await connection.conversation.item.retrieve(item_id=answer.item_id)
        item = (await until(connection, "conversation.item.retrieved"))[-1].item
    assert item.content[0].transcript == answer.transcript
    log = await call_log(gateway_url, session_id)
    assert log["turns"][0]["assistant"] == answer.transcript and not log["turns"][0]["interrupted"], log["turns"][0]


async def test_speech_that_does_not_interrupt_is_answered_after_the_response(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        detection = {"type": "server_vad", "silence_duration_ms": 600, "interrupt_response": False}
        await ask(connection, detection)
        story = (await until(connection, "response.output_audio.delta"))[-1].response_id
        await append_audio(connection, speech_at(24000).tobytes(), 4800)
        events = await until(connection, "response.done")
        while events[-1].response.id != story:
            events += await until(connection, "response.done")
        assert events[-1].response.status == "completed", "the story was not interrupted"
        events += await until(connection, "response.done")
    order = types(events)
    assert order.index("input_audio_buffer.speech_started") < order.index("input_audio_buffer.speech_stopped")
    assert "input_audio_buffer.committed" in order
    created = [e.response.id for e in events if e.type == "response.created"]
    assert created[-1] != story and created.count(created[-1]) == 1, created
    assert events[-1].response.id == created[-1] and events[-1].response.status == "completed"


@pytest.mark.parametrize("mode", ["server_vad", "push_to_talk"])
async def test_voicectl_realtime_speaks_a_wav_and_saves_the_answer(gateway_url, tmp_path, capsys, mode):
    from voice_audio import read_wav, wav_bytes
    from voicectl.__main__ import _parser
    from voicectl.realtime_command import talk

    samples, rate = speak(SENTENCE)
    question, out = tmp_path / "question.wav", tmp_path / "answer.wav"
    question.write_bytes(wav_bytes(samples, rate))
    argv = ["realtime", "--wav", str(question), "--out", str(out), "--url", gateway_url, "--api-key", API_KEY]
    args = _parser().parse_args([*argv, "--fast", *(["--push-to-talk"] if mode == "push_to_talk" else [])])
    assert await talk(args) == 0
    answer, answer_rate = read_wav(out.read_bytes())
    assert answer_rate == 24000 and len(answer) > answer_rate
    printed = capsys.readouterr().out
    assert ("input_audio_buffer.speech_stopped" in printed) == (mode == "server_vad")
    assert "you: " in printed and "agent: " in printed and "response.done" in printed


async def test_the_bench_times_speech_stopped_to_the_first_audio_delta(gateway_url, monkeypatch):
    from bench.realtime import speech_stopped_to_audio

    monkeypatch.setenv("GATEWAY_API_KEY", API_KEY)
    figures = await speech_stopped_to_audio(gateway_url, [speak(SENTENCE)], turns=1)
    assert figures["turns_answered"] == 1
    assert 0 < figures["speech_stopped_to_first_audio_s"]["median"] < 30


async def test_server_vad_without_create_response_waits_for_response_create(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        await until(connection, "session.created")
        detection = {"type": "server_vad", "create_response": False}
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": detection}},
            }
        )
        await until(connection, "session.updated")
        await append_audio(connection, speech_at(24000).tobytes(), 4800)
        committed = (await until(connection, "input_audio_buffer.committed"))[-1]
        # Nothing answers until the client asks; the item is there to retrieve.
        await connection.send({"type": "conversation.item.retrieve", "item_id": committed.item_id})
        retrieved = await until(connection, "conversation.item.retrieved")
        assert "response.created" not in types(retrieved)
        await connection.response.create()
        events = await until(connection, "response.done")
    transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert transcript.item_id == committed.item_id and word_error_rate(SENTENCE, transcript.transcript) <= 0.2
    assert events[-1].response.status == "completed"


async def test_a_deleted_item_leaves_the_history(gateway_url):
    async with sdk(gateway_url).realtime.connect() as connection:
        created = await until(connection, "session.created")
        await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await until(connection, "session.updated")
        ids = []
        for text in ("My name is Zebulon.", "Say hello."):
            content = [{"type": "input_text", "text": text}]
            await connection.conversation.item.create(item={"type": "message", "role": "user", "content": content})
            ids.append((await until(connection, "conversation.item.added"))[-1].item.id)
        await connection.conversation.item.delete(item_id=ids[0])
        assert (await until(connection, "conversation.item.deleted"))[-1].item_id == ids[0]
        await connection.response.create()
        await until(connection, "response.done")
    log = await call_log(gateway_url, created[-1].session.id)
    assert [turn["user"] for turn in log["turns"]] == ["Say hello."]


async def test_the_agents_own_webhook_tools_run_on_the_gateway(gateway_url):
    from tests.gateway.test_tools import agent_with, order_tool
    from tests.gateway.webhooks import WebhookServer

    with WebhookServer() as hooks:
        agent = agent_with("orders-rt", [order_tool(hooks.url + "/order")], "get_order")
        async with api_client(gateway_url) as http:
            assert (await http.put("/api/agents/orders-rt", json=agent)).status_code == 200
        async with sdk(gateway_url).realtime.connect(model="orders-rt") as connection:
            created = (await until(connection, "session.created"))[-1]
            assert created.session.tool_choice.name == "get_order" and created.session.tools == []
            await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(connection, "session.updated")
            content = [{"type": "input_text", "text": "Where is my order 42?"}]
            await connection.conversation.item.create(item={"type": "message", "role": "user", "content": content})
            await connection.response.create()
            events = await until(connection, "response.done")
        paths = [r["path"] for r in hooks.requests]
        assert paths and set(paths) == {"/order"}
    assert events[-1].response.status == "completed"
    assert "response.function_call_arguments.done" not in types(events)
    assert all(item.type == "message" for item in events[-1].response.output)

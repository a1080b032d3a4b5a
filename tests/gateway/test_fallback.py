"""The LLM backend down: callers of every dialect get the agent's fallback message and the call goes on.

The stack is its own (nats-server, STT, TTS and LLM workers, gateway), since its LLM worker answers
nothing but errors and must not take work from the other tests' workers. The LLM worker starts
against a real llama.cpp server, as in production, which is then stopped: its port is closed, so the
worker finds its backend down, which is the failure under test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import time
import uuid
import wave
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import websockets

from tests.gateway.client import BrowserClient
from tests.gateway.test_chat import ChatClient
from tests.gateway.test_retell import RetellPeer, transcript
from tests.support.gateway import API_KEY, api_client
from tests.support.llama import SERVER_THREADS, STARTUP_TIMEOUT_S, STOP_TIMEOUT_S
from tests.support.speech import speak, word_error_rate
from tests.support.workers import WorkerProcess, _Tee
from voice.v1 import audio_pb2, llm_pb2, llm_pb2_grpc, stt_pb2
from voice_audio import wav_bytes
from voice_bus.client import BusClient
from voice_bus.connection import connect
from voice_bus.errors import UNAVAILABLE, BusError
from voice_gateway.agents import DEFAULT_FALLBACK_MESSAGE
from voicectl.callers import call
from voicectl.local import GatewayProcess, NatsServer, free_port

CUSTOM_FALLBACK = "Sorry, our assistant is offline right now. Please try again soon."
LONG_FALLBACK = (
    "Sorry, our assistant is offline right now. We are working on it and expect to be back within the hour. "
    "In the meantime you can leave a message after the tone, or call our front desk during opening hours."
)
# The LLM worker's answer when its backend is down, through either front door.
FAIL_FAST_S = 3.0
MAX_WER = 0.3


@dataclass
class Stack:
    nats_url: str
    gateway: GatewayProcess
    llm: WorkerProcess
    tts: WorkerProcess


def _llama_backend(port: int, log) -> subprocess.Popen:
    from voice_llm.embedded import llama_server_command, smollm2_model_path, wait_until_ready

    command = llama_server_command(smollm2_model_path(), "127.0.0.1", port, n_threads=SERVER_THREADS)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    wait_until_ready(f"http://127.0.0.1:{port}/v1", STARTUP_TIMEOUT_S, process=process)
    return process


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Workers and gateway on their own nats-server, the LLM worker's backend stopped after it started."""
    with NatsServer() as nats:
        port = free_port()
        with (tmp_path_factory.mktemp("llama") / "server.log").open("wb") as log:
            backend = _llama_backend(port, log)
        llm = WorkerProcess("llm", nats.url, {"LLM_BASE_URL": f"http://127.0.0.1:{port}/v1"})
        workers = [WorkerProcess("stt", nats.url), WorkerProcess("tts", nats.url), llm]
        gateway = None
        try:
            for worker in workers:
                worker.launch()
            for worker in workers:
                worker.wait_ready()
            backend.terminate()
            backend.wait(STOP_TIMEOUT_S)
            gateway = GatewayProcess(
                nats.url, {"OTEL_TRACES_EXPORTER": "none", "GATEWAY_API_KEYS": API_KEY}, sink=_Tee(io.StringIO())
            ).start()
            yield Stack(nats.url, gateway, llm, workers[1])
        finally:
            if backend.poll() is None:
                backend.kill()
                backend.wait()
            if gateway:
                gateway.stop()
            for worker in workers:
                worker.stop()


@pytest.fixture
async def bus(stack):
    nc = await connect(stack.nats_url, name="fallback-test")
    yield BusClient(nc)
    await nc.close()


async def put_agent(stack: Stack, agent_id: str, **fields) -> None:
    async with api_client(stack.gateway.url) as http:
        response = await http.put(f"/api/agents/{agent_id}", json={"name": agent_id, **fields})
        assert response.status_code == 200, response.text


async def finished_call_log(stack: Stack, call_log_id: str) -> dict:
    async with api_client(stack.gateway.url) as http:
        for _ in range(50):
            response = await http.get(f"/api/calls/{call_log_id}")
            if response.status_code == 200 and response.json()["status"] != "active":
                return response.json()
            await asyncio.sleep(0.1)
    raise AssertionError(f"call {call_log_id} not finished: {response.text}")


async def transcribe(bus: BusClient, audio: bytes, rate: int) -> str:
    """What the STT worker hears in PCM16 ``audio``: proof the caller could understand the speech."""
    request = stt_pb2.TranscribeRequest(
        audio=audio, format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=rate)
    )
    events = await bus.collect("stt", request, timeout=60)
    return next(e.transcript.text for e in events if e.HasField("transcript"))


def pcm_of_wav(b64: str) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(base64.b64decode(b64))) as wav:
        return wav.readframes(wav.getnframes()), wav.getframerate()


def assert_fallback_turn(turn: dict, message: str) -> None:
    assert turn["assistant"] == message
    assert turn["fallback"] is True
    assert "unavailable" in turn["error"], turn["error"]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def test_the_llm_worker_answers_unavailable_within_seconds(stack, bus):
    request = llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="Hello?")])
    started = time.perf_counter()
    with pytest.raises(BusError) as err:
        await bus.collect("llm", request, timeout=60)
    elapsed = time.perf_counter() - started
    assert err.value.code == UNAVAILABLE and "backend" in err.value.message
    assert elapsed < FAIL_FAST_S, f"UNAVAILABLE after {elapsed:.1f} s"

    async with grpc.aio.insecure_channel(stack.llm.target) as channel:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
            async for _ in llm_pb2_grpc.LanguageModelStub(channel).Generate(request):
                pass
        elapsed = time.perf_counter() - started
    assert rpc_err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed < FAIL_FAST_S, f"UNAVAILABLE after {elapsed:.1f} s"
    assert stack.llm.child.running()


async def test_browser_voice_then_text_turns_hear_the_fallback_and_the_session_goes_on(stack, bus):
    await put_agent(stack, "helpdesk", fallback_message=CUSTOM_FALLBACK)
    samples, rate = speak("What time does the store open tomorrow?")
    async with BrowserClient(stack.gateway.url) as client:
        await client.send("init", agentId="helpdesk")
        call_log_id = (await client.until("init_success"))[-1]["data"]["callLogId"]

        await client.send("audio", audio=base64.b64encode(wav_bytes(samples, rate)).decode())
        voice_turn = await client.until("processing_complete")
        kinds = [e["type"] for e in voice_turn]
        assert "error" not in kinds, voice_turn
        assert next(e for e in voice_turn if e["type"] == "stt_complete")["data"]["text"]
        assert next(e for e in voice_turn if e["type"] == "llm_complete")["data"]["text"] == CUSTOM_FALLBACK
        assert kinds.index("llm_complete") < kinds.index("processing_complete") and kinds[-2] == "audio_response"
        spoken = " ".join(e["data"]["text"] for e in voice_turn if e["type"] == "audio_response")
        assert spoken.split() == CUSTOM_FALLBACK.split()
        # Each sentence's tts_complete carries its audio (audio_response the same).
        sentences = [pcm_of_wav(e["data"]["audio"]) for e in voice_turn if e["type"] == "tts_complete"]
        audio, audio_rate = b"".join(pcm for pcm, _ in sentences), sentences[0][1]
        assert len(audio) > audio_rate * 2, "less than a second of speech"
        heard = await transcribe(bus, audio, audio_rate)
        assert word_error_rate(CUSTOM_FALLBACK, heard) <= MAX_WER, heard

        await client.send("text", text="Are you still there?")
        text_turn = await client.until("processing_complete")
        assert "error" not in [e["type"] for e in text_turn], text_turn
        assert next(e for e in text_turn if e["type"] == "text_response")["data"]["text"] == CUSTOM_FALLBACK
        assert any(e["type"] == "audio_response" for e in text_turn)

        await client.send("end")
        await client.until("session_ended")

    log = await finished_call_log(stack, call_log_id)
    assert [t["kind"] for t in log["turns"]] == ["audio", "text"]
    for turn in log["turns"]:
        assert_fallback_turn(turn, CUSTOM_FALLBACK)
    assert log["turns"][1]["user"] == "Are you still there?"

    async with api_client(stack.gateway.url) as http:
        metrics = (await http.get("/metrics/")).text
    assert metric(metrics, "voice_gateway_fallbacks_total", reason="unavailable") >= 2
    assert metric(metrics, "voice_gateway_turns_total", dialect="browser", kind="audio", outcome="unavailable") >= 1
    assert metric(metrics, "voice_gateway_turns_total", dialect="browser", kind="text", outcome="unavailable") >= 1


async def test_chat_reads_the_default_fallback_and_the_channel_shows_the_error(stack):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    url = stack.gateway.url.replace("http://", "ws://") + "/ws/channels"
    async with websockets.connect(url) as dashboard, ChatClient(stack.gateway.url) as client:
        subscribe = {"action": "subscribe", "channel": conversation, "token": API_KEY}
        await dashboard.send(json.dumps({"channel": "subscription", "payload": subscribe}))
        assert json.loads(await dashboard.recv())["payload"]["action"] == "subscribed"
        await client.send(type="authorize", token=API_KEY)
        assert (await client.next())["type"] == "authorize_success"
        for question in ("Which plans do you offer?", "Hello, anyone there?"):
            await client.send(type="chat_message", content=question, agent_id="default", conversation_id=conversation)
            events = await client.until("stream_end")
            assert "error" not in [e["type"] for e in events], events
            chunks = [e["chunk"] for e in events if e["type"] == "tts_ready_chunk"]
            assert " ".join(chunks).split() == DEFAULT_FALLBACK_MESSAGE.split()
            assert events[-1]["content"] == DEFAULT_FALLBACK_MESSAGE and events[-1]["interrupted"] is False

        payloads = []
        while len([p for p in payloads if p["final_message"]]) < 2:
            payloads.append(json.loads(await asyncio.wait_for(dashboard.recv(), 30))["payload"])
    errors = [p for p in payloads if p["type"] == "error"]
    assert len(errors) == 2 and all("unavailable" in p["message"] and p["error_details"] for p in errors)
    finals = [p for p in payloads if p["final_message"]]
    assert [(p["type"], p["status"], p["message"]) for p in finals] == [
        ("response", "completed", DEFAULT_FALLBACK_MESSAGE)
    ] * 2

    log = await finished_call_log(stack, conversation)
    assert len(log["turns"]) == 2
    for turn in log["turns"]:
        assert_fallback_turn(turn, DEFAULT_FALLBACK_MESSAGE)


async def test_retell_gets_the_fallback_as_the_response_content(stack):
    await put_agent(stack, "helpdesk", fallback_message=CUSTOM_FALLBACK)
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    async with RetellPeer(stack.gateway.url, call_id) as retell:
        assert (await retell.next())["response_type"] == "config"
        await retell.send(
            interaction_type="call_details", call={"call_id": call_id, "metadata": {"agent_id": "helpdesk"}}
        )
        await retell.response(0)
        for response_id, question in ((1, "Can I change my booking?"), (2, "Hello?")):
            await retell.send(
                interaction_type="response_required",
                response_id=response_id,
                transcript=transcript(("user", question)),
            )
            chunks = await retell.response(response_id)
            assert "".join(c["content"] for c in chunks) == CUSTOM_FALLBACK
            assert chunks[-1]["content_complete"] is True and "end_call" not in chunks[-1]

    log = await finished_call_log(stack, call_id)
    turns = [t for t in log["turns"] if t["kind"] == "response"]
    assert len(turns) == 2
    for turn in turns:
        assert_fallback_turn(turn, CUSTOM_FALLBACK)


async def test_a_phone_call_hears_the_fallback_after_each_utterance(stack, bus):
    await put_agent(stack, "phone", fallback_message=CUSTOM_FALLBACK)
    first, rate = speak("I would like to book a table for two people.")
    second, _ = speak("Hello, can you hear me?")
    result = await call(
        "twilio",
        stack.gateway.url,
        first,
        rate,
        agent_id="phone",
        speech_at_s=1.0,
        # Far enough apart that the first fallback has been played before the caller speaks again, and
        # the second one before the caller hangs up, on a busy machine too.
        extra_speech=[(16.0, second)],
        listen_s=10.0,
    )
    assert result.problems == [] and result.closed_by == "caller"
    latencies = result.turn_latencies()
    assert len(latencies) == 2 and all(latency is not None for latency in latencies), result.timeline.table()

    log = await finished_call_log(stack, result.session_id)
    turns = [t for t in log["turns"] if t["kind"] == "audio"]
    assert len(turns) == 2, log
    for turn in turns:
        assert_fallback_turn(turn, CUSTOM_FALLBACK)
        assert turn["user"] and "first_audio_s" in turn["timings"]

    pcm = np.ascontiguousarray(result.agent_audio, dtype="<i2").tobytes()
    heard = await transcribe(bus, pcm, result.sample_rate)
    assert word_error_rate(f"{CUSTOM_FALLBACK} {CUSTOM_FALLBACK}", heard) <= MAX_WER, heard


async def test_without_a_fallback_message_the_turn_fails_with_an_error_event(stack):
    await put_agent(stack, "strict", fallback_message="")
    async with BrowserClient(stack.gateway.url) as client:
        await client.send("init", agentId="strict")
        call_log_id = (await client.until("init_success"))[-1]["data"]["callLogId"]
        await client.send("text", text="Hello?")
        error = (await client.until("error"))[-1]
        assert "unavailable" in error["data"]["error"]
        await client.send("end")
        await client.until("session_ended")
    turn = (await finished_call_log(stack, call_log_id))["turns"][0]
    assert turn["assistant"] == "" and turn["fallback"] is False and "unavailable" in turn["error"]


@pytest.mark.parametrize(("message", "reason"), [("   ", "must contain text"), ("x" * 501, "at most 500 characters")])
async def test_a_bad_fallback_message_is_refused(stack, message, reason):
    async with api_client(stack.gateway.url) as http:
        response = await http.put("/api/agents/bad-fallback", json={"fallback_message": message})
    assert response.status_code == 422 and reason in response.text, response.text


async def test_a_barge_in_keeps_only_what_was_heard_of_the_answer_it_cut(stack):
    """The greeting was heard in full before the caller asked; the caller then cut the answer short. The
    answer's record (and the history the next turn's LLM sees) holds the part of that answer the caller
    heard, not the greeting before it."""
    await put_agent(stack, "cut", greeting="Hello.", fallback_message=LONG_FALLBACK)
    question, rate = speak("I would like to book a table for two people.")
    interruption, _ = speak("Wait, stop please, I have another question.")
    question_end_s = 2.0 + question.size / rate
    result = await call(
        "twilio",
        stack.gateway.url,
        question,
        rate,
        agent_id="cut",
        speech_at_s=2.0,
        # The answer (about 9 s of speech) starts about a second after the question ends.
        extra_speech=[(question_end_s + 3.5, interruption)],
        listen_s=3.0,
    )
    assert result.problems == [], result.timeline.table()
    assert result.timeline.times("clear received"), result.timeline.table()
    log = await finished_call_log(stack, result.session_id)
    greeting, answer = log["turns"][0], log["turns"][1]
    assert greeting["kind"] == "greeting" and greeting["assistant"] == "Hello." and not greeting["interrupted"]
    assert answer["kind"] == "audio" and answer["interrupted"] is True, log
    heard = answer["assistant"].split()
    assert heard and heard == LONG_FALLBACK.split()[: len(heard)] and len(heard) < len(LONG_FALLBACK.split()), log


async def test_when_tts_is_down_too_the_turn_fails_with_an_error_event(stack):
    """Runs last in this module: it stops the TTS worker.

    The gateway keeps the audio of fallback messages it has spoken (and greetings): one it has already
    said is still heard with TTS down. This agent's fallback and greeting were never spoken, so the
    turn cannot be answered aloud and fails with the error event."""
    unheard = f"Sorry, the line {uuid.uuid4().hex[:6]} is offline. Please call again later."
    await put_agent(stack, "helpdesk_quiet", fallback_message=unheard, greeting="")
    stack.tts.stop()
    await asyncio.sleep(2.5)  # past the gateway's presence cache, so the request fails at once
    async with BrowserClient(stack.gateway.url) as client:
        await client.send("init", agentId="helpdesk_quiet")
        call_log_id = (await client.until("init_success"))[-1]["data"]["callLogId"]
        await client.send("text", text="Hello?")
        events = await client.until("error")
        assert "unavailable" in events[-1]["data"]["error"] and "LLM backend" in events[-1]["data"]["error"]
        await client.send("end")
        await client.until("session_ended")
    turn = (await finished_call_log(stack, call_log_id))["turns"][0]
    assert turn["fallback"] is False and "unavailable" in turn["error"]

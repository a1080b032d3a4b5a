"""STT and TTS workers as users run them: real processes, real models, over the bus and gRPC."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.services.conftest import wait_idle
from tests.support.speech import word_error_rate
from voice.v1 import audio_pb2, events_pb2, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc
from voice_audio import Encoding, encode_pcm16, wav_bytes
from voice_bus.catalog import HEADER_DEADLINE, HEADER_REPLY, HEADER_REQUEST_ID, SERVICES, cancel_subject
from voice_bus.errors import INVALID_ARGUMENT, BusError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back at the office tomorrow morning.",
    "I would like to book a table for two people.",
]
PCM16 = audio_pb2.AUDIO_ENCODING_PCM16
MULAW = audio_pb2.AUDIO_ENCODING_MULAW


async def synthesize(bus, text: str, encoding=PCM16, rate: int = 16000) -> tuple[bytes, list]:
    request = tts_pb2.SynthesizeRequest(
        text=text, output_format=audio_pb2.AudioFormat(encoding=encoding, sample_rate=rate)
    )
    events = await bus.collect("tts", request, timeout=60)
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    return b"".join(c.audio for c in chunks), events


async def transcribe(bus, audio: bytes, encoding=PCM16, rate: int = 16000, **fields) -> list:
    request = stt_pb2.TranscribeRequest(
        audio=audio, format=audio_pb2.AudioFormat(encoding=encoding, sample_rate=rate), **fields
    )
    return await bus.collect("stt", request, timeout=60)


@pytest.mark.parametrize("sentence", SENTENCES)
async def test_tts_to_stt_round_trip_pcm16(bus, stt_worker, tts_worker, sentence):
    audio, tts_events = await synthesize(bus, sentence)
    assert tts_events[-1].HasField("summary")
    stt_events = await transcribe(bus, audio, word_timestamps=True)
    transcript = stt_events[-1].transcript
    assert word_error_rate(sentence, transcript.text) <= 0.15, transcript.text
    assert [e.WhichOneof("event") for e in stt_events[:-1]] == ["segment"] * (len(stt_events) - 1)
    assert transcript.segments and transcript.segments[0].words
    assert transcript.language == "en"
    assert transcript.audio_duration_s == pytest.approx(len(audio) / 2 / 16000, rel=0.01)
    assert transcript.processing_time_s > 0


@pytest.mark.parametrize("sentence", SENTENCES)
async def test_tts_to_stt_round_trip_mulaw_8k(bus, stt_worker, tts_worker, sentence):
    audio, events = await synthesize(bus, sentence, encoding=MULAW, rate=8000)
    assert all(e.chunk.format.encoding == MULAW and e.chunk.format.sample_rate == 8000 for e in events[:-1])
    transcript = (await transcribe(bus, audio, encoding=MULAW, rate=8000))[-1].transcript
    assert word_error_rate(sentence, transcript.text) <= 0.15, transcript.text


async def test_tts_streams_each_sentence_in_pieces_in_the_asked_format(bus, tts_worker):
    text = " ".join(SENTENCES)
    for encoding, rate, width in [
        (PCM16, 24000, 2),
        (MULAW, 8000, 1),
        (audio_pb2.AUDIO_ENCODING_ALAW, 8000, 1),
        (PCM16, 48000, 2),
    ]:
        _, events = await synthesize(bus, text, encoding, rate)
        chunks = [e.chunk for e in events[:-1]]
        indexes = [c.sentence_index for c in chunks]
        assert indexes == sorted(indexes) and sorted(set(indexes)) == [0, 1, 2]
        assert [c.text for c in chunks] == [SENTENCES[i] for i in indexes]
        for chunk in chunks:
            assert chunk.format.sample_rate == rate and chunk.format.encoding == encoding
            assert len(chunk.audio) == pytest.approx(chunk.duration_s * rate * width, rel=0.01)
        summary = events[-1].summary
        assert summary.chunks == len(chunks) and 0 < summary.time_to_first_chunk_s < summary.processing_time_s


async def test_stt_accepts_containers_and_odd_rates(bus, stt_worker, piper_speech):
    from tests.support.speech import encode_container

    samples, rate = piper_speech(SENTENCES[0])
    cases = [
        (wav_bytes(samples, rate), audio_pb2.AUDIO_CONTAINER_WAV),
        (encode_container(samples, rate, "webm"), audio_pb2.AUDIO_CONTAINER_WEBM),
        (encode_container(samples, rate, "ogg"), audio_pb2.AUDIO_CONTAINER_OGG),
        (encode_container(samples, rate, "mp3"), audio_pb2.AUDIO_CONTAINER_AUTO),
        (encode_pcm16(samples, from_rate=rate, encoding=Encoding.PCM16, to_rate=44100), audio_pb2.AUDIO_CONTAINER_RAW),
    ]
    for data, container in cases:
        fmt = audio_pb2.AudioFormat(container=container, encoding=PCM16, sample_rate=44100)
        events = await bus.collect("stt", stt_pb2.TranscribeRequest(audio=data, format=fmt), timeout=60)
        assert word_error_rate(SENTENCES[0], events[-1].transcript.text) <= 0.15, (
            container,
            events[-1].transcript.text,
        )


BAD_STT = {
    "empty audio": stt_pb2.TranscribeRequest(),
    "unsupported encoding": stt_pb2.TranscribeRequest(
        audio=b"\x00" * 3200, format=audio_pb2.AudioFormat(encoding=77, sample_rate=16000)
    ),
    "garbage bytes": stt_pb2.TranscribeRequest(
        audio=b"\x13\x37" * 5000, format=audio_pb2.AudioFormat(container=audio_pb2.AUDIO_CONTAINER_WEBM)
    ),
    "absurd sample rate": stt_pb2.TranscribeRequest(
        audio=b"\x00" * 3200, format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate=10_000_000)
    ),
    "odd byte count": stt_pb2.TranscribeRequest(
        audio=b"\x00" * 3201, format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate=16000)
    ),
}
BAD_TTS = {
    "empty text": tts_pb2.SynthesizeRequest(text="  "),
    "unknown voice": tts_pb2.SynthesizeRequest(text="Hello.", voice="nobody"),
    "absurd sample rate": tts_pb2.SynthesizeRequest(
        text="Hello.", output_format=audio_pb2.AudioFormat(sample_rate=1_000_000)
    ),
    "unsupported encoding": tts_pb2.SynthesizeRequest(text="Hello.", output_format=audio_pb2.AudioFormat(encoding=42)),
    "bad speed": tts_pb2.SynthesizeRequest(text="Hello.", speed=-3),
}


async def test_bad_requests_are_invalid_argument_and_workers_stay_healthy(bus, stt_worker, tts_worker):
    for service, cases in (("stt", BAD_STT), ("tts", BAD_TTS)):
        for name, request in cases.items():
            with pytest.raises(BusError) as err:
                await bus.collect(service, request, timeout=30)
            assert err.value.code == INVALID_ARGUMENT, (service, name, err.value)
    audio, _ = await synthesize(bus, "Still working.")
    assert "working" in (await transcribe(bus, audio))[-1].transcript.text.lower()
    for worker in (stt_worker, tts_worker):
        assert worker.child.running()


async def test_tts_cancel_mid_stream_stops_output_and_frees_the_slot(nc, tts_worker):
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    request_id = uuid.uuid4().hex
    text = " ".join(f"This is sentence number {i} of a long answer." for i in range(20))
    request = tts_pb2.SynthesizeRequest(text=text, request_id=request_id)
    headers = {
        HEADER_REPLY: inbox,
        HEADER_REQUEST_ID: request_id,
        HEADER_DEADLINE: str(int(time.time() * 1000) + 60_000),
    }
    await nc.jetstream().publish(SERVICES["tts"].subject, request.SerializeToString(), headers=headers)
    while True:
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=30)).data)
        if reply.HasField("tts") and reply.tts.HasField("chunk"):
            break
    cancelled_at = time.monotonic()
    await nc.publish(cancel_subject(request_id), b"")
    late_chunks = 0
    while True:
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=5)).data)
        if reply.HasField("tts") and reply.tts.HasField("chunk") and time.monotonic() - cancelled_at > 0.3:
            late_chunks += 1
        if reply.final:
            break
    stopped_after = time.monotonic() - cancelled_at
    freed_after = await wait_idle(nc, "tts", 2.0) + stopped_after
    assert reply.error.code == events_pb2.ERROR_CODE_CANCELLED
    assert late_chunks == 0
    assert stopped_after < 0.3
    assert freed_after < 1.0


async def test_grpc_health_transcribe_synthesize_and_voices(stt_worker, tts_worker, piper_speech):
    for worker, service in ((stt_worker, "voice.v1.SpeechToText"), (tts_worker, "voice.v1.TextToSpeech")):
        async with grpc.aio.insecure_channel(worker.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                status = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert status.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(tts_worker.target) as channel:
        tts = tts_pb2_grpc.TextToSpeechStub(channel)
        voices = await tts.ListVoices(tts_pb2.ListVoicesRequest())
        assert voices.voices[0].name == "joe" and voices.voices[0].engine == "piper"
        events = [e async for e in tts.Synthesize(tts_pb2.SynthesizeRequest(text=SENTENCES[1]))]
        pcm = b"".join(e.chunk.audio for e in events if e.HasField("chunk"))
        rate = events[0].chunk.format.sample_rate
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in tts.Synthesize(tts_pb2.SynthesizeRequest(text="")):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(stt_worker.target) as channel:
        stt = stt_pb2_grpc.SpeechToTextStub(channel)
        request = stt_pb2.TranscribeRequest(audio=pcm, format=audio_pb2.AudioFormat(encoding=PCM16, sample_rate=rate))
        events = [e async for e in stt.Transcribe(request)]
        assert word_error_rate(SENTENCES[1], events[-1].transcript.text) <= 0.15
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stt.Transcribe(stt_pb2.TranscribeRequest()):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

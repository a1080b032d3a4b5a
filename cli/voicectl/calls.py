"""The stt, llm, tts and voices commands: one request each, through the bus or over gRPC."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import Message

from voice.v1 import audio_pb2, llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc
from voice_audio import wav_bytes
from voice_bus.client import BusClient
from voice_bus.connection import connect
from voice_bus.errors import BusError

RAW_ENCODINGS = {
    ".raw": audio_pb2.AUDIO_ENCODING_PCM16,
    ".pcm": audio_pb2.AUDIO_ENCODING_PCM16,
    ".ulaw": audio_pb2.AUDIO_ENCODING_MULAW,
    ".alaw": audio_pb2.AUDIO_ENCODING_ALAW,
}
ENCODINGS = {
    "pcm16": audio_pb2.AUDIO_ENCODING_PCM16,
    "mulaw": audio_pb2.AUDIO_ENCODING_MULAW,
    "alaw": audio_pb2.AUDIO_ENCODING_ALAW,
}


async def events(args: argparse.Namespace, service: str, request: Message) -> AsyncIterator[Message]:
    """The service's events for ``request``, from the gRPC server if ``--grpc`` is given, else the bus."""
    if args.grpc:
        async with grpc.aio.insecure_channel(args.grpc) as channel:
            method = {
                "stt": stt_pb2_grpc.SpeechToTextStub(channel).Transcribe,
                "llm": llm_pb2_grpc.LanguageModelStub(channel).Generate,
                "tts": tts_pb2_grpc.TextToSpeechStub(channel).Synthesize,
            }[service]
            async for event in method(request, timeout=args.timeout):
                yield event
        return
    nc = await connect(args.nats, name="voicectl", connect_timeout_s=3)
    try:
        async for event in BusClient(nc).stream(service, request, timeout=args.timeout):
            yield event
    finally:
        await nc.close()


async def stt(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = path.read_bytes()
    raw_encoding = RAW_ENCODINGS.get(path.suffix.lower())
    if raw_encoding is not None:
        fmt = audio_pb2.AudioFormat(
            encoding=raw_encoding, sample_rate=args.rate, container=audio_pb2.AUDIO_CONTAINER_RAW
        )
    else:
        fmt = audio_pb2.AudioFormat(container=audio_pb2.AUDIO_CONTAINER_AUTO)
    request = stt_pb2.TranscribeRequest(audio=data, format=fmt, language=args.language, word_timestamps=args.words)
    async for event in events(args, "stt", request):
        if event.HasField("segment") and args.words:
            segment = event.segment
            print(f"[{segment.start_s:6.2f} → {segment.end_s:6.2f}] {segment.text.strip()}")
            for word in segment.words:
                print(f"    {word.start_s:6.2f} {word.end_s:6.2f} {word.probability:.2f} {word.word.strip()}")
        elif event.HasField("transcript"):
            transcript = event.transcript
            print(transcript.text.strip())
            print(
                f"({transcript.audio_duration_s:.2f}s of audio in {transcript.processing_time_s:.2f}s, "
                f"language {transcript.language}, model {transcript.model})",
                file=sys.stderr,
            )
    return 0


async def llm(args: argparse.Namespace) -> int:
    request = llm_pb2.GenerateRequest(
        messages=[
            llm_pb2.ChatMessage(role="system", content=args.system),
            llm_pb2.ChatMessage(role="user", content=args.prompt),
        ],
        max_tokens=args.max_tokens,
    )
    if args.temperature is not None:
        request.temperature = args.temperature
    async for event in events(args, "llm", request):
        if event.HasField("delta"):
            sys.stdout.write(event.delta.text)
            sys.stdout.flush()
        elif event.HasField("completion"):
            completion = event.completion
            print()
            for call in completion.tool_calls:
                print(f"tool call {call.name}({call.arguments})")
            usage = completion.usage
            print(
                f"({completion.model}: first token {completion.time_to_first_token_s * 1000:.0f} ms, "
                f"{usage.completion_tokens} tokens in {completion.total_time_s:.2f}s, "
                f"finish {completion.finish_reason})",
                file=sys.stderr,
            )
    return 0


async def tts(args: argparse.Namespace) -> int:
    raw = args.output.endswith(".raw")
    encoding = ENCODINGS[args.encoding] if raw else audio_pb2.AUDIO_ENCODING_PCM16
    request = tts_pb2.SynthesizeRequest(
        text=args.text,
        voice=args.voice,
        speed=args.speed,
        output_format=audio_pb2.AudioFormat(encoding=encoding, sample_rate=args.rate),
    )
    pieces: list[bytes] = []
    sentences: set[int] = set()
    rate = args.rate
    started = time.perf_counter()
    async for event in events(args, "tts", request):
        if event.HasField("chunk"):
            if not pieces:
                print(f"first audio after {(time.perf_counter() - started) * 1000:.0f} ms", file=sys.stderr)
            pieces.append(event.chunk.audio)
            sentences.add(event.chunk.sentence_index)
            rate = event.chunk.format.sample_rate
        elif event.HasField("summary"):
            summary = event.summary
            print(
                f"{len(sentences)} sentence(s) in {summary.chunks} chunk(s), {summary.audio_duration_s:.2f}s of "
                f"audio at {rate} Hz in {summary.processing_time_s:.2f}s",
                file=sys.stderr,
            )
    audio = b"".join(pieces)
    if raw:
        Path(args.output).write_bytes(audio)
    else:
        Path(args.output).write_bytes(wav_bytes(np.frombuffer(audio, dtype="<i2"), rate))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


async def voices(args: argparse.Namespace) -> int:
    target = args.grpc or "127.0.0.1:50053"
    async with grpc.aio.insecure_channel(target) as channel:
        response = await tts_pb2_grpc.TextToSpeechStub(channel).ListVoices(
            tts_pb2.ListVoicesRequest(), timeout=args.timeout
        )
    for voice in response.voices:
        extras = f" speakers={','.join(voice.speakers)}" if voice.speakers else ""
        print(f"{voice.name}\t{voice.engine}\t{voice.language}\t{voice.sample_rate} Hz{extras}")
    return 0


async def run(args: argparse.Namespace) -> int:
    """Runs one command and returns its exit code; failures print one clear line."""
    command = {"stt": stt, "llm": llm, "tts": tts, "voices": voices}[args.command]
    try:
        return await command(args)
    except BusError as exc:
        print(f"voicectl {args.command}: {exc.code_name}: {exc.message}", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(f"voicectl {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except (ConnectionError, OSError) as exc:
        print(f"voicectl {args.command}: {exc}", file=sys.stderr)
    return 1

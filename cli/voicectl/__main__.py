"""voicectl: call the STT, LLM and TTS services through the bus (default) or over gRPC, or run the stack.

    voicectl up                              start everything locally (what `make run` does)
    voicectl nats                            run only nats-server, configured as the stack needs it
    voicectl cluster                         3 NATS nodes, 2 gateways behind a balancer, 2 of each worker
    voicectl balance --backend H:P ...       round-robin TCP balancer over ready gateways
    voicectl stt FILE                        transcribe an audio file (WAV, WebM, Ogg, MP3, ...)
    voicectl llm "prompt"                    stream a reply token by token
    voicectl tts "text" -o out.wav           synthesize speech
    voicectl voices                          list the TTS voices
    voicectl trace SESSION_ID [--png OUT]    a call's spans as a waterfall (local trace file of `up`)
    voicectl trace --list                    the recent sessions in that file
    voicectl call --dialect twilio --wav F   play a WAV file as a phone caller to the gateway
    voicectl load --calls N --duration S     N concurrent real-time calls, turn after turn, with a latency report
    voicectl realtime --wav F --out A        speak a WAV to /v1/realtime with the openai SDK, save the answer
Add --grpc (optionally HOST:PORT) to any of stt/llm/tts/voices to use the gRPC front door.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from voicectl import call_command, calls, load, realtime_command, traces


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicectl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--nats",
        default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="request timeout in seconds")
    sub = parser.add_subparsers(dest="command", required=True)

    def grpc_option(p: argparse.ArgumentParser, port: int) -> None:
        p.add_argument(
            "--grpc",
            nargs="?",
            const=f"127.0.0.1:{port}",
            default=None,
            metavar="HOST:PORT",
            help=f"call the gRPC service instead of the bus (default 127.0.0.1:{port})",
        )

    up = sub.add_parser("up", help="run nats-server, the llama.cpp server and the workers until Ctrl-C")
    up.add_argument("--state-dir", default=".run")

    nats = sub.add_parser("nats", help="run only nats-server (JetStream, 8 MB payloads) in the foreground")
    nats.add_argument("--state-dir", default=".run")

    cluster = sub.add_parser("cluster", help="run the loopback cluster (what `make cluster` does) until Ctrl-C")
    cluster.add_argument("--state-dir", default=".run/cluster")

    balance = sub.add_parser("balance", help="round-robin TCP balancer over gateways whose /readyz answers 200")
    balance.add_argument("--listen", type=int, default=8000)
    balance.add_argument("--backend", action="append", required=True, help="a gateway's host:port (repeat)")

    stt = sub.add_parser("stt", help="transcribe an audio file")
    stt.add_argument("file")
    stt.add_argument("--language", default="")
    stt.add_argument("--rate", type=int, default=16000, help="sample rate of a .raw/.pcm/.ulaw/.alaw file")
    stt.add_argument("--words", action="store_true", help="print word timestamps")
    grpc_option(stt, 50051)

    llm = sub.add_parser("llm", help="stream a chat reply")
    llm.add_argument("prompt")
    llm.add_argument("--system", default="You are a helpful voice assistant. Answer briefly.")
    llm.add_argument("--max-tokens", type=int, default=200)
    llm.add_argument("--temperature", type=float, default=None)
    grpc_option(llm, 50052)

    tts = sub.add_parser("tts", help="synthesize speech to a WAV file")
    tts.add_argument("text")
    tts.add_argument("-o", "--output", required=True, help="WAV file (PCM16), or .raw for the encoded stream")
    tts.add_argument("--voice", default="")
    tts.add_argument("--rate", type=int, default=0, help="output sample rate (default: the voice's own)")
    tts.add_argument("--encoding", choices=("pcm16", "mulaw", "alaw"), default="pcm16")
    tts.add_argument("--speed", type=float, default=1.0)
    grpc_option(tts, 50053)

    voices = sub.add_parser("voices", help="list the TTS voices")
    grpc_option(voices, 50053)

    call_command.add_parser(sub)
    load.add_parser(sub)
    realtime_command.add_parser(sub)
    traces.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "up":
        from voicectl.stack import run_stack

        sys.exit(run_stack(args.state_dir))
    if args.command == "nats":
        from voicectl.stack import run_nats

        sys.exit(run_nats(args.state_dir))
    if args.command == "cluster":
        from voicectl.cluster import run_cluster

        sys.exit(run_cluster(args.state_dir))
    if args.command == "balance":
        from voicectl.balancer import main as balance

        sys.exit(balance(["--listen", str(args.listen), *(f"--backend={b}" for b in args.backend)]))
    if args.command == "trace":
        sys.exit(traces.run(args))
    command = {"call": call_command.run_call, "load": load.run, "realtime": realtime_command.run}.get(
        args.command, calls.run
    )
    try:
        sys.exit(asyncio.run(command(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

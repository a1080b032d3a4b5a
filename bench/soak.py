"""``make soak`` (``python -m bench.soak``): real-time calls on the loopback cluster while faults are injected.

Starts the cluster ``make cluster`` runs (three NATS nodes with R3 streams, two gateways behind the
balancer, two workers of each service), then places ``--calls`` concurrent calls through the balancer
with ``voicectl load`` for ``--duration`` seconds while a chaos loop, every ``--fault-every`` seconds,
takes turns at: kill -9 of a busy (or any) worker, SIGTERM of a worker, stopping a NATS node. Each
worker taken away is replaced, and a stopped node started again, before the next fault. Writes
``bench/soak.json``: the load report (calls, turns, errors by kind, voice-to-voice percentiles) and the
fault timeline. It asserts nothing: the fault tests in ``tests/reliability`` do.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import signal
import sys
import time
from pathlib import Path

from voicectl.cluster import SERVICES, LoopbackCluster
from voicectl.load import INTERRUPTION, QUESTIONS, LoadOptions, render_utterances, run_load, table

RESULTS = Path(__file__).with_name("soak.json")
API_KEY = "soak-key"
FAULTS = ("kill -9 worker", "SIGTERM worker", "stop NATS node")


async def chaos(cluster: LoopbackCluster, every_s: float, stop: asyncio.Event, timeline: list[dict]) -> None:
    """Injects one fault every ``every_s`` seconds, in turn, until ``stop``; repairs it before the next."""
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    for round_ in itertools.count():
        try:
            async with asyncio.timeout(every_s):
                await stop.wait()
            return
        except TimeoutError:
            pass
        fault = FAULTS[round_ % len(FAULTS)]
        at = round(time.monotonic() - started, 1)
        if fault == "stop NATS node":
            index = rng.randrange(len(cluster.nats.nodes))
            await loop.run_in_executor(None, cluster.nats.stop_node, index)
            await asyncio.sleep(every_s / 3)
            await loop.run_in_executor(None, cluster.nats.start_node, index)
            timeline.append({"t_s": at, "fault": fault, "target": cluster.nats.nodes[index].server_name})
            continue
        service = rng.choice(SERVICES)
        worker = rng.choice(cluster.live_workers(service))
        if fault == "kill -9 worker":
            worker.child.process.kill()
        else:
            worker.child.signal(signal.SIGTERM)
        code = await loop.run_in_executor(None, worker.child.wait, 90)
        cluster.workers[service].remove(worker)
        await loop.run_in_executor(None, lambda s=service: cluster.add_worker(s))
        timeline.append({"t_s": at, "fault": fault, "target": worker.child.name, "exit_code": code})


async def soak(args: argparse.Namespace) -> dict:
    cluster = LoopbackCluster(env={"OTEL_TRACES_EXPORTER": "none", "GATEWAY_API_KEYS": API_KEY})
    await asyncio.get_running_loop().run_in_executor(None, cluster.start)
    try:
        spoken = await render_utterances([*QUESTIONS, INTERRUPTION], nats_url=cluster.nats.url)
        options = LoadOptions(
            gateway=cluster.url,
            dialect=args.dialect,
            calls=args.calls,
            duration_s=args.duration,
            ramp_s=min(10.0, args.duration / 4),
            api_key=API_KEY,
            answer_timeout_s=30.0,
            seed=1,
        )
        stop = asyncio.Event()
        timeline: list[dict] = []
        injector = asyncio.create_task(chaos(cluster, args.fault_every, stop, timeline))
        try:
            report = await run_load(options, spoken[:-1], spoken[-1])
        finally:
            stop.set()
            await injector
        report.pop("samples", None)
        report["faults"] = timeline
        return report
    finally:
        await asyncio.get_running_loop().run_in_executor(None, cluster.stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4, help="concurrent calls (default 4)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of calls (default 600)")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (default 30)")
    parser.add_argument("--dialect", default="twilio", choices=("twilio", "exotel", "pcm"))
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args))
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"faults injected: {len(report['faults'])}")
    for fault in report["faults"]:
        print(f"  {fault['t_s']:>7.1f} s  {fault['fault']:<15} {fault['target']}")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

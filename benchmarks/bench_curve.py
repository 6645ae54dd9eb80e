"""Latency cost of CURVE in connect mode: sequential ``add`` round trips, plaintext vs CURVE.

Two services run on this machine (127.0.0.1): one plaintext, one with CURVE and a ZAP
allow-list. One parent connects to both with ``connect_worker`` (registry in a temporary
directory, keys generated in a temporary directory). Rounds interleave the two modes (the
order alternates every round) so machine noise hits both; the report gives the median of
every sequential round trip per mode and the ratio CURVE / plaintext.

    python benchmarks/bench_curve.py [--rounds 10] [--calls 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import multifrost_trio as mf
from multifrost_trio import ChildWorker, inline


class AddService(ChildWorker):
    @inline
    def add(self, a: int, b: int) -> int:
        return a + b


def _serve(service_id: str, registry: str, secret: str | None, allowed: str | None) -> None:
    curve = None
    if secret is not None:
        curve = mf.CurveServer(Path(secret), Path(allowed) if allowed else None)
    AddService(service_id=service_id, registry_dir=registry, curve=curve).run()


async def _sequential(worker: mf.Worker, calls: int, samples: list[float]) -> None:
    add = worker.call.add
    clock = time.perf_counter
    for i in range(calls):
        started = clock()
        await add(i, 1)
        samples.append(clock() - started)


async def _measure(
    registry: Path, client: mf.CurveClient, rounds: int, calls: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"plaintext": [], "curve": []}
    round_medians: dict[str, list[float]] = {"plaintext": [], "curve": []}
    async with (
        mf.connect_worker("bench-plain", registry_dir=registry, timeout=15) as plain,
        mf.connect_worker("bench-curve", registry_dir=registry, timeout=15, curve=client) as sec,
    ):
        workers = {"plaintext": plain, "curve": sec}
        for worker in workers.values():  # warm up both paths
            await _sequential(worker, 200, [])
        for number in range(rounds):
            order = ["plaintext", "curve"] if number % 2 == 0 else ["curve", "plaintext"]
            for mode in order:
                one_round: list[float] = []
                await _sequential(workers[mode], calls, one_round)
                samples[mode].extend(one_round)
                round_medians[mode].append(statistics.median(one_round))
    return {**samples, **{f"{k}_rounds": v for k, v in round_medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        service_id, registry, secret, allowed = args.serve
        _serve(service_id, registry, secret or None, allowed or None)
        return

    root = Path(tempfile.mkdtemp(prefix="bench-curve-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        registry = root / "registry"
        server_public, server_secret = mf.generate_keypair(root / "server", "server")
        client_public, client_secret = mf.generate_keypair(root / "client", "client")
        allowed = root / "allowed"
        allowed.mkdir(mode=0o700)
        shutil.copy(client_public, allowed / "client.key")
        for service_id, secret, allow in (
            ("bench-plain", "", ""),
            ("bench-curve", str(server_secret), str(allowed)),
        ):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve", service_id, str(registry), secret, allow]
                )
            )
        client = mf.CurveClient(server_public, client_secret)
        result = trio.run(_measure, registry, client, args.rounds, args.calls)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    plain_us = statistics.median(result["plaintext"]) * 1e6
    curve_us = statistics.median(result["curve"]) * 1e6
    report = {
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "plaintext_median_us": round(plain_us, 1),
        "curve_median_us": round(curve_us, 1),
        "ratio_curve_over_plaintext": round(curve_us / plain_us, 3),
        "plaintext_round_medians_us": [round(x * 1e6, 1) for x in result["plaintext_rounds"]],
        "curve_round_medians_us": [round(x * 1e6, 1) for x in result["curve_rounds"]],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"sequential add round trip, connect mode, 127.0.0.1, "
        f"{args.rounds} interleaved rounds x {args.calls} calls per mode"
    )
    print(f"  plaintext median: {plain_us:8.1f} us")
    print(f"  CURVE     median: {curve_us:8.1f} us")
    print(f"  ratio CURVE / plaintext: {curve_us / plain_us:.3f}")
    print(f"  per-round medians plaintext (us): {report['plaintext_round_medians_us']}")
    print(f"  per-round medians CURVE     (us): {report['curve_round_medians_us']}")


if __name__ == "__main__":
    main()

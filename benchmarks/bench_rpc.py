"""Round-trip latency and throughput of multifrost_trio against a raw pyzmq floor.

The floor is a blocking pyzmq DEALER (this process) and ROUTER (a child process) exchanging
the same msgpack maps the protocol uses. Every library measurement is paired with a floor
measurement taken right before or after it (the order alternates between rounds), so the
machine's slow drifts hit both; the table shows medians, and ratios as the median over
rounds of each pair's ratio (library / floor for latency and for throughput).

    python benchmarks/bench_rpc.py [--rounds 5] [--calls 3000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack
import trio
import zmq

import multifrost_trio as mf
from multifrost_trio import _messages

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_worker.py"
IN_FLIGHT = 100


# --------------------------------------------------------------------------- floor


def _floor_server(port: int) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    while True:
        identity, empty, payload = sock.recv_multipart()
        request = msgpack.unpackb(payload, raw=False)
        if request["type"] == "shutdown":
            return
        a, b = request["args"]
        reply = {
            "app": "comlink_ipc_v4",
            "id": request["id"],
            "type": "response",
            "timestamp": time.time(),
            "result": a + b,
        }
        sock.send_multipart([identity, empty, msgpack.packb(reply, use_bin_type=True)])


def _floor_request(i: int) -> bytes:
    return msgpack.packb(
        {
            "app": "comlink_ipc_v4",
            "id": str(uuid.uuid4()),
            "type": "call",
            "timestamp": time.time(),
            "function": "add",
            "args": [i, 1],
            "namespace": "default",
        },
        use_bin_type=True,
    )


class Floor:
    """Blocking DEALER in this process talking to a ROUTER echo child."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port)])

    def _exchange(self) -> None:
        _, payload = self.sock.recv_multipart()
        msgpack.unpackb(payload, raw=False)

    def sequential(self, calls: int) -> float:
        """Median seconds per round trip."""
        samples = []
        for i in range(calls):
            start = time.perf_counter()
            self.sock.send_multipart([b"", _floor_request(i)])
            self._exchange()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def pipelined(self, calls: int) -> float:
        """Calls per second with IN_FLIGHT requests outstanding."""
        start = time.perf_counter()
        for i in range(IN_FLIGHT):
            self.sock.send_multipart([b"", _floor_request(i)])
        for i in range(calls):
            self._exchange()
            if i + IN_FLIGHT < calls:
                self.sock.send_multipart([b"", _floor_request(i)])
        return calls / (time.perf_counter() - start)

    async def trio_sequential(self, calls: int) -> float:
        """The same exchange from one trio task sleeping on the zmq fd: the least any
        trio-based client can do (a second floor, showing trio's own share)."""
        sock = self.sock
        events, pollin, noblock = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
        fd = sock.getsockopt(zmq.FD)
        samples = []
        for i in range(calls):
            start = time.perf_counter()
            sock.send(b"", zmq.SNDMORE)
            sock.send(_floor_request(i))
            while not sock.getsockopt(events) & pollin:
                await trio.lowlevel.wait_readable(fd)
            sock.recv(noblock)
            msgpack.unpackb(sock.recv(noblock), raw=False)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def close(self) -> None:
        shutdown = {"app": "comlink_ipc_v4", "id": "x", "type": "shutdown", "timestamp": 0.0}
        self.sock.send_multipart([b"", msgpack.packb(shutdown)])
        self.proc.wait(timeout=10)
        self.sock.close()


# --------------------------------------------------------------------------- library


async def lib_sequential(worker: mf.Worker, function: str, calls: int) -> float:
    samples = []
    call = worker.call
    for i in range(calls):
        start = time.perf_counter()
        await call(function, i, 1)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def lib_pipelined(worker: mf.Worker, function: str, calls: int) -> float:
    per_task = calls // IN_FLIGHT
    call = worker.call

    async def run() -> None:
        for i in range(per_task):
            await call(function, i, 1)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(run)
    return per_task * IN_FLIGHT / (time.perf_counter() - start)


def spawn_to_ready() -> float:
    async def once() -> float:
        start = time.perf_counter()
        async with mf.open_worker(WORKER):
            return time.perf_counter() - start

    return trio.run(once)


def import_time() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import multifrost_trio"], check=True)
    return time.perf_counter() - start


def codec_us(repeat: int = 20000) -> float:
    """Encode + decode of one call message through the wire models, in microseconds."""
    start = time.perf_counter()
    for i in range(repeat):
        payload = _messages.encode(_messages.make_call("add", (i, 1)))
        _messages.decode(payload)
    return (time.perf_counter() - start) / repeat * 1e6


KINDS = {"async": "add_async", "inline": "add_inline", "thread": "add_sync"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=0.05,
        help="heartbeat interval of the 'heartbeats on' run (default 0.05 s)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        _floor_server(args.floor_server)
        return

    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    options = mf.SpawnOptions(heartbeat_interval=0)
    with_heartbeats = mf.SpawnOptions(heartbeat_interval=args.heartbeat)
    floor = Floor()
    calls = args.calls

    async def library_round(floor_first: bool) -> None:
        async def paired(
            key: str, floor_side: Callable[[], float], library: Awaitable[float]
        ) -> None:
            """One library measurement and its floor, in this round's order."""
            floor_value = floor_side() if floor_first else 0.0
            value = await library
            if not floor_first:
                floor_value = floor_side()
            add(key, value)
            add("floor_tput" if key.endswith("_tput") else "floor_seq", floor_value)
            add(f"{key}_ratio", value / floor_value)

        def floor_seq() -> float:
            return floor.sequential(calls)

        def floor_tput() -> float:
            return floor.pipelined(calls * 3)

        await paired("trio_floor_seq", floor_seq, floor.trio_sequential(calls))
        async with mf.open_worker(WORKER, options=options) as worker:
            await lib_sequential(worker, "add_async", 200)  # warm-up
            for kind, function in KINDS.items():
                await paired(f"{kind}_seq", floor_seq, lib_sequential(worker, function, calls))
                await paired(f"{kind}_tput", floor_tput, lib_pipelined(worker, function, calls * 3))
        async with mf.open_worker(WORKER, options=with_heartbeats) as worker:
            await lib_sequential(worker, "add_async", 200)
            add("hb_seq", await lib_sequential(worker, "add_async", calls))

    try:
        for round_index in range(args.rounds):
            trio.run(library_round, round_index % 2 == 0)
            add("spawn_ready", spawn_to_ready())
            add("import", import_time())
        add("codec_us", codec_us())
    finally:
        floor.close()

    med = {key: statistics.median(values) for key, values in results.items()}
    rows = []
    for kind in KINDS:
        seq, tput = med[f"{kind}_seq"], med[f"{kind}_tput"]
        rows.append((kind, seq * 1e6, med[f"{kind}_seq_ratio"], tput, med[f"{kind}_tput_ratio"]))
    spawn_ratio = med["spawn_ready"] / med["import"]
    if args.json:
        print(json.dumps({"medians": med, "rounds": args.rounds, "calls": args.calls}, indent=2))
        return
    print(f"rounds={args.rounds} calls={args.calls} in_flight={IN_FLIGHT} cpus={os.cpu_count()}")
    print(
        f"floor (raw pyzmq): sequential {med['floor_seq'] * 1e6:.1f} us, "
        f"pipelined {med['floor_tput']:.0f} calls/s"
    )
    print(
        f"trio floor (one trio task, raw pyzmq): sequential "
        f"{med['trio_floor_seq'] * 1e6:.1f} us = {med['trio_floor_seq_ratio']:.2f}x"
    )
    header = ("handler", "seq us", "seq x floor", "calls/s@100", "tput x floor")
    print("{:<8} {:>8} {:>12} {:>12} {:>13}".format(*header))
    for kind, seq_us, seq_ratio, tput, tput_ratio in rows:
        print(f"{kind:<8} {seq_us:8.1f} {seq_ratio:12.2f} {tput:12.0f} {tput_ratio:13.2f}")
    print(
        f"spawn-to-ready {med['spawn_ready'] * 1e3:.0f} ms vs import {med['import'] * 1e3:.0f} ms"
        f" -> {spawn_ratio:.2f}x"
    )
    print(f"codec: encode+decode of one call message {med['codec_us']:.1f} us")
    print(
        f"heartbeats every {args.heartbeat} s: async sequential {med['hb_seq'] * 1e6:.1f} us vs "
        f"{med['async_seq'] * 1e6:.1f} us off -> {med['hb_seq'] / med['async_seq']:.3f}x"
    )


if __name__ == "__main__":
    main()

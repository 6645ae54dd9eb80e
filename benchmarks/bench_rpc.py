"""Round-trip latency and throughput of multifrost_trio against a raw pyzmq floor.

The floor is a blocking pyzmq DEALER (this process) and ROUTER (a child process) exchanging
the same msgpack maps the protocol uses. Every library block (``--calls`` sequential calls,
or ten times as many with 100 in flight) is paired with a floor block taken right before or
after it (the order alternates between blocks), so the machine's drifts hit both; a ratio
is the median over ``--blocks`` pairs of each pair's ratio (library / floor for latency and
for throughput), with its 10th to 90th percentiles. Two more references show what trio
itself costs: the floor's client as one trio task on the zmq fd, and that client talking
to a server written the same way (raw pyzmq, no library, on both sides).

    python benchmarks/bench_rpc.py [--blocks 30] [--calls 300] [--spawns 5] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio
import zmq

import multifrost_trio as mf
from multifrost_trio import _messages

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_worker.py"
IN_FLIGHT = 100


# --------------------------------------------------------------------------- floor


def _floor_reply(request: dict[str, Any]) -> bytes:
    """The floor servers' answer to an ``add`` call."""
    a, b = request["args"]
    reply = {
        "app": "comlink_ipc_v4",
        "id": request["id"],
        "type": "response",
        "timestamp": time.time(),
        "result": a + b,
    }
    return msgpack.packb(reply, use_bin_type=True)  # type: ignore[no-any-return]


def _floor_server(port: int) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    while True:
        identity, empty, payload = sock.recv_multipart()
        request = msgpack.unpackb(payload, raw=False)
        if request["type"] == "shutdown":
            return
        sock.send_multipart([identity, empty, _floor_reply(request)])


def _trio_floor_server(port: int) -> None:
    """The same echo from one trio task sleeping on the zmq fd."""

    async def serve() -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.connect(f"tcp://127.0.0.1:{port}")
        fd = sock.getsockopt(zmq.FD)
        events, pollin, noblock = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
        while True:
            while not sock.getsockopt(events) & pollin:
                await trio.lowlevel.wait_readable(fd)
            identity, empty = sock.recv(noblock), sock.recv(noblock)
            request = msgpack.unpackb(sock.recv(noblock), raw=False)
            if request["type"] == "shutdown":
                return
            sock.send(identity, zmq.SNDMORE)
            sock.send(empty, zmq.SNDMORE)
            sock.send(_floor_reply(request))

    trio.run(serve)


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
    """Blocking DEALER in this process talking to a ROUTER echo child (blocking pyzmq, or
    with ``server="--trio-floor-server"`` one trio task)."""

    def __init__(self, server: str = "--floor-server") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.proc = subprocess.Popen([sys.executable, __file__, server, str(port)])

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
TPUT_BLOCK_FACTOR = 10
"""A throughput block makes this many times the calls of a sequential block (100 in flight
ramp up and down at a block's ends: a longer block keeps that a small share)."""


def _spread(values: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[0], deciles[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30, help="paired blocks per figure")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per block")
    parser.add_argument("--spawns", type=int, default=5, help="spawn-to-ready samples")
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=0.05,
        help="heartbeat interval of the 'heartbeats on' run (default 0.05 s)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trio-floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        _floor_server(args.floor_server)
        return
    if args.trio_floor_server:
        _trio_floor_server(args.trio_floor_server)
        return

    values: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    calls, tput_calls = args.calls, args.calls * TPUT_BLOCK_FACTOR
    floor = Floor()
    trio_floor = Floor("--trio-floor-server")

    async def blocking(function: Callable[[int], float], count: int) -> float:
        return function(count)

    async def paired(
        key: str,
        reference: Callable[[], Awaitable[float]],
        measured: Callable[[], Awaitable[float]],
        first: bool,
    ) -> None:
        """One block of ``measured`` next to one of ``reference`` (``first``: reference first)."""
        if first:
            base = await reference()
            value = await measured()
        else:
            value = await measured()
            base = await reference()
        values.setdefault(key, []).append(value)
        values.setdefault(f"{key}_reference", []).append(base)
        ratios.setdefault(key, []).append(value / base)

    async def run_blocks() -> None:
        def floor_seq() -> Awaitable[float]:
            return blocking(floor.sequential, calls)

        def floor_tput() -> Awaitable[float]:
            return blocking(floor.pipelined, tput_calls)

        async with mf.open_worker(WORKER, options=mf.SpawnOptions(heartbeat_interval=0)) as worker:
            floor.sequential(200)
            await trio_floor.trio_sequential(200)
            await lib_sequential(worker, "add_async", 200)
            for block in range(args.blocks):
                first = block % 2 == 0
                await paired(
                    "trio_floor_seq", floor_seq, lambda: floor.trio_sequential(calls), first
                )
                await paired(
                    "trio_both_seq", floor_seq, lambda: trio_floor.trio_sequential(calls), first
                )
                for kind, function in KINDS.items():
                    await paired(
                        f"{kind}_seq",
                        floor_seq,
                        functools.partial(lib_sequential, worker, function, calls),
                        first,
                    )
                    await paired(
                        f"{kind}_tput",
                        floor_tput,
                        functools.partial(lib_pipelined, worker, function, tput_calls),
                        first,
                    )
            heartbeats = mf.SpawnOptions(heartbeat_interval=args.heartbeat)
            async with mf.open_worker(WORKER, options=heartbeats) as beating:
                await lib_sequential(beating, "add_async", 200)
                for block in range(args.blocks):
                    await paired(
                        "heartbeat_seq",
                        functools.partial(lib_sequential, worker, "add_async", calls),
                        functools.partial(lib_sequential, beating, "add_async", calls),
                        block % 2 == 0,
                    )

    try:
        trio.run(run_blocks)
    finally:
        floor.close()
        trio_floor.close()
    spawn = statistics.median(spawn_to_ready() for _ in range(args.spawns))
    imports = statistics.median(import_time() for _ in range(args.spawns))
    codec = codec_us()

    if args.json:
        summary = {
            "blocks": args.blocks,
            "calls": calls,
            "ratios": {key: _spread(found) for key, found in ratios.items()},
            "medians": {key: statistics.median(found) for key, found in values.items()},
            "spawn_ready": spawn,
            "import": imports,
            "codec_us": codec,
        }
        print(json.dumps(summary, indent=2))
        return

    def ratio(key: str) -> str:
        middle, low, high = _spread(ratios[key])
        return f"{middle:.2f} [{low:.2f}-{high:.2f}]"

    def median_of(key: str) -> float:
        return statistics.median(values[key])

    print(
        f"blocks={args.blocks} calls/block={calls} (throughput {tput_calls}) "
        f"in_flight={IN_FLIGHT} cpus={os.cpu_count()}"
    )
    print("ratios: median of paired blocks [10th-90th percentile]")
    print(
        f"floor (raw blocking pyzmq): sequential {median_of('async_seq_reference') * 1e6:.1f} us, "
        f"pipelined {median_of('async_tput_reference'):.0f} calls/s"
    )
    print(
        f"trio floor (raw pyzmq in one trio task), sequential: parent side only "
        f"{ratio('trio_floor_seq')}x, both sides {ratio('trio_both_seq')}x"
    )
    header = ("handler", "seq us", "seq x floor", "calls/s@100", "tput x floor")
    print("{:<8} {:>8} {:>20} {:>12} {:>20}".format(*header))
    for kind in KINDS:
        print(
            f"{kind:<8} {median_of(f'{kind}_seq') * 1e6:8.1f} {ratio(f'{kind}_seq'):>20} "
            f"{median_of(f'{kind}_tput'):12.0f} {ratio(f'{kind}_tput'):>20}"
        )
    print(
        f"spawn-to-ready {spawn * 1e3:.0f} ms vs import {imports * 1e3:.0f} ms"
        f" -> {spawn / imports:.2f}x"
    )
    print(f"codec: encode+decode of one call message {codec:.1f} us")
    print(
        f"heartbeats every {args.heartbeat} s vs off, async sequential: {ratio('heartbeat_seq')}x"
    )


if __name__ == "__main__":
    main()

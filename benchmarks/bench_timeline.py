"""Where a sequential round trip's time goes: five parts, for the library and the trio floor.

Both processes stamp ``time.perf_counter()`` (one system-wide monotonic clock on Linux) at
fixed points, and each round trip is cut into: the parent's work before its send, the trip
to the worker (zmq I/O threads, TCP, the worker's wake-up), the worker's work from its
wake-up to its reply's send, the trip back, and the parent's work from its wake-up to the
call's return. The floor is raw pyzmq driven by one trio task on each side, stamped at the
same points (its request is built before the first stamp, its reply after the last). The
library is stamped by wrapping ``trio.lowlevel.wait_readable``, the idle wait (a caller's
wait off the scheduler) and ``Channel.try_send`` in both processes, which adds well under a
microsecond per stamp. Medians of ``--calls`` calls; the machine is noisy, so compare parts
measured in one run, not across runs.

    python benchmarks/bench_timeline.py [--calls 3000] [--kinds async,inline,thread]
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import trio
import zmq

import multifrost_trio as mf
from multifrost_trio import _transport

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_rpc import KINDS, _floor_reply, _floor_request  # noqa: E402
from bench_worker import BenchWorker  # noqa: E402

PARTS = ("parent before send", "to worker", "worker", "to parent", "parent after wake")
Stamps = list[tuple[str, float]]


def _install_stamps(stamps: Stamps) -> None:
    """Stamp every socket wake-up ("wake") and every send ("send", from the event loop or
    from a sync handler's thread) of this process."""
    waiting = trio.lowlevel.wait_readable
    channel_class = _transport.Channel
    idle_wait = _transport._IdleWait.wait

    async def wait_readable(fd: int) -> None:
        await waiting(fd)
        stamps.append(("wake", time.perf_counter()))

    def idle_wait_stamped(self: Any, waiter: Any) -> bool:
        woke = idle_wait(self, waiter)
        if woke:
            stamps.append(("wake", time.perf_counter()))
        return woke

    def stamped(send: Callable[[Any, Sequence[bytes]], bool]) -> Callable[..., bool]:
        def send_stamped(channel: Any, frames: Sequence[bytes]) -> bool:
            stamps.append(("send", time.perf_counter()))
            return send(channel, frames)

        return send_stamped

    trio.lowlevel.wait_readable = wait_readable
    _transport._IdleWait.wait = idle_wait_stamped  # type: ignore[method-assign]
    channel_class.try_send = stamped(channel_class.try_send)  # type: ignore[method-assign]
    channel_class.send_from_thread = stamped(channel_class.send_from_thread)  # type: ignore[method-assign]


class TimelineWorker(BenchWorker):
    """The benchmark worker, stamping its wake-ups and sends."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: Stamps = []
        _install_stamps(self.stamps)

    @mf.inline
    def timeline(self, path: str) -> None:
        """Write the stamps so far to ``path`` and start afresh."""
        Path(path).write_text(json.dumps(self.stamps))
        self.stamps.clear()


def _parts(parent: Stamps, worker: Stamps, starts: list[float], ends: list[float]) -> list[float]:
    """Median of each part over the round trips whose every stamp was found."""
    sends = [t for kind, t in parent if kind == "send"]
    parent_wakes = [t for kind, t in parent if kind == "wake"]
    worker_wakes = [t for kind, t in worker if kind == "wake"]
    worker_sends = [t for kind, t in worker if kind == "send"]
    rows = []
    for start, end in zip(starts, ends, strict=True):
        marks = [start]
        for found in (sends, worker_wakes, worker_sends, parent_wakes):
            index = bisect.bisect_left(found, marks[-1])
            if index == len(found):
                break
            marks.append(found[index])
        marks.append(end)
        if len(marks) == 6 and marks[4] < end:
            rows.append([later - earlier for earlier, later in itertools.pairwise(marks)])
    return [statistics.median(row[part] for row in rows) for part in range(len(PARTS))]


def _floor_server(port: int, out: str) -> None:
    async def serve() -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.connect(f"tcp://127.0.0.1:{port}")
        fd = sock.getsockopt(zmq.FD)
        stamps: Stamps = []
        while True:
            while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                await trio.lowlevel.wait_readable(fd)
                stamps.append(("wake", time.perf_counter()))
            identity, empty = sock.recv(zmq.NOBLOCK), sock.recv(zmq.NOBLOCK)
            request = msgpack.unpackb(sock.recv(zmq.NOBLOCK), raw=False)
            if request["type"] == "shutdown":
                await trio.Path(out).write_text(json.dumps(stamps))
                return
            stamps.append(("send", time.perf_counter()))
            sock.send_multipart([identity, empty, _floor_reply(request)])

    trio.run(serve)


def floor_parts(calls: int, scratch: Path) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
    out = scratch / "floor.json"
    server = subprocess.Popen([sys.executable, __file__, "--floor-server", port, str(out)])
    stamps: Stamps = []
    starts: list[float] = []
    ends: list[float] = []

    async def client() -> None:
        fd = sock.getsockopt(zmq.FD)
        for i in range(calls):
            request = _floor_request(i)
            starts.append(time.perf_counter())
            stamps.append(("send", time.perf_counter()))
            sock.send_multipart([b"", request])
            while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                await trio.lowlevel.wait_readable(fd)
                stamps.append(("wake", time.perf_counter()))
            msgpack.unpackb(sock.recv_multipart(zmq.NOBLOCK)[1], raw=False)
            ends.append(time.perf_counter())

    try:
        trio.run(client)
    finally:
        shutdown = {"app": "comlink_ipc_v4", "id": "x", "type": "shutdown", "timestamp": 0.0}
        sock.send_multipart([b"", msgpack.packb(shutdown)])
        server.wait(timeout=10)
        sock.close()
    skip = calls // 10  # the first calls warm both sides up
    worker = json.loads(out.read_text())
    return _parts(stamps, worker, starts[skip:], ends[skip:])


def library_parts(function: str, calls: int, scratch: Path) -> list[float]:
    stamps: Stamps = []
    starts: list[float] = []
    ends: list[float] = []
    out = scratch / "worker.json"

    async def run() -> None:
        options = mf.SpawnOptions(heartbeat_interval=0)
        async with mf.open_worker(__file__, options=options) as worker:
            call = worker.call
            for i in range(calls // 10):
                await call(function, i, 1)
            await call("timeline", str(out))
            stamps.clear()
            for i in range(calls):
                starts.append(time.perf_counter())
                await call(function, i, 1)
                ends.append(time.perf_counter())
            parent = list(stamps)
            await call("timeline", str(out))
            stamps[:] = parent

    _install_stamps(stamps)
    trio.run(run)
    return _parts(stamps, json.loads(out.read_text()), starts, ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--kinds", default=",".join(KINDS), help="of: " + ", ".join(KINDS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        TimelineWorker().run()
        return
    if args.floor_server:
        _floor_server(int(args.floor_server[0]), args.floor_server[1])
        return
    runs: dict[str, Callable[[int, Path], list[float]]] = {"trio floor": floor_parts}
    for kind in args.kinds.split(","):
        runs[kind] = lambda calls, scratch, name=KINDS[kind]: library_parts(name, calls, scratch)
    print(f"median microseconds of {args.calls} sequential calls")
    print(f"{'':<11}" + "".join(f"{part:>19}" for part in PARTS) + f"{'sum':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        for label, measure in runs.items():
            parts: list[Any] = measure(args.calls, Path(scratch))
            cells = "".join(f"{value * 1e6:19.1f}" for value in parts)
            print(f"{label:<11}{cells}{sum(parts) * 1e6:8.1f}")


if __name__ == "__main__":
    main()

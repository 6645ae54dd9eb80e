"""Which side costs what: every pairing of a raw pyzmq peer and a multifrost_trio peer.

Sequential inline ``add`` round trips, medians, in interleaved rounds:

- floor client x floor server  (blocking pyzmq on both sides)
- floor client x our child     (what the worker side adds)
- our parent   x floor server  (what the parent side adds)
- our parent   x our child

    python benchmarks/bench_sides.py [--rounds 4] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import trio
import zmq

from multifrost_trio._parent import SpawnOptions, Worker, WorkerCore
from multifrost_trio._transport import Channel, bind_ephemeral, new_socket

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_rpc import _floor_request, lib_sequential  # noqa: E402

SHUTDOWN = {"app": "comlink_ipc_v4", "id": "x", "type": "shutdown", "timestamp": 0.0}


def _request(i: int) -> bytes:
    message = msgpack.unpackb(_floor_request(i))
    message["function"] = "add_inline"
    return msgpack.packb(message)


def _start_server(kind: str, port: int) -> subprocess.Popen[bytes]:
    if kind == "floor":
        return subprocess.Popen(
            [sys.executable, str(HERE / "bench_rpc.py"), "--floor-server", str(port)]
        )
    env = dict(os.environ, COMLINK_ZMQ_PORT=str(port), COMLINK_WORKER_MODE="1")
    return subprocess.Popen([sys.executable, str(HERE / "bench_worker.py")], env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def floor_client(server: str, calls: int) -> float:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:0")
    process = _start_server(server, int(sock.getsockopt_string(zmq.LAST_ENDPOINT).split(":")[-1]))
    samples = []
    for i in range(200 + calls):
        start = time.perf_counter()
        sock.send_multipart([b"", _request(i)])
        msgpack.unpackb(sock.recv_multipart()[-1])
        samples.append(time.perf_counter() - start)
    sock.send_multipart([b"", msgpack.packb(SHUTDOWN)])
    _stop(process)
    sock.close()
    return statistics.median(samples[200:])


async def our_parent(server: str, calls: int) -> float:
    core = WorkerCore("bench", SpawnOptions(heartbeat_interval=0))
    sock = new_socket(zmq.DEALER)
    channel = Channel(sock, core.on_frames)
    core.attach(channel)
    process = _start_server(server, bind_ephemeral(sock))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run)
        worker = Worker._for(core)
        await lib_sequential(worker, "add_inline", 200)
        result = await lib_sequential(worker, "add_inline", calls)
        core.send_nowait(SHUTDOWN)
        nursery.cancel_scope.cancel()
    channel.close()
    _stop(process)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        pairs = {
            "floor client x floor server": lambda: floor_client("floor", args.calls),
            "floor client x our child": lambda: floor_client("ours", args.calls),
            "our parent x floor server": lambda: trio.run(our_parent, "floor", args.calls),
            "our parent x our child": lambda: trio.run(our_parent, "ours", args.calls),
        }
        for name, measure in pairs.items():
            results.setdefault(name, []).append(measure())
    floor = statistics.median(results["floor client x floor server"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<28} {median * 1e6:7.1f} us  {median / floor:5.2f}x")


if __name__ == "__main__":
    main()

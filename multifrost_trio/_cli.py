"""The ``multifrost-trio`` command line (also ``python -m multifrost_trio``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from . import examples
from ._errors import MultifrostError, RemoteCallError
from ._parent import SpawnOptions
from ._spawn import open_worker

DEMO_WORKER = Path(examples.__file__).with_name("math_worker.py")


async def _demo() -> None:
    print(f"spawning {DEMO_WORKER.name} ...")
    async with open_worker(DEMO_WORKER) as worker:
        print(f"worker ready (pid {worker.pid}); functions: {await worker.list_functions()}")
        print(f"add(20, 22)        -> {await worker.call('add', 20, 22)}")
        print(f"factorial(20)      -> {await worker.call.factorial(20)}")
        print(f"greet('trio')      -> {await worker.call.greet('trio')}")
        async with trio.open_nursery() as nursery:
            squares: list[float] = []

            async def square(x: int) -> None:
                squares.append(await worker.call.slow_square(x, 0.2))

            for x in range(5):
                nursery.start_soon(square, x)
        print(f"5 x slow_square in parallel -> {sorted(squares)}")
        with trio.move_on_after(0.1):
            await worker.call.slow_square(3, 10)
            print("(not reached)")
        print("slow_square(3, 10) with a 0.1 s cancel scope -> cancelled in the worker too")
        try:
            await worker.call.divide(1, 0)
        except RemoteCallError as exc:
            print(f"divide(1, 0)       -> RemoteCallError: {exc}")
        for i in range(200):
            await worker.call.add(i, i)
        snapshot = worker.metrics()
    print(
        f"metrics: {snapshot.requests_total} calls, {snapshot.requests_success} ok, "
        f"{snapshot.requests_failed} failed, {snapshot.requests_cancelled} cancelled; "
        f"latency p50 {snapshot.latency_p50_ms:.2f} ms, p99 {snapshot.latency_p99_ms:.2f} ms"
    )
    print("worker stopped.")


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


async def _call(script: str, function: str, args: list[Any]) -> None:
    async with open_worker(script, options=SpawnOptions()) as worker:
        result = await worker.call(function, *args)
    print(json.dumps(result, default=repr))


async def _list(script: str) -> None:
    async with open_worker(script) as worker:
        for name in await worker.list_functions():
            print(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="multifrost-trio", description="Call functions in worker processes."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="spawn the example worker and call it")
    call = commands.add_parser("call", help="call one function and print the result as JSON")
    call.add_argument("script", help="worker script")
    call.add_argument("function")
    call.add_argument("args", nargs="*", help="arguments, as JSON (plain text if not JSON)")
    listing = commands.add_parser("list", help="list a worker's functions")
    listing.add_argument("script", help="worker script")
    options = parser.parse_args(argv)
    try:
        if options.command == "demo":
            trio.run(_demo)
        elif options.command == "call":
            trio.run(_call, options.script, options.function, [_parse_arg(a) for a in options.args])
        elif options.command == "list":
            trio.run(_list, options.script)
    except RemoteCallError as exc:
        if options.debug:
            raise
        print(f"remote error: {exc}", file=sys.stderr)
        if exc.remote_traceback:
            print(exc.remote_traceback.rstrip(), file=sys.stderr)
        return 1
    except (MultifrostError, OSError) as exc:
        if options.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

"""A trio parent: spawn a Python worker, call it, run calls in parallel in a nursery.

Run: ``python examples/trio_parent.py``. The worker is the packaged example
``multifrost_trio/examples/math_worker.py`` (a ``ChildWorker`` subclass: read it, it is short).
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

import multifrost_trio
from multifrost_trio import RemoteCallError, examples

MATH_WORKER = Path(examples.__file__).with_name("math_worker.py")


async def main() -> None:
    """Start the worker, use it, and stop it when the ``async with`` block ends."""
    # open_worker returns once the child answered its first heartbeat; leaving the block
    # stops it (shutdown, then SIGTERM/SIGKILL if needed) and reaps it, even on errors.
    async with multifrost_trio.open_worker(MATH_WORKER) as worker:
        print(f"functions: {', '.join(await worker.list_functions())}")

        # Two spellings of the same call.
        print(f"add(20, 22) = {await worker.call('add', 20, 22)}")
        print(f"factorial(10) = {await worker.call.factorial(10)}")

        # Calls are concurrent: five 0.5 s calls in one nursery take about 0.5 s, not 2.5 s.
        # The worker runs each async handler as its own trio task.
        results: dict[int, float] = {}

        async def square(x: int) -> None:
            results[x] = await worker.call.slow_square(x, 0.5)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for x in range(5):
                nursery.start_soon(square, x)
        elapsed = time.perf_counter() - started
        squares = [int(results[x]) for x in range(5)]
        parallel = "in parallel" if elapsed < 2.0 else "NOT in parallel"
        print(f"slow_square x5: {squares} in {elapsed:.1f} s ({parallel})")

        # The handler's exception comes back as RemoteCallError, with the remote traceback.
        try:
            await worker.call.divide(1, 0)
        except RemoteCallError as error:
            print(f"divide(1, 0) raised {error.remote_type}: {error.remote_message}")

        # print() in the worker reaches this process's stdout, prefixed with its name.
        print(await worker.call.greet("trio"))
    print("worker stopped")


if __name__ == "__main__":
    trio.run(main)

"""An asyncio application (``asyncio.run``) using the async API.

Run: ``python examples/asyncio_app.py``. ``multifrost_trio.open_worker`` is written against
anyio, so the same code runs under asyncio and trio. Under asyncio:

* concurrent calls are ordinary asyncio tasks (here an ``asyncio.TaskGroup``);
* a call that outlives its ``timeout`` option raises ``multifrost_trio.CallTimeout``, which
  *is* a ``TimeoutError``;
* ``asyncio.timeout()`` works too (it raises ``TimeoutError``); in both cases the worker is
  told to cancel the handler.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import multifrost_trio
from multifrost_trio import examples

MATH_WORKER = Path(examples.__file__).with_name("math_worker.py")


async def main() -> None:
    """Call the worker from asyncio code, then show both ways a timeout surfaces."""
    async with multifrost_trio.open_worker(MATH_WORKER) as worker:
        print(f"add(20, 22) = {await worker.call.add(20, 22)}")

        # Parallel calls: each is an asyncio task awaiting its own reply.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(worker.call.slow_square(x, 0.2)) for x in range(4)]
        print(f"slow_square x4 = {[int(task.result()) for task in tasks]}")

        # 1. The library's own timeout: a per-view call option.
        quick = worker.with_options(timeout=0.1)
        try:
            await quick.call.slow_square(3, 5.0)
        except TimeoutError as error:  # multifrost_trio.CallTimeout is a TimeoutError
            kind = type(error).__name__
            print(f"with_options(timeout=0.1): {kind} (a TimeoutError: True): {error}")

        # 2. asyncio's own deadline around any await, calls included.
        try:
            async with asyncio.timeout(0.1):
                await worker.call.slow_square(4, 5.0)
        except TimeoutError:
            print("asyncio.timeout(0.1): TimeoutError")

        # The worker is unharmed by the abandoned calls.
        print(f"still serving: add(1, 2) = {await worker.call.add(1, 2)}")
        snapshot = worker.metrics()
        print(f"timeouts: {snapshot.requests_timeout}, cancelled: {snapshot.requests_cancelled}")


if __name__ == "__main__":
    asyncio.run(main())

"""Cancellation crosses the process boundary: give up on a call, the worker stops it too.

Run: ``python examples/cancellation.py`` (uses ``examples/cancel_worker.py``).

A call is an ordinary trio checkpoint. When the caller's cancel scope (``move_on_after``,
``fail_after``, a nursery being cancelled, Ctrl-C) ends the wait, the parent sends a
``cancel`` message and the worker cancels the async handler running that call. Sync
handlers cannot be interrupted: they finish and their result is dropped.
"""

from __future__ import annotations

from pathlib import Path

import trio

import multifrost_trio
from multifrost_trio import CallTimeout

CANCEL_WORKER = Path(__file__).resolve().with_name("cancel_worker.py")


async def main() -> None:
    """Three ways to give up on slow calls, then the worker's own account of them."""
    async with multifrost_trio.open_worker(CANCEL_WORKER) as worker:
        # 1. A cancel scope around one call.
        with trio.move_on_after(0.2) as scope:
            await worker.call.slow(30)
        print(f"move_on_after(0.2): gave up = {scope.cancelled_caught}")
        report = await worker.call.report(1)  # arguments are positional on the wire
        print(f"worker: {report['cancelled']} cancelled, {report['finished']} finished")

        # 2. The timeout option: CallTimeout, and the handler is cancelled the same way.
        try:
            await worker.with_options(timeout=0.2).call.slow(30)
        except CallTimeout:
            print("with_options(timeout=0.2): CallTimeout")

        # 3. Cancelling a nursery cancels every call in flight inside it.
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(worker.call.slow, 30)
            await trio.sleep(0.2)  # let the five calls reach the worker
            nursery.cancel_scope.cancel()
        print("nursery cancelled with 5 calls in flight")

        report = await worker.call.report(7)
        print(
            f"worker: {report['started']} started, {report['cancelled']} cancelled, "
            f"{report['finished']} finished"
        )
        # A call that is allowed to finish still does.
        print(await worker.call.slow(0.05))


if __name__ == "__main__":
    trio.run(main)

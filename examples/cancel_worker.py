"""A worker for ``examples/cancellation.py``: a slow async call that counts its cancellations.

Started by a parent (``open_worker("examples/cancel_worker.py")``), not run by hand.
"""

from __future__ import annotations

import trio

from multifrost_trio import ChildWorker


class CancelWorker(ChildWorker):
    """``slow`` sleeps; when a parent gives up on it, trio cancels it here and we count it."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.cancelled = 0
        self.finished = 0

    async def slow(self, seconds: float) -> str:
        """Sleep ``seconds``; a caller's cancellation arrives here as ``trio.Cancelled``."""
        self.started += 1
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            self.cancelled += 1
            raise  # always let Cancelled propagate
        self.finished += 1
        return f"slept {seconds} s"

    async def report(self, expect_cancelled: int = 0, wait: float = 10.0) -> dict[str, int]:
        """Counts of started, cancelled and finished ``slow`` calls.

        The cancel message travels asynchronously, so this first waits (up to ``wait``
        seconds) until at least ``expect_cancelled`` cancellations were seen.
        """
        with trio.move_on_after(wait):
            while self.cancelled < expect_cancelled:
                await trio.sleep(0.01)
        return {"started": self.started, "cancelled": self.cancelled, "finished": self.finished}


if __name__ == "__main__":
    CancelWorker().run()

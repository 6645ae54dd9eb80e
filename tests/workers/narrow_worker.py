"""Test worker with room for only 4 handlers at once: calls queue in the backlog."""

from __future__ import annotations

import trio

from multifrost_trio import ChildWorker, inline


class NarrowWorker(ChildWorker):
    async def add_async(self, a: int, b: int) -> int:
        return a + b

    async def nap(self, seconds: float, value: int) -> int:
        await trio.sleep(seconds)
        return value

    def add_sync(self, a: int, b: int) -> int:
        return a + b

    @inline
    def bookkeeping(self) -> dict[str, int]:
        """The worker's own accounting of calls in progress (all 0 when it is idle)."""
        return {
            "active": self._active,
            "runners": self._runners,
            "summoned": self._summoned,
            "ready": len(self._ready),
            "backlog": len(self._backlog),
            "running": len(self._running),
            "sync_jobs": len(self._sync_jobs),
        }


if __name__ == "__main__":
    NarrowWorker(max_concurrency=4).run()

"""Worker for the benchmarks: the same ``add`` as async, inline and threaded handlers."""

from __future__ import annotations

import time

from multifrost_trio import ChildWorker, inline


class BenchWorker(ChildWorker):
    async def add_async(self, a: int, b: int) -> int:
        return a + b

    @inline
    def add_inline(self, a: int, b: int) -> int:
        return a + b

    def add_sync(self, a: int, b: int) -> int:
        return a + b

    @inline
    def cpu(self) -> float:
        """CPU seconds this worker process has used (for per-call cost measurements)."""
        return time.process_time()


if __name__ == "__main__":
    BenchWorker().run()

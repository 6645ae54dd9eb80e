"""Worker for the benchmarks: the same ``add`` as async, inline and threaded handlers."""

from __future__ import annotations

from multifrost_trio import ChildWorker, inline


class BenchWorker(ChildWorker):
    async def add_async(self, a: int, b: int) -> int:
        return a + b

    @inline
    def add_inline(self, a: int, b: int) -> int:
        return a + b

    def add_sync(self, a: int, b: int) -> int:
        return a + b


if __name__ == "__main__":
    BenchWorker().run()

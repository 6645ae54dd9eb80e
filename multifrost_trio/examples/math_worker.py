"""A small worker: arithmetic, a slow call and a failing one (used by ``multifrost-trio demo``)."""

from __future__ import annotations

import trio

from multifrost_trio import ChildWorker, inline


class MathWorker(ChildWorker):
    """Arithmetic over the wire."""

    @inline
    def add(self, a: float, b: float) -> float:
        """a + b, run inline: far cheaper than a thread hand-off."""
        return a + b

    def factorial(self, n: int) -> int:
        """n! computed on a worker thread (large n keeps the CPU busy)."""
        result = 1
        for k in range(2, n + 1):
            result *= k
        return result

    async def slow_square(self, x: float, seconds: float = 0.5) -> float:
        """x * x after ``seconds``: cancellable, like every async handler."""
        await trio.sleep(seconds)
        return x * x

    def divide(self, a: float, b: float) -> float:
        """a / b; b == 0 raises ZeroDivisionError in the parent as RemoteCallError."""
        return a / b

    def greet(self, name: str) -> str:
        """Prints a line (forwarded to the parent) and returns a greeting."""
        print(f"greeting {name}")
        return f"Hello, {name}!"


if __name__ == "__main__":
    MathWorker().run()

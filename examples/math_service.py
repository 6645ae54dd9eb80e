"""A connect-mode service: binds a loopback port, registers as "math-service", serves anyone.

    python examples/math_service.py          # then, elsewhere: python examples/connect_caller.py

Stop it with Ctrl-C or SIGTERM: it unregisters itself on the way out. A caller's
``shutdown`` message does not stop it (it is shared); ``allow_remote_shutdown=True`` would.
"""

from __future__ import annotations

from multifrost_trio import ChildWorker, inline


class MathService(ChildWorker):
    @inline
    def add(self, a: float, b: float) -> float:
        return a + b

    def greet(self, name: str) -> str:
        print(f"greeting {name}")  # goes to the caller that asked, and only to it
        return f"Hello, {name}!"


if __name__ == "__main__":
    MathService(service_id="math-service").run()

"""Use a worker from a plain script, no ``async``: the blocking API in ``multifrost_trio.sync``.

Run: ``python examples/blocking_script.py``. The worker is the packaged example
``multifrost_trio/examples/math_worker.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from multifrost_trio import CallTimeout, RemoteCallError, examples
from multifrost_trio.sync import open_worker

MATH_WORKER = Path(examples.__file__).with_name("math_worker.py")


def main() -> None:
    """Start the worker, call it a few ways, and stop it when the block ends."""
    with open_worker(MATH_WORKER) as worker:
        print(f"add(20, 22) = {worker.call('add', 20, 22)}")
        print(f"factorial(20) = {worker.call.factorial(20)}")

        try:
            worker.call.divide(1, 0)
        except RemoteCallError as error:
            print(f"divide(1, 0) failed: {error}")

        try:
            worker.with_options(timeout=0.1).call.slow_square(3, 5.0)
        except CallTimeout:
            print("slow_square timed out after 0.1 s (the worker cancelled it)")

        # Several threads may share one worker: these eight calls overlap.
        with ThreadPoolExecutor(8) as pool:
            squares = list(pool.map(lambda x: worker.call.slow_square(x, 0.2), range(8)))
        print(f"threads: {[int(s) for s in squares]}")

        # The worker's print() shows up here, prefixed with its name.
        print(worker.call.greet("Ada"))
        print(f"functions: {', '.join(worker.list_functions())}")


if __name__ == "__main__":
    main()

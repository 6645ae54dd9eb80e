"""A Python parent calling a Node.js worker: the same protocol, another language.

Run: ``python examples/node_worker.py [path/to/worker.mjs]``. The default worker is
``tests/node/worker.mjs`` in this repository, a Multifrost v4 worker written in plain
Node.js. It needs its npm packages once: ``cd tests/node && npm install``.

``open_worker`` starts ``.js``/``.mjs`` scripts with ``node`` (found on PATH); the calls,
errors and output forwarding are the same as with a Python worker.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import trio

import multifrost_trio
from multifrost_trio import RemoteCallError

DEFAULT_WORKER = Path(__file__).resolve().parent.parent / "tests" / "node" / "worker.mjs"


async def main(script: Path) -> None:
    """Call the Node worker a few ways."""
    async with multifrost_trio.open_worker(script) as worker:
        print(f"node worker pid {worker.pid}; functions: {await worker.list_functions()}")
        print(f"add(20, 22) = {await worker.call.add(20, 22)}")
        # Values cross the language boundary: maps, lists, bytes, big ints.
        value = {"text": "héllo", "list": [1, 2.5, None], "raw": b"\x00\xff", "big": 2**40}
        print(f"echo round trip equal: {await worker.call.echo(value) == value}")
        # The worker's stdout message is printed here with a "[worker.mjs STDOUT]" prefix.
        print(await worker.call.hello("python"))
        # A JavaScript exception arrives as RemoteCallError, with the JS stack trace.
        try:
            await worker.call.fail("thrown in node")
        except RemoteCallError as error:
            print(f"fail() raised {error.remote_type}: {error.remote_message}")


def run() -> int:
    """Check the prerequisites, then run :func:`main`; returns the exit status."""
    script = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_WORKER
    if shutil.which("node") is None:
        print("this example needs Node.js (`node` on PATH)", file=sys.stderr)
        return 2
    if not script.is_file():
        print(f"no such worker script: {script}", file=sys.stderr)
        return 2
    if script == DEFAULT_WORKER and not (script.parent / "node_modules").is_dir():
        print(f"run `npm install` in {script.parent} first", file=sys.stderr)
        return 2
    trio.run(main, script)
    return 0


if __name__ == "__main__":
    sys.exit(run())

"""A parent with three workers for the Ctrl-C test: prints the children's pids, then waits."""

import sys

import trio

from multifrost_trio import SpawnOptions, open_worker


async def main() -> None:
    options = SpawnOptions(output=lambda stream, line: None)
    async with (
        open_worker(sys.argv[1], options=options) as a,
        open_worker(sys.argv[1], options=options) as b,
        open_worker(sys.argv[1], options=options) as c,
    ):
        print(a.pid, b.pid, c.pid, flush=True)
        async with trio.open_nursery() as nursery:
            for worker in (a, b, c):
                nursery.start_soon(worker.call, "sleep", 60)


trio.run(main)

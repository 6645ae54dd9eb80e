"""A parent with three workers for the Ctrl-C test: starts a long call on each, and once
everything waits, prints the children's pids."""

import sys

import trio
import trio.testing

from multifrost_trio import SpawnOptions, open_worker


async def main() -> None:
    options = SpawnOptions(output=lambda stream, line: None)
    async with (
        open_worker(sys.argv[1], options=options) as a,
        open_worker(sys.argv[1], options=options) as b,
        open_worker(sys.argv[1], options=options) as c,
        trio.open_nursery() as nursery,
    ):
        for worker in (a, b, c):
            nursery.start_soon(worker.call, "sleep", 60)
        # Only then may Ctrl-C come: trio's start_soon is not safe against it (a
        # KeyboardInterrupt between adding a task and scheduling it leaves a task that
        # never runs, and the nursery waits for it forever).
        await trio.testing.wait_all_tasks_blocked()
        print(a.pid, b.pid, c.pid, flush=True)


trio.run(main)

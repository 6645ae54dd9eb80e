"""A parent process for the no-orphans test: starts a worker, prints its pid, waits forever."""

import sys

import trio

from multifrost_trio import SpawnOptions, open_worker


async def main() -> None:
    async with open_worker(sys.argv[1], options=SpawnOptions(heartbeat_interval=0)) as worker:
        print(worker.pid, flush=True)
        await trio.sleep_forever()


trio.run(main)

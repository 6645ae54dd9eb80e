"""Call the running "math-service" (see math_service.py), found in the service registry.

python examples/connect_caller.py
"""

from __future__ import annotations

import trio

from multifrost_trio import connect_worker


async def main() -> None:
    # Waits up to 5 s for the name to appear, then for the service to answer a heartbeat.
    async with connect_worker("math-service", timeout=5.0) as service:
        print(f"connected to pid {service.pid}; functions: {await service.list_functions()}")
        print(f"add(20, 22) -> {await service.call.add(20, 22)}")
        print(f"greet('Ada') -> {await service.call.greet('Ada')}")
        print(f"heartbeat round trip: {await service.ping():.2f} ms")
    # Leaving the block only disconnects: the service keeps running for other callers.


if __name__ == "__main__":
    trio.run(main)

"""Metrics and health of a worker: counters, latencies, heartbeats and the circuit breaker.

Run: ``python examples/metrics_and_health.py``. Uses the packaged example worker.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio

import multifrost_trio
from multifrost_trio import CallTimeout, RemoteCallError, examples

MATH_WORKER = Path(examples.__file__).with_name("math_worker.py")


async def main() -> None:
    """Make successful, failing and timed-out calls, then read what the worker recorded."""
    # Heartbeats every 0.2 s here so a few are measured during this short run
    # (the default is every 5 s; a worker that misses 3 in a row is unhealthy).
    options = multifrost_trio.SpawnOptions(heartbeat_interval=0.2)
    async with multifrost_trio.open_worker(MATH_WORKER, options=options) as worker:
        for i in range(100):
            await worker.call.add(i, 1)
        with contextlib.suppress(RemoteCallError):
            await worker.call.divide(1, 0)  # counted in requests_failed
        with contextlib.suppress(CallTimeout):
            await worker.with_options(timeout=0.05).call.slow_square(2, 5.0)  # requests_timeout
        await trio.sleep(0.5)  # a couple of heartbeats

        snapshot = worker.metrics()  # a frozen dataclass: read it at leisure
        print(f"requests_total: {snapshot.requests_total}")
        print(f"requests_success: {snapshot.requests_success}")
        print(f"requests_failed: {snapshot.requests_failed}")
        print(f"requests_timeout: {snapshot.requests_timeout}")
        print(f"success_rate: {snapshot.success_rate:.3f}")
        print(f"latency_p50_ms: {snapshot.latency_p50_ms:.3f}")
        print(f"latency_p99_ms: {snapshot.latency_p99_ms:.3f}")
        print(f"in_flight: {snapshot.in_flight}")
        print(f"circuit_breaker_state: {snapshot.circuit_breaker_state}")
        add = snapshot.functions["add"]
        print(f"functions['add']: {add.requests_success} ok, p50 {add.latency_p50_ms:.3f} ms")

        # Health, as the parent sees it right now.
        print(f"is_healthy: {worker.is_healthy}")
        rtt = worker.last_heartbeat_rtt_ms
        print(f"last_heartbeat_rtt_ms: {rtt:.3f}" if rtt is not None else "no heartbeat yet")
        print(f"circuit_open: {worker.circuit_open}")
        # An explicit heartbeat: its round trip in ms (bound it with a cancel scope).
        with trio.fail_after(5):
            print(f"ping: {await worker.ping():.3f} ms")


if __name__ == "__main__":
    trio.run(main)

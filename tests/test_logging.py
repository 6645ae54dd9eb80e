"""The library is silent unless the application configures logging."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import worker_path

SCRIPT = """
import sys, trio
import multifrost_trio as mf

async def main():
    options = mf.SpawnOptions(heartbeat_interval=0.05, heartbeat_timeout=0.5)
    async with mf.open_worker(sys.argv[1], options=options) as worker:
        assert await worker.call.add(1, 2) == 3
        try:
            await worker.call.fail("x")
        except mf.RemoteCallError:
            pass
        try:
            await worker.with_options(timeout=0.05).call.sleep(5)
        except mf.CallTimeout:
            pass
        await trio.sleep(0.2)  # let a few heartbeats go by
    print("done")

if len(sys.argv) > 2:
    import logging
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
trio.run(main)
"""


def _run(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, worker_path("echo_worker.py"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_nothing_on_stderr_without_logging_configured() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == ""


def test_events_are_logged_under_multifrost_trio_when_configured() -> None:
    done = _run("--log")
    assert done.returncode == 0, done.stderr
    assert "multifrost_trio" in done.stderr
    assert "ready" in done.stderr

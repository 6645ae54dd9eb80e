"""Shared fixtures: worker script paths, the anyio backends, and a no-orphans check."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parent / "workers"

# A shell starts background jobs with SIGINT ignored, and processes inherit that: Python
# then installs no KeyboardInterrupt handler, and the Ctrl-C tests (which signal this
# process or its children) could not pass. Restored so the suite runs the same either way.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def worker_path(name: str) -> str:
    """Path of a test worker script in tests/workers/."""
    return str(WORKERS / name)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run parent-side tests on both backends."""
    return str(request.param)


def _children() -> set[int]:
    """Live (non-zombie) child processes of this test process."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state != "Z":
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every test must reap what it spawned; a survivor fails the test (and is killed)."""
    before = _children() if sys.platform == "linux" else set()
    yield
    if sys.platform != "linux":
        return
    left = _children() - before
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"test left child processes behind: {sorted(left)}"

"""Test worker that ignores shutdown and SIGTERM (must be SIGKILLed)."""

from __future__ import annotations

import signal

from multifrost_trio import ChildWorker


class StubbornWorker(ChildWorker):
    async def ping(self) -> str:
        return "pong"

    def _stop(self) -> None:  # ignore shutdown requests and signals
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    StubbornWorker().run()

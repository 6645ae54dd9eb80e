"""Test worker for connect mode: a long-running service that parents find by name or address.

    python service_worker.py [--service-id NAME] [--bind ADDR] [--registry-dir DIR]
                             [--curve-secret PATH --curve-allowed DIR] [--allow-shutdown]

Each option can also come from the environment (``SERVICE_ID``, ``SERVICE_BIND``,
``MULTIFROST_REGISTRY_DIR`` is read by the library itself, ``SERVICE_CURVE_SECRET``,
``SERVICE_CURVE_ALLOWED``, ``SERVICE_ALLOW_SHUTDOWN=1``). Only key *file paths* are taken,
never key text. Prints nothing to stdout.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from multifrost_trio import ChildWorker, CurveServer, inline


class Boom(BaseException):
    """Escapes the handler's ``except Exception``: takes the whole worker down."""


class ServiceWorker(ChildWorker):
    @inline
    def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, value: Any) -> Any:
        return value

    async def sleep(self, seconds: float) -> str:
        await trio.sleep(seconds)
        return "slept"

    @inline
    def stats(self) -> dict[str, int]:
        return asdict(self.counters)

    @inline
    def pid(self) -> int:
        return os.getpid()

    def shout(self, text: str) -> str:
        """Prints (only when called): what the worker prints is forwarded to parents."""
        print(text)
        return text

    async def explode(self) -> None:
        """Tear the serving loop down with an exception (tests the unregister-on-error path)."""
        await trio.sleep(0)
        raise Boom("explode() was called")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service-id", default=env("SERVICE_ID"))
    parser.add_argument("--bind", default=env("SERVICE_BIND"))
    parser.add_argument("--registry-dir", default=None)
    parser.add_argument("--curve-secret", default=env("SERVICE_CURVE_SECRET"))
    parser.add_argument("--curve-allowed", default=env("SERVICE_CURVE_ALLOWED"))
    parser.add_argument(
        "--allow-shutdown", action="store_true", default=env("SERVICE_ALLOW_SHUTDOWN") == "1"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.curve_allowed and not args.curve_secret:
        parser.error("--curve-allowed needs --curve-secret")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    curve = None
    if args.curve_secret:
        allowed = Path(args.curve_allowed) if args.curve_allowed else None
        curve = CurveServer(Path(args.curve_secret), allowed_clients=allowed)
    worker = ServiceWorker(
        service_id=args.service_id,
        bind=args.bind,
        registry_dir=args.registry_dir,
        curve=curve,
        allow_remote_shutdown=True if args.allow_shutdown else None,
    )
    worker.run()


if __name__ == "__main__":
    main()

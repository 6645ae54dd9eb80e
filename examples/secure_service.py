"""CURVE encryption and a client allow-list, end to end on this machine.

    python examples/secure_service.py

It writes key pairs into a temporary directory (as ``multifrost-trio keygen`` does), starts
this same file as a service that only lets the allowed client in, and connects twice: once
with the allowed key (works) and once with a key that is not on the list (refused). Over a
real network the service would bind e.g. ``tcp://0.0.0.0:5555`` and callers would use
``connect_worker(endpoint="tcp://host:5555", curve=...)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from multifrost_trio import (
    ChildWorker,
    CurveClient,
    CurveServer,
    WorkerStartError,
    connect_worker,
    generate_keypair,
    inline,
)


class SecretMath(ChildWorker):
    @inline
    def add(self, a: float, b: float) -> float:
        return a + b


def serve(keys: Path) -> None:
    """The service side: only clients whose public key is in keys/allowed get in."""
    curve = CurveServer(
        secret_key_file=keys / "server" / "id.key_secret", allowed_clients=keys / "allowed"
    )
    SecretMath(service_id="secret-math", curve=curve).run()


async def call(keys: Path) -> None:
    server_public = keys / "server" / "id.key"
    allowed = CurveClient(server_public, keys / "alice" / "id.key_secret")
    async with connect_worker("secret-math", curve=allowed, timeout=10) as service:
        print(f"alice (allowed): add(2, 3) -> {await service.call.add(2, 3)}")
    stranger = CurveClient(server_public, keys / "mallory" / "id.key_secret")
    try:
        async with connect_worker("secret-math", curve=stranger, timeout=1):
            print("mallory got in (this must not happen)")
    except WorkerStartError:
        print("mallory (not on the allow-list): refused")


def main() -> None:
    keys = Path(tempfile.mkdtemp(prefix="multifrost-keys-"))
    registry = Path(tempfile.mkdtemp(prefix="multifrost-registry-"))
    try:
        for who in ("server", "alice", "mallory"):
            generate_keypair(keys / who)
        (keys / "allowed").mkdir()
        shutil.copy(keys / "alice" / "id.key", keys / "allowed" / "alice.key")
        env = {**os.environ, "MULTIFROST_REGISTRY_DIR": str(registry)}
        # Only key *file paths* cross the process boundary, never the keys themselves.
        service = subprocess.Popen([sys.executable, __file__, "--serve", str(keys)], env=env)
        try:
            os.environ["MULTIFROST_REGISTRY_DIR"] = str(registry)
            trio.run(call, keys)
        finally:
            service.terminate()
            service.wait(timeout=10)
    finally:
        shutil.rmtree(keys)
        shutil.rmtree(registry)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
    else:
        main()

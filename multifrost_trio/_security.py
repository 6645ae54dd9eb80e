"""CURVE encryption and a ZAP allow-list of client keys, for workers reached over a network.

Keys live in files written by :func:`generate_keypair` (``<name>.key`` public,
``<name>.key_secret`` secret, pyzmq's certificate format). Only file paths are ever passed
around, so a secret key never appears in a process's argv or environment. A secret key file
that others may read is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth

from ._errors import MultifrostError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


class SecurityError(MultifrostError):
    """A key file is missing, malformed or readable by others; raised before connecting
    or binding."""


def generate_keypair(directory: str | os.PathLike[str], name: str = "id") -> tuple[Path, Path]:
    """Write a new CURVE key pair into ``directory`` (created 0700): returns the paths of
    the public (``<name>.key``, 0644) and secret (``<name>.key_secret``, 0600) files."""
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def _load(path: str | os.PathLike[str], *, secret: bool) -> tuple[bytes, bytes | None]:
    file = Path(path)
    try:
        mode = file.stat().st_mode
        public_key, secret_key = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot load CURVE key file {file}: {exc}") from None
    if secret:
        if secret_key is None:
            raise SecurityError(f"{file} holds no secret key (use the .key_secret file)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecurityError(
                f"{file} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                "chmod 600 it first"
            )
    return public_key, secret_key


@dataclass(frozen=True)
class CurveServer:
    """A worker's CURVE identity and who may talk to it.

    ``secret_key_file``: the worker's ``.key_secret`` file. ``allowed_clients``: a directory
    of client public ``.key`` files; only those clients get through (ZAP). None lets any
    client with the worker's public key in (encryption without an allow-list).
    """

    secret_key_file: Path
    allowed_clients: Path | None = None

    def apply(self, sock: zmq.Socket[Any]) -> ThreadAuthenticator | None:
        """Make ``sock`` a CURVE server; returns the running authenticator (stop it later)."""
        public_key, secret_key = _load(self.secret_key_file, secret=True)
        authenticator = None
        if self.allowed_clients is not None:
            if not Path(self.allowed_clients).is_dir():
                raise SecurityError(f"allowed-clients directory {self.allowed_clients} is missing")
            # Imported here: it pulls in asyncio, which no spawn-mode child needs at start-up.
            from zmq.auth.thread import ThreadAuthenticator

            authenticator = ThreadAuthenticator(sock.context)
            authenticator.start()
            authenticator.configure_curve(domain="*", location=str(self.allowed_clients))
        sock.curve_secretkey = secret_key
        sock.curve_publickey = public_key
        sock.curve_server = True
        return authenticator


@dataclass(frozen=True)
class CurveClient:
    """A caller's CURVE identity and the worker it expects.

    ``server_public_key_file``: the worker's public ``.key`` file. ``secret_key_file``: the
    caller's own ``.key_secret`` file (its public key must be on the worker's allow-list).
    """

    server_public_key_file: Path
    secret_key_file: Path

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of that server."""
        server_key, _ = _load(self.server_public_key_file, secret=False)
        public_key, secret_key = _load(self.secret_key_file, secret=True)
        sock.curve_serverkey = server_key
        sock.curve_publickey = public_key
        sock.curve_secretkey = secret_key

"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (trio and asyncio backends, Node.js interop included)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, with the ASYNC rules."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "multifrost_trio")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".", "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Latency and throughput against a raw pyzmq floor measured in the same run."""
    session.install("-e", ".")
    session.run("python", "benchmarks/bench_rpc.py", *session.posargs)

"""The library at a git revision against the working tree, block after block: how a change
to the hot path is judged here (comparing separate ``bench_rpc.py`` runs is not enough, as
one run's ratio moves by several hundredths on a shared machine).

``--side parent``: this process imports both versions (the old one extracted with ``git
archive`` under another package name) and calls one connect-mode worker through each, so
the two parents differ only in their code. Reported: the parent's CPU per call and the wall
time per call, new/old.

``--side worker``: one parent calls two spawned workers, one running each version. Separate
processes differ among themselves by a few per cent (memory layout, hash seed), so each of
``--runs`` runs makes a fresh pair and the median of the runs' ratios is reported. The
worker's CPU is its main thread's (``time.thread_time``).

    python benchmarks/bench_ab.py REV [--side parent|worker] [--mode seq|tput]
        [--function add_async] [--blocks 30] [--runs 3]

A null comparison (REV = HEAD, clean tree) shows the noise: here single runs of 30 block
pairs fall within about 3 % of 1 on either side, and medians of three runs within 2.5 %;
a change of a few lines per call is below that, and shows only in line counts and stamps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TREE_ENV = "BENCH_AB_TREE"
"""Set in a worker process started by this script: the directory to import the library from."""
BIND_ENV = "BENCH_AB_BIND"
"""Set when that worker serves in connect mode; it prints its endpoint."""
OLD_PACKAGE = "multifrost_trio_old"
SEQ_CALLS = 300
TPUT_CALLS = 3000
IN_FLIGHT = 100
PARENT_RUN_FLAG = "--parent-run"


def _serve(tree: str) -> None:
    """Worker process: the benchmark worker on the library found in ``tree``, with a
    ``cpu`` function giving its main thread's CPU seconds."""
    sys.path[:0] = [tree, str(HERE)]
    from bench_worker import BenchWorker

    import multifrost_trio

    assert Path(multifrost_trio.__file__).is_relative_to(tree), multifrost_trio.__file__

    class Worker(BenchWorker):
        @multifrost_trio.inline
        def cpu(self) -> float:
            return time.thread_time()

    if not os.environ.get(BIND_ENV):
        Worker().run()
        return

    async def serve_printing_endpoint() -> None:
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(Worker(bind="tcp://127.0.0.1:0").serve)
            print(endpoint, flush=True)

    trio.run(serve_printing_endpoint)


def _extract(rev: str, into: Path, package: str) -> None:
    """The library at ``rev``, as ``into/<package>``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "multifrost_trio"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if package != "multifrost_trio":
        (into / "multifrost_trio").rename(into / package)


async def _block(call: Callable[..., Awaitable[Any]], function: str, mode: str) -> float:
    """Seconds per call of one block: sequential calls, or IN_FLIGHT chains of calls."""

    async def chain(calls: int) -> None:
        for i in range(calls):
            await call(function, i, 1)

    start = time.perf_counter()
    if mode == "seq":
        await chain(SEQ_CALLS)
        return (time.perf_counter() - start) / SEQ_CALLS
    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(chain, TPUT_CALLS // IN_FLIGHT)
    return (time.perf_counter() - start) / TPUT_CALLS


async def _paired(
    blocks: int, measure: Callable[[str], Awaitable[tuple[float, float]]]
) -> tuple[float, float]:
    """(CPU new/old over all blocks, median of the blocks' wall-time ratios new/old); the
    order alternates from block to block. ``measure(side)`` gives (cpu, wall) of a block."""
    for side in ("old", "new"):  # warm-up
        await measure(side)
    cpu = {"old": 0.0, "new": 0.0}
    walls: dict[str, list[float]] = {"old": [], "new": []}
    for index in range(blocks):
        for side in ("old", "new") if index % 2 else ("new", "old"):
            spent, wall = await measure(side)
            cpu[side] += spent
            walls[side].append(wall)
    ratios = [new / old for new, old in zip(walls["new"], walls["old"], strict=True)]
    return cpu["new"] / cpu["old"], statistics.median(ratios)


async def _parent_side(
    args: argparse.Namespace, scratch: Path, endpoint: str
) -> tuple[float, float]:
    sys.path[:0] = [str(scratch), str(ROOT)]
    import multifrost_trio_old as old  # type: ignore[import-not-found]

    import multifrost_trio as new

    assert Path(new.__file__).is_relative_to(ROOT), new.__file__

    async with (
        old.connect_worker(endpoint=endpoint) as old_worker,
        new.connect_worker(endpoint=endpoint) as new_worker,
    ):
        workers = {"old": old_worker, "new": new_worker}

        async def measure(side: str) -> tuple[float, float]:
            cpu = time.thread_time()
            wall = await _block(workers[side].call, args.function, args.mode)
            return (time.thread_time() - cpu), wall

        return await _paired(args.blocks, measure)


async def _worker_side(args: argparse.Namespace, scratch: Path, run: int) -> tuple[float, float]:
    import multifrost_trio as mf

    trees = {"old": str(scratch), "new": str(ROOT)}
    first, second = ("old", "new") if run % 2 else ("new", "old")  # who starts first
    async with (
        mf.open_worker(__file__, options=mf.SpawnOptions(env={TREE_ENV: trees[first]})) as one,
        mf.open_worker(__file__, options=mf.SpawnOptions(env={TREE_ENV: trees[second]})) as two,
    ):
        workers = {first: one, second: two}

        async def measure(side: str) -> tuple[float, float]:
            worker = workers[side]
            cpu = await worker.call("cpu")
            wall = await _block(worker.call, args.function, args.mode)
            return (await worker.call("cpu") - cpu), wall

        return await _paired(args.blocks, measure)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("rev", help="the old code: a git revision of this repository")
    parser.add_argument("--side", choices=("parent", "worker"), default="worker")
    parser.add_argument("--mode", choices=("seq", "tput"), default="seq")
    parser.add_argument("--function", default="add_async")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args(argv)


def _one_run(args: argparse.Namespace, run: int) -> tuple[float, float]:
    scratch = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    try:
        _extract(args.rev, scratch, OLD_PACKAGE if args.side == "parent" else "multifrost_trio")
        if args.side == "worker":
            return trio.run(_worker_side, args, scratch, run)
        env = {**os.environ, TREE_ENV: str(ROOT), BIND_ENV: "1"}
        with subprocess.Popen(
            [sys.executable, __file__], env=env, stdout=subprocess.PIPE, text=True
        ) as server:
            assert server.stdout is not None
            endpoint = server.stdout.readline().strip()
            try:
                return trio.run(_parent_side, args, scratch, endpoint)
            finally:
                server.terminate()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    args = _arguments(sys.argv[1:])
    results = []
    for run in range(args.runs):
        if args.side == "parent":
            # A process can import the old tree once: each run of this side is a process.
            command = [sys.executable, __file__, PARENT_RUN_FLAG, *sys.argv[1:]]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            cpu, wall = (float(x) for x in done.stdout.split())
        else:
            cpu, wall = _one_run(args, run)
        results.append((cpu, wall))
        print(f"run {run + 1}: cpu new/old {cpu:.3f}, wall new/old {wall:.3f}", flush=True)
    print(
        f"{args.side} side, {args.mode} {args.function}, {args.blocks} block pairs x "
        f"{args.runs} runs: median cpu new/old "
        f"{statistics.median(c for c, _ in results):.3f}, "
        f"wall new/old {statistics.median(w for _, w in results):.3f}"
    )


if __name__ == "__main__":
    if os.environ.get(TREE_ENV):
        _serve(os.environ[TREE_ENV])
    elif sys.argv[1:2] == [PARENT_RUN_FLAG]:
        print(*_one_run(_arguments(sys.argv[2:]), 0))
    else:
        main()

"""The ``multifrost-trio`` command line (also ``python -m multifrost_trio``).

Commands: ``demo`` (spawn the packaged example worker and call it), ``call`` (one call, the
result printed as JSON), ``list`` (a worker's functions) and ``bench`` (latency and
throughput at 1, 10 and 100 calls in flight). ``--help`` works on each.

A *target* names the worker: a script path (spawned, like :func:`open_worker`), a service
name or a ``tcp://`` endpoint (connect mode, when the package has ``connect_worker``).
:func:`_open_target` is the one place that decides.

``call`` prints its result as one JSON document on stdout; bytes, which JSON lacks, are
printed as base64 strings (``--bytes hex|repr`` for other spellings). Worker output goes to
stderr, prefixed with the worker's name, so stdout stays parseable.

Exit status: 0 on success, 1 on any error (a remote error included), 2 on a usage error
(argparse's convention), 130 on Ctrl-C. Errors are one line on stderr (a remote error is
followed by the worker's traceback); ``--debug`` adds the local traceback.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TextIO

import trio

from . import examples
from ._errors import MultifrostError, RemoteCallError, WorkerDied
from ._parent import SpawnOptions, Stream, Worker
from ._spawn import open_worker

DEMO_WORKER: Final = Path(examples.__file__).with_name("math_worker.py")

SCRIPT_SUFFIXES: Final = (".py", ".js", ".mjs", ".cjs", ".ts")
"""A target ending with one of these is a worker script (spawned), never a service name."""

ENDPOINT_SCHEMES: Final = ("tcp://",)
"""Endpoint prefixes a target may use to name a listening worker (connect mode)."""

_SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]*")
"""What a bare service name looks like: no path separator, no scheme."""

BytesMode = Literal["base64", "hex", "repr"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130

DEFAULT_IN_FLIGHT: Final = (1, 10, 100)
_BAR_WIDTH: Final = 30
_BAR_REFRESH_SECONDS: Final = 0.1


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# --------------------------------------------------------------------------- targets


def _worker_output(stream: Stream, line: str, *, name: str) -> None:
    """Worker output goes to stderr, so stdout carries nothing but the command's result."""
    print(f"[{name} {stream.upper()}]: {line}", file=sys.stderr, flush=True)


def _cli_options(target: str, timeout: float | None = None) -> SpawnOptions:
    """The options every command uses: worker output on stderr, optional call timeout."""
    name = Path(target).name or target

    def sink(stream: Stream, line: str) -> None:
        _worker_output(stream, line, name=name)

    return SpawnOptions(output=sink, timeout=timeout)


def _is_script(target: str) -> bool:
    """A target is a script if it has a script suffix or is an existing file."""
    return target.lower().endswith(SCRIPT_SUFFIXES) or Path(target).is_file()


def _open_target(target: str, options: SpawnOptions) -> AbstractAsyncContextManager[Worker]:
    """An async context manager yielding a :class:`Worker` for ``target``.

    * a script (known suffix or an existing file): spawned with :func:`open_worker`;
    * a ``tcp://`` endpoint or a bare service name: ``connect_worker`` if this version of
      ``multifrost_trio`` has it, else a :class:`CliError` saying connect mode is missing.

    Raises :class:`CliError` for a script that does not exist or a target that is neither.
    """
    if _is_script(target):
        if not Path(target).is_file():
            raise CliError(f"no such worker script: {target}")
        return open_worker(target, options=options)
    is_endpoint = target.startswith(ENDPOINT_SCHEMES)
    if not is_endpoint and "://" in target:
        scheme = target.split("://", 1)[0]
        raise CliError(f"unsupported endpoint {target!r}: only tcp:// is supported, not {scheme}")
    if not is_endpoint and not _SERVICE_NAME.fullmatch(target):
        raise CliError(f"no such worker script: {target}")
    import multifrost_trio  # the package itself: connect_worker may be added to it later

    connect = getattr(multifrost_trio, "connect_worker", None)
    if connect is None:
        kind = "endpoint" if is_endpoint else "service name"
        raise CliError(
            f"{target!r} is not a script file; it would be a {kind}, but connect mode "
            "is not available yet in this version of multifrost_trio"
        )
    kwargs: dict[str, Any] = {}
    if _accepts_keyword(connect, "options"):
        kwargs["options"] = options
    if is_endpoint:
        return connect(endpoint=target, **kwargs)  # type: ignore[no-any-return]
    return connect(target, **kwargs)  # type: ignore[no-any-return]


def _accepts_keyword(func: Any, name: str) -> bool:
    """Whether ``func`` takes a keyword argument ``name`` (False if it cannot be told)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    if name in parameters:
        return parameters[name].kind is not inspect.Parameter.POSITIONAL_ONLY
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# --------------------------------------------------------------------------- values


def _parse_arg(text: str) -> Any:
    """A command-line argument: JSON if it parses (``2``, ``"x"``, ``[1]``), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _jsonable(value: Any, bytes_mode: BytesMode) -> Any:
    """``value`` with what JSON cannot hold converted: bytes per ``bytes_mode``, tuples as
    lists, map keys as strings, anything else unknown as its ``repr``."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if bytes_mode == "base64":
            return base64.b64encode(raw).decode("ascii")
        if bytes_mode == "hex":
            return raw.hex()
        return repr(raw)
    if isinstance(value, list | tuple):
        return [_jsonable(item, bytes_mode) for item in value]
    if isinstance(value, dict):
        return {_json_key(key, bytes_mode): _jsonable(v, bytes_mode) for key, v in value.items()}
    return repr(value)


def _json_key(key: Any, bytes_mode: BytesMode) -> str:
    if isinstance(key, str):
        return key
    converted = _jsonable(key, bytes_mode)
    return converted if isinstance(converted, str) else json.dumps(converted)


def _dump(value: Any, bytes_mode: BytesMode = "base64") -> str:
    """One JSON document for ``value`` (non-ASCII text kept readable)."""
    return json.dumps(_jsonable(value, bytes_mode), ensure_ascii=False)


# --------------------------------------------------------------------------- commands


async def _demo() -> None:
    print(f"spawning {DEMO_WORKER.name} ...")
    async with open_worker(DEMO_WORKER) as worker:
        print(f"worker ready (pid {worker.pid}); functions: {await worker.list_functions()}")
        print(f"add(20, 22)        -> {await worker.call('add', 20, 22)}")
        print(f"factorial(20)      -> {await worker.call.factorial(20)}")
        print(f"greet('trio')      -> {await worker.call.greet('trio')}")
        async with trio.open_nursery() as nursery:
            squares: list[float] = []

            async def square(x: int) -> None:
                squares.append(await worker.call.slow_square(x, 0.2))

            for x in range(5):
                nursery.start_soon(square, x)
        print(f"5 x slow_square in parallel -> {sorted(squares)}")
        with trio.move_on_after(0.1):
            await worker.call.slow_square(3, 10)
            print("(not reached)")
        print("slow_square(3, 10) with a 0.1 s cancel scope -> cancelled in the worker too")
        try:
            await worker.call.divide(1, 0)
        except RemoteCallError as exc:
            print(f"divide(1, 0)       -> RemoteCallError: {exc}")
        for i in range(200):
            await worker.call.add(i, i)
        snapshot = worker.metrics()
    print(
        f"metrics: {snapshot.requests_total} calls, {snapshot.requests_success} ok, "
        f"{snapshot.requests_failed} failed, {snapshot.requests_cancelled} cancelled; "
        f"latency p50 {snapshot.latency_p50_ms:.2f} ms, p99 {snapshot.latency_p99_ms:.2f} ms"
    )
    print("worker stopped.")


async def _call(
    target: str, function: str, args: list[Any], timeout: float | None, bytes_mode: BytesMode
) -> None:
    async with _open_target(target, _cli_options(target, timeout)) as worker:
        result = await worker.call(function, *args)
    print(_dump(result, bytes_mode))


async def _list(target: str, as_json: bool) -> None:
    async with _open_target(target, _cli_options(target)) as worker:
        names = await worker.list_functions()
    if as_json:
        print(_dump(names))
    else:
        for name in names:
            print(name)


async def _ping(target: str, count: int) -> None:
    async with _open_target(target, _cli_options(target)) as worker:
        for _ in range(count):
            print(f"{worker.name}: heartbeat round trip {await worker.ping():.2f} ms")


def _services(as_json: bool) -> None:
    from ._registry import list_services, registry_file

    entries = list_services()
    if as_json:
        print(
            _dump(
                [
                    {
                        "service_id": e.service_id,
                        "pid": e.pid,
                        "port": e.port,
                        "started": e.started,
                        "alive": e.alive,
                    }
                    for e in entries
                ]
            )
        )
        return
    if not entries:
        print(f"no services registered in {registry_file()}")
        return
    width = max(len(e.service_id) for e in entries)
    print(f"{'SERVICE':<{width}}  {'PID':>7}  {'PORT':>5}  STATE  STARTED")
    for e in entries:
        state = "alive" if e.alive else "stale"
        print(f"{e.service_id:<{width}}  {e.pid:>7}  {e.port:>5}  {state:<5}  {e.started or '-'}")


def _keygen(directory: str, name: str) -> None:
    from ._security import generate_keypair

    public, secret = generate_keypair(directory, name)
    print(f"public key: {public}  (give it to peers; 0644)")
    print(f"secret key: {secret}  (keep it private; 0600)")


# --------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class LevelResult:
    """What ``bench`` measured at one number of calls in flight."""

    in_flight: int
    calls: int
    seconds: float
    throughput_per_s: float
    latency_median_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_min_ms: float
    latency_max_ms: float


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _summarise(in_flight: int, samples: list[float], seconds: float) -> LevelResult:
    ordered = sorted(samples)
    n = len(ordered)
    ms = 1000.0
    return LevelResult(
        in_flight=in_flight,
        calls=n,
        seconds=seconds,
        throughput_per_s=n / seconds if seconds > 0 else math.inf,
        latency_median_ms=(ordered[(n - 1) // 2] + ordered[n // 2]) / 2 * ms,
        latency_p99_ms=_percentile(ordered, 0.99) * ms,
        latency_mean_ms=sum(ordered) / n * ms,
        latency_min_ms=ordered[0] * ms,
        latency_max_ms=ordered[-1] * ms,
    )


class _ProgressBar:
    """A one-line carriage-return progress bar (only drawn on a terminal)."""

    def __init__(self, out: TextIO, label: str, total: int) -> None:
        self._out = out
        self._label = label
        self._total = total
        self._started = time.perf_counter()

    def draw(self, done: int, *, final: bool = False) -> None:
        fraction = done / self._total if self._total else 1.0
        filled = round(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self._started
        rate = f"{done / elapsed:8.0f} calls/s" if elapsed > 0 and done else ""
        count = f"{done:>{len(str(self._total))}}/{self._total}"
        line = f"\r{self._label} [{bar}] {fraction:4.0%} {count}{rate}"
        self._out.write(line + ("\n" if final else ""))
        self._out.flush()

    def end_line(self) -> None:
        """Move past the bar's line (when a level ends early)."""
        self._out.write("\n")
        self._out.flush()


async def _bench_level(
    worker: Worker,
    function: str,
    args: list[Any],
    calls: int,
    in_flight: int,
    bar: _ProgressBar | None,
) -> LevelResult:
    """``calls`` calls with ``in_flight`` of them outstanding at any moment."""
    samples: list[float] = []
    next_index = 0
    call = worker.call

    async def runner() -> None:
        nonlocal next_index
        while next_index < calls:
            next_index += 1
            started = time.perf_counter()
            await call(function, *args)
            samples.append(time.perf_counter() - started)

    async def redraw(bar: _ProgressBar) -> None:
        while True:
            bar.draw(len(samples))
            await trio.sleep(_BAR_REFRESH_SECONDS)

    started = time.perf_counter()
    try:
        async with trio.open_nursery() as outer:
            if bar is not None:
                outer.start_soon(redraw, bar)
            async with trio.open_nursery() as runners:
                for _ in range(min(in_flight, calls)):
                    runners.start_soon(runner)
            elapsed = time.perf_counter() - started
            outer.cancel_scope.cancel()
    except BaseException:
        if bar is not None:
            bar.end_line()  # an error message must not land on the bar's line
        raise
    if bar is not None:
        bar.draw(len(samples), final=True)
    return _summarise(in_flight, samples, elapsed)


async def _bench(
    target: str,
    function: str,
    args: list[Any],
    calls: int,
    levels: Sequence[int],
    warmup: int,
    timeout: float | None,
    as_json: bool,
) -> None:
    out = sys.stdout
    live = not as_json and out.isatty()
    call_text = f"{function}({', '.join(json.dumps(a) for a in args)})"
    results: list[LevelResult] = []
    async with _open_target(target, _cli_options(target, timeout)) as worker:
        if live and warmup:
            print(f"warming up: {warmup} x {call_text} on {worker.name}", file=out, flush=True)
        for _ in range(warmup):
            await worker.call(function, *args)
        for in_flight in levels:
            bar = _ProgressBar(out, f"in flight {in_flight:>4}", calls) if live else None
            results.append(await _bench_level(worker, function, args, calls, in_flight, bar))
        name = worker.name
    if as_json:
        report = {
            "target": target,
            "worker": name,
            "function": function,
            "args": _jsonable(args, "base64"),
            "calls": calls,
            "warmup": warmup,
            "results": [vars(result) for result in results],
        }
        print(json.dumps(report))
        return
    print(f"bench {call_text} on {name}: {calls} calls per level, {warmup} warm-up calls")
    print(
        f"{'in flight':>9}  {'calls':>7}  {'median ms':>10}  {'p99 ms':>10}  "
        f"{'mean ms':>10}  {'calls/s':>10}"
    )
    for r in results:
        print(
            f"{r.in_flight:>9}  {r.calls:>7}  {r.latency_median_ms:>10.3f}  "
            f"{r.latency_p99_ms:>10.3f}  {r.latency_mean_ms:>10.3f}  {r.throughput_per_s:>10.0f}"
        )


# --------------------------------------------------------------------------- parsing


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _levels(text: str) -> list[int]:
    try:
        return [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"in-flight levels: {exc}") from None


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a JSON array like '[1, 2]': {text!r}")
    return value


TARGET_HELP: Final = (
    "the worker: a script path (.py, .js, .mjs, .cjs, .ts or an executable file) to spawn, "
    "or the service name or tcp://host:port endpoint of a running worker (connect mode)"
)

EPILOG: Final = """\
examples:
  multifrost-trio demo
  multifrost-trio call worker.py add 20 22          # prints 42
  multifrost-trio call worker.py greet '"Ada"'
  multifrost-trio list worker.py
  multifrost-trio call my-service add 1 2             # connect mode: a registered service
  multifrost-trio call tcp://127.0.0.1:5555 add 1 2   # connect mode: an endpoint
  multifrost-trio bench worker.py --function add --args '[1, 2]' --calls 2000
  multifrost-trio services                            # the service registry
  multifrost-trio ping my-service                     # heartbeat round trip
  multifrost-trio keygen ./keys                       # a CURVE key pair

exit status: 0 ok, 1 error (remote errors included), 2 usage error, 130 Ctrl-C.
"""


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command; SUPPRESS keeps a subcommand's
    # default from overwriting a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog="multifrost-trio",
        description="Call functions in worker processes (Multifrost v4 protocol, trio).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "demo",
        parents=[debug],
        help="spawn the packaged example worker and call it",
        description="Spawn multifrost_trio/examples/math_worker.py and show what a parent "
        "can do: calls, parallel calls, cancellation, a remote error and metrics.",
    )

    call = commands.add_parser(
        "call",
        parents=[debug],
        help="call one function and print its result as JSON",
        description="Start (or connect to) a worker, call one function, print the result as "
        "one JSON document on stdout and stop the worker. The worker's own output goes to "
        "stderr. A remote error prints the remote message and traceback on stderr and exits "
        "with status 1.",
        epilog="bytes in the result cannot be JSON: they are printed as a base64 string by "
        "default (see --bytes). Arguments are JSON when they parse as JSON (2, 2.5, true, "
        'null, "text", [1,2], {"k": 1}), else plain text: `greet Ada` passes "Ada".',
    )
    call.add_argument("target", help=TARGET_HELP)
    call.add_argument("function", help="the function to call")
    call.add_argument("args", nargs="*", help="arguments, as JSON (plain text if not JSON)")
    call.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="give up after SECONDS"
    )
    call.add_argument(
        "--bytes",
        choices=["base64", "hex", "repr"],
        default="base64",
        dest="bytes_mode",
        help="how bytes in the result are printed (default: base64)",
    )

    listing = commands.add_parser(
        "list",
        parents=[debug],
        help="list a worker's functions",
        description="Print the names of the functions a worker exposes, one per line.",
    )
    listing.add_argument("target", help=TARGET_HELP)
    listing.add_argument("--json", action="store_true", help="print one JSON array instead")

    bench = commands.add_parser(
        "bench",
        parents=[debug],
        help="measure latency and throughput",
        description="Call one function CALLS times at each number of calls in flight "
        "(default 1, 10 and 100) and report latency (median, p99, mean, in ms) and "
        "throughput (calls/s). A live progress bar is drawn when stdout is a terminal, "
        "a plain table is printed otherwise; --json prints one JSON object.",
    )
    bench.add_argument("target", help=TARGET_HELP)
    bench.add_argument("--function", default="add", help="function to call (default: add)")
    bench.add_argument(
        "--args",
        type=_json_list,
        default=[1, 2],
        metavar="JSON",
        help="its arguments as a JSON array (default: '[1, 2]')",
    )
    bench.add_argument(
        "--calls", type=_positive_int, default=2000, help="calls per level (default: 2000)"
    )
    bench.add_argument(
        "--in-flight",
        type=_levels,
        default=list(DEFAULT_IN_FLIGHT),
        metavar="N,N,...",
        help="calls in flight at each level (default: 1,10,100)",
    )
    bench.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=50,
        help="unmeasured calls made first (default: 50)",
    )
    bench.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="per-call timeout"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    services = commands.add_parser(
        "services",
        parents=[debug],
        help="list the connect-mode service registry",
        description="Print every entry of the service registry (~/.multifrost/services.json, "
        "or MULTIFROST_REGISTRY_DIR) with its pid, port and whether its process is alive.",
    )
    services.add_argument("--json", action="store_true", help="print one JSON array instead")

    ping = commands.add_parser(
        "ping",
        parents=[debug],
        help="measure a worker's heartbeat round trip",
        description="Connect to a service (or endpoint, or spawn a script) and print the "
        "round trip of heartbeats, or a clear error if it does not answer.",
    )
    ping.add_argument("target", help=TARGET_HELP)
    ping.add_argument("--count", type=_positive_int, default=1, help="heartbeats (default: 1)")

    keygen = commands.add_parser(
        "keygen",
        parents=[debug],
        help="write a CURVE key pair",
        description="Write <name>.key (public, 0644) and <name>.key_secret (secret, 0600) "
        "into DIRECTORY (created 0700), for CurveServer / CurveClient.",
    )
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="id", help="file name stem (default: id)")
    return parser


# --------------------------------------------------------------------------- errors


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            found.extend(_leaves(inner))
        return found
    return [exc]


def _report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` for a person (one line, plus the remote side's own details)."""
    leaves = _leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        if debug:
            traceback.print_exception(exc)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if debug:
        traceback.print_exception(exc)
    shown = real or leaves
    _report_one(shown[0], debug)
    if len(shown) > 1:  # concurrent calls (bench) that failed at the same moment
        print(f"(and {len(shown) - 1} more errors)", file=sys.stderr)
    return EXIT_ERROR


def _report_one(exc: BaseException, debug: bool) -> None:
    err = sys.stderr
    if isinstance(exc, BrokenPipeError):
        return  # the reader of our output went away (``| head``): nothing to tell
    if isinstance(exc, RemoteCallError):
        print(f"remote error: {exc}", file=err)
        if exc.remote_traceback.strip():
            print(exc.remote_traceback.rstrip(), file=err)
        return
    if isinstance(exc, WorkerDied):
        # Only the first line: the worker's stderr (which the message repeats) was already
        # shown line by line as it was written, prefixed with the worker's name.
        first_line = str(exc).split("\n", 1)[0]
        print(f"error: {first_line}", file=err)
        return
    if isinstance(exc, CliError | MultifrostError | OSError):
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text}", file=err)
        return
    text = " ".join(str(exc).split())
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"error: unexpected {type(exc).__name__}: {text}{hint}", file=err)


def _fail(message: str) -> NoReturn:
    raise CliError(message)


# --------------------------------------------------------------------------- main


def _run(options: argparse.Namespace) -> None:
    command = options.command
    if command == "demo":
        trio.run(_demo)
    elif command == "call":
        args = [_parse_arg(a) for a in options.args]
        trio.run(_call, options.target, options.function, args, options.timeout, options.bytes_mode)
    elif command == "list":
        trio.run(_list, options.target, options.json)
    elif command == "bench":
        levels = options.in_flight or _fail("--in-flight needs at least one level")
        trio.run(
            _bench,
            options.target,
            options.function,
            options.args,
            options.calls,
            levels,
            options.warmup,
            options.timeout,
            options.json,
        )
    elif command == "services":
        _services(options.json)
    elif command == "ping":
        trio.run(_ping, options.target, options.count)
    elif command == "keygen":
        _keygen(options.directory, options.name)
    else:  # pragma: no cover - argparse only lets the commands above through
        _fail(f"unknown command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``multifrost-trio``; returns the exit status (see the module doc)."""
    options = _parser().parse_args(argv)
    debug: bool = getattr(options, "debug", False)
    try:
        _run(options)
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
        return _report(exc, debug)
    finally:
        _flush_quietly()
    return EXIT_OK


def _flush_quietly() -> None:
    """Flush stdout; a closed pipe (``| head``) is not an error worth a traceback."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own flush at exit stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

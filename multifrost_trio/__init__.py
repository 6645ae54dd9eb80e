"""multifrost_trio: call functions in other processes with structured concurrency.

Speaks the Multifrost v4 wire protocol, so its parents and workers also talk to the
JavaScript, Go, Rust and Python/asyncio implementations.
"""

import logging as _logging

from ._child import ChildCounters, ChildWorker, inline
from ._errors import (
    CallTimeout,
    CircuitOpenError,
    EncodeError,
    MultifrostError,
    RemoteCallError,
    ServiceNotFound,
    WorkerDied,
    WorkerStartError,
)
from ._metrics import FunctionMetrics, MetricsSnapshot
from ._parent import OutputSink, SpawnOptions, Worker
from ._spawn import open_worker

__version__ = "0.1.0"

# Silent unless the application configures logging (also keeps logging's last-resort
# handler from printing our warnings to stderr).
_logging.getLogger("multifrost_trio").addHandler(_logging.NullHandler())

__all__ = [
    "CallTimeout",
    "ChildCounters",
    "ChildWorker",
    "CircuitOpenError",
    "EncodeError",
    "FunctionMetrics",
    "MetricsSnapshot",
    "MultifrostError",
    "OutputSink",
    "RemoteCallError",
    "ServiceNotFound",
    "SpawnOptions",
    "Worker",
    "WorkerDied",
    "WorkerStartError",
    "__version__",
    "inline",
    "open_worker",
]

"""multifrost_trio: call functions in other processes with structured concurrency.

Speaks the Multifrost v4 wire protocol, so its parents and workers also talk to the
JavaScript, Go, Rust and Python/asyncio implementations.
"""

import logging as _logging

from ._child import ChildCounters, ChildWorker, inline
from ._connect import connect_worker
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
from ._health import CircuitState
from ._metrics import FunctionMetrics, MetricsSnapshot
from ._parent import OutputSink, SpawnOptions, Worker
from ._registry import RegistryError, ServiceEntry, list_services
from ._security import CurveClient, CurveServer, SecurityError, generate_keypair
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
    "CircuitState",
    "CurveClient",
    "CurveServer",
    "EncodeError",
    "FunctionMetrics",
    "MetricsSnapshot",
    "MultifrostError",
    "OutputSink",
    "RegistryError",
    "RemoteCallError",
    "SecurityError",
    "ServiceEntry",
    "ServiceNotFound",
    "SpawnOptions",
    "Worker",
    "WorkerDied",
    "WorkerStartError",
    "__version__",
    "connect_worker",
    "generate_keypair",
    "inline",
    "list_services",
    "open_worker",
]

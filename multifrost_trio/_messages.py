"""Wire models, the msgpack codec and the portable-value rules (PROTOCOL.md sections 2 and 3).

Decoding is tolerant (the "accept" column), encoding is exact (the "send" column). The models
describe every message and validate what arrives, except that the two messages on the hot
path, a plain call and a plain response, are read straight from the unpacked map when its
fields already have their wire types (``CallRequest.from_raw``, ``plain_core``): only maps
the model would take unchanged. Outgoing messages are plain maps built by the ``make_*``
functions from already-checked values, so the send path pays for no validation it does not
need.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import msgpack
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from ._errors import EncodeError

APP_ID: Final = "comlink_ipc_v4"
DEFAULT_NAMESPACE: Final = "default"

MAX_DEPTH: Final = 100
"""Deepest nesting of arrays/maps a value may have when sent (the peers use 100)."""
MAX_STR_BYTES: Final = 10 * 1024 * 1024
MAX_CONTAINER_ITEMS: Final = 100_000
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""A frame larger than this is dropped before decoding: several 10 MiB strings fit."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    app: str = APP_ID
    id: str
    timestamp: float = 0.0
    metadata: dict[str, Any] | None = None


class CallMessage(_Message):
    """parent -> child: run ``function(*args)`` in ``namespace``."""

    type: Literal["call"] = "call"
    function: str | None = None
    args: list[Any] = Field(default_factory=list)
    namespace: str = DEFAULT_NAMESPACE
    client_name: str | None = Field(
        default=None, validation_alias=AliasChoices("client_name", "clientName")
    )


class ResponseMessage(_Message):
    """child -> parent: the call with this ``id`` returned ``result``."""

    type: Literal["response"] = "response"
    result: Any = None


class ErrorMessage(_Message):
    """child -> parent: the call with this ``id`` failed; ``error`` is "<Type>: <msg>\\n<tb>"."""

    type: Literal["error"] = "error"
    error: str = "Unknown error"


class OutputMessage(_Message):
    """child -> parent: text the worker printed."""

    type: Literal["stdout", "stderr"]
    output: str = ""


class HeartbeatMessage(_Message):
    """parent -> child and echoed back; ``metadata.hb_timestamp`` is the send time."""

    type: Literal["heartbeat"] = "heartbeat"


class ShutdownMessage(_Message):
    """parent -> child: stop serving and exit."""

    type: Literal["shutdown"] = "shutdown"


class CancelMessage(_Message):
    """parent -> child (extension): the caller of call ``id`` gave up; cancel its handler."""

    type: Literal["cancel"] = "cancel"


Message = (
    CallMessage
    | ResponseMessage
    | ErrorMessage
    | OutputMessage
    | HeartbeatMessage
    | ShutdownMessage
    | CancelMessage
)
_MODELS: Final[dict[str, type[Message]]] = {
    "call": CallMessage,
    "response": ResponseMessage,
    "error": ErrorMessage,
    "stdout": OutputMessage,
    "stderr": OutputMessage,
    "heartbeat": HeartbeatMessage,
    "shutdown": ShutdownMessage,
    "cancel": CancelMessage,
}
# Validating against the one model the ``type`` field names costs half of validating
# against the discriminated union of all of them.
_VALIDATORS: Final[dict[str, Callable[[Any], Message]]] = {
    kind: model.__pydantic_validator__.validate_python for kind, model in _MODELS.items()
}


class DecodeError(Exception):
    """A frame that is not a valid message of ours; ``call_id`` is set when it looked like a
    call with a usable id, so the child can still answer it with an error."""

    def __init__(
        self, reason: str, call_id: str | None = None, namespace: str = DEFAULT_NAMESPACE
    ) -> None:
        super().__init__(reason)
        self.call_id = call_id
        self.namespace = namespace


# --------------------------------------------------------------------------- values


def to_wire_value(value: Any, _depth: int = 0) -> Any:
    """Check ``value`` against the portable subset and return what to pack.

    NaN and +-Infinity become None, tuples become lists, pydantic models become their dump.
    Raises :class:`EncodeError` for ints outside int64, non-str map keys, nesting deeper than
    :data:`MAX_DEPTH` and types with no wire form.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None or kind is bytes:
        return value
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        raise EncodeError(f"int {value} is outside the int64 range and cannot be sent")
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is list or kind is tuple:
        if _depth >= MAX_DEPTH:
            raise EncodeError(f"value nested deeper than {MAX_DEPTH} levels")
        out_list = []
        for item in value:
            # Strings and int64 ints, the usual arguments, are taken without a call.
            item_kind = type(item)
            if item_kind is str or (item_kind is int and _INT64_MIN <= item <= _INT64_MAX):
                out_list.append(item)
            else:
                out_list.append(to_wire_value(item, _depth + 1))
        return out_list
    if kind is dict:
        if _depth >= MAX_DEPTH:
            raise EncodeError(f"value nested deeper than {MAX_DEPTH} levels")
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise EncodeError(f"map key {key!r} is not a str; only str keys can be sent")
            out[key] = to_wire_value(item, _depth + 1)
        return out
    return _to_wire_slow(value, _depth)


def _to_wire_slow(value: Any, depth: int) -> Any:
    """Subclasses of the portable types, byte-likes and pydantic models."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return to_wire_value(int(value), depth)
    if isinstance(value, float):
        return to_wire_value(float(value), depth)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, BaseModel):
        return to_wire_value(value.model_dump(mode="python"), depth)
    if isinstance(value, list | tuple):
        return to_wire_value(list(value), depth)
    if isinstance(value, Mapping):
        return to_wire_value(dict(value), depth)
    raise EncodeError(f"a value of type {type(value).__name__} cannot be sent")


# --------------------------------------------------------------------------- codec

WireMap = dict[str, Any]
"""An outgoing message as the plain map that is packed (built only by the ``make_*``
functions below, so its fields are exactly what the protocol says to send)."""

_UNPACKER_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "max_str_len": MAX_STR_BYTES,
    "max_bin_len": MAX_STR_BYTES,
    "max_array_len": MAX_CONTAINER_ITEMS,
    "max_map_len": MAX_CONTAINER_ITEMS,
    "max_ext_len": 0,
    "strict_map_key": False,
}
PACKER_KEEP_BYTES: Final = 1 << 20
"""A packer keeps a buffer up to twice the size of the largest message it packed; one that
packed a larger message than this is replaced, so a big reply's memory is not held for
good (a packer per thread may keep about 2 MiB)."""


class _ThreadPacker(threading.local):
    """A msgpack packer per thread (the event loop's, and each sync handler thread's):
    ``msgpack.packb`` would build one per call, which costs more than the packing."""

    def __init__(self) -> None:
        self.pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack


_packer = _ThreadPacker()

_ID_PREFIX: Final = str(uuid.uuid4())[:24]
_id_counter = itertools.count(int.from_bytes(os.urandom(5), "big"))


def new_id() -> str:
    """A fresh message id in uuid4 text form.

    A random per-process prefix plus a counter: unique like a uuid4, at a fraction of
    the cost of ``uuid.uuid4()`` (which reads the OS random source every time).
    """
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def encode(message: WireMap) -> bytes:
    """Pack a message built by this module's ``make_*`` functions (from any thread)."""
    packer = _packer
    payload = packer.pack(message)
    if len(payload) > PACKER_KEEP_BYTES:
        packer.pack = msgpack.Packer(use_bin_type=True).pack
    return payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Unpack one payload and check what every message needs: a map with our ``app`` id
    and a str ``type``. Raises :class:`DecodeError` for anything else."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"frame of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        raw = msgpack.unpackb(payload, **_UNPACKER_OPTIONS)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    if type(raw) is not dict:
        raise DecodeError(f"payload is a {type(raw).__name__}, not a map")
    if raw.get("app") != APP_ID:
        raise DecodeError(f"foreign app id {raw.get('app')!r}")
    kind = raw.get("type")
    if type(kind) is not str:
        raise DecodeError(f"message type {kind!r} is not a str")
    return raw


def validate(raw: dict[str, Any]) -> Message | None:
    """Validate an unpacked map against the model its ``type`` names.

    Returns None for a message to ignore silently (unknown ``type``); raises
    :class:`DecodeError` for an ill-typed one.
    """
    kind: str = raw["type"]
    validator = _VALIDATORS.get(kind)
    if validator is None:
        return None
    try:
        return validator(raw)
    except (ValidationError, RecursionError) as exc:
        call_id = raw.get("id") if kind == "call" else None
        namespace = raw.get("namespace", DEFAULT_NAMESPACE)
        reason = f"ill-typed {kind} message: {exc}".splitlines()[0]
        raise DecodeError(
            reason,
            call_id if type(call_id) is str else None,
            namespace if type(namespace) is str else "",
        ) from None


def decode(payload: bytes) -> Message | None:
    """Unpack and validate one payload (:func:`unpack`, then :func:`validate`)."""
    return validate(unpack(payload))


def plain_core(raw: dict[str, Any]) -> bool:
    """Whether an unpacked map's optional core fields already have their wire types.

    The hot paths read such maps directly instead of building a model; they take only maps
    the model would accept unchanged, and leave every other map to the model.
    """
    stamp = type(raw.get("timestamp", 0.0))
    meta = raw.get("metadata")
    return (stamp is float or stamp is int) and (
        meta is None or (type(meta) is dict and all(type(key) is str for key in meta))
    )


class CallRequest:
    """What a worker needs of a call: read straight from a well-formed map, or taken from a
    validated :class:`CallMessage` when the map needed the model's tolerance."""

    __slots__ = ("args", "function", "id", "namespace")

    def __init__(self, call_id: str, function: str | None, args: list[Any], namespace: str) -> None:
        self.id = call_id
        self.function = function
        self.args = args
        self.namespace = namespace

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> CallRequest | None:
        """The call in an unpacked ``call`` map when its fields already have their wire
        types (the usual case, at a fraction of the model's cost); None otherwise."""
        call_id = raw.get("id")
        function = raw.get("function")
        args = raw.get("args")
        namespace = raw.get("namespace", DEFAULT_NAMESPACE)
        name, js_name = raw.get("client_name"), raw.get("clientName")
        typed = type(call_id) is str and type(function) is str and type(namespace) is str
        if (
            typed
            and type(args) is list
            and (name is None or type(name) is str)
            and (js_name is None or type(js_name) is str)
            and plain_core(raw)
        ):
            return cls(call_id, function, args, namespace)  # type: ignore[arg-type]
        return None

    @classmethod
    def from_message(cls, message: CallMessage) -> CallRequest:
        return cls(message.id, message.function, message.args, message.namespace)


# --------------------------------------------------------------------------- constructors


def make_call(
    function: str,
    args: tuple[Any, ...] | list[Any],
    namespace: str = DEFAULT_NAMESPACE,
    client_name: str | None = None,
) -> WireMap:
    """A call message; checks every argument (raises :class:`EncodeError`)."""
    message = {
        "app": APP_ID,
        "id": new_id(),
        "type": "call",
        "timestamp": time.time(),
        "function": function,
        "args": to_wire_value(args),
        "namespace": namespace,
    }
    if client_name is not None:
        message["client_name"] = client_name
    return message


def make_response(call_id: str, result: Any) -> WireMap:
    """The reply to ``call_id``; checks the result (raises :class:`EncodeError`).
    ``result`` is sent even when it is None."""
    kind = type(result)
    if not (kind is str or (kind is int and _INT64_MIN <= result <= _INT64_MAX)):
        result = to_wire_value(result)  # the usual results are taken without a call
    return {
        "app": APP_ID,
        "id": call_id,
        "type": "response",
        "timestamp": time.time(),
        "result": result,
    }


def make_error(call_id: str, text: str) -> WireMap:
    """The error reply to ``call_id``."""
    return {"app": APP_ID, "id": call_id, "type": "error", "timestamp": time.time(), "error": text}


def make_output(stream: Literal["stdout", "stderr"], text: str) -> WireMap:
    """Forwarded output, with a fresh id (parents drop output without one)."""
    return {"app": APP_ID, "id": new_id(), "type": stream, "timestamp": time.time(), "output": text}


def make_heartbeat() -> WireMap:
    """A heartbeat request stamped with the wall clock."""
    now = time.time()
    return {
        "app": APP_ID,
        "id": new_id(),
        "type": "heartbeat",
        "timestamp": now,
        "metadata": {"hb_timestamp": now},
    }


def make_heartbeat_echo(request: HeartbeatMessage) -> WireMap:
    """The echo of a heartbeat request: same id, ``hb_timestamp`` copied, ``hb_response``."""
    stamp = (request.metadata or {}).get("hb_timestamp")
    if type(stamp) is not float and type(stamp) is not int:
        stamp = None  # echo only what may be sent: a number
    elif not (math.isfinite(stamp) and _INT64_MIN <= stamp <= _INT64_MAX):
        stamp = None
    return {
        "app": APP_ID,
        "id": request.id,
        "type": "heartbeat",
        "timestamp": time.time(),
        "metadata": {"hb_timestamp": stamp, "hb_response": True},
    }


def make_shutdown() -> WireMap:
    """Ask the child to exit."""
    return {"app": APP_ID, "id": new_id(), "type": "shutdown", "timestamp": time.time()}


def make_cancel(call_id: str) -> WireMap:
    """Tell the child the caller of ``call_id`` gave up."""
    return {"app": APP_ID, "id": call_id, "type": "cancel", "timestamp": time.time()}


def format_exception_text(exc: BaseException, traceback_text: str) -> str:
    """The wire form of a handler's exception: ``"<ExcType>: <message>\\n<traceback>"``."""
    try:
        message = str(exc)
    except Exception:  # a handler's exception class may be broken: the reply still goes
        message = "<str() of the exception failed>"
    return f"{type(exc).__name__}: {message}\n{traceback_text}"

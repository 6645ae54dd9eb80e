"""Wire models, the msgpack codec and the portable-value rules (PROTOCOL.md sections 2 and 3).

Decoding is tolerant (the "accept" column), encoding is exact (the "send" column). Outgoing
messages are built from already-checked values with ``model_construct`` and packed straight
from their fields, so the send path pays for no validation it does not need.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgpack
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._errors import EncodeError

APP_ID: Final = "comlink_ipc_v4"
DEFAULT_NAMESPACE: Final = "default"

MAX_DEPTH: Final = 100
"""Deepest nesting of arrays/maps a value may have when sent (the peers use 100)."""
MAX_STR_BYTES: Final = 10 * 1024 * 1024
MAX_CONTAINER_ITEMS: Final = 100_000
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""A frame larger than this is dropped before decoding: several 10 MiB strings fit, a flood does not."""

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
_ADAPTER: Final[TypeAdapter[Message]] = TypeAdapter(
    Annotated[Message, Field(discriminator="type")]
)
_KNOWN_TYPES: Final = frozenset(
    {"call", "response", "error", "stdout", "stderr", "heartbeat", "shutdown", "cancel"}
)
_OPTIONAL_FIELDS: Final = ("metadata", "client_name")


class DecodeError(Exception):
    """A frame that is not a valid message of ours; ``call_id`` is set when it looked like a
    call with a usable id, so the child can still answer it with an error."""

    def __init__(self, reason: str, call_id: str | None = None) -> None:
        super().__init__(reason)
        self.call_id = call_id


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
        return [to_wire_value(item, _depth + 1) for item in value]
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

_PACKER_OPTIONS: Final[dict[str, Any]] = {"use_bin_type": True}
_UNPACKER_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "max_str_len": MAX_STR_BYTES,
    "max_bin_len": MAX_STR_BYTES,
    "max_array_len": MAX_CONTAINER_ITEMS,
    "max_map_len": MAX_CONTAINER_ITEMS,
    "max_ext_len": 0,
    "strict_map_key": False,
}


def new_id() -> str:
    """A fresh message id (uuid4 text, as every peer sends)."""
    return str(uuid.uuid4())


def encode(message: _Message) -> bytes:
    """Pack a message built by this module's constructors (values already checked)."""
    fields = dict(message.__dict__)
    for name in _OPTIONAL_FIELDS:
        if fields.get(name, 0) is None:
            del fields[name]
    return msgpack.packb(fields, **_PACKER_OPTIONS)  # type: ignore[no-any-return]


def decode(payload: bytes) -> Message | None:
    """Unpack and validate one payload.

    Returns None for a message to ignore silently (unknown ``type``); raises
    :class:`DecodeError` for anything malformed or foreign, which callers drop and count.
    """
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
    if kind not in _KNOWN_TYPES:
        return None
    try:
        return _ADAPTER.validate_python(raw)
    except (ValidationError, RecursionError) as exc:
        call_id = raw.get("id") if kind == "call" else None
        reason = f"ill-typed {kind} message: {exc}".splitlines()[0]
        raise DecodeError(reason, call_id if type(call_id) is str else None) from None


# --------------------------------------------------------------------------- constructors


def make_call(
    function: str,
    args: tuple[Any, ...] | list[Any],
    namespace: str = DEFAULT_NAMESPACE,
    client_name: str | None = None,
) -> CallMessage:
    """A call message; checks every argument (raises :class:`EncodeError`)."""
    return CallMessage.model_construct(
        app=APP_ID,
        id=new_id(),
        type="call",
        timestamp=time.time(),
        metadata=None,
        function=function,
        args=to_wire_value(args),
        namespace=namespace,
        client_name=client_name,
    )


def make_response(call_id: str, result: Any) -> ResponseMessage:
    """The reply to ``call_id``; checks the result (raises :class:`EncodeError`)."""
    return ResponseMessage.model_construct(
        app=APP_ID,
        id=call_id,
        type="response",
        timestamp=time.time(),
        metadata=None,
        result=to_wire_value(result),
    )


def make_error(call_id: str, text: str) -> ErrorMessage:
    """The error reply to ``call_id``."""
    return ErrorMessage.model_construct(
        app=APP_ID, id=call_id, type="error", timestamp=time.time(), metadata=None, error=text
    )


def make_output(stream: Literal["stdout", "stderr"], text: str) -> OutputMessage:
    """Forwarded output, with a fresh id (parents drop output without one)."""
    return OutputMessage.model_construct(
        app=APP_ID, id=new_id(), type=stream, timestamp=time.time(), metadata=None, output=text
    )


def make_heartbeat(message_id: str | None = None) -> HeartbeatMessage:
    """A heartbeat request stamped with the wall clock."""
    now = time.time()
    return HeartbeatMessage.model_construct(
        app=APP_ID,
        id=message_id or new_id(),
        type="heartbeat",
        timestamp=now,
        metadata={"hb_timestamp": now},
    )


def make_heartbeat_echo(request: HeartbeatMessage) -> HeartbeatMessage:
    """The echo of a heartbeat request: same id, ``hb_timestamp`` copied, ``hb_response``."""
    stamp = (request.metadata or {}).get("hb_timestamp")
    return HeartbeatMessage.model_construct(
        app=APP_ID,
        id=request.id,
        type="heartbeat",
        timestamp=time.time(),
        metadata={"hb_timestamp": stamp, "hb_response": True},
    )


def make_shutdown() -> ShutdownMessage:
    """Ask the child to exit."""
    return ShutdownMessage.model_construct(
        app=APP_ID, id=new_id(), type="shutdown", timestamp=time.time(), metadata=None
    )


def make_cancel(call_id: str) -> CancelMessage:
    """Tell the child the caller of ``call_id`` gave up."""
    return CancelMessage.model_construct(
        app=APP_ID, id=call_id, type="cancel", timestamp=time.time(), metadata=None
    )


def format_exception_text(exc: BaseException, traceback_text: str) -> str:
    """The wire form of a handler's exception: ``"<ExcType>: <message>\\n<traceback>"``."""
    return f"{type(exc).__name__}: {exc}\n{traceback_text}"

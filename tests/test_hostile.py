"""Hostile input to a real worker process (PROTOCOL.md sections 1, 2 and 4).

The test plays the parent by hand with a blocking pyzmq DEALER, so it can send what no
well-behaved parent would: garbage, wrong frame counts, foreign or ill-typed messages,
frames past the size limit. After each one the worker must still answer a valid call, and
its ``messages_dropped`` counter must account for every frame it dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from multifrost_trio import _messages as m
from tests.conftest import worker_path

ECHO = worker_path("echo_worker.py")
WAIT_MS = 10_000
"""Longest wait for any single reply (the machine is small and shared)."""
START_SECONDS = 30.0
"""Longest wait for a fresh worker to answer its first heartbeat."""
STATS = "stats"
"""The echo worker's function returning ``asdict(self.counters)``."""

pytestmark = pytest.mark.timeout(180)


def pack(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def call_fields(function: Any = "add", args: Any = (1, 2), **extra: Any) -> dict[str, Any]:
    """A call as a plain map, for tampering with before packing."""
    fields: dict[str, Any] = {
        "app": m.APP_ID,
        "id": m.new_id(),
        "type": "call",
        "timestamp": time.time(),
        "function": function,
        "args": list(args),
        "namespace": "default",
    }
    fields.update(extra)
    return fields


def map_header(count: int) -> bytes:
    assert count < 16
    return bytes([0x80 | count])


class Child:
    """A worker process and the DEALER a parent would use to talk to it."""

    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.stderr_path = tmp / "worker-stderr.txt"
        env = {**os.environ, "COMLINK_ZMQ_PORT": str(port), "COMLINK_WORKER_MODE": "1"}
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, ECHO, "--worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    # ------------------------------------------------------------------ lifecycle

    def wait_ready(self) -> None:
        heartbeat = m.make_heartbeat()
        self.send_frames([b"", m.encode(heartbeat)], wait_s=START_SECONDS)
        echo = self.next_reply(wait_s=START_SECONDS)
        assert echo["type"] == "heartbeat"
        assert echo["id"] == heartbeat["id"]
        assert echo["metadata"]["hb_response"] is True

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
        finally:
            self.sock.close(linger=0)
            self.ctx.term()

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            stderr = self.stderr_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"worker exited with status {code}; stderr:\n{stderr}")

    # ------------------------------------------------------------------ frames

    def send_frames(self, frames: list[bytes], wait_s: float = WAIT_MS / 1000) -> None:
        """Send one multipart message; fails (not hangs) if the worker is gone."""
        deadline = time.monotonic() + wait_s
        while True:
            self._check_alive()
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    pytest.fail("could not send to the worker in time")
                self.sock.poll(100, zmq.POLLOUT)

    def send(self, payload: bytes) -> None:
        self.send_frames([b"", payload])

    def next_reply(self, wait_s: float = WAIT_MS / 1000) -> dict[str, Any]:
        """The next message from the worker; fails on timeout or if the worker died."""
        deadline = time.monotonic() + wait_s
        while not self.sock.poll(100):
            self._check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"no reply from the worker within {wait_s} s")
        frames = self.sock.recv_multipart()
        assert len(frames) == 2
        assert frames[0] == b""
        reply = msgpack.unpackb(frames[1], raw=False)
        assert reply["app"] == m.APP_ID
        return reply  # type: ignore[no-any-return]

    def assert_quiet(self) -> None:
        """Nothing is waiting on the socket right now (no stray reply pending)."""
        assert not self.sock.poll(0), f"unexpected reply: {self.next_reply()!r}"

    # ------------------------------------------------------------------ calls

    def call(self, function: str, args: list[Any]) -> dict[str, Any]:
        """Call and return the reply, which must be the very next message received."""
        message = m.make_call(function, args)
        self.send(m.encode(message))
        reply = self.next_reply()
        assert reply["id"] == message["id"], f"a reply to something else came first: {reply!r}"
        return reply

    def call_error(self, function: str, args: list[Any]) -> str:
        reply = self.call(function, args)
        assert reply["type"] == "error", reply
        return reply["error"]  # type: ignore[no-any-return]

    def assert_alive(self) -> None:
        """A valid call succeeds, and its reply is the first message received."""
        reply = self.call("add", [1, 2])
        assert reply["type"] == "response", reply
        assert reply["result"] == 3

    def replies_before_probe(self) -> list[dict[str, Any]]:
        """Send a valid call; return every reply received before its (correct) answer."""
        probe = m.make_call("add", [1, 2])
        self.send(m.encode(probe))
        earlier = []
        while (reply := self.next_reply())["id"] != probe["id"]:
            earlier.append(reply)
        assert reply["result"] == 3
        return earlier

    def dropped(self) -> int:
        reply = self.call(STATS, [])
        assert reply["type"] == "response", reply
        return reply["result"]["messages_dropped"]  # type: ignore[no-any-return]


def _start(tmp: Path) -> Iterator[Child]:
    child = Child(tmp)
    try:
        child.wait_ready()
        yield child
    finally:
        child.close()


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """One worker shared by the module (each test ends with nothing pending)."""
    yield from _start(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def fresh_child(tmp_path: Path) -> Iterator[Child]:
    """A worker of its own, for a test that may kill it."""
    yield from _start(tmp_path)


@pytest.fixture
def shared(child: Child) -> Iterator[Child]:
    """The module's worker, checked quiet before and after each test."""
    child.assert_quiet()
    yield child
    child.assert_alive()
    child.assert_quiet()


# --------------------------------------------------------------------------- timing


def test_messages_read_with_a_call_whose_first_step_parked_cannot_break_it(
    fresh_child: Child, tmp_path: Path
) -> None:
    """While a handler holds the worker's loop, three messages queue: an async call whose
    first step parks on an event, an inline call that sets that event, and a cancel for
    the first. They are read together, right where the first one's step may run at once:
    the worker must stay up, answer the inline call, and either answer the parked call or
    drop it as cancelled."""
    marker = tmp_path / "stalling"
    stall = m.make_call("stall", [1.0, str(marker)])
    fresh_child.send(m.encode(stall))
    deadline = time.monotonic() + WAIT_MS / 1000
    while not marker.exists():
        assert time.monotonic() < deadline, "the stall never began"
        time.sleep(0.005)
    parked, setter = m.make_call("wait_flag", []), m.make_call("set_flag", [])
    for message in (parked, setter, m.make_cancel(parked["id"])):
        fresh_child.send(m.encode(message))
    # The parked call, if not cancelled in time, may finish after the first probe.
    replies = fresh_child.replies_before_probe() + fresh_child.replies_before_probe()
    by_id = {reply["id"]: reply for reply in replies}
    assert len(by_id) == len(replies)
    assert by_id.pop(stall["id"])["result"] == "stalled"
    assert by_id.pop(setter["id"])["result"] == "set"
    assert all(reply["result"] == "flagged" for reply in by_id.values())
    assert set(by_id) <= {parked["id"]}
    fresh_child.assert_alive()
    fresh_child.assert_quiet()


# --------------------------------------------------------------------------- garbage


def test_random_bytes(shared: Child) -> None:
    before = shared.dropped()
    sent = 0

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def check(payload: bytes) -> None:
        nonlocal sent
        shared.send(payload)
        sent += 1
        shared.assert_alive()

    check()
    assert sent >= 100
    assert shared.dropped() - before >= sent


def test_random_frame_lists(shared: Child) -> None:
    """Any number of garbage frames; the worker reads only the last one (or drops them all)."""
    before = shared.dropped()
    sent = 0

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
    def check(frames: list[bytes]) -> None:
        nonlocal sent
        shared.send_frames(frames)
        sent += 1
        shared.assert_alive()

    check()
    assert shared.dropped() - before >= sent


def test_mutated_calls(shared: Child) -> None:
    """Corrupted copies of a valid call to an inline function: whatever the worker makes of
    them (drop, error reply, response), it answers at once and keeps serving."""

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        payload = bytearray(m.encode(m.make_call("list_functions", [])))
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, len(payload) - 1))
            payload[index] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            payload = payload[: data.draw(st.integers(0, len(payload)))]
            shared.send(bytes(payload))
        # An inline function or a refused call answers synchronously: any reply to the
        # corrupted call arrives before the probe's, and nothing arrives after it.
        assert len(shared.replies_before_probe()) <= 1

    check()


@pytest.mark.parametrize(
    "value",
    [[1, 2], [call_fields()], 1, -1, 2**64 - 1, 1.5, "call", b"bin", None, True, []],
    ids=repr,
)
def test_non_map_payloads_are_dropped(shared: Child, value: Any) -> None:
    before = shared.dropped()
    shared.send(pack(value))
    shared.assert_alive()
    assert shared.dropped() - before >= 1


def test_invalid_msgpack_payloads_are_dropped(shared: Child) -> None:
    valid = pack(call_fields())
    payloads = [b"", b"\xc1", valid[:-1], valid + b"\x00", valid[: len(valid) // 2]]
    before = shared.dropped()
    for payload in payloads:
        shared.send(payload)
    shared.assert_alive()
    assert shared.dropped() - before >= len(payloads)


# --------------------------------------------------------------------------- frames


def test_single_frame_is_dropped(shared: Child) -> None:
    """A DEALER sending ``[payload]`` gives the ROUTER two frames: not a message."""
    before = shared.dropped()
    shared.send_frames([pack(call_fields())])
    shared.send_frames([pack(call_fields("echo", ["x"]))])
    shared.assert_alive()  # the first reply is the probe's: the two calls went unanswered
    assert shared.dropped() - before >= 2


def test_extra_frames_use_the_last_one(shared: Child) -> None:
    for frames_before in ([b"", b""], [b"junk"], [b"", b"x", b""]):
        message = m.make_call("add", [20, 22])
        shared.send_frames([*frames_before, m.encode(message)])
        reply = shared.next_reply()
        assert reply["id"] == message["id"]
        assert reply["result"] == 42


# --------------------------------------------------------------------------- foreign


@pytest.mark.parametrize("app", ["comlink_ipc_v3", "", 4, None, b"comlink_ipc_v4"], ids=repr)
def test_foreign_app_gets_no_reply(shared: Child, app: Any) -> None:
    before = shared.dropped()
    shared.send(pack(call_fields("add", [5, 5], app=app)))
    shared.assert_alive()  # the first reply received is the probe's, not the foreign call's
    assert shared.dropped() - before >= 1


def test_missing_app_gets_no_reply(shared: Child) -> None:
    fields = call_fields("add", [5, 5])
    del fields["app"]
    before = shared.dropped()
    shared.send(pack(fields))
    shared.assert_alive()
    assert shared.dropped() - before >= 1


def test_other_namespace_gets_no_reply(shared: Child) -> None:
    before = shared.dropped()
    shared.send(m.encode(m.make_call("add", [5, 5], namespace="other")))
    shared.send(pack(call_fields("add", [5, 5], namespace="")))
    shared.assert_alive()
    assert shared.dropped() - before >= 2


def test_unknown_types_are_ignored(shared: Child) -> None:
    for kind in ("bogus", "", "CALL", None, 7, "response", "error", "stdout"):
        shared.send(pack({**call_fields("add", [5, 5]), "type": kind}))
    shared.assert_alive()


# --------------------------------------------------------------------------- ill-typed


@pytest.mark.parametrize(
    "tamper",
    [
        {"function": 42},
        {"function": ["add"]},
        {"args": {"a": 1}},
        {"args": "12"},
        {"namespace": 7},
        {"metadata": [1]},
        {"timestamp": "now"},
    ],
    ids=repr,
)
def test_ill_typed_call_with_str_id(shared: Child, tamper: dict[str, Any]) -> None:
    """Answered with an error for its id, or dropped; either way the worker goes on."""
    bad = {**call_fields(), **tamper}
    shared.send(pack(bad))
    earlier = shared.replies_before_probe()
    assert len(earlier) <= 1
    for reply in earlier:
        assert reply["id"] == bad["id"]
        assert reply["type"] == "error"


def test_ill_typed_call_for_other_namespace_gets_no_reply(shared: Child) -> None:
    bad = call_fields(function=42, namespace="other")
    shared.send(pack(bad))
    assert shared.replies_before_probe() == []


@pytest.mark.parametrize("call_id", [42, None, b"\xff\xfe", ["id"], {"id": "x"}, 1.5], ids=repr)
def test_ill_typed_id_is_dropped(shared: Child, call_id: Any) -> None:
    before = shared.dropped()
    shared.send(pack(call_fields(id=call_id)))
    shared.assert_alive()
    assert shared.dropped() - before >= 1


def test_ill_typed_heartbeat_is_dropped(shared: Child) -> None:
    heartbeat = m.make_heartbeat()
    before = shared.dropped()
    shared.send(pack({**heartbeat, "metadata": [1, 2]}))
    shared.send(pack({**heartbeat, "id": 5}))
    shared.assert_alive()
    assert shared.dropped() - before >= 2


def test_heartbeat_with_odd_metadata_is_echoed(shared: Child) -> None:
    # Only a number that may be sent is echoed; anything else comes back as nil.
    for stamp in ("not a time", None, 2**64 - 1, [[1], {"a": b""}]):
        heartbeat = {**m.make_heartbeat(), "metadata": {"hb_timestamp": stamp, "x": 1}}
        shared.send(pack(heartbeat))
        echo = shared.next_reply()
        assert echo["id"] == heartbeat["id"]
        assert echo["metadata"] == {"hb_timestamp": None, "hb_response": True}
    # A heartbeat that says it is an echo is not echoed back.
    shared.send(pack({**m.make_heartbeat(), "metadata": {"hb_response": True}}))
    shared.assert_alive()


@pytest.mark.parametrize("kind", [["call"], {"t": 1}, []], ids=repr)
def test_unhashable_type_does_not_kill_the_worker(fresh_child: Child, kind: Any) -> None:
    before = fresh_child.dropped()
    fresh_child.send(pack({**call_fields(), "type": kind}))
    fresh_child.assert_alive()
    assert fresh_child.dropped() - before >= 1


# --------------------------------------------------------------------------- bad calls


def test_missing_function(shared: Child) -> None:
    fields = call_fields()
    del fields["function"]
    shared.send(pack(fields))
    reply = shared.next_reply()
    assert reply["id"] == fields["id"]
    assert reply["type"] == "error"
    assert "missing" in reply["error"]
    assert "function" in reply["error"]


def test_null_function_is_missing(shared: Child) -> None:
    fields = call_fields(function=None)
    shared.send(pack(fields))
    reply = shared.next_reply()
    assert reply["id"] == fields["id"]
    assert "missing" in reply["error"]


@pytest.mark.parametrize("name", ["nope", "", "run", "serve", "Add", "add "])
def test_unknown_function(shared: Child, name: str) -> None:
    assert "not found" in shared.call_error(name, [])


@pytest.mark.parametrize("name", ["_private", "__init__", "_stop", "_on_frames", "__class__"])
def test_private_function(shared: Child, name: str) -> None:
    assert "private" in shared.call_error(name, [])


@pytest.mark.parametrize("function", ["add", "add_sync", "add_async"])
@pytest.mark.parametrize("args", [[], [1], [1, 2, 3]], ids=repr)
def test_wrong_argument_count(shared: Child, function: str, args: list[Any]) -> None:
    assert "TypeError" in shared.call_error(function, args)


def test_args_absent_means_no_arguments(shared: Child) -> None:
    fields = call_fields("list_functions")
    del fields["args"]
    shared.send(pack(fields))
    reply = shared.next_reply()
    assert reply["id"] == fields["id"]
    assert "add" in reply["result"]
    assert STATS in reply["result"]


# --------------------------------------------------------------------------- limits


def _call_with_raw_args(function: str, raw_args: bytes) -> tuple[str, bytes]:
    """A call whose ``args`` value is the given msgpack bytes (built by hand)."""
    fields = call_fields(function)
    del fields["args"]
    body = b"".join(pack(key) + pack(value) for key, value in fields.items())
    return fields["id"], map_header(len(fields) + 1) + body + pack("args") + raw_args


def test_1025_deep_payload_is_dropped(shared: Child) -> None:
    before = shared.dropped()
    shared.send(b"\x91" * 1025 + b"\xc0")
    _, payload = _call_with_raw_args("echo", b"\x91" * 1025 + b"\xc0")
    shared.send(payload)
    _, payload = _call_with_raw_args("echo", b"\x91" * 100_000 + b"\xc0")
    shared.send(payload)
    shared.assert_alive()
    assert shared.dropped() - before >= 3


@pytest.mark.parametrize("function", ["echo", "echo_sync"])
def test_deep_but_decodable_args_get_an_error_reply(shared: Child, function: str) -> None:
    """1,000 levels decode (under msgpack's 1,024), but the echo is deeper than MAX_DEPTH."""
    call_id, payload = _call_with_raw_args(function, b"\x91" + b"\x91" * 1000 + b"\xc0")
    shared.send(payload)
    reply = shared.next_reply()
    assert reply["id"] == call_id
    assert reply["type"] == "error"
    assert "deeper" in reply["error"]


def test_oversized_frame_is_dropped(shared: Child) -> None:
    """Past MAX_MESSAGE_BYTES (but under libzmq's MAXMSGSIZE, twice that): dropped, counted."""
    before = shared.dropped()
    payload = bytearray(m.MAX_MESSAGE_BYTES + 1)
    prefix = pack(call_fields())  # would be a valid call, if it were not followed by padding
    payload[: len(prefix)] = prefix
    shared.send(bytes(payload))
    del payload
    shared.assert_alive()
    assert shared.dropped() - before >= 1


@pytest.mark.parametrize(
    ("function", "args"),
    [("echo", [2**64 - 1]), ("echo_sync", [2**64 - 1]), ("add", [2**64 - 1, 0])],
)
def test_uint64_args_are_accepted_but_cannot_be_echoed(
    shared: Child, function: str, args: list[int]
) -> None:
    """uint64 is accepted on input; sending it back is refused with an error reply."""
    fields = call_fields(function, args)
    shared.send(pack(fields))
    reply = shared.next_reply()
    assert reply["id"] == fields["id"]
    assert reply["type"] == "error"
    assert "int64" in reply["error"]


def test_uint64_args_usable_when_the_result_fits(shared: Child) -> None:
    fields = call_fields("add", [2**64 - 1, -(2**63)])
    shared.send(pack(fields))
    reply = shared.next_reply()
    assert reply["id"] == fields["id"]
    assert reply["result"] == 2**63 - 1


def test_all_drops_are_counted(shared: Child) -> None:
    """One of each kind of dropped frame, counted together."""
    before = shared.dropped()
    wrong_app = call_fields(app="other")
    frames = [
        [b"", b"\xc1"],
        [b"", pack([1])],
        [pack(call_fields())],
        [b"", pack(wrong_app)],
        [b"", m.encode(m.make_call("add", [1, 2], namespace="elsewhere"))],
        [b"", pack(call_fields(id=5))],
        [b"", b"\x91" * 1025 + b"\xc0"],
    ]
    for message in frames:
        shared.send_frames(message)
    shared.assert_alive()
    assert shared.dropped() - before >= len(frames)

"""The public API is complete and documented: ``__all__``, docstrings, annotations, py.typed.

Attribute docstrings (a string literal right after ``name: type = value`` in a class or
module body) count as documentation: that is how ``SpawnOptions`` fields, ``ChildWorker``
class attributes and the ``OutputSink`` alias are documented.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.resources
import inspect
import itertools
import pkgutil
import textwrap
import types
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest

import multifrost_trio
from multifrost_trio import sync

PACKAGE = "multifrost_trio"


# --------------------------------------------------------------------------- helpers


def _attribute_docs(body: list[ast.stmt]) -> dict[str, str]:
    """``{name: docstring}`` for ``name [: type] = value`` followed by a string literal."""
    found: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names = [statement.target.id]
        elif isinstance(statement, ast.Assign):
            names = [t.id for t in statement.targets if isinstance(t, ast.Name)]
        else:
            continue
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            for name in names:
                found[name] = following.value.value
    return found


@cache
def _package_modules() -> list[types.ModuleType]:
    modules = [multifrost_trio]
    for info in pkgutil.walk_packages(multifrost_trio.__path__, prefix=f"{PACKAGE}."):
        if info.name.endswith("__main__"):
            continue  # running it would start the CLI
        modules.append(importlib.import_module(info.name))
    return modules


@cache
def _module_attribute_docs() -> dict[str, str]:
    """Module-level attribute docstrings of every module of the package."""
    docs: dict[str, str] = {}
    for module in _package_modules():
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            continue
        docs.update(_attribute_docs(ast.parse(source).body))
    return docs


def _class_attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and of its bases within the package."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith(PACKAGE):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        node = tree.body[0]
        assert isinstance(node, ast.ClassDef)
        docs.update(_attribute_docs(node.body))
    return docs


def _own_public_members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public members defined by ``cls`` or its bases within the package, leaving out what
    a base outside it (``object``, pydantic's ``BaseModel``: ``model_config``) defines."""
    foreign = [klass for klass in cls.__mro__ if not klass.__module__.startswith(PACKAGE)]
    seen = {name for klass in foreign for name in vars(klass)}
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PACKAGE):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            yield name, value


def _is_routine(value: Any) -> bool:
    return isinstance(value, types.FunctionType | staticmethod | classmethod | property)


def _undocumented_members(cls: type) -> list[str]:
    """Public methods and properties of ``cls`` without a docstring, and public data
    attributes with neither an attribute docstring nor a pydantic description."""
    attribute_docs = _class_attribute_docs(cls)
    pydantic_fields: dict[str, Any] = getattr(cls, "model_fields", {})
    missing = []
    for name, value in _own_public_members(cls):
        if _is_routine(value):
            function = value.fget if isinstance(value, property) else value
            if isinstance(function, staticmethod | classmethod):
                function = function.__func__
            if not (function.__doc__ or "").strip():
                missing.append(name)
        elif not attribute_docs.get(name, "").strip():
            field = pydantic_fields.get(name)
            if field is None or not (field.description or "").strip():
                missing.append(name)
    for name, field in pydantic_fields.items():
        if name not in attribute_docs and not (field.description or "").strip():
            missing.append(name)  # a field with a default_factory is not in vars(cls)
    return sorted(set(missing))


def _unannotated(function: Callable[..., Any]) -> list[str]:
    """Parameters (and ``return``) of ``function`` that carry no annotation."""
    signature = inspect.signature(function)
    missing = [
        name
        for name, parameter in signature.parameters.items()
        if name not in ("self", "cls") and parameter.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def _public(module: types.ModuleType) -> list[str]:
    return list(module.__all__)


# --------------------------------------------------------------------------- __all__


@pytest.mark.parametrize("module", [multifrost_trio, sync], ids=lambda m: m.__name__)
def test_every_name_in_all_is_importable(module: types.ModuleType) -> None:
    assert len(set(module.__all__)) == len(module.__all__), "duplicates in __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ lists missing {name!r}"
    namespace: dict[str, Any] = {}
    exec(f"from {module.__name__} import *", namespace)
    assert set(module.__all__) <= set(namespace)


def test_every_public_name_of_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(multifrost_trio).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(multifrost_trio.__all__), sorted(public - set(multifrost_trio.__all__))
    assert "__version__" in multifrost_trio.__all__
    assert isinstance(multifrost_trio.__version__, str)
    assert multifrost_trio.__version__


def test_every_public_definition_of_sync_is_in_all() -> None:
    defined = {
        name
        for name, value in vars(sync).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == sync.__name__
        and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert defined <= set(sync.__all__), sorted(defined - set(sync.__all__))


# --------------------------------------------------------------------------- docstrings


@pytest.mark.parametrize(
    ("module", "name"),
    [(multifrost_trio, n) for n in _public(multifrost_trio) if n != "__version__"]
    + [(sync, n) for n in _public(sync)],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_every_public_name_has_a_docstring(module: types.ModuleType, name: str) -> None:
    value = getattr(module, name)
    if inspect.isclass(value) or inspect.isroutine(value):
        doc = value.__doc__
    else:  # a type alias or a constant: documented by an attribute docstring
        doc = _module_attribute_docs().get(name)
    assert (doc or "").strip(), f"{module.__name__}.{name} has no docstring"


def test_modules_have_docstrings() -> None:
    for module in _package_modules():
        assert (module.__doc__ or "").strip(), f"{module.__name__} has no module docstring"


@pytest.mark.parametrize(
    "cls",
    [
        multifrost_trio.Worker,
        multifrost_trio.ChildWorker,
        multifrost_trio.SpawnOptions,
        sync.BlockingWorker,
        sync.BlockingCallProxy,
    ],
    ids=lambda cls: cls.__name__,
)
def test_core_classes_document_every_public_member(cls: type) -> None:
    assert _undocumented_members(cls) == []


def test_spawn_options_document_every_field() -> None:
    options = multifrost_trio.SpawnOptions
    docs = _class_attribute_docs(options)
    fields = options.model_fields
    assert fields, "SpawnOptions has no fields?"
    undocumented = [
        name
        for name, field in fields.items()
        if not (docs.get(name, "").strip() or (field.description or "").strip())
    ]
    assert undocumented == []


def test_worker_members_are_the_documented_surface() -> None:
    """The handle's public surface (a change here is an API change: update the README)."""
    members = {name for name, _ in _own_public_members(multifrost_trio.Worker)}
    assert {
        "call",
        "with_options",
        "ping",
        "list_functions",
        "metrics",
        "name",
        "pid",
        "timeout",
        "namespace",
        "is_healthy",
        "circuit_open",
        "last_heartbeat_rtt_ms",
        "pending_calls",
    } <= members


@pytest.mark.parametrize(
    "cls",
    [
        value
        for name in _public(multifrost_trio)
        if inspect.isclass(value := getattr(multifrost_trio, name))
    ],
    ids=lambda cls: cls.__name__,
)
def test_public_classes_document_their_methods(cls: type) -> None:
    missing = [
        name
        for name, value in _own_public_members(cls)
        if _is_routine(value)
        and not (
            (value.fget if isinstance(value, property) else inspect.unwrap(value)).__doc__ or ""
        ).strip()
    ]
    assert missing == [], f"{cls.__name__}: {missing}"


def test_dataclass_snapshots_are_documented() -> None:
    for cls in (multifrost_trio.MetricsSnapshot, multifrost_trio.FunctionMetrics):
        assert dataclasses.is_dataclass(cls)
        assert (cls.__doc__ or "").strip()


# --------------------------------------------------------------------------- typing


def test_py_typed_marker_is_shipped() -> None:
    assert importlib.resources.files(PACKAGE).joinpath("py.typed").is_file()


@pytest.mark.parametrize(
    ("module", "name"),
    [(multifrost_trio, n) for n in _public(multifrost_trio)] + [(sync, n) for n in _public(sync)],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_public_functions_and_methods_are_annotated(module: types.ModuleType, name: str) -> None:
    value = getattr(module, name)
    if inspect.isfunction(value):
        assert _unannotated(inspect.unwrap(value)) == [], name
    elif inspect.isclass(value) and value.__module__.startswith(PACKAGE):
        for member, attribute in _own_public_members(value):
            if isinstance(attribute, property):
                assert attribute.fget is not None
                assert _unannotated(attribute.fget) == [], f"{name}.{member}"
            elif isinstance(attribute, types.FunctionType):
                assert _unannotated(attribute) == [], f"{name}.{member}"

"""The exception tree: groups by what the caller can do, and the wire axis beside them."""

from __future__ import annotations

import ast
import inspect
import pickle
import re
from pathlib import Path

import pytest

from orchestrator import errors
from orchestrator.errors import (
    AccountFullError,
    ApiError,
    AuthenticationError,
    BadRequestError,
    BodyTooLargeError,
    ConfigError,
    ConfigurationError,
    ForbiddenError,
    InputError,
    InvalidInputError,
    JournalError,
    JournalMismatchError,
    JournalStateError,
    NotFoundError,
    OrchestratorError,
    RateLimitedError,
    RecordError,
    RetryLaterError,
    ServerError,
    TransientError,
    TransportError,
)
from orchestrator.provenance import Source

GROUPS: dict[type[OrchestratorError], set[type[OrchestratorError]]] = {
    ConfigurationError: {ConfigError, AuthenticationError, ForbiddenError},
    InvalidInputError: {
        InputError,
        RecordError,
        BadRequestError,
        BodyTooLargeError,
        NotFoundError,
        JournalMismatchError,
    },
    RetryLaterError: {
        AccountFullError,
        RateLimitedError,
        TransientError,
        ServerError,
        TransportError,
    },
    TransientError: {ServerError, TransportError},
    JournalError: {JournalMismatchError, JournalStateError},
    ApiError: {
        AuthenticationError,
        ForbiddenError,
        NotFoundError,
        BadRequestError,
        BodyTooLargeError,
        AccountFullError,
        RateLimitedError,
        ServerError,
    },
}


def _classes() -> list[type[BaseException]]:
    return [
        value
        for name in errors.__all__
        if inspect.isclass(value := getattr(errors, name)) and issubclass(value, BaseException)
    ]


def _instance(cls: type[OrchestratorError]) -> OrchestratorError:
    if issubclass(cls, RateLimitedError):
        return cls("m", retry_after=1.0, status=429)
    if issubclass(cls, ApiError):
        return cls("m", status=500)
    if issubclass(cls, RecordError):
        return cls("rule", "m")
    return cls("m")


@pytest.mark.parametrize("group", list(GROUPS), ids=lambda g: g.__name__)
def test_each_group_catches_exactly_its_members(group: type[OrchestratorError]) -> None:
    """`except Group` catches every member of the group and no other class of the tree."""
    for cls in _classes():
        assert issubclass(cls, OrchestratorError)
        caught = False
        try:
            raise _instance(cls)
        except group:
            caught = True
        except OrchestratorError:
            pass
        assert caught == (cls is group or cls in GROUPS[group]), cls.__name__


def test_every_error_is_named_error_and_drawn_in_the_tree() -> None:
    """Every class a caller can catch ends in Error and appears in the module's drawn tree."""
    doc = errors.__doc__ or ""
    for cls in _classes():
        assert cls.__name__.endswith("Error"), cls.__name__
        assert f" {cls.__name__} " in doc, cls.__name__


def test_transport_errors_have_no_status_and_api_errors_always_do() -> None:
    """No answer is not an ApiError; an ApiError always carries the status that came back."""
    assert not issubclass(TransportError, ApiError)
    assert not hasattr(TransportError("m"), "status")
    with pytest.raises(TypeError):
        ApiError("m")  # type: ignore[call-arg]
    assert ServerError("m", status=503).status == 503


def test_value_errors_by_convention() -> None:
    """A bad setting and a journal step out of order are ValueErrors too, as Python expects."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(JournalStateError, ValueError)


def test_record_error_survives_pickling() -> None:
    """A RecordError crosses a process boundary with its rule, key and source."""
    error = RecordError("key-missing", "no key", key="k", source=Source("f", 3))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.rule, copy.key, copy.source, str(copy)) == (
        "key-missing",
        "k",
        Source("f", 3),
        str(error),
    )
    assert isinstance(copy, InvalidInputError)


def _message_strings(tree: ast.AST) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_the_library_never_names_a_command_line_flag() -> None:
    """Outside the command's own modules no string names a flag: messages name settings."""
    package = Path(errors.__file__).parent
    command = {
        "cli.py",
        "run_command.py",
        "options.py",
        "demo.py",
        "__main__.py",
        "outbox_cli.py",
        "worker_cli.py",
    }
    flag = re.compile(r"(?<![-\w])--[a-z][a-z-]+")
    found = [
        f"{path.relative_to(package)}: {text!r}"
        for path in sorted(package.rglob("*.py"))
        if path.name not in command
        for text in _message_strings(ast.parse(path.read_text()))
        if flag.search(text)
    ]
    assert found == []

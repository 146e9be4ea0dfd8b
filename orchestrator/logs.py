"""Logging: the library's loggers, the command's output, and a capture for tests.

The library logs structured events (``import.finished``, ``api.call_failed``...) through the
standard library's ``logging``, on loggers named ``orchestrator.<module>``, and configures nothing:
like httpx, it is silent until the application configures logging. Each event reaches ``logging``
as a record whose message is the event's dict, so ``structlog.stdlib.ProcessorFormatter`` renders
it with every key (that is what the command does: JSON lines when stderr is not a terminal, the
console renderer when it is), and a plain ``logging`` formatter shows ``event key=value ...``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import IO, Any

import orjson
import structlog

__all__ = [
    "LOGGER_NAME",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "capture_events",
    "configure_logging",
    "get_logger",
]

LOG_LEVELS = ("auto", "debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
#: The parent of every logger of the library.
LOGGER_NAME = "orchestrator"

# The logging HOWTO's advice for libraries: without a handler of its own, a warning of ours would
# reach logging's last resort (stderr) in an application that configured nothing.
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())


class _Event(dict[str, Any]):
    """An event's dict that reads as ``event key=value ...`` in a plain ``logging`` formatter."""

    def __str__(self) -> str:
        rest = " ".join(f"{key}={value!r}" for key, value in self.items() if key != "event")
        return f"{self.get('event', '')} {rest}".rstrip()


def _as_event(_: Any, __: str, event_dict: structlog.typing.EventDict) -> _Event:
    return _Event(event_dict)


#: The library's own chain, set per logger: nothing here reads or changes structlog's global
#: configuration, so an application's own structlog set-up neither shapes nor sees these events
#: unless it configures ``logging``.
_LIBRARY_PROCESSORS: tuple[Any, ...] = (
    structlog.stdlib.filter_by_level,  # cheap exit for a level nobody listens to
    structlog.contextvars.merge_contextvars,  # collection=..., import_id=... bound by the engine
    _as_event,
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger over the standard library's ``logging.getLogger(name)``.

    Args:
        name: the logger's name, ``orchestrator.<module>``.
    """
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=_LIBRARY_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return logger


# --------------------------------------------------------------------------- the command's output


def _orjson_dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


class _StderrHandler(logging.StreamHandler[IO[str]]):
    """Writes to whatever ``sys.stderr`` is now, so a live progress display can interleave logs."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def configure_logging(*, level: str = "auto", fmt: str = "auto") -> None:
    """Send the library's logs to stderr: for the command and the worker, never the library.

    Args:
        level: the lowest level shown: ``debug``, ``info``, ``warning``, ``error``, or ``auto``
            (``info``, but ``warning`` on a terminal, where the progress display tells the rest).
        fmt: ``console``, ``json``, or ``auto`` (console on a terminal, JSON otherwise).
    """
    tty = sys.stderr.isatty()
    if fmt == "auto":
        fmt = "console" if tty else "json"
    if level == "auto":
        level = "warning" if tty else "info"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    stamp: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                *stamp,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            # records of other libraries (aiohttp, asyncio): the same shape
            foreign_pre_chain=[structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger(LOGGER_NAME).setLevel(getattr(logging, level.upper()))


# --------------------------------------------------------------------------- tests


@contextlib.contextmanager
def capture_events(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Collect the library's events as dicts (``event``, ``log_level`` and every key), for tests.

    Use it as ``with capture_events() as events:``; the library's loggers are set to ``level``
    while the block runs, and restored after.

    Args:
        level: the lowest level collected.
    """
    events: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, dict):
                events.append({**record.msg, "log_level": record.levelname.lower()})

    logger = logging.getLogger(LOGGER_NAME)
    handler, before = Collect(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)

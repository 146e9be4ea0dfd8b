"""``insight-import worker``: the long-lived outbox worker as a command.

The command, not the library, owns the process: it configures logging, installs the SIGTERM and
SIGINT handlers (the first stops claiming and lets submits in progress get their import id; the
process exits within ``--shutdown-timeout`` even if one hangs; a second signal exits at once,
every step being a transaction) and turns the outcome into the exit status: 0 stopped by a
signal, or ``--burst`` with every record imported; 1 ``--burst`` done with some rows
dead-lettered by this run; 2 usage or configuration error; 3 a fatal error (credentials, or
this worker fenced out: declared dead and its imports adopted by another).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import anyio

__all__ = ["add_worker_command", "run_worker_command"]

EXIT_OK, EXIT_DEAD_LETTERS, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3


_ENV_PREFIX = "INSIGHT_IMPORT_"


def _log() -> Any:
    # loaded with the command that runs, not with the parser (``--help`` stays light)
    from orchestrator.logs import get_logger

    return get_logger("orchestrator.worker_cli")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: (flag, type, default, help): each also settable as INSIGHT_IMPORT_<FLAG> (dashes as underscores).
_OPTIONS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    (
        "database",
        str,
        None,
        "sqlite:///ABSOLUTE/PATH (default: outbox.sqlite in the user's state directory), "
        "or postgresql://USER@HOST:PORT/DB (any number of workers share it)",
    ),
    (
        "lease",
        _positive(float),
        15.0,
        "PostgreSQL: seconds without a heartbeat after which a worker is dead and adopted",
    ),
    ("accounts", str, None, "accounts file (TOML); without one, the default account from env"),
    ("http", str, None, "serve /healthz, /readyz and /metrics on HOST:PORT"),
    ("linger", float, 5.0, "seconds a record waits for company before a partial batch is sent"),
    ("shutdown-timeout", _positive(float), 20.0, "seconds to finish after SIGTERM before exiting"),
    ("poll-interval", _positive(float), 0.5, "seconds between looks at the outbox for new rows"),
    ("max-held-bytes", _positive(int), 100_000_000, "bytes of bodies held at once in the process"),
    ("max-concurrent", _positive(int), 5, "bulk imports in flight per account"),
    ("max-body-bytes", _positive(int), 50_000_000, "hard cap on one request body, in bytes"),
    ("poll-min", float, 5.0, "seconds: least time between two status polls of one import"),
    ("poll-max", float, 30.0, "seconds: most time between two status polls of one import"),
    ("max-resubmits", int, 2, "times a Failed import is sent again before dead-lettering"),
    ("request-timeout", _positive(float), 120.0, "seconds allowed for one API call"),
    (
        "parse-processes",
        int,
        None,
        "processes validating large claims (default: one per CPU; 0: in a thread)",
    ),
    ("base-url", str, None, "API root of accounts that set none (default: the --region host)"),
    ("region", str, None, "r1, r2 or r3: region of accounts that set none"),
    ("log-level", str, "info", "debug, info, warning or error"),
    ("log-format", str, "auto", "console, json, or auto (console on a terminal)"),
)
_CHOICES = {
    "region": ("r1", "r2", "r3"),
    "log-level": ("debug", "info", "warning", "error"),
    "log-format": ("auto", "console", "json"),
}


def add_worker_command(commands: Any) -> None:
    """Add ``worker`` to the ``insight-import`` subparsers ``commands``."""
    worker = commands.add_parser(
        "worker",
        help="drain the outbox into bulk imports, forever (or once with --burst)",
        description=(
            "Drain the outbox table into bulk imports, per account of the accounts file. "
            "SIGTERM/SIGINT stop it (state saved); --burst imports what the outbox holds and "
            "what arrives meanwhile, then exits. Every option is also settable as "
            "INSIGHT_IMPORT_<OPTION>."
        ),
    )
    worker.add_argument("--burst", action="store_true", default=None, help="drain, then exit")
    for name, kind, _, text in _OPTIONS:
        worker.add_argument(
            f"--{name}", type=kind, default=None, help=text, choices=_CHOICES.get(name)
        )


def _resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Flag > env > default, for each option."""
    values: dict[str, Any] = {}
    for name, kind, default, _ in _OPTIONS:
        dest = name.replace("-", "_")
        given = getattr(args, dest)
        if given is None:
            text = environ.get(_ENV_PREFIX + dest.upper())
            if text:
                try:
                    given = kind(text)
                except (ValueError, argparse.ArgumentTypeError) as error:
                    raise _Usage(f"{_ENV_PREFIX}{dest.upper()}: {error}") from None
                if name in _CHOICES and given not in _CHOICES[name]:
                    raise _Usage(f"{_ENV_PREFIX}{dest.upper()} must be one of {_CHOICES[name]}")
        values[dest] = default if given is None else given
    burst = args.burst
    if burst is None:
        burst = environ.get(_ENV_PREFIX + "BURST", "").lower() in {"1", "true", "yes", "on"}
    values["burst"] = bool(burst)
    return values


class _Usage(Exception):
    pass


def run_worker_command(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Run ``insight-import worker`` and return its exit status."""
    from orchestrator.accounts import load_accounts
    from orchestrator.errors import ConfigError, JournalError
    from orchestrator.logs import configure_logging
    from orchestrator.outbox.database import parse_database
    from orchestrator.settings import Settings
    from orchestrator.worker_http import parse_address

    try:
        opts = _resolve(args, environ)
    except _Usage as error:
        print(f"insight-import worker: {error}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    configure_logging(level=opts["log_level"], fmt=opts["log_format"])
    try:
        database = parse_database(opts["database"], environ=environ)
        client_options: dict[str, Any] = {"request_timeout": opts["request_timeout"]}
        if opts["region"] is not None:
            client_options["region"] = opts["region"]
        if opts["base_url"] is not None:
            client_options["base_url"] = opts["base_url"]
        accounts = load_accounts(opts["accounts"], environ=environ, **client_options)
        settings = Settings(
            max_concurrent=opts["max_concurrent"],
            max_body_bytes=opts["max_body_bytes"],
            poll_min=opts["poll_min"],
            poll_max=opts["poll_max"],
            max_resubmits=opts["max_resubmits"],
            linger=opts["linger"],
            parse_processes=opts["parse_processes"],
        )
        http = parse_address(opts["http"]) if opts["http"] else None
    except ConfigError as error:
        _log().error("worker.config_error", error=str(error))
        return EXIT_USAGE
    try:
        return anyio.run(
            _serve,
            database,
            accounts,
            settings,
            http,
            opts,
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as error:
        _log().error("worker.config_error", error=str(error))
        return EXIT_USAGE
    except JournalError as error:
        _log().error("worker.database_error", error=str(error))
        return EXIT_USAGE if "another worker" in str(error) else EXIT_FATAL


async def _serve(
    database: Any,
    accounts: Any,
    settings: Any,
    http: tuple[str, int] | None,
    opts: dict[str, Any],
) -> int:
    import contextlib

    from orchestrator.errors import AuthenticationError, ForbiddenError, OrchestratorError
    from orchestrator.outbox.base import FencedOut
    from orchestrator.outbox.database import open_outbox
    from orchestrator.taskgroups import first_error_unwrapped
    from orchestrator.worker import Worker
    from orchestrator.worker_http import serve_http

    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            open_outbox(database, worker=True, **_store_options(database, accounts, settings, opts))
        )
        worker = await stack.enter_async_context(
            Worker(
                store,
                accounts,
                settings=settings,
                poll_interval=opts["poll_interval"],
                max_held_bytes=opts["max_held_bytes"],
            )
        )
        if http is not None:
            host, port = await stack.enter_async_context(serve_http(worker, *http))
            _log().info("worker.http", address=f"{host}:{port}")
        try:
            with first_error_unwrapped():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_on_signals, worker, opts["shutdown_timeout"])
                    await worker.run(burst=opts["burst"])
                    tg.cancel_scope.cancel()
        except FencedOut:
            # logged as worker.fenced_out: another worker owns this one's imports now
            return EXIT_FATAL
        except (AuthenticationError, ForbiddenError) as error:
            _log().error("worker.fatal", error=str(error), detail="check the account's credentials")
            return EXIT_FATAL
        except OrchestratorError as error:
            _log().error("worker.fatal", error=str(error))
            return EXIT_FATAL
        if opts["burst"] and worker.dead_lettered:
            return EXIT_DEAD_LETTERS
        return EXIT_OK
    raise AssertionError("unreachable")  # pragma: no cover


def _store_options(database: Any, accounts: Any, settings: Any, opts: dict[str, Any]) -> Any:
    """The shared store's options: this replica's name (host:pid), its lease, and each
    account's slots (its ``max_concurrent``, counted for every worker together)."""
    if not database.shared:
        return {}
    import socket

    return {
        "name": f"{socket.gethostname()}:{os.getpid()}",
        "lease": opts["lease"],
        "capacity": {
            name: account.max_concurrent or settings.max_concurrent
            for name, account in accounts.items()
        },
    }


async def _on_signals(worker: Any, shutdown_timeout: float) -> None:
    """First SIGTERM/SIGINT: stop, and exit hard if that takes longer than the grace period;
    a second one: exit at once (every step is a transaction: nothing is half written)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            async for signum in signals:
                if worker.stopping:
                    _log().warning("worker.forced_exit", signal=signal.Signals(signum).name)
                    _exit_now()
                _log().info("worker.signal", signal=signal.Signals(signum).name)
                worker.stop()
                tg.start_soon(_deadline, shutdown_timeout)


async def _deadline(seconds: float) -> None:
    await anyio.sleep(seconds)
    _log().warning("worker.shutdown_timeout", timeout_s=seconds)
    _exit_now()


def _exit_now() -> None:
    sys.stderr.flush()
    os._exit(EXIT_OK)

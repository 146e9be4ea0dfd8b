"""The ``insight-import`` command: run, demo, simulator, status (the outbox commands and the
worker live in ``outbox_cli.py`` and ``worker_cli.py``).

Exit status: 0 every record imported; 1 finished, some records in the dead-letter file; 2 usage,
configuration or input error before any import; 3 aborted (credentials, region, or an error that
retrying cannot fix); 130 interrupted with the state saved.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import os
import sys
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from orchestrator.errors import (
    BodyTooLargeError,
    ConfigError,
    ForbiddenError,
    JournalError,
    JournalMismatchError,
    OrchestratorError,
)
from orchestrator.options import OPTIONS
from orchestrator.outbox_cli import OUTBOX_COMMANDS, add_outbox_commands
from orchestrator.worker_cli import add_worker_command

__all__ = ["main"]

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# --------------------------------------------------------------------------- argument parsing


_EXIT_CODES = """\
exit status:
  0    every record imported
  1    the run finished, but some records were rejected (all are in the dead-letter file)
  2    usage, configuration or input error before any import
  3    aborted: bad credentials, wrong region, unreachable host, or an error retrying cannot fix
  130  interrupted (SIGINT/SIGTERM); the state is saved: run the same command again to resume
"""


def _version() -> str:
    # Imported here: importlib.metadata is ~40 ms of a start-up that seldom shows the version.
    import importlib.metadata

    try:
        return importlib.metadata.version("insight-orchestrator")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version and exit")
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="insight-import",
        description="Import JSON Lines records into Dotdigital Insight data collections.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="import JSON Lines files into a collection",
        description=(
            "Import JSON Lines files (.gz allowed, - for stdin). Credentials come from "
            "DOTDIGITAL_API_USER and DOTDIGITAL_API_PASSWORD. Every option can also be set with "
            "INSIGHT_IMPORT_<OPTION> or in a TOML file given with --config."
        ),
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="JSONL file, .gz, or - for stdin")
    run.add_argument("--config", help="TOML file of options (see config/default.toml)")
    run.add_argument(
        "--replay",
        metavar="DEAD_LETTER_FILE",
        help="send the records of a dead-letter file again (its record members) instead of INPUT",
    )
    for option in OPTIONS:
        shown = option.help
        if option.default not in (None, False):
            shown += f" (default: {option.default})"
        kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": shown}
        if option.is_flag:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["type"] = option.parse
            if option.choices:
                kwargs["choices"] = option.choices
        run.add_argument(f"--{option.name}", **kwargs)

    demo = commands.add_parser(
        "demo",
        help="the whole job against the bundled simulator, with sample data (no account)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--records", type=int, default=20_000, help="sample orders to generate")
    demo.add_argument("--output", default="insight-demo", help="folder for sample, report, journal")
    demo.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto", help="live progress display"
    )
    demo.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="lowest log level shown",
    )
    demo.add_argument(
        "--log-format", choices=("auto", "console", "json"), default="auto", help="log format"
    )

    sim = commands.add_parser(
        "simulator",
        help="serve the bundled Insight import API simulator",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    sim.add_argument("--port", type=int, default=8787, help="port to listen on; 0 picks a free one")
    sim.add_argument("--records-per-second", type=float, default=20_000.0, help="import speed")
    sim.add_argument("--min-processing", type=float, default=0.0, help="seconds, per import")
    sim.add_argument("--jitter", type=float, default=0.2, help="+/- share of processing time")
    sim.add_argument("--max-active-imports", type=int, default=5, help="slots of the account")
    sim.add_argument("--max-body-bytes", type=int, default=50_000_000, help="larger bodies: 413")
    sim.add_argument(
        "--api-endpoint",
        default=None,
        help="the ApiEndpoint account-info names (default: the simulator's own URL)",
    )
    sim.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")

    status = commands.add_parser("status", help="show an import's status")
    status.add_argument("import_id")
    status.add_argument("--base-url", default=None, help="API root (default: the --region host)")
    status.add_argument(
        "--region", choices=("r1", "r2", "r3"), default=None, help="Dotdigital region (default: r1)"
    )

    add_outbox_commands(commands)
    add_worker_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``insight-import`` command and return its exit status."""
    # The command owns its process: collect young objects less often. Every record makes a few
    # short-lived objects, and the default threshold (700) spends ~10% of a run in the collector.
    gc.set_threshold(50_000, 20, 100)
    _tune_malloc()
    args = _parser().parse_args(argv)
    _import_structlog_without_rich()
    # What is loaded by now lives as long as the process: keep full collections off it.
    gc.freeze()
    command = args.command
    if command == "run":
        from orchestrator.run_command import main_run

        code = main_run(args)
    elif command == "demo":
        code = _main_demo(args)
    elif command == "simulator":
        code = _main_simulator(args)
    elif command == "status":
        code = _main_status(args)
    elif command in OUTBOX_COMMANDS:
        from orchestrator.outbox_cli import run_outbox_command

        code = run_outbox_command(args)
    else:
        from orchestrator.worker_cli import run_worker_command

        code = run_worker_command(args)
    return code


def _tune_malloc() -> None:
    """Keep glibc's heap from growing with the length of a run. glibc only; elsewhere a no-op.

    - Every allocation of 1 MB or more gets its own mapping, returned to the system when freed.
      glibc raises its mmap threshold (up to 32 MB) after the first big block is freed; from then
      on, bodies being built and read back (up to 50 MB each) come from the heap, interleave with
      small long-lived objects, and the heap only grows: about +100 MB over a 3 GB run.
    - One malloc arena, not one per thread that ever allocated: the worker threads (reading,
      journal, sealing) each warmed an arena of their own, and the run's memory kept climbing
      for as long as new threads came into play (+40 MB between a 1 GB and a 3 GB input).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 1)


def _import_structlog_without_rich() -> None:
    """Import structlog with rich kept out of it, unless one of them is loaded already.

    structlog imports rich when it is installed (~80 ms of the command's start-up), only to
    draw tracebacks on a console: the command's logs carry none (the library never logs one),
    and the progress display imports rich for itself when it is shown.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def fail(message: str, code: int) -> int:
    """Tell the user what went wrong on stderr; return the exit status to leave with."""
    print(f"insight-import: error: {message}", file=sys.stderr)
    return code


# The library's messages name its settings (fresh=True, max_body_bytes); the command says which
# of its flags set them. The first matching class wins, so subclasses come first.
_HINTS: tuple[tuple[type[OrchestratorError], str], ...] = (
    (
        JournalMismatchError,
        "--fresh starts over and imports every input anew; --journal PATH uses another journal",
    ),
    (JournalError, "--journal PATH uses another journal file"),
    (
        ForbiddenError,
        "--region r1|r2|r3 picks the account's region; --base-url URL an explicit API root",
    ),
    (BodyTooLargeError, "--max-body-bytes N lowers the cap on one request body"),
)


def explain(error: OrchestratorError) -> str:
    """The error's message, followed by the flag that fixes it when there is one."""
    for kind, hint in _HINTS:
        if isinstance(error, kind):
            return f"{error}\n  hint: {hint}"
    return str(error)


# --------------------------------------------------------------------------- demo


def _main_demo(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.demo import run_demo
    from orchestrator.logs import configure_logging
    from orchestrator.run_command import Job, execute_async

    configure_logging(level=args.log_level, fmt=args.log_format)

    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        return anyio.run(run_demo, Path(args.output), args.records, progress, execute_async, Job)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------- simulator, status


def _main_simulator(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.logs import configure_logging
    from orchestrator.simulator import SimulatorConfig, serve

    configure_logging(level="info", fmt="auto")
    username = os.environ.get("DOTDIGITAL_API_USER")
    password = os.environ.get("DOTDIGITAL_API_PASSWORD")
    config = SimulatorConfig(
        records_per_second=args.records_per_second,
        min_processing_s=args.min_processing,
        jitter=args.jitter,
        max_active_imports=args.max_active_imports,
        max_body_bytes=args.max_body_bytes,
        api_endpoint=args.api_endpoint,
        seed=args.seed,
    )
    if username:
        config.username = username
    if password:
        config.password = password

    def started(sim: Any) -> None:
        base_url = sim.base_url
        print(f"Insight import API simulator listening on {base_url}", flush=True)
        print(f"  user: {config.username}", flush=True)
        if not password:  # a password the operator chose is not echoed back
            print(f"  password: {config.password}", flush=True)
        print(f"  inspect: {base_url}/_simulator/stats  (Ctrl-C to stop)", flush=True)

    try:
        with suppress(KeyboardInterrupt):
            anyio.run(lambda: serve(config, host=args.host, port=args.port, on_started=started))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return fail(
                f"port {args.port} on {args.host} is already in use: stop what listens there, "
                "or pick another with --port (0 takes a free one)",
                EXIT_USAGE,
            )
        return fail(f"cannot listen on {args.host}:{args.port}: {error.strerror}", EXIT_USAGE)
    return EXIT_OK


def _main_status(args: argparse.Namespace) -> int:
    import anyio
    import orjson

    from orchestrator.client import ClientSettings, InsightClient
    from orchestrator.logs import configure_logging

    configure_logging(level="warning", fmt="auto")
    try:
        settings = ClientSettings.from_env(base_url=args.base_url, region=args.region or "r1")
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)

    async def fetch() -> dict[str, Any]:
        async with InsightClient(settings) as client:
            status = await client.import_status(args.import_id)
        return {
            "import_id": status.import_id,
            "status": status.status,
            "state": status.state.name.lower(),
            "summary": None
            if status.summary is None
            else {
                "total_records": status.summary.total_records,
                "total_imported": status.summary.total_imported,
                "total_rejected": status.summary.total_rejected,
            },
            "failures": [
                {"key": f.key, "reason": f.reason, "details": list(f.details)}
                for f in status.failures
            ],
        }

    try:
        answer = anyio.run(fetch)
    except OrchestratorError as error:  # an API answer, or no answer at all
        return fail(explain(error), EXIT_ABORTED)
    sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK

"""The ``insight-import`` command: run, demo, simulator, status (and the worker's placeholder).

Exit status: 0 every record imported; 1 finished, some records in the dead-letter file; 2 usage,
configuration or input error before any import; 3 aborted (credentials, region, or an error that
retrying cannot fix); 130 interrupted with the state saved.

Every command imports what it needs when it runs: ``--help`` and the parser need none of the
HTTP client, the engine or the journal; ``run`` loads rich only to show its progress display,
and never the simulator (aiohttp.web) nor the demo.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from orchestrator.errors import (
    ApiError,
    AuthenticationError,
    ConfigError,
    ForbiddenError,
    InputError,
    JournalError,
    JournalMismatch,
    OrchestratorError,
)
from orchestrator.options import OPTIONS, resolve_options
from orchestrator.records import Collection
from orchestrator.settings import Settings

if TYPE_CHECKING:
    from orchestrator.client import ClientSettings
    from orchestrator.journal import SqliteJournal
    from orchestrator.outcomes import ImportResult

__all__ = ["main"]

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# --------------------------------------------------------------------------- argument parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="insight-import",
        description="Import JSON Lines records into Dotdigital Insight data collections.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="import JSON Lines files into a collection",
        description=(
            "Import JSON Lines files (.gz allowed, - for stdin). Credentials come from "
            "DOTDIGITAL_API_USER and DOTDIGITAL_API_PASSWORD. Every option can also be set with "
            "INSIGHT_IMPORT_<OPTION> or in a TOML file given with --config."
        ),
    )
    run.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL file, .gz, or - for stdin")
    run.add_argument("--config", help="TOML file of options (see config/default.toml)")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": option.help}
        if option.name == "fresh":
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["type"] = option.parse
            if option.choices:
                kwargs["choices"] = option.choices
        run.add_argument(f"--{option.name}", **kwargs)

    demo = commands.add_parser(
        "demo", help="the whole job against the bundled simulator, with sample data (no account)"
    )
    demo.add_argument("--records", type=int, default=20_000, help="sample orders to generate")
    demo.add_argument("--output", default="insight-demo", help="folder for sample, report, journal")
    demo.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    demo.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    demo.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")

    sim = commands.add_parser("simulator", help="serve the bundled Insight import API simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787)
    sim.add_argument("--records-per-second", type=float, default=20_000.0)
    sim.add_argument("--min-processing", type=float, default=0.0, help="seconds, per import")
    sim.add_argument("--jitter", type=float, default=0.2)
    sim.add_argument("--max-active-imports", type=int, default=5)
    sim.add_argument("--max-body-bytes", type=int, default=50_000_000)
    sim.add_argument("--seed", type=int, default=None)

    status = commands.add_parser("status", help="show an import's status")
    status.add_argument("import_id")
    status.add_argument("--base-url", default=None)
    status.add_argument("--region", choices=("r1", "r2", "r3"), default=None)

    commands.add_parser("worker", help="the long-lived outbox worker (not built yet)")
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
        code = _main_run(args)
    elif command == "demo":
        code = _main_demo(args)
    elif command == "simulator":
        code = _main_simulator(args)
    elif command == "status":
        code = _main_status(args)
    else:
        print(
            "insight-import worker: the long-lived outbox worker is not part of this release; "
            "use `insight-import run` or the Orchestrator API.",
            file=sys.stderr,
        )
        code = EXIT_USAGE
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


def _fail(message: str, code: int) -> int:
    print(f"insight-import: error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- run


@dataclass(frozen=True, slots=True)
class _Job:
    """Everything one import needs, resolved from options or built by the demo."""

    inputs: tuple[str, ...]
    collection: Collection
    client: ClientSettings
    settings: Settings
    journal: Path
    dead_letter: Path
    report: Path | None
    fresh: bool
    progress: bool


def _main_run(args: argparse.Namespace) -> int:
    from orchestrator.logs import configure_logging

    flags = {option.dest: getattr(args, option.dest) for option in OPTIONS}
    try:
        opts = resolve_options(flags, config_path=args.config)
        configure_logging(level=opts["log_level"], fmt=opts["log_format"])
        job = _job_from_options(tuple(args.inputs), opts)
    except (ConfigError, InputError) as error:
        return _fail(str(error), EXIT_USAGE)
    return _execute(job)


def _job_from_options(inputs: tuple[str, ...], opts: dict[str, Any]) -> _Job:
    from orchestrator.client import ClientSettings
    from orchestrator.sources import validate_inputs

    if not opts["collection"]:
        raise ConfigError("--collection is required (or INSIGHT_IMPORT_COLLECTION)")
    collection = Collection(opts["collection"], opts["scope"], opts["type"])
    settings = Settings(
        max_concurrent=opts["max_concurrent"],
        max_body_bytes=opts["max_body_bytes"],
        poll_min=opts["poll_min"],
        poll_max=opts["poll_max"],
        max_resubmits=opts["max_resubmits"],
        parse_processes=opts["parse_processes"],
    )
    client = ClientSettings.from_env(
        base_url=opts["base_url"], region=opts["region"], request_timeout=opts["request_timeout"]
    )
    if inputs.count("-") > 1:
        raise ConfigError("standard input (-) can be given only once")
    anyio.run(validate_inputs, list(inputs))
    origins = tuple(i if i == "-" else str(Path(i).resolve()) for i in inputs)
    journal = (
        Path(opts["journal"]) if opts["journal"] else _default_journal(collection, origins, client)
    )
    dead_letter = (
        Path(opts["dead_letter"]) if opts["dead_letter"] else journal.parent / "dead-letter.jsonl"
    )
    progress = opts["progress"] == "on" or (opts["progress"] == "auto" and sys.stderr.isatty())
    return _Job(
        inputs=origins,
        collection=collection,
        client=client,
        settings=settings,
        journal=journal,
        dead_letter=dead_letter,
        report=Path(opts["report"]) if opts["report"] else None,
        fresh=bool(opts["fresh"]),
        progress=progress,
    )


def _default_journal(
    collection: Collection, inputs: tuple[str, ...], client: ClientSettings
) -> Path:
    """One journal per command: the same command finds its journal again and resumes."""
    import platformdirs

    identity = orjson.dumps([collection.name, str(collection.scope), inputs, client.api_root])
    digest = hashlib.sha256(identity).hexdigest()[:12]
    state = Path(platformdirs.user_state_dir("insight-orchestrator", appauthor=False))
    return state / f"{collection.name}-{digest}.sqlite"


def _execute(job: _Job) -> int:
    try:
        return anyio.run(_execute_async, job)
    except KeyboardInterrupt:  # a second Ctrl-C before the handler was installed
        return EXIT_INTERRUPTED


async def _execute_async(job: _Job) -> int:
    import structlog

    from orchestrator.client import InsightClient
    from orchestrator.engine import Orchestrator
    from orchestrator.journal import SqliteJournal
    from orchestrator.outcomes import RunStats

    gc.freeze()  # as in main: the modules a run needs are loaded now, for good
    log = structlog.get_logger("orchestrator.cli")
    stats = RunStats()
    result: ImportResult | None = None
    interrupted = False
    async with AsyncExitStack() as stack:
        try:
            journal = await stack.enter_async_context(SqliteJournal(job.journal))
        except JournalError as error:
            return _fail(str(error), EXIT_USAGE)
        orchestrator = Orchestrator(InsightClient(job.client), job.settings)
        await stack.enter_async_context(orchestrator)
        display = None
        if job.progress:
            from orchestrator.progress import ProgressDisplay  # rich: only when it is shown

            display = await stack.enter_async_context(ProgressDisplay(stats, enabled=True))
        code: int | None = None
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        if interrupted:  # second signal: leave now; the journal is consistent
                            os._exit(EXIT_INTERRUPTED)
                        interrupted = True
                        log.warning("run.interrupted", signal=signal.Signals(signum).name)
                        print(
                            "\ninsight-import: stopping (finishing submits in progress); "
                            "press Ctrl-C again to quit at once",
                            file=sys.stderr,
                        )
                        run_scope.cancel()

            tg.start_soon(watch_signals)
            with anyio.CancelScope() as run_scope:
                try:
                    result = await orchestrator.import_files(
                        job.collection, job.inputs, journal=journal, fresh=job.fresh, stats=stats
                    )
                except (JournalMismatch, InputError) as error:
                    code = _fail(str(error), EXIT_USAGE)
                except (AuthenticationError, ForbiddenError) as error:
                    code = _fail(str(error), EXIT_ABORTED)
                except OrchestratorError as error:
                    log.error("run.aborted", error=str(error), error_type=type(error).__name__)
                    code = _fail(f"{error}; re-run the same command to resume", EXIT_ABORTED)
                finally:
                    with anyio.CancelScope(shield=True):
                        if display is not None:
                            await display.stop()
                        await _write_dead_letters(journal, job.dead_letter)
            tg.cancel_scope.cancel()
    if code is not None:
        return code
    if interrupted or result is None:
        print(
            f"insight-import: interrupted; progress is saved in {job.journal}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if job.report is not None:
        await _write_report(job.report, result)
    _print_summary(result, job)
    return EXIT_OK if result.ok else EXIT_REJECTED


async def _write_dead_letters(journal: SqliteJournal, path: Path) -> None:
    """Rewrite the dead-letter file from the journal (the source of truth), atomically."""
    letters = await journal.dead_letters()

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            for letter in letters:
                handle.write(letter.to_json())
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    await anyio.to_thread.run_sync(write)


async def _write_report(path: Path, result: ImportResult) -> None:
    data = orjson.dumps(result.report(), option=orjson.OPT_INDENT_2)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data + b"\n")

    await anyio.to_thread.run_sync(write)


def _print_summary(result: ImportResult, job: _Job) -> None:
    if result.nothing_to_do:
        print(
            f"Nothing to do: the journal {job.journal} says this run already finished. "
            "Use --fresh to import again."
        )
    counters = result.counters
    read = counters.get("records_read", 0)
    imported = counters.get("records_imported", 0)
    print(
        f"Imported {imported:,} of {read:,} records into collection {result.collection!r} "
        f"in {result.duration_s:.1f} s, with {len(result.imports)} imports."
    )
    superseded = counters.get("records_superseded", 0)
    if superseded:
        print(f"  {superseded:,} records were replaced by a later record with the same key.")
    if result.dead_letters:
        reasons: dict[str, int] = {}
        for letter in result.dead_letters:
            reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
        print(f"  {len(result.dead_letters):,} records not imported, listed in {job.dead_letter}:")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            print(f"    {count:>8,}  {reason}")
    events = [
        f"{label} {counters[name]}"
        for name, label in (
            ("lost_responses", "lost responses re-sent:"),
            ("account_full_waits", "waits for a free import slot:"),
            ("submits_in_doubt", "in-doubt submits re-sent after a crash:"),
            ("resubmits", "failed imports re-sent:"),
        )
        if counters.get(name)
    ]
    if events:
        print("  Handled on the way: " + ", ".join(events) + ".")
    if job.report is not None:
        print(f"  Report: {job.report}")
    print(f"  Journal: {job.journal}")


# --------------------------------------------------------------------------- demo


def _main_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo
    from orchestrator.logs import configure_logging

    configure_logging(level=args.log_level, fmt=args.log_format)

    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        return anyio.run(run_demo, Path(args.output), args.records, progress, _execute_async, _Job)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------- simulator, status


def _main_simulator(args: argparse.Namespace) -> int:
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

    with suppress(KeyboardInterrupt):
        anyio.run(lambda: serve(config, host=args.host, port=args.port, on_started=started))
    return EXIT_OK


def _main_status(args: argparse.Namespace) -> int:
    from orchestrator.client import ClientSettings, InsightClient
    from orchestrator.logs import configure_logging

    configure_logging(level="warning", fmt="auto")
    try:
        settings = ClientSettings.from_env(base_url=args.base_url, region=args.region or "r1")
    except ConfigError as error:
        return _fail(str(error), EXIT_USAGE)

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
    except (AuthenticationError, ForbiddenError) as error:
        return _fail(str(error), EXIT_ABORTED)
    except ApiError as error:
        return _fail(str(error), EXIT_ABORTED)
    sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK

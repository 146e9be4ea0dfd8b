"""``insight-import run``: JSON Lines files (or a dead-letter file to replay) into a collection.

The command's side of a run: options to a job, the journal's plan for a re-run (resume, append,
new run), the first contact with the API, the output files (dead letters, report) checked before
anything is imported and written whole, signals, and the summary. The import itself is the
library's ``Orchestrator.import_files``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import orjson
import platformdirs

from orchestrator.cli import (
    EXIT_ABORTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
)
from orchestrator.cli import (
    explain as _explain,
)
from orchestrator.cli import (
    fail as _fail,
)
from orchestrator.client import (
    ClientSettings,
    InsightClient,
    is_loopback_url,
    region_of,
    same_api_root,
)
from orchestrator.engine import Orchestrator
from orchestrator.errors import (
    AuthenticationError,
    ConfigError,
    ForbiddenError,
    InputError,
    JournalError,
    JournalMismatchError,
    OrchestratorError,
)
from orchestrator.journal import InputProgress, RecordedRun, RunSpec, SqliteJournal, account_id
from orchestrator.journal.base import mismatch_message
from orchestrator.logs import configure_logging, get_logger
from orchestrator.options import OPTIONS, resolve_options, unknown_environment
from orchestrator.outcomes import ImportResult, RunStats, iso_time
from orchestrator.poll_history import history_path, load_history, save_history
from orchestrator.progress import ProgressDisplay
from orchestrator.records import Collection
from orchestrator.settings import Settings, api_limit_breaches
from orchestrator.sources import JsonLinesReader, is_stream, validate_inputs

__all__ = ["Job", "execute_async", "main_run"]

log = get_logger("orchestrator.cli")


@dataclass(frozen=True, slots=True)
class Job:
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
    replay: Path | None = None  # a dead-letter file whose records are sent again (inputs[0])

    auto_region: bool = False
    progress_interval: float = 10.0


class _OutputError(Exception):
    """An output file (dead-letter file, report, replay input) cannot be written."""


def main_run(args: argparse.Namespace) -> int:
    """Run ``insight-import run`` with its parsed arguments; return the exit status."""
    flags = {option.dest: getattr(args, option.dest) for option in OPTIONS}
    for warning in unknown_environment():
        print(f"insight-import: warning: {warning}", file=sys.stderr)
    try:
        opts = resolve_options(flags, config_path=args.config)
        configure_logging(level=opts["log_level"], fmt=opts["log_format"])
        job = _job_from_options(tuple(args.inputs), opts, replay=args.replay)
    except (ConfigError, InputError) as error:
        return _fail(str(error), EXIT_USAGE)
    return _execute(job)


def _check_api_limits(settings: Settings, api_root: str, *, allow_unsafe: bool) -> None:
    """Refuse settings beyond Dotdigital's published limits, unless local or overridden."""
    breaches = api_limit_breaches(settings)
    if not breaches or is_loopback_url(api_root):
        return
    if allow_unsafe:
        for breach in breaches:
            print(
                f"insight-import: warning: {breach} (allowed by --allow-unsafe-limits)",
                file=sys.stderr,
            )
        return
    raise ConfigError(
        "; ".join(breaches)
        + f". These limits hold for {api_root}; they are lifted only for a local simulator "
        "(a loopback --base-url) or with --allow-unsafe-limits (INSIGHT_IMPORT_ALLOW_UNSAFE_LIMITS"
        "=1, or allow-unsafe-limits = true in the config file)"
    )


def _job_from_options(
    inputs: tuple[str, ...], opts: dict[str, Any], *, replay: str | None = None
) -> Job:
    if not opts["collection"]:
        raise ConfigError("--collection is required (or INSIGHT_IMPORT_COLLECTION)")
    if replay is not None and inputs:
        raise ConfigError("--replay takes the place of INPUT: give one or the other")
    if replay is None and not inputs:
        raise ConfigError("name at least one INPUT (a JSON Lines file, or - for stdin)")
    collection = Collection(opts["collection"], opts["scope"], opts["type"])
    settings = Settings(
        max_concurrent=opts["max_concurrent"],
        max_body_bytes=opts["max_body_bytes"],
        poll_min=opts["poll_min"],
        poll_max=opts["poll_max"],
        max_resubmits=opts["max_resubmits"],
        parse_processes=opts["parse_processes"],
    )
    auto_region = opts["region"] == "auto"
    client = ClientSettings.from_env(
        base_url=opts["base_url"],
        region="r1" if auto_region else opts["region"],
        request_timeout=opts["request_timeout"],
    )
    _check_api_limits(settings, client.api_root, allow_unsafe=bool(opts["allow_unsafe_limits"]))
    if inputs.count("-") > 1:
        raise ConfigError("standard input (-) can be given only once")
    replayed = Path(replay).resolve() if replay is not None else None
    anyio.run(validate_inputs, [str(replayed)] if replayed is not None else list(inputs))
    # A pipe (like stdin) is named as given: /dev/fd/63 resolves to a "pipe:[inode]" that no run
    # could open again, and the journal of the same command must be found again.
    origins = tuple(i if is_stream(i) else str(Path(i).resolve()) for i in inputs)
    identity = (f"replay:{replayed}",) if replayed is not None else origins
    journal = (
        Path(opts["journal"]) if opts["journal"] else _default_journal(collection, identity, client)
    )
    dead_letter = (
        Path(opts["dead_letter"]) if opts["dead_letter"] else _beside(journal, "dead-letter")
    )
    if replayed is not None:
        if dead_letter.resolve() == replayed:
            raise ConfigError(
                f"the replay would write its dead letters over {replayed}, the file it replays: "
                "pass another --dead-letter"
            )
        origins = (str(_beside(journal, "replay").resolve()),)
    progress = opts["progress"] == "on" or (opts["progress"] == "auto" and sys.stderr.isatty())
    return Job(
        inputs=origins,
        collection=collection,
        client=client,
        settings=settings,
        journal=journal,
        dead_letter=dead_letter,
        report=Path(opts["report"]) if opts["report"] else None,
        fresh=bool(opts["fresh"]),
        progress=progress,
        replay=replayed,
        auto_region=auto_region,
        progress_interval=opts["progress_interval"],
    )


def _default_journal(
    collection: Collection, inputs: tuple[str, ...], client: ClientSettings
) -> Path:
    """One journal per command: the same command finds its journal again and resumes."""
    identity = orjson.dumps([collection.name, str(collection.scope), inputs, client.api_root])
    digest = hashlib.sha256(identity).hexdigest()[:12]
    state = Path(platformdirs.user_state_dir("insight-orchestrator", appauthor=False))
    return state / f"{collection.name}-{digest}.sqlite"


def _beside(journal: Path, role: str) -> Path:
    """A file that belongs to one journal: beside it, named after it (``NAME.<role>.jsonl``)."""
    return journal.with_name(f"{journal.stem}.{role}.jsonl")


def _execute(job: Job) -> int:
    try:
        return anyio.run(execute_async, job)
    except KeyboardInterrupt:  # a second Ctrl-C before the handler was installed
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------- re-runs


@dataclass(frozen=True, slots=True)
class _Plan:
    """How this command's run relates to what its journal holds."""

    spec: RunSpec
    fresh: bool  # start a new run (wiping the journal's previous one)
    start_after: tuple[InputProgress, ...] = ()  # lines a finished run imported, not sent again
    notes: tuple[str, ...] = ()  # what the user is told before the run
    mismatch: str | None = None  # the journal holds another run: this message, exit 2


async def _plan(job: Job, journal: SqliteJournal) -> _Plan:
    """Resume the same content, start a new run for new content, and skip only what was imported.

    - the journal is empty, or ``--fresh``: a new run;
    - it holds another run (collection, scope, type, input paths or account differ): refused;
    - standard input among the inputs: a new run (stdin cannot be read again, so never resumed);
    - an unfinished run: resumed (the engine checks the inputs' fingerprints: exit 2 if changed);
    - a finished run whose inputs are the same: nothing to do; whose inputs only grew (each one's
      first lines have the fingerprint the run recorded): a new run of the lines after them;
      whose inputs changed otherwise: a new run of everything.
    """
    spec = RunSpec(
        collection=job.collection.name,
        scope=str(job.collection.scope),
        collection_type=job.collection.type,
        inputs=job.inputs,
        account=account_id(job.client.api_root, job.client.username),
    )
    if job.fresh:
        return _Plan(spec, fresh=True)
    recorded = await journal.recorded()
    if recorded is None:
        return _Plan(spec, fresh=False)
    if recorded.spec != spec:
        return _Plan(spec, fresh=False, mismatch=mismatch_message(recorded.spec, spec))
    if any(map(is_stream, spec.inputs)):
        state = "finished" if recorded.complete else "unfinished"
        note = (
            "standard input cannot be read again (nor can a pipe), so a run from it is never "
            f"resumed: starting a new run (the journal's {state} run is replaced)"
        )
        return _Plan(spec, fresh=True, notes=(note,))
    if not recorded.complete:
        return _Plan(spec, fresh=False)
    verdicts = [
        await _compare(path, progress)
        for path, progress in zip(spec.inputs, recorded.inputs, strict=True)
    ]
    if all(verdict == "same" for verdict in verdicts):
        return _Plan(spec, fresh=False)  # the engine says "nothing to do"
    if "changed" in verdicts:
        changed = [path for path, v in zip(spec.inputs, verdicts, strict=True) if v == "changed"]
        note = (
            f"{', '.join(changed)} changed since the journal's finished run: "
            "importing the inputs again as a new run"
        )
        return _Plan(spec, fresh=True, notes=(note,))
    notes = tuple(
        f"{path}: its first {progress.lines:,} lines were imported by the journal's finished "
        f"run; sending only the lines after them"
        for path, progress, verdict in zip(spec.inputs, recorded.inputs, verdicts, strict=True)
        if verdict == "grew" and progress.lines
    )
    return _Plan(spec, fresh=True, start_after=recorded.inputs, notes=notes)


async def _compare(path: str, progress: InputProgress) -> str:
    """Whether an input is the ``same`` as a finished run read, ``grew`` after it, or ``changed``.

    Reads the input through to its end, once (in worker threads).
    """
    async with JsonLinesReader(path) as reader:
        try:
            digest = await reader.skip(progress.lines)
        except InputError:  # fewer lines than the run read
            return "changed"
        if progress.lines and digest != progress.digest:
            return "changed"
        async for chunk in reader.chunks():
            if chunk.data.strip():
                return "grew"
        return "same"


# --------------------------------------------------------------------------- replay


def _extract_replay(dead_letters: Path, target: Path) -> list[int]:
    """Write the ``record`` members of a dead-letter file as JSON Lines, line for line.

    Line N of ``target`` is the record of line N of the dead-letter file (blank when it has none),
    so the replay's own dead letters point at the dead-letter file's lines. Returns the numbers of
    the lines without a record. Blocking.
    """
    without: list[int] = []

    def write(out: BinaryIO) -> None:
        with dead_letters.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    out.write(b"\n")
                    continue
                try:
                    letter = json.loads(line)
                except ValueError:
                    letter = None
                if not isinstance(letter, dict):
                    raise InputError(
                        f"{dead_letters}:{number}: not a dead letter (a JSON object a line); "
                        "fix or remove the line, then replay again"
                    )
                record = letter.get("record")
                if record is None:
                    without.append(number)
                    out.write(b"\n")
                    continue
                # json keeps integers of any size exactly; a raw line (a string) is sent as is.
                text = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
                out.write(text.replace("\r", " ").replace("\n", " ").encode() + b"\n")

    try:
        _write_file(target, write, "the replay input")
    except OSError as error:
        raise _OutputError(_cannot_write("the replay input", target, error, "--journal")) from None
    return without


def _replay_letters(dead_letters: Path, numbers: Sequence[int]) -> list[bytes]:
    """The lines ``numbers`` of a dead-letter file, as they are. Blocking."""
    wanted = set(numbers)
    with dead_letters.open("rb") as lines:
        return [line.strip() for n, line in enumerate(lines, 1) if n in wanted]


# --------------------------------------------------------------------------- output files


def _check_outputs(job: Job) -> None:
    """Check before any import that every output file can be written (blocking).

    A directory is created if missing; a probe file shows it is writable. A device or a pipe
    (``/dev/stdout``) is written in place, so only its existence is checked.
    """
    outputs: list[tuple[str, Path, str]] = [
        ("the journal", job.journal, "--journal"),
        ("the dead-letter file", job.dead_letter, "--dead-letter"),
    ]
    if job.report is not None:
        outputs.append(("the report", job.report, "--report"))
    for what, path, option in outputs:
        target = path.resolve()
        if target.is_dir():
            raise _OutputError(f"{what} {path} is a directory: pass a file to {option}")
        if target.exists() and not target.is_file():
            continue
        probe = target.with_name(target.name + ".tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise _OutputError(_cannot_write(what, path, error, option)) from None


def _cannot_write(what: str, path: Path, error: OSError, option: str) -> str:
    reason = error.strerror or str(error)
    blocking = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        reason, fix = f"{blocking} is not a directory", "fix the path"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space"
    else:
        fix = "make its directory writable"
    return f"cannot write {what} {path}: {reason}; {fix} or pass another {option}"


def _write_file(path: Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write a file whole or not at all: into ``NAME.tmp``, synced, then renamed over ``path``.

    A symbolic link is followed (the link stays); a device or a pipe is written in place. On an
    error nothing partial is left behind. Blocking; raises ``OSError``.
    """
    target = path.resolve()
    if target.exists() and not target.is_file():
        with target.open("wb") as handle:
            write(handle)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    log.debug("output.written", what=what, path=str(path))


async def _write_dead_letters(
    journal: SqliteJournal, path: Path, carried: Sequence[bytes] = ()
) -> None:
    """Rewrite the dead-letter file from the journal (the source of truth), whole or not at all.

    ``carried`` lines (dead letters of a replayed file that had no record) are kept at the end.
    """
    letters = await journal.dead_letters()

    def write(handle: BinaryIO) -> None:
        for letter in letters:
            handle.write(letter.to_json())
            handle.write(b"\n")
        for line in carried:
            handle.write(line + b"\n")

    try:
        await anyio.to_thread.run_sync(_write_file, path, write, "the dead-letter file")
    except OSError as error:
        message = _cannot_write("the dead-letter file", path, error, "--dead-letter")
        raise _OutputError(
            f"{message}; then run the same command again: the journal keeps every dead letter, "
            "so nothing is imported twice"
        ) from None


async def _write_report(path: Path, report: dict[str, Any]) -> None:
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    try:
        await anyio.to_thread.run_sync(
            _write_file, path, lambda handle: handle.write(data), "the report"
        )
    except OSError as error:
        raise _OutputError(
            f"{_cannot_write('the report', path, error, '--report')}; then run the same command "
            "again: it writes the report of the finished run without importing anything again"
        ) from None


# --------------------------------------------------------------------------- the run itself


async def execute_async(job: Job) -> int:
    started_at = time.time()
    started = time.monotonic()
    try:
        await anyio.to_thread.run_sync(_check_outputs, job)
    except _OutputError as error:
        return _fail(str(error), EXIT_USAGE)
    without_record: list[int] = []
    carried: list[bytes] = []
    if job.replay is not None:
        try:
            without_record = await anyio.to_thread.run_sync(
                _extract_replay, job.replay, Path(job.inputs[0])
            )
            carried = await anyio.to_thread.run_sync(_replay_letters, job.replay, without_record)
        except (InputError, _OutputError) as error:
            return _fail(str(error), EXIT_USAGE)
        except OSError as error:
            return _fail(f"cannot read {job.replay}: {error.strerror or error}", EXIT_USAGE)
    stats = RunStats(input_bytes=await anyio.to_thread.run_sync(_input_bytes, job.inputs))
    result: ImportResult | None = None
    interrupted = False
    code: int | None = None
    try:
        # before reading any input: a wrong password or host is told in a second
        job = replace(job, client=await _first_contact(job))
    except OrchestratorError as error:
        return _fail(_explain(error), EXIT_ABORTED)
    async with AsyncExitStack() as stack:
        try:
            journal = await stack.enter_async_context(SqliteJournal(job.journal))
            plan = await _plan(job, journal)
            if plan.mismatch is not None:
                return _fail(_explain(JournalMismatchError(plan.mismatch)), EXIT_USAGE)
            await journal.open(plan.spec, fresh=plan.fresh, start_after=plan.start_after)
        except JournalError as error:
            return _fail(_explain(error), EXIT_USAGE)
        except InputError as error:
            return _fail(_explain(error), EXIT_USAGE)
        for note in plan.notes:
            print(f"insight-import: {note}", flush=True)
        orchestrator = Orchestrator(InsightClient(job.client), settings=job.settings)
        await stack.enter_async_context(orchestrator)
        polls = history_path(
            job.journal.parent, api_root=job.client.api_root, username=job.client.username
        )
        restored = await _restore_poll_history(orchestrator, polls)
        display = ProgressDisplay(stats, live=job.progress, log_every=job.progress_interval)
        await stack.enter_async_context(display)
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
                        job.collection, job.inputs, journal=journal, stats=stats
                    )
                except (JournalMismatchError, InputError) as error:
                    code = _fail(_explain(error), EXIT_USAGE)
                except (AuthenticationError, ForbiddenError) as error:
                    code = _fail(_explain(error), EXIT_ABORTED)
                except OrchestratorError as error:
                    log.error("run.aborted", error=str(error), error_type=type(error).__name__)
                    code = _fail(
                        _explain(error) + "\n  re-run the same command to resume", EXIT_ABORTED
                    )
                finally:
                    with anyio.CancelScope(shield=True):
                        await display.stop()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await _keep_poll_history(orchestrator, polls, restored)
            try:
                await _write_dead_letters(journal, job.dead_letter, carried)
                final = result if result is not None else await _result_so_far(journal, started)
                recorded = await journal.recorded()
            except (_OutputError, JournalError) as error:
                failed = _fail(str(error), EXIT_ABORTED)
                return code if code is not None else EXIT_INTERRUPTED if interrupted else failed
        if code is None:
            if interrupted:
                code = EXIT_INTERRUPTED
            elif final.ok and not carried:
                code = EXIT_OK
            else:
                code = EXIT_REJECTED
        if job.report is not None:
            report = _report(final, job, plan, recorded, started_at, code, without_record)
            try:
                await _write_report(job.report, report)
            except _OutputError as error:
                failed = _fail(str(error), EXIT_ABORTED)
                code = failed if code in (EXIT_OK, EXIT_REJECTED) else code
    if interrupted:
        if any(map(is_stream, job.inputs)):
            advice = (
                "standard input (or a pipe) cannot be resumed: run the command again with the "
                "whole input (records already imported are sent again, harmlessly)"
            )
        else:
            advice = "Run the same command again to resume."
        print(
            f"insight-import: interrupted; progress is saved in {job.journal}. {advice}",
            file=sys.stderr,
        )
    elif code in (EXIT_OK, EXIT_REJECTED):
        _print_summary(final, job, carried=len(carried), without_record=without_record)
    return code


async def _restore_poll_history(orchestrator: Orchestrator, path: Path) -> list[tuple[int, float]]:
    """Start the poll planner from what earlier runs of the account learned (``poll_history``)."""
    history = await anyio.to_thread.run_sync(load_history, path)
    if orchestrator.restore_poll_history(history):
        log.info("polls.history_restored", imports=len(history))
    return history


async def _keep_poll_history(
    orchestrator: Orchestrator, path: Path, restored: list[tuple[int, float]]
) -> None:
    """Save what the planner knows for the account's next run, if this run taught it more."""
    history = orchestrator.poll_history()
    if not history or history == restored:
        return
    try:
        await anyio.to_thread.run_sync(save_history, path, history)
    except OSError as error:  # only a hint for the next run: this one is not affected
        log.warning("polls.history_not_saved", path=str(path), error=error.strerror or str(error))


async def _result_so_far(journal: SqliteJournal, started: float) -> ImportResult:
    """The result of a run that did not finish, from what its journal holds."""
    recorded = await journal.recorded()
    return ImportResult(
        collection=recorded.spec.collection if recorded is not None else "",
        counters=await journal.counters(),
        imports=tuple(await journal.batches()),
        dead_letters=tuple(await journal.dead_letters()),
        duration_s=time.monotonic() - started,
    )


def _input_bytes(inputs: tuple[str, ...]) -> int | None:
    """The inputs' total size, when every one is a plain file (not gzip, not stdin)."""
    total = 0
    for origin in inputs:
        if is_stream(origin):  # never opened twice: its first read is the run's
            return None
        try:
            with open(origin, "rb") as handle:
                if handle.read(2) == b"\x1f\x8b":  # gzip: its size says little of its lines
                    return None
                total += os.fstat(handle.fileno()).st_size
        except OSError:
            return None
    return total


async def _first_contact(job: Job) -> ClientSettings:
    """One cheap call before reading any input: the credentials, the host and the region.

    Returns the client settings to run with (``--region auto`` takes the account's own root).
    """
    root = job.client.api_root
    async with InsightClient(job.client) as client:
        endpoint = await client.check_access()
    if same_api_root(endpoint, root):
        return job.client
    if job.auto_region:
        log.info("run.region_found", api_root=endpoint)
        return replace(job.client, base_url=endpoint)
    region = region_of(endpoint)
    if region is not None:
        use = f"--region {region}" + (" (without --base-url)" if job.client.base_url else "")
    else:
        use = f"--base-url {endpoint}"
    raise _WrongRegion(
        f"the account lives at {endpoint}, not {root} (imports there answer 403): use {use}, "
        "or --region auto to take the account's own API root"
    )


class _WrongRegion(OrchestratorError):
    """The account-info call named another API root than the one configured."""


def _report(
    result: ImportResult,
    job: Job,
    plan: _Plan,
    recorded: RecordedRun | None,
    started_at: float,
    code: int,
    without_record: Sequence[int],
) -> dict[str, Any]:
    """The report of the contract, with this run's inputs, exit status and dead-letter file."""
    skipped = {progress.index: progress.lines for progress in plan.start_after}
    progress = recorded.inputs if recorded is not None else ()
    inputs = [
        {
            "path": path,
            "fingerprint": done.digest or None,
            "lines": done.lines,
            "skipped_lines": done.lines if result.nothing_to_do else skipped.get(index, 0),
        }
        for index, (path, done) in enumerate(zip(job.inputs, progress, strict=False))
    ]
    report = result.report()
    extra: dict[str, Any] = {
        "started_at": iso_time(started_at),
        "exit_status": code,
        "inputs": inputs,
        "dead_letter_file": str(job.dead_letter),
    }
    if job.replay is not None:
        extra["replay"] = {"file": str(job.replay), "lines_without_record": list(without_record)}
    return {"collection": report.pop("collection"), **extra, **report}


def _print_summary(
    result: ImportResult, job: Job, *, carried: int, without_record: Sequence[int]
) -> None:
    if result.nothing_to_do:
        print(
            f"Nothing to do: the journal {job.journal} says this run already finished with the "
            "same input. Use --fresh to import it again."
        )
    counters = result.counters
    read = counters.get("records_read", 0)
    imported = counters.get("records_imported", 0)
    print(
        f"Imported {imported:,} of {_count(read, 'record')} into collection "
        f"{result.collection!r} in {result.duration_s:.1f} s, with "
        f"{_count(len(result.imports), 'import')}."
    )
    superseded = counters.get("records_superseded", 0)
    if superseded:
        print(
            f"  {_count(superseded, 'record')} {'was' if superseded == 1 else 'were'} replaced "
            "by a later record with the same key."
        )
    if result.dead_letters or carried:
        reasons = result.reasons()
        total = len(result.dead_letters) + carried
        print(f"  {_count(total, 'record')} not imported, listed in {job.dead_letter}:")
        for reason, count in reasons.items():
            print(f"    {count:>8,}  {reason}")
    if without_record:
        lines = ", ".join(map(str, without_record[:10])) + (
            ", ..." if len(without_record) > 10 else ""
        )
        print(
            f"    {carried:>8,}  dead letters of {job.replay} without a record, not sent again "
            f"(lines {lines}): kept as they are"
        )
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


def _count(n: int, noun: str) -> str:
    """``1 record``, ``2 records``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")

"""The outbox's commands of ``insight-import``: ``outbox init``, ``enqueue``, ``dead-letters``.

Exit status: 0 done; 1 ``enqueue`` wrote the valid lines but some broke a record rule (each is
reported with its ``file:line`` and rule, none of them written); 2 a usage, configuration,
input-file or database error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["OUTBOX_COMMANDS", "add_outbox_commands", "run_outbox_command"]

OUTBOX_COMMANDS = frozenset({"outbox", "enqueue", "dead-letters"})
"""The commands this module adds (``args.command`` values)."""

_EXIT_OK, _EXIT_REJECTED, _EXIT_USAGE = 0, 1, 2
_DATABASE_HELP = (
    "sqlite:///ABSOLUTE/PATH or postgresql://USER@HOST:PORT/DB (env INSIGHT_IMPORT_DATABASE; "
    "default: outbox.sqlite in the user's state directory)"
)
_PAGE = 1000


def add_outbox_commands(commands: Any) -> None:
    """Add the outbox commands to the ``insight-import`` subparsers ``commands``."""
    outbox = commands.add_parser("outbox", help="manage the outbox tables")
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init", help="create or upgrade the outbox tables (idempotent)", description=(
            "Create the outbox tables (insight_outbox, insight_dead_letter and the worker's "
            "state) in the database, or upgrade them; running it again changes nothing."
        )
    )  # fmt: skip
    init.add_argument("--database", default=None, help=_DATABASE_HELP)

    enqueue = commands.add_parser(
        "enqueue",
        help="validate JSON Lines files and add their records to the outbox",
        description=(
            "Add the records of JSON Lines files (.gz allowed, - for stdin) to the outbox, for "
            "the worker to import. Each line is checked as `run` checks it; a line that breaks "
            "a rule is reported with its file:line and not enqueued (exit status 1)."
        ),
    )
    enqueue.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL file, .gz, or -")
    enqueue.add_argument("--database", default=None, help=_DATABASE_HELP)
    enqueue.add_argument("--account", required=True, help="account name ('default' without file)")
    enqueue.add_argument("--collection", required=True, help="collection name")
    enqueue.add_argument("--scope", choices=("account", "contact"), default="account")
    enqueue.add_argument("--type", dest="collection_type", default="custom", help="collection type")

    letters = commands.add_parser(
        "dead-letters",
        help="list the outbox's dead letters as JSON Lines (--requeue puts them back)",
        description=(
            "Write the dead letters of the outbox to stdout, one JSON object a line, oldest "
            "first: the record as enqueued, with its reason. With --requeue, each listed one "
            "goes back into the outbox as a new row (in the same order) and leaves the list."
        ),
    )
    letters.add_argument("--database", default=None, help=_DATABASE_HELP)
    letters.add_argument("--account", default=None, help="only this account's")
    letters.add_argument("--collection", default=None, help="only this collection's")
    letters.add_argument("--requeue", action="store_true", help="put them back into the outbox")


def run_outbox_command(args: argparse.Namespace) -> int:
    """Run the outbox command ``args`` names and return its exit status."""
    import anyio

    from orchestrator.errors import ConfigError, InputError, JournalError
    from orchestrator.logs import configure_logging
    from orchestrator.outbox.database import parse_database

    configure_logging(level="warning", fmt="auto")
    try:
        path = parse_database(args.database)
        if args.command == "outbox":
            return anyio.run(_init, path)
        if args.command == "enqueue":
            return anyio.run(_enqueue, path, args)
        return anyio.run(_dead_letters, path, args)
    except (ConfigError, InputError, JournalError) as error:
        print(f"insight-import: error: {error}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _init(path: Any) -> int:
    from orchestrator.outbox.database import open_outbox

    async with open_outbox(path) as store:
        version = await store.schema_version()
    print(f"Outbox tables ready in {path.where} (schema version {version}).")
    return _EXIT_OK


async def _enqueue(path: Any, args: argparse.Namespace) -> int:
    import anyio.to_thread

    from orchestrator.outbox.database import open_outbox
    from orchestrator.records import Collection
    from orchestrator.sources import JsonLinesReader, validate_inputs

    collection = Collection(args.collection, args.scope, args.collection_type)
    await validate_inputs(args.inputs)
    written = rejected = 0
    async with open_outbox(path) as store:
        for name in args.inputs:
            async with JsonLinesReader(name) as reader:
                async for chunk in reader.chunks():
                    texts, errors = await anyio.to_thread.run_sync(
                        _check_lines, chunk.lines, chunk.first_line, chunk.origin, collection
                    )
                    for error in errors:
                        print(f"insight-import: rejected: {error}", file=sys.stderr)
                    rejected += len(errors)
                    if texts:  # one transaction per chunk of about 1 MB
                        written += await store.enqueue(args.account, collection, texts, check=False)
    print(
        f"Enqueued {written:,} records for account {args.account!r} into collection "
        f"{collection.name!r} in {path.where}"
        + (f"; {rejected:,} lines rejected." if rejected else ".")
    )
    return _EXIT_REJECTED if rejected else _EXIT_OK


def _check_lines(
    lines: list[bytes], first_line: int, origin: str, collection: Any
) -> tuple[list[str], list[Exception]]:
    from orchestrator.errors import RecordError
    from orchestrator.provenance import Source
    from orchestrator.records import encode_line

    texts: list[str] = []
    errors: list[Exception] = []
    for number, line in enumerate(lines, start=first_line):
        stripped = line.strip()
        if not stripped:
            continue  # blank lines are skipped, as `run` skips them
        try:
            encode_line(stripped, collection, source=Source(origin, number))
        except RecordError as error:
            errors.append(error)
            continue
        texts.append(stripped.decode())
    return texts, errors


async def _dead_letters(path: Any, args: argparse.Namespace) -> int:
    from orchestrator.outbox.database import open_outbox

    listed = requeued = 0
    after = 0
    out = sys.stdout.buffer
    async with open_outbox(path) as store:
        while True:
            page = await store.dead_letters(
                account=args.account, collection=args.collection, after=after, limit=_PAGE
            )
            if not page:
                break
            out.write(b"".join(letter.to_json() + b"\n" for letter in page))
            out.flush()
            listed += len(page)
            after = page[-1].id
            if args.requeue:  # only what was written out goes back
                requeued += await store.requeue([letter.id for letter in page])
    if args.requeue:
        print(f"Requeued {requeued:,} dead letters into the outbox.", file=sys.stderr)
    else:
        print(f"{listed:,} dead letters.", file=sys.stderr)
    return _EXIT_OK

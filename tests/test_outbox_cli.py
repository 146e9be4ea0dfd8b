"""The outbox commands run as a user runs them: `outbox init`, `enqueue`, `dead-letters`."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import anyio
import orjson
import pytest

from orchestrator.outbox import SCHEMA_VERSION, OutboxQueue, SqliteOutbox
from orchestrator.records import Collection
from tests.conftest import run_cli

GOOD = b'{"key": "o-1", "json": {"n": 12345678901234567890123}}'


def url(path: Path) -> str:
    """The --database URL of a file."""
    return f"sqlite://{path}"


def outbox(path: Path) -> list[tuple[object, ...]]:
    """The outbox rows, in id order."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT account, collection, scope, collection_type, record FROM insight_outbox "
            "ORDER BY id"
        ).fetchall()
    conn.close()
    return rows


def test_outbox_init_is_idempotent(tmp_path: Path) -> None:
    """`outbox init` creates the tables, and says so again the second time."""
    db = tmp_path / "state" / "outbox.sqlite"
    for _ in range(2):
        done = run_cli("outbox", "init", "--database", url(db))
        assert done.returncode == 0, done.stderr.decode()
        assert b"schema version %d" % SCHEMA_VERSION in done.stdout
    assert outbox(db) == []


def test_enqueue_writes_valid_lines_and_reports_the_others(tmp_path: Path) -> None:
    """Bad lines are reported with file:line and rule and not enqueued: exit 1."""
    db = tmp_path / "outbox.sqlite"
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD + b"\n\n" + b'{"json": {}}\n' + b'{"key": "o-2", "json": {}}')
    done = run_cli(
        "enqueue", str(data), "--database", url(db), "--account", "acme",
        "--collection", "Orders", "--type", "orders",
    )  # fmt: skip
    assert done.returncode == 1
    assert f"{data}:3: record breaks rule 'key-missing'".encode() in done.stderr
    assert b"Enqueued 2 records" in done.stdout
    assert outbox(db) == [
        ("acme", "Orders", "account", "orders", GOOD.decode()),
        ("acme", "Orders", "account", "orders", '{"key": "o-2", "json": {}}'),
    ]


def test_enqueue_reads_gzip_and_stdin_and_the_database_from_the_environment(
    tmp_path: Path,
) -> None:
    """INSIGHT_IMPORT_DATABASE stands in for --database; .gz and - are inputs as for run."""
    db = tmp_path / "env.sqlite"
    packed = tmp_path / "in.jsonl.gz"
    contact = (
        b'{"key": "c-1", "json": {}, "contactIdentity": {"identifier": "email", "value": "a@b.io"}}'
    )
    packed.write_bytes(gzip.compress(contact + b"\n"))
    done = run_cli(
        "enqueue", str(packed), "-", "--account", "default", "--collection", "People",
        "--scope", "contact",
        env={"INSIGHT_IMPORT_DATABASE": url(db)}, stdin=contact.replace(b"c-1", b"c-2"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert [row[4] for row in outbox(db)] == [
        contact.decode(),
        contact.replace(b"c-1", b"c-2").decode(),
    ]


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("postgresql://worker:s3cret@127.0.0.1:1/app", b"cannot connect"),
        ("sqlite://relative.sqlite", b"the path must be absolute"),
        ("mysql://user:s3cret@host/db", b"use sqlite:///ABSOLUTE/PATH"),
    ],
)
def test_a_database_url_this_release_cannot_use_exits_2(database: str, message: bytes) -> None:
    """An unreachable PostgreSQL, a relative path, another URL: usage errors, no secret shown."""
    done = run_cli("outbox", "init", "--database", database)
    assert done.returncode == 2
    assert message in done.stderr
    assert b"s3cret" not in done.stderr


def test_enqueue_usage_errors_exit_2(tmp_path: Path) -> None:
    """A missing input or an invalid collection stops before anything is written."""
    db = tmp_path / "outbox.sqlite"
    common = ["--database", url(db), "--account", "acme"]
    missing = run_cli("enqueue", str(tmp_path / "nope.jsonl"), *common, "--collection", "Orders")
    assert missing.returncode == 2
    assert b"nope.jsonl" in missing.stderr
    data = tmp_path / "in.jsonl"
    data.write_bytes(GOOD + b"\n")
    invalid = run_cli("enqueue", str(data), *common, "--collection", "1-starts-with-a-digit")
    assert invalid.returncode == 2
    assert b"must not start with a digit" in invalid.stderr
    assert not db.exists()


def test_dead_letters_lists_them_and_requeue_puts_them_back(tmp_path: Path) -> None:
    """JSON Lines on stdout, record kept exactly; --requeue moves the listed ones back."""
    db = tmp_path / "outbox.sqlite"
    rejected = '{"key": "x", "json": {"n": 12345678901234567890123}, "extra": 1}'

    async def prepare() -> None:
        async with SqliteOutbox(db) as store:
            for account in ("acme", "beta"):
                await store.enqueue(account, Collection("Orders"), [rejected], check=False)
                await store.claim(OutboxQueue(account, "Orders"), budget_bytes=10_000)

    anyio.run(prepare)
    listed = run_cli("dead-letters", "--database", url(db))
    assert listed.returncode == 0, listed.stderr.decode()
    letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(d["account"], d["reason"], d["key"]) for d in letters] == [
        ("acme", "unknown-field", "x"),
        ("beta", "unknown-field", "x"),
    ]
    assert b'"record":' + rejected.encode() + b"}" in listed.stdout.splitlines()[0]
    requeued = run_cli("dead-letters", "--database", url(db), "--account", "beta", "--requeue")
    assert requeued.returncode == 0
    assert b"Requeued 1 dead letters" in requeued.stderr
    assert outbox(db) == [("beta", "Orders", "account", "custom", rejected)]
    left = run_cli("dead-letters", "--database", url(db), "--collection", "Orders")
    assert [orjson.loads(line)["account"] for line in left.stdout.splitlines()] == ["acme"]

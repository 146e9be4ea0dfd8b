"""Tests of the journal: both backends' behaviour, and SQLite's durability, locking and errors."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import JournalError, JournalMismatchError, JournalStateError
from orchestrator.journal import (
    BatchPhase,
    DeadLetter,
    InputProgress,
    Journal,
    MemoryJournal,
    NewBatch,
    RunSpec,
    SqliteJournal,
    open_journal,
)
from orchestrator.journal.sqlite import _decode_refs, _encode_refs
from orchestrator.provenance import Source
from orchestrator.refs import RecordRef, RecordRefs

pytestmark = pytest.mark.anyio

SPEC = RunSpec(
    collection="Orders",
    scope="contact",
    collection_type="custom",
    inputs=("/data/orders.jsonl", "-"),
    account="acct-5f1e",
)

Factory = Callable[[], Journal]


def make_refs(n: int, *, first_line: int = 1) -> list[RecordRef]:
    return [
        RecordRef(
            key=f"order-{first_line + i}",
            contact=("email", f"c{i}@example.com") if i % 2 else None,
            source=Source(origin="/data/orders.jsonl", line=first_line + i) if i % 3 else None,
        )
        for i in range(n)
    ]


def letter(n: int, **kwargs: object) -> DeadLetter:
    fields: dict[str, object] = {
        "source": f"/data/orders.jsonl:{n}",
        "key": f"order-{n}",
        "reason": "json-nested-array",
        "message": "an array directly inside an array",
    }
    fields.update(kwargs)
    return DeadLetter(**fields)  # type: ignore[arg-type]


async def seal(journal: Journal, n: int = 3, *, lines: int = 0) -> int:
    return await journal.seal_batch(
        body=b'{"records":[' + b"x" * n + b"]}",
        refs=make_refs(n, first_line=lines + 1),
        depends_on=(),
        progress=InputProgress(0, lines + n, f"digest-{lines + n}"),
        dead_letters=(),
        counters={"records_read": n},
    )


@pytest.fixture(params=["sqlite", "memory"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A maker of journals over one store: a new SqliteJournal per call, or one MemoryJournal."""
    if request.param == "sqlite":
        return lambda: SqliteJournal(tmp_path / "state" / "journal.db")
    memory = MemoryJournal()
    return lambda: memory


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where a SQLite journal lives in one test."""
    return tmp_path / "journal.db"


# --------------------------------------------------------------------------- both backends


async def test_new_journal_starts_an_empty_run(factory: Factory) -> None:
    """Opening an empty journal creates the run with zero progress and nothing unfinished."""
    async with factory() as journal:
        state = await journal.open(SPEC)
    assert state.fresh
    assert not state.complete
    assert state.inputs == (InputProgress(0, 0, ""), InputProgress(1, 0, ""))
    assert state.unfinished == ()
    assert dict(state.counters) == {}


async def test_round_trip_of_every_method(factory: Factory) -> None:
    """Each method's effect reads back exactly through the journal's queries."""
    refs = make_refs(5)
    async with factory() as journal:
        await journal.open(SPEC)
        first = await journal.seal_batch(
            body=b"body-one",
            refs=refs,
            depends_on=(),
            progress=InputProgress(0, 6, "d6"),
            dead_letters=[letter(2, record=b'{"key": 1}')],
            counters={"records_read": 6, "records_rejected": 1},
        )
        second = await journal.seal_batch(
            body=b"body-two",
            refs=make_refs(2, first_line=7),
            depends_on=[first],
            progress=None,
            dead_letters=(),
            counters={"records_read": 2},
        )
        assert second > first
        await journal.save_progress(
            progress=[InputProgress(0, 8, "d8", done=True), InputProgress(1, 4, "s4")],
            dead_letters=[letter(9, import_id=None, details=("a", "b"))],
            counters={"records_superseded": 3},
        )
        await journal.add_counters({"account_full_waits": 1})
        assert await journal.load_body(first) == b"body-one"
        assert await journal.load_refs(first) == refs

        await journal.mark_submitting(first)
        refused = await journal.mark_refused(first, calls=2)
        assert (refused.phase, refused.attempts, refused.submits) == (BatchPhase.SEALED, 2, 1)
        await journal.mark_submitting(first)
        await journal.mark_submitted(first, "imp-1", 100.5)
        await journal.mark_polled(first, calls=2)
        polled = await journal.mark_polled(first)
        assert polled.polls == 3
        await journal.mark_resubmit(first)
        await journal.mark_submitting(first)
        submitted = await journal.mark_submitted(first, "imp-2", 200.0, calls=3)
        assert (submitted.phase, submitted.import_id) == (BatchPhase.SUBMITTED, "imp-2")
        failure = letter(4, reason="ContactEmailDoesNotExist", import_id="imp-2")
        await journal.mark_finished(
            first,
            status="Finished",
            imported=4,
            dead_letters=[failure],
            finished_at=250.0,
            counters={"records_imported": 4, "records_failed": 1},
        )

        batches = await journal.batches()
        assert [b.batch_id for b in batches] == [first, second]
        done, waiting = batches
        assert done.phase is BatchPhase.FINISHED
        assert done.import_id == "imp-2"
        assert (done.record_count, done.body_bytes) == (5, len(b"body-one"))
        assert (done.attempts, done.submits, done.resubmits, done.in_doubt, done.polls) == (
            6,
            3,
            1,
            0,
            3,
        )
        assert (done.submitted_at, done.finished_at) == (200.0, 250.0)
        assert (done.status, done.imported) == ("Finished", 4)
        assert waiting.phase is BatchPhase.SEALED
        assert waiting.depends_on == (first,)
        assert waiting.import_id is None
        assert waiting.status is None

        letters = await journal.dead_letters()
        assert letters == [letter(2, record=b'{"key": 1}'), letter(9, details=("a", "b")), failure]
        assert await journal.counters() == {
            "account_full_waits": 1,
            "records_failed": 1,
            "records_imported": 4,
            "records_read": 8,
            "records_rejected": 1,
            "records_superseded": 3,
        }
        await journal.mark_complete()
    async with factory() as journal:
        state = await journal.open(SPEC)
    assert state.complete
    assert not state.fresh
    assert state.inputs == (InputProgress(0, 8, "d8", done=True), InputProgress(1, 4, "s4"))
    assert [b.batch_id for b in state.unfinished] == [second]


async def test_reopen_resumes_the_run(factory: Factory) -> None:
    """After close, opening the same run again returns its progress, batches and counters."""
    async with factory() as journal:
        await journal.open(SPEC)
        sealed = await seal(journal, 3)
        submitted = await seal(journal, 2, lines=3)
        await journal.mark_submitting(submitted)
        await journal.mark_submitted(submitted, "imp-9", 5.0)
    async with factory() as journal:
        state = await journal.open(SPEC)
        assert await journal.load_body(sealed) == b'{"records":[xxx]}'
        assert len(await journal.load_refs(submitted)) == 2
    assert not state.fresh
    assert not state.complete
    assert state.inputs[0] == InputProgress(0, 5, "digest-5")
    assert [(b.batch_id, b.phase, b.import_id) for b in state.unfinished] == [
        (sealed, BatchPhase.SEALED, None),
        (submitted, BatchPhase.SUBMITTED, "imp-9"),
    ]
    assert state.counters == {"records_read": 5}


async def test_submit_in_doubt_goes_back_to_sealed(factory: Factory) -> None:
    """A batch left SUBMITTING is found in doubt at reopen: SEALED again, counted once."""
    async with factory() as journal:
        await journal.open(SPEC)
        batch = await seal(journal)
        await journal.mark_submitting(batch)
    async with factory() as journal:
        state = await journal.open(SPEC)
    (stored,) = state.unfinished
    assert stored.phase is BatchPhase.SEALED
    assert (stored.in_doubt, stored.submits, stored.attempts) == (1, 1, 0)
    assert state.counters["submits_in_doubt"] == 1
    async with factory() as journal:
        state = await journal.open(SPEC)
    assert state.unfinished[0].in_doubt == 1  # counted when found, not at every open
    assert state.counters["submits_in_doubt"] == 1


async def test_another_run_is_refused(factory: Factory) -> None:
    """A journal holding another run raises JournalMismatchError naming it, and stays as it was."""
    async with factory() as journal:
        await journal.open(SPEC)
        await seal(journal)
    other = RunSpec(
        collection="Carts",
        scope=SPEC.scope,
        collection_type=SPEC.collection_type,
        inputs=SPEC.inputs,
        account=SPEC.account,
    )
    async with factory() as journal:
        with pytest.raises(
            JournalMismatchError, match=r"collection 'Orders'.*fresh=True"
        ) as caught:
            await journal.open(other)
    assert "collection" in str(caught.value)
    assert "--" not in str(caught.value)  # the library names settings; the command adds flags
    async with factory() as journal:
        state = await journal.open(SPEC)
    assert len(state.unfinished) == 1


async def test_fresh_wipes_the_previous_run(factory: Factory) -> None:
    """fresh=True discards everything, even another run's, and starts batch ids again."""
    async with factory() as journal:
        await journal.open(SPEC)
        await seal(journal)
        await journal.save_progress(progress=None, dead_letters=[letter(1)], counters={"x": 1})
        await journal.mark_complete()
    other = RunSpec("Carts", "account", "custom", ("/data/carts.jsonl",), "acct-5f1e")
    async with factory() as journal:
        state = await journal.open(other, fresh=True)
        assert state.fresh
        assert not state.complete
        assert state.inputs == (InputProgress(0, 0, ""),)
        assert state.unfinished == ()
        assert state.counters == {}
        assert await journal.dead_letters() == []
        assert await seal(journal) == 1


async def test_recorded_reads_the_run_without_changing_it(factory: Factory) -> None:
    """recorded() is None on an empty journal, then the spec, completeness and input progress."""
    async with factory() as journal:
        assert await journal.recorded() is None
        await journal.open(SPEC)
        await journal.save_progress(
            progress=InputProgress(0, 7, "d7", done=True), dead_letters=[], counters={}
        )
        await journal.mark_complete()
    async with factory() as journal:
        found = await journal.recorded()
    assert found is not None
    assert (found.spec, found.complete) == (SPEC, True)
    assert found.inputs == (InputProgress(0, 7, "d7", done=True), InputProgress(1, 0, ""))


async def test_a_fresh_run_can_start_after_lines_already_imported(factory: Factory) -> None:
    """open(fresh, start_after=...) starts a new run whose input begins after those lines."""
    async with factory() as journal:
        await journal.open(SPEC)
        await journal.save_progress(progress=None, dead_letters=[letter(1)], counters={"x": 1})
        await journal.mark_complete()
    async with factory() as journal:
        state = await journal.open(
            SPEC, fresh=True, start_after=[InputProgress(0, 7, "d7", done=True)]
        )
        assert state.fresh
        assert not state.complete
        assert state.inputs == (InputProgress(0, 7, "d7"), InputProgress(1, 0, ""))
        assert state.counters == {}
        assert await journal.dead_letters() == []


async def test_bad_transitions_are_refused(factory: Factory) -> None:
    """Transitions the protocol does not allow raise JournalStateError and change nothing."""
    async with factory() as journal:
        await journal.open(SPEC)
        batch = await seal(journal)
        with pytest.raises(JournalStateError, match="is sealed, not submitting"):
            await journal.mark_submitted(batch, "imp", 1.0)
        with pytest.raises(JournalStateError, match="batch 99 is not in the journal"):
            await journal.mark_submitting(99)
        with pytest.raises(JournalStateError, match="not in the journal"):
            await journal.mark_polled(99)
        await journal.mark_finished(
            batch, status="dead", imported=0, dead_letters=(), finished_at=1.0, counters={}
        )
        with pytest.raises(JournalStateError, match="is finished"):
            await journal.load_body(batch)
        with pytest.raises(JournalStateError, match="is finished"):
            await journal.load_refs(batch)
        with pytest.raises(JournalStateError, match="is finished"):
            await journal.mark_finished(
                batch, status="x", imported=0, dead_letters=(), finished_at=2.0, counters={}
            )
        (stored,) = await journal.batches()
    assert (stored.status, stored.finished_at) == ("dead", 1.0)


async def test_progress_for_an_unknown_input_is_refused(factory: Factory) -> None:
    """Progress naming an input the run does not have raises before anything is written."""
    async with factory() as journal:
        await journal.open(SPEC)
        with pytest.raises(JournalStateError, match="index 2 is out of range"):
            await journal.seal_batch(
                body=b"b",
                refs=make_refs(1),
                depends_on=(),
                progress=[InputProgress(0, 1, "d"), InputProgress(2, 1, "d")],
                dead_letters=(),
                counters={"records_read": 1},
            )
        assert await journal.batches() == []
        assert await journal.counters() == {}
    async with factory() as journal:
        state = await journal.open(SPEC)
    assert state.inputs[0].lines == 0


async def test_use_before_open_is_an_error(factory: Factory) -> None:
    """Calling a method before open() says so instead of acting on no run."""
    journal = factory()
    with pytest.raises(JournalStateError, match="call open"):
        await journal.counters()
    await journal.close()


async def test_open_journal_picks_the_backend(tmp_path: Path) -> None:
    """open_journal gives memory for None and SQLite (touching nothing yet) for a path."""
    assert isinstance(await open_journal(None), MemoryJournal)
    journal = await open_journal(tmp_path / "deep" / "journal.db")
    assert isinstance(journal, SqliteJournal)
    assert not (tmp_path / "deep").exists()
    async with journal:
        await journal.open(SPEC)
    assert (tmp_path / "deep" / "journal.db").exists()


# --------------------------------------------------------------------------- dead letters


def test_dead_letter_json_keeps_the_record_exactly() -> None:
    """A record that parses is embedded as JSON, big integers and all, on one line."""
    raw = b'{"key": "k1", "json": {"n": 123456789012345678901234567890}}\n'
    line = letter(3, record=raw, details=("d",), import_id="imp").to_json()
    assert b"\n" not in line
    assert b"123456789012345678901234567890" in line
    parsed = orjson.loads(line)
    assert parsed["source"] == "/data/orders.jsonl:3"
    assert parsed["key"] == "order-3"
    assert parsed["reason"] == "json-nested-array"
    assert parsed["details"] == ["d"]
    assert parsed["import_id"] == "imp"
    assert parsed["record"]["key"] == "k1"


def test_dead_letter_json_of_unparsable_and_missing_records() -> None:
    """A line that is not JSON is kept as text; no record is null; multi-line JSON is one line."""
    bad = orjson.loads(letter(1, record=b'{"key": broken \xff').to_json())
    assert bad["record"] == '{"key": broken \ufffd'
    assert orjson.loads(letter(1).to_json())["record"] is None
    pretty = letter(1, record=b'{\n  "key": "k",\n  "json": {}\n}').to_json()
    assert b"\n" not in pretty
    assert orjson.loads(pretty)["record"] == {"key": "k", "json": {}}


# --------------------------------------------------------------------------- SQLite only


refs_strategy = st.lists(
    st.builds(
        RecordRef,
        key=st.text(max_size=20),
        contact=st.none() | st.tuples(st.text(max_size=10), st.text(max_size=10)),
        source=st.none()
        | st.builds(
            Source, origin=st.sampled_from(["a.jsonl", "b.jsonl", "-"]), line=st.integers(1, 10**9)
        ),
    ),
    max_size=30,
)


@given(refs=refs_strategy)
@settings(max_examples=200, deadline=None)
def test_refs_codec_round_trips(refs: list[RecordRef]) -> None:
    """Any list of record refs survives the compact encoding unchanged."""
    assert _decode_refs(_encode_refs(RecordRefs.of(refs))) == refs


async def test_file_is_private_and_parents_are_created(tmp_path: Path) -> None:
    """The journal file is created with mode 0600, its missing directories with it."""
    path = tmp_path / "a" / "b" / "journal.db"
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        await seal(journal)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name("journal.db-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("journal.db.lock").stat().st_mode) == 0o600


def body_files(path: Path) -> list[str]:
    """The body files beside a journal."""
    bodies = path.with_name(path.name + ".bodies")
    return sorted(p.name for p in bodies.iterdir()) if bodies.exists() else []


async def test_a_body_is_a_private_file_beside_the_journal_until_its_batch_ends(
    tmp_path: Path,
) -> None:
    """A body is a 0600 file in a 0700 directory beside the journal; it goes with its batch."""
    path = tmp_path / "journal.db"
    bodies = tmp_path / "journal.db.bodies"
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        body = bytes(range(256)) * 20_000
        [batch_id] = await journal.seal_batches(
            batches=[NewBatch(body, RecordRefs(["k"], [None], ["f"], [1]))],
            progress=[],
            dead_letters=[],
            counters={},
        )
        [name] = body_files(path)
        assert stat.S_IMODE(bodies.stat().st_mode) == 0o700
        assert stat.S_IMODE((bodies / name).stat().st_mode) == 0o600
        assert (bodies / name).read_bytes() == body
        assert await journal.load_body(batch_id) == body
        assert journal._conn is not None
        [(stored,)] = journal._conn.execute("SELECT length(body) FROM payloads").fetchall()
        assert stored == 0  # not in the table as well
        await journal.mark_finished(
            batch_id, status="Finished", imported=1, dead_letters=(), finished_at=1.0, counters={}
        )
        assert body_files(path) == []
        await journal.mark_complete()
        assert not bodies.exists()


async def test_body_files_no_batch_names_are_removed_at_open(tmp_path: Path) -> None:
    """A body file left by a seal that never committed, or a batch that ended, goes at open."""
    path = tmp_path / "journal.db"
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        kept = await seal(journal)
    [name] = body_files(path)
    bodies = tmp_path / "journal.db.bodies"
    (bodies / "0123456789abcdef.body").write_bytes(b"orphan")
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        assert body_files(path) == [name]
        assert await journal.load_body(kept) == b'{"records":[xxx]}'
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC, fresh=True)
        assert body_files(path) == []


async def test_a_missing_body_file_is_a_journal_error(tmp_path: Path) -> None:
    """A body file removed behind the journal's back is reported, not read as empty."""
    path = tmp_path / "journal.db"
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        batch = await seal(journal)
        [name] = body_files(path)
        (tmp_path / "journal.db.bodies" / name).unlink()
        with pytest.raises(JournalError, match=f"cannot load the body of batch {batch}"):
            await journal.load_body(batch)


def make_older_journal(path: Path, body: bytes) -> None:
    """A journal of schema 2, bodies kept in the table: one sealed batch holding ``body``."""

    async def write() -> None:
        async with SqliteJournal(path) as journal:
            await journal.open(SPEC)
            await seal(journal)

    anyio.run(write)
    for name in body_files(path):
        (path.with_name(path.name + ".bodies") / name).unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE payloads SET body = ?", (body,))
        conn.execute("ALTER TABLE payloads DROP COLUMN body_file")
        conn.execute("PRAGMA user_version = 2")
    conn.close()


async def test_an_older_journal_is_migrated_and_its_bodies_read_from_the_table(
    tmp_path: Path,
) -> None:
    """A schema-2 journal opens, its kept body loads, and a new batch's body goes to a file."""
    path = tmp_path / "journal.db"
    body = os.urandom(300_000)
    await anyio.to_thread.run_sync(make_older_journal, path, body)
    async with SqliteJournal(path) as journal:
        state = await journal.open(SPEC)
        [old] = [stored.batch_id for stored in state.unfinished]
        assert await journal.load_body(old) == body
        new = await seal(journal, lines=3)
        assert len(body_files(path)) == 1
        assert await journal.load_body(new) == b'{"records":[xxx]}'
        assert journal._conn is not None
        assert journal._conn.execute("PRAGMA user_version").fetchone()[0] == 3


async def test_second_open_of_the_same_journal_is_refused(path: Path) -> None:
    """While one journal object holds the file, another gets 'in use by another process'."""
    async with SqliteJournal(path) as first:
        await first.open(SPEC)
        with pytest.raises(JournalError, match="in use by another process"):
            await SqliteJournal(path).open(SPEC)
        await seal(first)
    async with SqliteJournal(path) as second:
        state = await second.open(SPEC)
    assert len(state.unfinished) == 1


async def test_failed_open_releases_the_file(path: Path) -> None:
    """An open() that fails (here: another run) does not keep the lock."""
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
    other = RunSpec("Carts", "account", "custom", (), "acct")
    with pytest.raises(JournalMismatchError):
        await SqliteJournal(path).open(other)
    journal = SqliteJournal(path)
    await journal.open(SPEC)
    await journal.close()
    await journal.close()  # twice is fine


async def test_cancelled_close_still_releases_the_lock(path: Path) -> None:
    """Closing inside a cancelled scope still closes the file and drops the lock."""
    journal = SqliteJournal(path)
    await journal.open(SPEC)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await journal.close()
    async with SqliteJournal(path) as again:
        await again.open(SPEC)


async def test_sqlite_never_runs_on_the_event_loop_thread(path: Path) -> None:
    """Every SQL statement runs on a worker thread, never the loop's."""
    loop_thread = threading.get_ident()
    seen: set[int] = set()
    async with SqliteJournal(path) as journal:
        assert journal._conn is not None
        journal._conn.set_trace_callback(lambda _: seen.add(threading.get_ident()))
        await journal.open(SPEC)
        batch = await seal(journal)
        await journal.mark_submitting(batch)
        await journal.load_body(batch)
        await journal.counters()
    assert seen
    assert loop_thread not in seen


async def test_poll_counts_skip_the_fsync_then_restore_it(path: Path) -> None:
    """mark_polled commits without fsync and leaves the connection at synchronous=FULL."""
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        batch = await seal(journal)
        modes: list[int] = []
        assert journal._conn is not None
        journal._conn.set_trace_callback(modes.append)  # type: ignore[arg-type]
        await journal.mark_polled(batch, calls=7)
        journal._conn.set_trace_callback(None)
        assert any("synchronous = NORMAL" in str(m) for m in modes)
        assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert (await journal.batches())[0].polls == 7


async def test_mark_complete_gives_dropped_bodies_back(path: Path) -> None:
    """After the run completes, the pages of bodies an older journal kept are given back."""
    await anyio.to_thread.run_sync(make_older_journal, path, os.urandom(400_000))
    async with SqliteJournal(path) as journal:
        state = await journal.open(SPEC)
        [batch] = [stored.batch_id for stored in state.unfinished]
        await journal.mark_finished(
            batch, status="Finished", imported=1, dead_letters=(), finished_at=1.0, counters={}
        )
        assert journal._conn is not None
        assert journal._conn.execute("PRAGMA freelist_count").fetchone()[0] > 50
        await journal.mark_complete()
        assert journal._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


async def test_mark_complete_does_not_rewrite_the_dropped_bodies(path: Path) -> None:
    """Giving dropped bodies back writes about the pages kept, not the pages freed."""
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        batches = [
            await journal.seal_batch(
                body=os.urandom(1_000_000),
                refs=make_refs(1, first_line=i + 1),
                depends_on=(),
                progress=None,
                dead_letters=(),
                counters={},
            )
            for i in range(4)
        ]
        for batch in batches:
            await journal.mark_finished(
                batch, status="Finished", imported=1, dead_letters=(), finished_at=1.0, counters={}
            )
        assert journal._conn is not None
        journal._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        await journal.mark_complete()
        assert journal._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert journal._conn.execute("PRAGMA page_count").fetchone()[0] < 20
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal < 400_000, f"{wal:,} bytes written to the WAL to give 4 MB back"
        assert (await journal.batches())[3].status == "Finished"


async def test_mark_complete_keeps_many_dead_letters_and_frees_the_rest(path: Path) -> None:
    """With more kept than freed, completing still gives every freed page back, keeping all."""
    await anyio.to_thread.run_sync(make_older_journal, path, os.urandom(400_000))
    async with SqliteJournal(path) as journal:
        state = await journal.open(SPEC)
        [batch] = [stored.batch_id for stored in state.unfinished]
        letters = [
            DeadLetter(
                source=f"/data/orders.jsonl:{i}",
                key=f"k{i}",
                reason="invalid_record",
                message="m",
                details=(),
                record=os.urandom(2_000),
            )
            for i in range(1_000)
        ]
        await journal.save_progress(progress=None, dead_letters=letters, counters={})
        await journal.mark_finished(
            batch, status="Finished", imported=1, dead_letters=(), finished_at=1.0, counters={}
        )
        assert journal._conn is not None
        assert journal._conn.execute("PRAGMA freelist_count").fetchone()[0] > 50
        await journal.mark_complete()
        assert journal._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert await journal.dead_letters() == letters


async def test_disk_full_raises_and_keeps_the_previous_state(path: Path) -> None:
    """SQLITE_FULL in a transaction raises JournalError and rolls back all of it."""
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        kept = await seal(journal)
        assert journal._conn is not None
        pages = journal._conn.execute("PRAGMA page_count").fetchone()[0]
        journal._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(JournalError, match=r"journal\.db: cannot seal a batch.*disk is full"):
            await journal.seal_batch(
                body=b"x" * 200_000,
                refs=make_refs(50),
                depends_on=(),
                progress=InputProgress(0, 53, "d"),
                dead_letters=[letter(1, record=os.urandom(200_000))],
                counters={"records_read": 50},
            )
        assert [b.batch_id for b in await journal.batches()] == [kept]
        assert await journal.counters() == {"records_read": 3}
        assert await journal.dead_letters() == []
        assert len(body_files(path)) == 1  # the failed seal's body file is gone
        journal._conn.execute("PRAGMA max_page_count = 1073741823")
        assert await seal(journal, lines=3) == kept + 1
    async with SqliteJournal(path) as journal:
        state = await journal.open(SPEC)
    assert state.inputs[0].lines == 6
    assert state.counters == {"records_read": 6}


async def test_read_only_connection_raises_and_keeps_state(path: Path) -> None:
    """A write refused as read-only raises JournalError with advice; reads still work."""
    async with SqliteJournal(path) as journal:
        await journal.open(SPEC)
        batch = await seal(journal)
        assert journal._conn is not None
        journal._conn.execute("PRAGMA query_only = ON")
        with pytest.raises(JournalError, match="read-only"):
            await journal.mark_submitting(batch)
        (stored,) = await journal.batches()
        assert stored.phase is BatchPhase.SEALED
        assert stored.attempts == 0


READ_ONLY_SCENARIO = textwrap.dedent(
    """
    import os
    import sys

    import anyio
    import anyio._backends._asyncio  # imported before dropping root: the venv may be unreadable
    import queue

    from orchestrator.errors import JournalError
    from orchestrator.journal import RunSpec, SqliteJournal

    if os.geteuid() == 0:  # root ignores permissions: play the scenario as nobody
        os.setgid(65534)
        os.setuid(65534)
    base = sys.argv[1]
    SPEC = RunSpec("Orders", "account", "custom", ("/in.jsonl",), "acct")


    async def refused(path, needle):
        try:
            await SqliteJournal(path).open(SPEC)
        except JournalError as error:
            assert path in str(error) and needle in str(error), str(error)
        else:
            raise AssertionError(f"{path} opened")


    async def counters(path):
        async with SqliteJournal(path) as journal:
            return (await journal.open(SPEC)).counters


    async def main():
        folder = os.path.join(base, "w")
        os.mkdir(folder)
        path = os.path.join(folder, "journal.db")
        async with SqliteJournal(path) as journal:
            await journal.open(SPEC)
            await journal.save_progress(progress=None, dead_letters=(), counters={"kept": 1})
        os.chmod(path, 0o400)
        await refused(path, "permissions")
        os.chmod(path, 0o600)
        assert await counters(path) == {"kept": 1}
        print("file ok")
        os.chmod(folder, 0o500)
        await refused(path, "read-only")
        os.chmod(folder, 0o700)
        assert await counters(path) == {"kept": 1}
        print("existing in read-only dir ok")
        fixed = os.path.join(base, "ro")
        os.mkdir(fixed)
        os.chmod(fixed, 0o500)
        await refused(os.path.join(fixed, "journal.db"), "directory is writable")
        print("new in read-only dir ok")


    anyio.run(main)
    """
)


def test_read_only_file_and_directory_are_refused() -> None:
    """A chmod 0400 journal or 0500 directory raises JournalError; the state survives."""
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o777)  # the scenario may run as nobody
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_SCENARIO, base],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    said = [line for line in done.stdout.decode().splitlines() if line.endswith(" ok")]
    assert said == [
        "file ok",
        "existing in read-only dir ok",
        "new in read-only dir ok",
    ]


async def test_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A journal path under a regular file raises JournalError, not OSError."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(JournalError, match="cannot open it"):
        await SqliteJournal(tmp_path / "file" / "journal.db").open(SPEC)


async def test_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    """Garbage and another application's database raise JournalError, and are left alone."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(JournalError, match=r"not a journal|damaged"):
        await SqliteJournal(garbage).open(SPEC)
    assert garbage.read_bytes().startswith(b"this is not")

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    with pytest.raises(JournalError, match="not a journal of insight-import"):
        await SqliteJournal(foreign).open(SPEC)


CHILD = textwrap.dedent(
    """
    import sys

    import anyio

    from orchestrator.journal import DeadLetter, InputProgress, RunSpec, SqliteJournal
    from orchestrator.provenance import Source
    from orchestrator.refs import RecordRef

    SPEC = RunSpec("Orders", "account", "custom", ("/in.jsonl",), "acct")


    async def main() -> None:
        async with SqliteJournal(sys.argv[1]) as journal:
            state = await journal.open(SPEC)
            lines = state.inputs[0].lines
            sys.stderr.write("ready\\n")
            sys.stderr.flush()
            i = 0
            while True:
                n = 1 + i % 7
                refs = [
                    RecordRef(f"k{lines + k + 1}", None, Source("/in.jsonl", lines + k + 1))
                    for k in range(n)
                ]
                lines += n + 1
                batch = await journal.seal_batch(
                    body=bytes([n]) * (n * 30_000),
                    refs=refs,
                    depends_on=(),
                    progress=InputProgress(0, lines, f"d{lines}"),
                    dead_letters=[DeadLetter(f"/in.jsonl:{lines}", f"k{lines}", "r", "m")],
                    counters={"records_read": n + 1, "records_rejected": 1},
                )
                if i % 3 == 0:
                    await journal.mark_submitting(batch)
                    await journal.mark_submitted(batch, f"imp-{batch}", 1.0)
                    await journal.mark_polled(batch)
                    await journal.mark_finished(
                        batch, status="Finished", imported=n, dead_letters=(),
                        finished_at=2.0, counters={"records_imported": n},
                    )
                elif i % 3 == 1:
                    await journal.mark_submitting(batch)
                i += 1


    anyio.run(main)
    """
)


async def check_consistent(path: Path) -> int:
    spec = RunSpec("Orders", "account", "custom", ("/in.jsonl",), "acct")
    async with SqliteJournal(path) as journal:
        state = await journal.open(spec)
        batches = await journal.batches()
        letters = await journal.dead_letters()
        counters = await journal.counters()
        assert [b.batch_id for b in batches] == list(range(1, len(batches) + 1))
        unfinished = [b for b in batches if b.phase is not BatchPhase.FINISHED]
        assert len(body_files(path)) == len(unfinished)  # none left over by the kill
        total = sum(b.record_count for b in batches)
        assert counters.get("records_read", 0) == total + len(letters) == state.inputs[0].lines
        assert counters.get("records_rejected", 0) == len(letters) == len(batches)
        assert state.inputs[0].digest == (f"d{total + len(letters)}" if batches else "")
        assert counters.get("records_imported", 0) == sum(b.imported or 0 for b in batches)
        assert counters.get("submits_in_doubt", 0) == sum(b.in_doubt for b in batches)
        for stored in batches:
            if stored.phase is BatchPhase.FINISHED:
                assert (stored.status, stored.import_id) == ("Finished", f"imp-{stored.batch_id}")
                continue
            assert stored.phase is not BatchPhase.SUBMITTING  # in doubt at open: sealed again
            n = stored.record_count
            body = await journal.load_body(stored.batch_id)
            assert body == bytes([n]) * (n * 30_000)
            assert len(body) == stored.body_bytes
            refs = await journal.load_refs(stored.batch_id)
            assert len(refs) == n
            lines = [ref.source.line for ref in refs if ref.source is not None]
            assert lines == list(range(lines[0], lines[0] + n))
        return len(batches)


def test_state_is_consistent_after_kill_9_at_random_moments(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-work leaves every committed batch whole and the counters exact."""
    path = tmp_path / "journal.db"
    rng = random.Random(20_260_509)
    seen = 0
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stderr is not None
            assert child.stderr.readline() == b"ready\n"
            time.sleep(rng.uniform(0.02, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stderr is not None:
                child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        count = anyio.run(check_consistent, path)
        assert count >= seen
        seen = count
    assert seen > 6


async def test_keeps_bodies_says_whether_the_body_given_is_the_body_stored(
    factory: Factory,
) -> None:
    """``keeps_bodies`` is true exactly when ``load_body`` hands back the object that was sealed
    (the engine then must not free it after sending, nor build the next body in it)."""
    async with factory() as journal:
        await journal.open(SPEC)
        body = bytearray(b'{"records":[1]}')
        [batch_id] = await journal.seal_batches(
            batches=[NewBatch(body, RecordRefs(["k"], [None], ["f"], [1]))],
            progress=[],
            dead_letters=[],
            counters={},
        )
        loaded = await journal.load_body(batch_id)
        assert loaded == body
        assert journal.keeps_bodies is (loaded is body)


async def test_split_replaces_a_batch_and_redirects_its_dependents(factory: Factory) -> None:
    """split_batch seals the halves, finishes the parent as split and makes every unfinished
    batch that waited for the parent wait for the halves, across a reopen too."""
    async with factory() as journal:
        await journal.open(SPEC)
        parent = await seal(journal, 4)
        other = await seal(journal, 1, lines=4)
        dependent = await journal.seal_batch(
            body=b"held",
            refs=make_refs(1, first_line=6),
            depends_on=(parent, other),
            progress=None,
            dead_letters=(),
            counters={},
        )
        await journal.mark_submitting(parent)
        halves = [
            NewBatch(b"first", RecordRefs.of(make_refs(2)).with_ends([3, 5])),
            NewBatch(b"second", RecordRefs.of(make_refs(2, first_line=3)).with_ends([3, 6])),
        ]
        ids = await journal.split_batch(parent, halves)
        assert ids == [dependent + 1, dependent + 2]
    async with factory() as journal:
        state = await journal.open(SPEC)
        by_id = {batch.batch_id: batch for batch in await journal.batches()}
        assert (by_id[parent].phase, by_id[parent].status) == (BatchPhase.FINISHED, "split")
        assert by_id[dependent].depends_on == (other, *ids)
        assert [b.batch_id for b in state.unfinished] == [other, dependent, *ids]
        assert await journal.load_body(ids[1]) == b"second"
        loaded = await journal.load_refs(ids[1])
        assert loaded == make_refs(2, first_line=3)
        assert loaded.ends is not None
        assert list(loaded.ends) == [3, 6]
        with pytest.raises(ValueError, match="is finished"):
            await journal.load_body(parent)

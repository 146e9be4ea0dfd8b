"""End-to-end tests of the engine against the bundled simulator over loopback."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import (
    AuthenticationError,
    ClientSettings,
    Collection,
    ImportOutcome,
    InsightClient,
    JournalMismatchError,
    Orchestrator,
    RetryPolicy,
    Settings,
    SqliteJournal,
    inputs,
    parsing,
)
from orchestrator.engine import _start_pool_for
from orchestrator.lifecycle import ByteBudget, UploadBudget
from orchestrator.logs import capture_events
from orchestrator.parsing import PROCESS_AFTER, ParsePool
from orchestrator.simulator import Simulator, SimulatorConfig
from orchestrator.wire import SubmitReceipt
from tests.conftest import sim_client_settings

pytestmark = pytest.mark.anyio

# 5–30 s polling scaled to 0.05–0.3 s.
FAST = Settings.scaled(0.01, max_body_bytes=20_000)
# Loopback answers in milliseconds; event-loop lateness on a busy CI machine is allowed for.
SLACK = 0.05


def client_for(sim: Simulator, **overrides: Any) -> InsightClient:
    # small real waits between retries: the poll-window tests must see them
    retry = RetryPolicy(wait_initial=0.01, wait_max=0.05, wait_jitter=0.01, timeout=20.0)
    return InsightClient(sim_client_settings(sim, **{"retry": retry, **overrides}))


def orders(n: int, *, contacts: int = 50, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "key": f"order-{i}",
            "json": {"total": round(rng.uniform(1, 500), 2), "items": [{"sku": f"s{i}", "qty": 1}]},
            "contactIdentity": {"identifier": "email", "value": f"c{rng.randrange(contacts)}@x.io"},
        }
        for i in range(n)
    ]


def stored(sim: Simulator, name: str) -> dict[Any, dict[str, Any]]:
    return sim.collections.get(name, {})


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(
        SimulatorConfig(records_per_second=5_000, jitter=0.3, seed=3)
    ) as simulator:
        yield simulator


async def test_imports_every_valid_record_and_dead_letters_the_rest(sim: Simulator) -> None:
    """Valid records are stored; bad and unknown-contact records end in the dead letters."""
    records: list[Any] = orders(300)
    records[10] = {"key": "bad-1", "json": [1, 2]}  # json not an object
    records[20] = {
        "key": "bad-2",
        "json": {"a": [[1]]},
        "contactIdentity": records[20]["contactIdentity"],
    }
    records[30]["contactIdentity"] = {"identifier": "email", "value": "ghost@nowhere.invalid"}
    collection = Collection("Orders", "contact", "orders")
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        result = await orch.import_records(collection, records)

    assert result.records_read == 300
    assert result.records_rejected == 2
    assert result.records_failed == 1
    assert result.records_imported == 297
    reasons = {letter.key: letter.reason for letter in result.dead_letters}
    assert reasons == {
        "bad-1": "json-type",
        "bad-2": "json-nested-array",
        "order-30": "ContactEmailDoesNotExist",
    }
    sources = {letter.key: letter.source for letter in result.dead_letters}
    assert sources["order-30"] == "<records>:31"
    assert len(stored(sim, "Orders")) == 297
    assert len(result.imports) > 1  # the 20 kB cap split the work
    assert all(batch.body_bytes <= 20_000 for batch in result.imports)
    assert sim.stats.max_active_seen <= 5


async def test_never_more_than_max_concurrent_in_flight(sim: Simulator) -> None:
    """The slot gate holds the account to max_concurrent imports, however many batches wait."""
    sim.config.records_per_second = 300  # ~0.1 s an import: the gate, not the API, sets the pace
    settings = Settings.scaled(0.01, max_body_bytes=5_000, max_concurrent=3)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        result = await orch.import_records(Collection("Few", "contact"), orders(400))
    assert len(result.imports) >= 10
    assert sim.stats.max_active_seen == 3
    assert sim.stats.rejected_too_many_active == 0


async def test_polls_stay_within_poll_min_and_poll_max(sim: Simulator) -> None:
    """Every poll is at least poll_min and at most poll_max after the submit or the last poll."""
    sim.config.records_per_second = 2_000
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        await orch.import_records(Collection("Polled", "contact"), orders(600))
    gaps = []
    for stats in sim.stats.imports.values():
        times = [stats.accepted_at, *stats.polls]
        gaps.extend(b - a for a, b in itertools.pairwise(times))
        assert stats.polls, "every import is polled to its end"
    assert min(gaps) >= FAST.poll_min
    assert max(gaps) <= FAST.poll_max + SLACK


async def test_status_polls_of_all_runs_share_the_accounts_budget(sim: Simulator) -> None:
    """Two runs of one orchestrator together poll no faster than its status-call budget."""
    sim.config.records_per_second = 1_000
    # Time scaled by 0.01: the budget's minute is 0.6 s.
    settings = Settings.scaled(0.01, max_body_bytes=20_000, status_calls_per_minute=6)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        with capture_events() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(orch.import_records, Collection("BudgetA", "contact"), orders(300))
                tg.start_soon(orch.import_records, Collection("BudgetB", "contact"), orders(300))
    polls = sorted(t for stats in sim.stats.imports.values() for t in stats.polls)
    assert len(polls) > 6
    # Counted when sent, seen when arrived: allow the loopback's jitter on the window.
    assert all(
        later - earlier >= 0.6 - 3 * SLACK for earlier, later in zip(polls, polls[6:], strict=False)
    )
    assert len(stored(sim, "BudgetA")) == len(stored(sim, "BudgetB")) == 300
    stretched = [entry for entry in logs if entry["event"] == "poll.budget_stretched"]
    assert 1 <= len(stretched) <= len(sim.stats.imports)


async def test_last_occurrence_wins_across_concurrent_imports(sim: Simulator) -> None:
    """With keys repeated across concurrent imports, the collection ends with the last value."""
    sim.config.jitter = 0.9  # imports finish in any order
    rng = random.Random(5)
    records = [
        {
            "key": f"k{rng.randrange(40)}",
            "json": {"version": i, "pad": "x" * rng.randrange(200)},
            "contactIdentity": {"identifier": "email", "value": "a@x.io"},
        }
        for i in range(800)
    ]
    expected = {record["key"]: record["json"] for record in records}
    async with Orchestrator(
        client_for(sim), settings=Settings.scaled(0.01, max_body_bytes=3_000)
    ) as orch:
        result = await orch.import_records(Collection("Versions", "contact"), records)
    got = {identity[2]: record["json"] for identity, record in stored(sim, "Versions").items()}
    assert got == expected
    assert result.records_read == 800
    assert result.records_superseded + result.counters["records_submitted"] == 800
    assert sim.stats.max_active_seen > 1, "held batches must not serialize the main stream"


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keys=st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=120),
    cap=st.integers(min_value=400, max_value=3_000),
    concurrent=st.integers(min_value=1, max_value=5),
)
def test_scheduling_invariants(keys: list[int], cap: int, concurrent: int) -> None:
    """For any key sequence and cap: last write wins, slots respected, bodies under the cap."""

    async def scenario() -> None:
        config = SimulatorConfig(records_per_second=20_000, jitter=0.9, seed=len(keys))
        async with Simulator(config) as sim:
            records = [{"key": f"k{k}", "json": {"v": i}} for i, k in enumerate(keys)]
            settings = Settings.scaled(
                0.002, max_body_bytes=cap, max_concurrent=concurrent, linger=0.01
            )
            async with Orchestrator(client_for(sim), settings=settings) as orch:
                result = await orch.import_records(Collection("Inv"), records)
            assert {k: r["json"] for k, r in stored(sim, "Inv").items()} == {
                r["key"]: r["json"] for r in records
            }
            assert sim.stats.max_active_seen <= concurrent
            assert all(s.body_bytes <= cap for s in sim.stats.imports.values())
            assert result.records_imported + result.records_superseded == len(keys)

    anyio.run(scenario)


async def test_server_errors_and_lost_responses_are_retried_and_counted(sim: Simulator) -> None:
    """5xx answers and a lost response are survived; the lost one is counted."""
    sim.faults.server_errors = 2
    sim.faults.resets_after_accept = 1
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        result = await orch.import_records(Collection("Faulty", "contact"), orders(200))
    assert result.ok
    assert result.records_imported == 200
    assert result.counters["lost_responses"] == 1
    assert len(stored(sim, "Faulty")) == 200
    assert sim.stats.lost_responses == 1
    assert len(sim.stats.imports) == len(result.imports) + 1  # the stray import of the lost answer


async def test_a_failed_import_is_resubmitted(sim: Simulator) -> None:
    """An import that ends Failed is sent again and its records land."""
    sim.faults.failed_imports = 1
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        result = await orch.import_records(Collection("Retried", "contact"), orders(100))
    assert result.ok
    assert result.counters["resubmits"] == 1
    assert len(stored(sim, "Retried")) == 100
    assert [s.status for s in sim.stats.imports.values()].count("Failed") == 1


async def test_failed_past_the_budget_is_dead_lettered(sim: Simulator) -> None:
    """An import that keeps failing ends with its records in the dead letters, reason Failed."""
    sim.faults.failed_imports = 100
    settings = Settings.scaled(0.01, max_resubmits=1)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        result = await orch.import_records(Collection("Doomed"), orders(5))
    assert result.records_failed == 5
    assert {letter.reason for letter in result.dead_letters} == {"Failed"}
    assert [batch.attempts for batch in result.imports] == [2]


async def test_account_full_waits_for_a_slot(sim: Simulator) -> None:
    """Slots held by another integration make us wait (counted), never fail, never exceed 5."""
    sim.faults.foreign_active_imports = 4

    async def release_later() -> None:
        await anyio.sleep(0.4)
        sim.faults.foreign_active_imports = 0

    async with (
        anyio.create_task_group() as tg,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        tg.start_soon(release_later)
        result = await orch.import_records(Collection("Shared", "contact"), orders(300))
    assert result.ok
    assert result.counters["account_full_waits"] >= 1
    assert sim.stats.max_active_seen_with_foreign <= 5


async def test_rate_limit_is_waited_out(sim: Simulator) -> None:
    """429 rate limits are waited out and the import completes."""
    sim.faults.rate_limit_calls = 3
    sim.faults.rate_limit_reset_s = 0.05
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        result = await orch.import_records(Collection("Limited"), orders(50))
    assert result.ok
    assert sim.stats.status_counts.get(429, 0) == 3


async def test_bad_credentials_abort_the_run(sim: Simulator) -> None:
    """A wrong password raises AuthenticationError without leaking the password."""
    async with Orchestrator(client_for(sim, password="wrong-secret"), settings=FAST) as orch:
        with pytest.raises(AuthenticationError) as caught:
            await orch.import_records(Collection("Nope"), orders(5))
    assert "wrong-secret" not in str(caught.value)


async def test_async_iterable_trickle_is_sealed_on_pause(sim: Simulator) -> None:
    """A slow async source gets its records imported without waiting for the end."""
    outcomes: list[ImportOutcome] = []
    first_seen = anyio.Event()

    async def trickle() -> AsyncIterator[dict[str, Any]]:
        for record in orders(3):
            yield record
        await first_seen.wait()  # only goes on once the first import ended
        for record in orders(6)[3:]:
            yield record

    def on_outcome(outcome: ImportOutcome) -> None:
        outcomes.append(outcome)
        first_seen.set()

    settings = Settings.scaled(0.01, linger=0.05)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        with anyio.fail_after(10):
            result = await orch.import_records(
                Collection("Trickle", "contact"), trickle(), on_outcome=on_outcome
            )
    assert [outcome.records for outcome in outcomes] == [3, 3]
    assert result.records_imported == 6


async def test_a_steady_trickle_is_sent_within_linger(sim: Simulator) -> None:
    """A source that never pauses (a record every 10 ms) still gets batches sealed once their
    oldest record waited `linger` while a slot is free; a local reject is told as it happens."""
    linger = 0.1
    sent_at: dict[str, float] = {}
    ended_at: dict[str, float] = {}
    source_done = anyio.Event()
    rejected_before_end: list[ImportOutcome] = []
    records = orders(100)
    records[5] = {"key": "bad", "json": [1], "contactIdentity": records[5]["contactIdentity"]}

    async def trickle() -> AsyncIterator[dict[str, Any]]:
        for record in records:
            sent_at[record["key"]] = anyio.current_time()
            yield record
            await anyio.sleep(0.01)
        source_done.set()

    def on_outcome(outcome: ImportOutcome) -> None:
        if outcome.batch_id is None:
            assert outcome.status == "rejected"
            if not source_done.is_set():
                rejected_before_end.append(outcome)
            return
        now = anyio.current_time()
        for identity in stored(sim, "Linger"):
            ended_at.setdefault(identity[2], now)

    settings = Settings.scaled(0.01, linger=linger)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        with anyio.fail_after(20):
            result = await orch.import_records(
                Collection("Linger", "contact"), trickle(), on_outcome=on_outcome
            )
    assert result.records_imported == 99
    assert [letter.reason for outcome in rejected_before_end for letter in outcome.failures] == [
        "json-type"
    ]
    assert len(result.imports) > 3  # sealed by linger, not only at the end
    # each record was imported within linger + processing + poll_max of being yielded
    bound = linger + settings.poll_max + 0.5
    assert max(ended_at[key] - sent_at[key] for key in ended_at) <= bound
    assert len(ended_at) == 99


async def test_cancellation_leaves_no_task_behind(sim: Simulator) -> None:
    """Cancelling the caller stops the run cleanly and the orchestrator closes."""
    sim.config.records_per_second = 200  # slow imports: the run is mid-way when cancelled
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        with anyio.move_on_after(0.3) as scope:
            await orch.import_records(Collection("Cancelled", "contact"), orders(400))
        assert scope.cancelled_caught
    assert orch.client._session is None or orch.client._session.closed


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path


async def test_resume_from_the_journal_after_an_interruption(
    sim: Simulator, tmp_path: Path
) -> None:
    """A cancelled file import resumes from its journal: everything stored, nothing read twice."""
    sim.config.records_per_second = 500
    data = write_jsonl(tmp_path / "in.jsonl", orders(400))
    collection = Collection("Resumed", "contact")
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        with anyio.move_on_after(0.5):
            await orch.import_files(collection, [str(data)], journal=journal)
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        result = await orch.import_files(collection, [str(data)], journal=journal)
    assert result.records_read == 400
    assert result.records_imported == 400
    assert len(stored(sim, "Resumed")) == 400
    submitted = sum(s.records for s in sim.stats.imports.values())
    sent_twice = sum(batch.record_count for batch in result.imports if batch.in_doubt)
    assert submitted <= 400 + sent_twice  # only batches in doubt at the crash went twice
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        again = await orch.import_files(collection, [str(data)], journal=journal)
    assert again.nothing_to_do


async def test_a_resumed_batch_over_a_lowered_cap_is_split_before_it_is_sent(
    sim: Simulator, tmp_path: Path
) -> None:
    """Batches sealed under a 20,000-byte cap, resumed with 6,000: no body over 6,000 is sent."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(300))
    collection = Collection("Lowered", "contact")
    sim.faults.foreign_active_imports = 5  # every submit is refused: batches stay sealed
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        with anyio.move_on_after(0.5):
            await orch.import_files(collection, [str(data)], journal=journal)
    assert not sim.stats.imports
    sim.faults.foreign_active_imports = 0
    lowered = Settings.scaled(0.01, max_body_bytes=6_000)
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=lowered) as orch,
    ):
        result = await orch.import_files(collection, [str(data)], journal=journal)
    assert result.records_imported == 300
    assert len(stored(sim, "Lowered")) == 300
    assert max(s.body_bytes for s in sim.stats.imports.values()) <= 6_000
    assert any(batch.status == "split" for batch in result.imports)


async def test_changed_input_is_detected_on_resume(sim: Simulator, tmp_path: Path) -> None:
    """Input edited after a crash is reported, not silently mixed."""
    sim.config.records_per_second = 50  # imports of ~35 records take ~0.7 s: cancelled mid-way
    data = write_jsonl(tmp_path / "in.jsonl", orders(300))
    collection = Collection("Changed", "contact")
    settings = Settings.scaled(0.01, max_body_bytes=5_000)
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=settings) as orch,
    ):
        with anyio.move_on_after(0.4):
            await orch.import_files(collection, [str(data)], journal=journal)
    lines = data.read_bytes().splitlines(keepends=True)
    lines[0] = (
        orjson.dumps(
            {"key": "edited", "json": {}, "contactIdentity": orders(1)[0]["contactIdentity"]}
        )
        + b"\n"
    )
    data.write_bytes(b"".join(lines))
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=settings) as orch,
    ):
        with pytest.raises(JournalMismatchError, match="changed"):
            await orch.import_files(collection, [str(data)], journal=journal)


def test_results_report_has_the_contract_fields() -> None:
    """The report carries every field the contract names."""

    async def scenario() -> dict[str, Any]:
        async with (
            Simulator(SimulatorConfig(records_per_second=50_000)) as sim,
            Orchestrator(client_for(sim), settings=FAST) as orch,
        ):
            result = await orch.import_records(Collection("Rep"), orders(30))
        return result.report()

    report = anyio.run(scenario)
    for name in (
        "collection",
        "records_read",
        "records_rejected",
        "records_submitted",
        "records_imported",
        "records_failed",
        "duration_s",
        "imports",
    ):
        assert name in report
    for entry in report["imports"]:
        assert set(entry) >= {
            "import_id",
            "records",
            "body_bytes",
            "status",
            "attempts",
            "polls",
            "submitted_at",
            "finished_at",
        }
    assert report["records_imported"] == 30


async def test_a_body_the_api_finds_too_large_is_split_and_sent(sim: Simulator) -> None:
    """An API limit below ours answers 413: the batch is split in halves until it fits."""
    sim.config.max_body_bytes = 6_000
    async with Orchestrator(client_for(sim), settings=FAST) as orch:
        result = await orch.import_records(Collection("Split", "contact"), orders(300))
    assert result.ok
    assert result.records_imported == 300
    assert len(stored(sim, "Split")) == 300
    assert sim.stats.rejected_too_large >= 1
    assert "split" in {batch.status for batch in result.imports}
    assert all(s.body_bytes <= 6_000 for s in sim.stats.imports.values())


async def test_stream_yields_each_outcome_as_it_ends(sim: Simulator) -> None:
    """`stream()` hands out one outcome per batch, all records accounted for."""
    settings = Settings.scaled(0.01, max_body_bytes=4_000)
    async with (
        Orchestrator(client_for(sim), settings=settings) as orch,
        orch.stream(Collection("Streamed", "contact"), orders(120)) as outcomes,
    ):
        seen = [outcome async for outcome in outcomes]
    assert len(seen) > 1
    assert sum(outcome.imported for outcome in seen) == 120
    assert all(outcome.succeeded for outcome in seen)


async def test_leaving_the_stream_early_cancels_the_import(sim: Simulator) -> None:
    """Breaking out of `stream()` stops the run; nothing keeps running afterwards."""
    sim.config.records_per_second = 500
    settings = Settings.scaled(0.01, max_body_bytes=4_000)
    async with Orchestrator(client_for(sim), settings=settings) as orch:
        async with orch.stream(Collection("Early", "contact"), orders(2_000)) as outcomes:
            async for _ in outcomes:
                break
        submitted = len(sim.stats.imports)
        await anyio.sleep(0.3)
        assert len(sim.stats.imports) == submitted
    assert len(stored(sim, "Early")) < 2_000


async def test_upload_budget_holds_bodies_back_but_always_lets_one_through() -> None:
    """Bodies wait while the bytes being uploaded would pass the budget; one always goes."""
    from orchestrator.lifecycle import ByteBudget as _ByteBudget

    budget = _ByteBudget(100)
    inside: list[int] = []
    peak = 0

    async def upload(size: int) -> None:
        nonlocal peak
        async with budget.hold(size):
            inside.append(size)
            peak = max(peak, sum(inside))
            await anyio.sleep(0.01)
            inside.remove(size)

    async with anyio.create_task_group() as tg:
        for size in (60, 60, 30, 150, 10):
            tg.start_soon(upload, size)
    assert peak == 150  # the oversized body went alone
    assert not inside


async def test_status_errors_are_polled_again_within_the_window(sim: Simulator) -> None:
    """5xx answers to status polls are retried by the poller's own rhythm, inside the window."""
    sim.config.records_per_second = 100  # 20 records: ~0.2 s of processing
    sim.config.jitter = 0.0

    async def break_polls() -> None:
        while not sim.stats.imports:  # noqa: ASYNC110 - the simulator has no event for a 202
            await anyio.sleep(0.001)
        sim.faults.server_errors = 3  # after the PUT was accepted, before its first poll

    async with (
        anyio.create_task_group() as tg,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        tg.start_soon(break_polls)
        result = await orch.import_records(Collection("Flaky", "contact"), orders(20))
    assert result.ok
    (stats,) = sim.stats.imports.values()
    times = [stats.accepted_at, *stats.polls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(stats.polls) >= 4  # three failed polls, then the one that saw the end
    assert min(gaps) >= FAST.poll_min
    assert max(gaps) <= FAST.poll_max + SLACK


async def test_a_file_parsed_in_processes_imports_each_record_once_last_write_winning(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's path: a file parsed by worker processes, in many small chunks, packed by runs
    into bodies (built over the previous ones), with keys updated while their imports run."""
    monkeypatch.setattr(parsing, "PROCESS_AFTER", 0)
    monkeypatch.setattr(inputs, "_CHUNK_BYTES", 1 << 14)
    sim.config.jitter = 0.9  # imports finish in any order
    rng = random.Random(11)
    records: list[Any] = [
        {
            "key": f"k{rng.randrange(120)}",
            "json": {"version": i, "pad": "x" * rng.randrange(300)},
            "contactIdentity": {"identifier": "email", "value": "a@x.io"},
        }
        for i in range(1_500)
    ]
    records[100] = {"key": "bad", "json": [1]}
    records[700] = {
        "key": "ghost-order",
        "json": {},
        "contactIdentity": {"identifier": "email", "value": "ghost@nowhere.invalid"},
    }
    data = write_jsonl(tmp_path / "in.jsonl", records)
    expected = {
        record["key"]: record["json"]
        for record in records
        if record["key"] not in {"bad", "ghost-order"}
    }
    settings = Settings.scaled(0.01, max_body_bytes=20_000, parse_processes=2)
    async with (
        SqliteJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=settings) as orch,
    ):
        result = await orch.import_files(
            Collection("Versions", "contact"), [str(data)], journal=journal
        )
        # parsed in worker processes, not in the thread fallback
        assert orch._parse_pool is not None
        assert orch._parse_pool._executor is not None

    assert result.records_read == 1_500
    assert {(letter.source, letter.reason) for letter in result.dead_letters} == {
        (f"{data}:101", "json-type"),
        (f"{data}:701", "ContactEmailDoesNotExist"),
    }
    got = {identity[2]: record["json"] for identity, record in stored(sim, "Versions").items()}
    assert got == expected
    assert sim.stats.max_active_seen <= 5


async def test_the_parse_pool_starts_as_a_large_input_is_opened(tmp_path: Path) -> None:
    """An input past PROCESS_AFTER bytes starts the pool at once; small ones and stdin do not."""
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"{}\n")
    large = tmp_path / "large.jsonl"
    with large.open("wb") as handle:
        handle.truncate(PROCESS_AFTER + 1)  # sparse: only its size matters here
    async with ParsePool(1) as pool:
        await _start_pool_for(pool, ["-", str(small), str(tmp_path / "missing.jsonl")])
        assert pool._executor is None
        await _start_pool_for(pool, [str(small), str(large)])
        assert pool._executor is not None


async def test_a_parse_pool_that_cannot_start_does_not_fail_the_run(tmp_path: Path) -> None:
    """Starting the pool ahead is best effort: a closed pool is left to the input to report."""
    large = tmp_path / "large.jsonl"
    with large.open("wb") as handle:
        handle.truncate(PROCESS_AFTER + 1)
    pool = ParsePool(1)
    await pool.aclose()
    await _start_pool_for(pool, [str(large)])


class CountingJournal(SqliteJournal):
    """The durable journal, counting the bodies read back from it and the seals."""

    loads = 0
    seals = 0

    def __init__(self, path: Path, *, signal_after_seals: int = 0) -> None:
        super().__init__(path)
        self.loaded: list[int] = []
        self._signal_after = signal_after_seals
        self.sealed_enough = anyio.Event()  # set once that many batches are sealed

    async def seal_batches(self, **kwargs: Any) -> list[int]:
        ids = await super().seal_batches(**kwargs)
        self.seals += len(ids)
        if self.seals >= self._signal_after:
            self.sealed_enough.set()
        return ids

    async def load_body(self, batch_id: int) -> bytes | bytearray:
        self.loads += 1
        self.loaded.append(batch_id)
        return await super().load_body(batch_id)


async def test_the_first_wave_is_sent_from_memory_with_its_intent_sealed(
    sim: Simulator, tmp_path: Path
) -> None:
    """Bodies sealed while a slot is free are never read back; their intent is in the seal."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(400))
    async with (
        CountingJournal(tmp_path / "j.sqlite") as journal,
        Orchestrator(client_for(sim), settings=FAST) as orch,
    ):
        wave = Collection("Wave", "contact")
        result = await orch.import_files(wave, [str(data)], journal=journal)
    assert result.records_imported == 400
    assert 1 < len(result.imports) <= FAST.max_concurrent
    assert journal.loads == 0
    assert [batch.submits for batch in result.imports] == [1] * len(result.imports)


class UploadGatedClient(InsightClient):
    """The real client, whose first upload does not start until ``gate`` is set."""

    def __init__(self, settings: ClientSettings, gate: anyio.Event) -> None:
        super().__init__(settings)
        self._gate: anyio.Event | None = gate

    async def submit_import(
        self, body: bytes | bytearray, *, on_sent: Callable[[], object] | None = None
    ) -> SubmitReceipt:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            with anyio.fail_after(10):
                await gate.wait()
        return await super().submit_import(body, on_sent=on_sent)


async def test_a_body_sealed_while_another_uploads_waits_in_the_journal(
    sim: Simulator, tmp_path: Path
) -> None:
    """With the upload budget taken, the next body is read back when its upload starts: it is
    not kept in memory beside the one being sent and the one being built."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(400))
    slow = Settings.scaled(0.01, max_body_bytes=20_000, max_upload_bytes=20_000)
    async with CountingJournal(tmp_path / "j.sqlite", signal_after_seals=3) as journal:
        client = UploadGatedClient(sim_client_settings(sim), journal.sealed_enough)
        async with Orchestrator(client, settings=slow) as orch:
            result = await orch.import_files(
                Collection("Wave", "contact"), [str(data)], journal=journal
            )
    assert result.records_imported == 400
    first, second, third = sorted(i.batch_id for i in result.imports if i.batch_id)[:3]
    # the first body went from memory; those sealed during its upload were read back
    assert first not in journal.loaded
    assert {second, third} <= set(journal.loaded)


class LoadAheadProbe(InsightClient):
    """The real client, whose first upload waits until two batches are sealed and every task
    has settled, then notes which bodies the journal was asked for meanwhile."""

    def __init__(self, settings: ClientSettings, journal: CountingJournal) -> None:
        super().__init__(settings)
        self._journal = journal
        self.loaded_during_first_upload: list[int] | None = None

    async def submit_import(
        self, body: bytes | bytearray, *, on_sent: Callable[[], object] | None = None
    ) -> SubmitReceipt:
        if self.loaded_during_first_upload is None:
            with anyio.fail_after(10):
                await self._journal.sealed_enough.wait()
            await anyio.wait_all_tasks_blocked()  # the second batch waits for the slot by now
            self.loaded_during_first_upload = list(self._journal.loaded)
        return await super().submit_import(body, on_sent=on_sent)


@pytest.mark.parametrize(("max_upload_bytes", "ahead"), [(200_000, True), (60_000, False)])
async def test_only_a_small_body_is_loaded_ahead_of_its_slot(
    sim: Simulator, tmp_path: Path, max_upload_bytes: int, ahead: bool
) -> None:
    """A batch waiting for a slot has its body loaded ahead only if that body is at most a
    quarter of the upload budget: a large one is read back from its file in a fraction of its
    upload, and holding it ahead would lift the run's peak memory by as much."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1000))
    one_slot = Settings.scaled(
        0.01, max_body_bytes=20_000, max_concurrent=1, max_upload_bytes=max_upload_bytes
    )
    async with CountingJournal(tmp_path / "j.sqlite", signal_after_seals=2) as journal:
        client = LoadAheadProbe(sim_client_settings(sim), journal)
        async with Orchestrator(client, settings=one_slot) as orch:
            result = await orch.import_files(
                Collection("Wave", "contact"), [str(data)], journal=journal
            )
    assert result.records_imported == 1000
    second = sorted(i.batch_id for i in result.imports if i.batch_id)[1]
    assert client.loaded_during_first_upload == ([second] if ahead else [])


async def test_an_upload_gives_its_budget_back_when_told_before_its_block_ends() -> None:
    """A holder that releases early lets the next one in while it still waits for its answer."""
    budget = ByteBudget(10)
    order: list[str] = []

    async def first(release_sent: anyio.Event) -> None:
        async with budget.hold(8) as uploaded:
            order.append("first in")
            uploaded()
            await release_sent.wait()
            order.append("first out")

    async def second() -> None:
        async with budget.hold(8):
            order.append("second in")

    answered = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(first, answered)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        answered.set()
    assert order == ["first in", "second in", "first out"]


async def test_bodies_waiting_for_their_answer_are_bounded_too() -> None:
    """An upload gives its writing share back when written, but the next ones wait once as many
    bytes again are written and still waiting for their answer: at most two bodies here."""
    budget = UploadBudget(10)
    order: list[str] = []
    answers = [anyio.Event() for _ in range(3)]

    async def upload(n: int) -> None:
        async with budget.hold(8) as written:
            order.append(f"{n} writing")
            written()
            await answers[n].wait()
        order.append(f"{n} answered")

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(upload, n)
            await anyio.wait_all_tasks_blocked()
        assert order == ["0 writing", "1 writing"]
        assert not budget.admits(8)
        answers[0].set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["0 writing", "1 writing", "0 answered", "2 writing"]
        answers[1].set()
        answers[2].set()
    assert budget.admits(8)


async def test_a_later_orchestrator_started_from_the_history_aims_its_first_polls() -> None:
    """``poll_history()`` of one orchestrator, handed to ``restore_poll_history()`` of the next,
    lets that one aim its first import's polls: fewer than probing for it takes."""
    config = SimulatorConfig(records_per_second=100_000, min_processing_s=1.0, jitter=0.0)
    settings = Settings.scaled(0.01, max_body_bytes=20_000, poll_max=1.5)
    collection = Collection("History", "contact")
    async with Simulator(config) as sim:
        async with Orchestrator(client_for(sim), settings=settings) as first:
            probed = await first.import_records(collection, orders(100, seed=1))
            history = first.poll_history()
        async with Orchestrator(client_for(sim), settings=settings) as later:
            assert later.restore_poll_history(history)
            aimed = await later.import_records(collection, orders(100, seed=2))
            assert later.poll_history()[:-1] == history  # and what it learned itself after
    assert len(history) == len(probed.imports) == 1
    assert probed.imports[0].polls >= 5  # 0.05, 0.125, 0.24, 0.41, 0.66, 1.04 s
    # aimed at the estimate (one probed import's: the middle of its last two probes), and if
    # that is early, probed from there
    assert aimed.imports[0].polls <= 3

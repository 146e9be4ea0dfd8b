"""Crash tests: a real `insight-import run` is SIGKILLed at exact moments, then run again."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import SimulatorProcess, fast_run_args, run_cli, serve_simulator

RECORDS = 1_500


def versioned_orders(seed: int) -> list[dict[str, Any]]:
    """Orders with repeated keys (updates), so the final value of each key is known."""
    rng = random.Random(seed)
    return [
        {
            "key": f"order-{rng.randrange(900)}",
            "json": {"version": i, "pad": "x" * rng.randrange(120)},
            "contactIdentity": {"identifier": "email", "value": f"c{i % 23}@x.io"},
        }
        for i in range(RECORDS)
    ]


def expected_state(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last occurrence of each (contact, key): what the collection must hold at the end."""
    return {(r["contactIdentity"]["value"], r["key"]): r["json"] for r in records}


def stored_state(sim: SimulatorProcess, collection: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["contactIdentity"]["value"], r["key"]): r["json"] for r in sim.records(collection)}


def run_args(
    sim: SimulatorProcess, tmp_path: Path, collection: str, records: list[dict[str, Any]]
) -> list[str]:
    """`run` of the records as a file, into a contact collection, in bodies of 6,000 bytes."""
    data = tmp_path / "orders.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return [
        "run",
        str(data),
        *fast_run_args(sim, tmp_path, collection),
        "--scope",
        "contact",
        "--max-body-bytes",
        "6000",
    ]


def crash_then_rerun(
    sim: SimulatorProcess,
    collection: str,
    records: list[dict[str, Any]],
    args: list[str],
    failpoint: str,
) -> None:
    """Kill the command at the failpoint, run it again: it finishes with the last values."""
    crashed = run_cli(*args, env={"INSIGHT_IMPORT_FAILPOINT": failpoint})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert stored_state(sim, collection) == expected_state(records)


@pytest.mark.parametrize(
    ("failpoint", "count"),
    [
        ("read", 1),  # while reading input
        ("sealed", 1),  # the first batch is journaled with its intent (a slot was free), not sent
        ("sealed", 3),  # a batch is journaled, not yet sent
        ("loaded", 1),  # a batch waiting for its slot has its body loaded, nothing sent
        ("intent", 1),  # intent written, the PUT never sent
        ("intent", 4),
        ("accepted", 1),  # the first body, sent from memory, was accepted; its id not journaled
        ("accepted", 2),  # the API accepted the import, its id is not journaled
        ("submitted", 3),  # the id is journaled: the re-run must poll it, not resubmit
        ("polled", 5),  # while polling
        ("terminal", 2),  # the end is seen, the outcome not yet written
        ("finished", 4),  # right after an outcome was written
    ],
)
def test_kill_9_then_rerun_loses_nothing(
    simulator_process: SimulatorProcess, tmp_path: Path, failpoint: str, count: int
) -> None:
    """After SIGKILL at any moment, the same command finishes: last values stored, none lost."""
    collection = f"Crash{failpoint.capitalize()}{count}"
    records = versioned_orders(seed=count)
    args = run_args(simulator_process, tmp_path, collection, records)
    if failpoint == "loaded":  # one slot: the second batch always waits for it, body loaded
        args += ["--max-concurrent", "1"]
    crash_then_rerun(simulator_process, collection, records, args, f"{failpoint}:{count}")

    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["records_read"] == RECORDS
    assert report["records_superseded"] + report["records_submitted"] == RECORDS
    assert report["records_imported"] == report["records_submitted"]
    # Only batches in doubt at the crash (intent written, no id) may have been sent twice.
    sent = sum(i["records"] for i in simulator_process.imports(collection))
    in_doubt = sum(i["records"] for i in report["imports"] if i["in_doubt"])
    assert sent <= report["records_submitted"] + in_doubt
    if failpoint in {"intent", "accepted"} or (failpoint, count) == ("sealed", 1):
        assert report["submits_in_doubt"] >= 1

    again = run_cli(*args)
    assert again.returncode == 0
    assert b"Nothing to do" in again.stdout


@pytest.mark.parametrize("count", [1, 3])
def test_kill_9_after_a_split_then_rerun_keeps_the_last_write(tmp_path: Path, count: int) -> None:
    """A body the API finds too large is split; SIGKILL right after a split, then the re-run:
    the halves are not split or sent again, and later versions still win over the split ones."""
    records = versioned_orders(seed=40 + count)
    with serve_simulator("--records-per-second", "4000", "--max-body-bytes", "4000") as sim:
        collection = f"Split{count}"
        args = run_args(sim, tmp_path, collection, records)
        crash_then_rerun(sim, collection, records, args, f"split:{count}")
        report = orjson.loads((tmp_path / "report.json").read_bytes())
        assert report["records_imported"] == report["records_submitted"]
        assert report["records_superseded"] + report["records_submitted"] == RECORDS
        split = [i for i in report["imports"] if i["status"] == "split"]
        assert split
        # No batch was split or sent again, but those in doubt at the kill (intent, no id).
        accepted = sum(i["records"] for i in sim.imports(collection))
        in_doubt = sum(i["records"] for i in report["imports"] if i["in_doubt"])
        assert accepted <= report["records_submitted"] + in_doubt

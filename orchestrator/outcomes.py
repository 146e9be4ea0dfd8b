"""What a run produced: per-import outcomes, the run's result, its live counters and the report."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.journal import DeadLetter, StoredBatch

__all__ = ["ImportOutcome", "ImportResult", "RunStats", "iso_time"]


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    """One batch that reached its end: imported, or given up with its records dead-lettered.

    Records rejected locally (by a record rule, before any batch) come as outcomes too, as they
    are recorded: ``batch_id`` and ``import_id`` ``None``, ``status`` ``"rejected"``.

    Args:
        batch_id: the batch's number in the journal (``None`` for local rejects).
        import_id: the API's id of the last import of this batch (``None`` if never accepted).
        status: the final API status word (``Finished``, ``Failed``...) or a local reason.
        records: records in the batch.
        imported: records the API stored.
        failures: the batch's records that were not imported, with their reasons.
        body_bytes: size of the request body as sent.
        attempts: PUT requests sent for this batch, as the API saw them (retries after errors,
            refusals such as "too many active imports", and resubmits included).
        polls: status requests sent for this batch.
        submitted_at: epoch seconds of the accepted submit.
        finished_at: epoch seconds when the end was seen.
    """

    batch_id: int | None
    import_id: str | None
    status: str
    records: int
    imported: int
    failures: tuple[DeadLetter, ...]
    body_bytes: int
    attempts: int
    polls: int
    submitted_at: float | None
    finished_at: float | None

    @property
    def succeeded(self) -> bool:
        """True when every record of the batch was imported."""
        return self.imported == self.records

    @property
    def duration_s(self) -> float | None:
        """Seconds from the accepted submit to the end, when both are known."""
        if self.submitted_at is None or self.finished_at is None:
            return None
        return round(self.finished_at - self.submitted_at, 3)

    @classmethod
    def of(cls, batch: StoredBatch, failures: tuple[DeadLetter, ...]) -> ImportOutcome:
        """The outcome of a finished batch, as the journal stored it."""
        return cls(
            batch_id=batch.batch_id,
            import_id=batch.import_id,
            status=batch.status or "",
            records=batch.record_count,
            imported=batch.imported or 0,
            failures=failures,
            body_bytes=batch.body_bytes,
            attempts=batch.attempts,
            polls=batch.polls,
            submitted_at=batch.submitted_at,
            finished_at=batch.finished_at,
        )

    @classmethod
    def rejected(cls, letters: tuple[DeadLetter, ...]) -> ImportOutcome:
        """Records rejected by a local rule, never sent."""
        return cls(
            batch_id=None,
            import_id=None,
            status="rejected",
            records=len(letters),
            imported=0,
            failures=letters,
            body_bytes=0,
            attempts=0,
            polls=0,
            submitted_at=None,
            finished_at=time.time(),
        )


@dataclass(frozen=True, slots=True)
class ImportResult:
    """The result of one import run into one collection.

    Args:
        collection: the collection's name.
        counters: totals: ``records_read``, ``records_rejected`` (local rules),
            ``records_superseded`` (a later occurrence of the same key replaced them),
            ``records_submitted``, ``records_imported``, ``records_failed`` (rejected by the API),
            and events such as ``lost_responses``, ``account_full_waits``, ``submits_in_doubt``,
            ``resubmits``.
        imports: every batch of the run, as stored in the journal.
        dead_letters: every record not imported, with its source and reason.
        duration_s: wall-clock seconds of this run (this process only).
        nothing_to_do: the journal says an earlier run already finished this work.
    """

    collection: str
    counters: dict[str, int]
    imports: tuple[StoredBatch, ...]
    dead_letters: tuple[DeadLetter, ...]
    duration_s: float
    nothing_to_do: bool = False

    @property
    def records_read(self) -> int:
        """Records read from the input (blank lines aside)."""
        return self.counters.get("records_read", 0)

    @property
    def records_rejected(self) -> int:
        """Records that broke a local rule and were never sent."""
        return self.counters.get("records_rejected", 0)

    @property
    def records_superseded(self) -> int:
        """Records replaced by a later record with the same key before being sent."""
        return self.counters.get("records_superseded", 0)

    @property
    def records_submitted(self) -> int:
        """Records sent to the API (each counted once, however often its batch was sent)."""
        return self.counters.get("records_submitted", 0)

    @property
    def records_imported(self) -> int:
        """Records the API stored."""
        return self.counters.get("records_imported", 0)

    @property
    def records_failed(self) -> int:
        """Records the API rejected (or whose import failed past the resubmit budget)."""
        return self.counters.get("records_failed", 0)

    @property
    def ok(self) -> bool:
        """True when every record read was imported (nothing rejected or failed)."""
        return not self.dead_letters

    def reasons(self) -> dict[str, int]:
        """How many dead letters each reason has, the most frequent first."""
        counts: dict[str, int] = {}
        for letter in self.dead_letters:
            counts[letter.reason] = counts.get(letter.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def report(self) -> dict[str, Any]:
        """The JSON report of the contract (``--report``), with extra counters."""
        counts = {name: self.counters.get(name, 0) for name in _REPORT_COUNTERS}
        # Every request the run sent, as the API saw it: the batches keep their own counts.
        counts["submit_calls"] = sum(batch.attempts for batch in self.imports)
        counts["status_calls"] = sum(batch.polls for batch in self.imports)
        return {
            "collection": self.collection,
            **counts,
            "dead_letters": len(self.dead_letters),
            "dead_letters_by_reason": self.reasons(),
            "duration_s": round(self.duration_s, 3),
            "nothing_to_do": self.nothing_to_do,
            "imports": [
                {
                    "import_id": batch.import_id,
                    "records": batch.record_count,
                    "body_bytes": batch.body_bytes,
                    "status": batch.status,
                    "attempts": batch.attempts,
                    "submits": batch.submits,
                    "polls": batch.polls,
                    "resubmits": batch.resubmits,
                    "in_doubt": batch.in_doubt,
                    "submitted_at": iso_time(batch.submitted_at),
                    "finished_at": iso_time(batch.finished_at),
                }
                for batch in self.imports
            ],
        }


_REPORT_COUNTERS = (
    "records_read",
    "records_rejected",
    "records_superseded",
    "records_submitted",
    "records_imported",
    "records_failed",
    "lost_responses",
    "account_full_waits",
    "submits_in_doubt",
    "resubmits",
)


def iso_time(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 in UTC with milliseconds (``2024-05-01T12:00:00.250Z``)."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


@dataclass(slots=True)
class RunStats:
    """Live counters of a run, updated by the engine as it goes (read them for a progress display).

    Plain integers on one event loop: reading them from the same loop is always consistent.
    After a resume the record counts include what earlier runs of the journal did.

    Args:
        records_read: records read (valid or not), earlier runs of the journal included.
        records_rejected: records that broke a local rule.
        batches_sealed: batches sealed by this run.
        imports_in_flight: imports holding a slot now.
        imports_finished: batches of this run that reached their end.
        records_imported: records the API stored.
        records_failed: records the API refused (or whose import failed for good).
        bytes_read: bytes of input read by this run (decompressed; files only).
        input_bytes: the inputs' total size when known (plain files), set by the caller.
        reading_done: every input was read to its end.
        resumed: the run continues an earlier one (its records were not read again).
        started: ``time.monotonic()`` at the start.
    """

    records_read: int = 0
    records_rejected: int = 0
    batches_sealed: int = 0
    imports_in_flight: int = 0
    imports_finished: int = 0
    records_imported: int = 0
    records_failed: int = 0
    bytes_read: int = 0
    input_bytes: int | None = None
    reading_done: bool = False
    resumed: bool = False
    started: float = field(default_factory=time.monotonic)
    _read_before: int = 0

    def resume(self, counters: Mapping[str, int]) -> None:
        """Count on from what earlier runs of the same journal did (the journal's counters).

        Args:
            counters: the journal's totals.
        """
        self.resumed = True
        self._read_before = counters.get("records_read", 0)
        self.records_read += self._read_before
        self.records_rejected += counters.get("records_rejected", 0)
        self.records_imported += counters.get("records_imported", 0)
        self.records_failed += counters.get("records_failed", 0)

    def rate(self) -> float:
        """Records read per second by this run since its start."""
        elapsed = time.monotonic() - self.started
        read = self.records_read - self._read_before
        return read / elapsed if elapsed > 0 else 0.0

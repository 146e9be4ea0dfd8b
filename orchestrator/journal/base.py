"""The journal's interface: the value types of a run's durable state and the ``Journal`` protocol.

A journal holds exactly one *run* (a collection and its inputs). Every state change is one
transaction, so a crash at any instant followed by a re-run resumes: imports in flight are polled
by their ids, submits in doubt are sent again, input already handled is skipped, and input that
changed since is detected. Backends (SQLite, memory, later PostgreSQL) keep their storage specifics
to themselves; the engine sees only this module.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import orjson

from orchestrator.errors import JournalStateError

if TYPE_CHECKING:
    from orchestrator.refs import RecordRef, RecordRefs

__all__ = [
    "BatchPhase",
    "BatchStore",
    "DeadLetter",
    "InputProgress",
    "Journal",
    "RecordedRun",
    "RunSpec",
    "RunState",
    "StoredBatch",
]

#: Counter bumped once per submit found in doubt when a journal is opened.
SUBMITS_IN_DOUBT = "submits_in_doubt"


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What identifies a run; a journal holds exactly one, and refuses to resume another.

    Args:
        collection: the collection name.
        scope: the collection scope (``account`` or ``contact``).
        collection_type: the collection type, e.g. ``custom``.
        inputs: the input origins as given (absolute paths; ``"-"`` for standard input).
        account: an opaque account id (a hash of the API user; never a password).
    """

    collection: str
    scope: str
    collection_type: str
    inputs: tuple[str, ...]
    account: str

    def describe(self) -> str:
        """Return a short human description of the run, for error messages."""
        inputs = ", ".join(self.inputs) if self.inputs else "none"
        return f"collection {self.collection!r}, inputs {inputs}"


def account_id(api_root: str, username: str) -> str:
    """Return the opaque account id of ``RunSpec.account``: API root and user, hashed.

    Args:
        api_root: the API root the run talks to.
        username: the API user (the password never enters the id).
    """
    return hashlib.sha256(f"{api_root}\0{username}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class InputProgress:
    """How far one input has been handled durably.

    Args:
        index: the input's position in ``RunSpec.inputs``.
        lines: lines fully handled (in a sealed batch, dead-lettered or superseded).
        digest: the fingerprint of those lines (``sources.LineChunk.digest_through``);
            empty while ``lines`` is 0.
        done: the whole input was read.
    """

    index: int
    lines: int
    digest: str
    done: bool = False


class BatchPhase(enum.StrEnum):
    """Where a batch stands between sealing and its terminal status."""

    SEALED = "sealed"  # body stored, not yet sent
    SUBMITTING = "submitting"  # intent written before a PUT: a crash now leaves the submit in doubt
    SUBMITTED = "submitted"  # importId known
    FINISHED = "finished"  # terminal: succeeded, failed past the resubmit budget, or dead


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """One batch as the journal knows it.

    Args:
        batch_id: the batch's id, monotonic within the run.
        phase: where the batch stands.
        import_id: the API's import id while submitted (and after it finished).
        record_count: records in the body.
        body_bytes: the body's size in bytes as sent.
        depends_on: batch ids that must finish before this one is submitted.
        attempts: PUT requests sent for this batch, as the API saw them: retries after a 5xx or
            a lost answer and refusals ("too many active imports", rate limits) included.
        resubmits: times a ``Failed`` import was sent again.
        in_doubt: submits found in doubt when a journal was opened (intent without an id).
        polls: status requests sent for this batch's imports.
        submitted_at: epoch seconds of the last submit.
        finished_at: epoch seconds of the terminal status.
        status: the raw final API status word, or a local reason such as ``"dead"``.
        imported: records the API reported imported, once finished.
    """

    batch_id: int
    phase: BatchPhase
    import_id: str | None
    record_count: int
    body_bytes: int
    depends_on: tuple[int, ...]
    attempts: int
    resubmits: int
    in_doubt: int
    polls: int
    submitted_at: float | None
    finished_at: float | None
    status: str | None
    imported: int | None = None
    submits: int = 0  # submits started (intents written), in-doubt ones included

    @classmethod
    def sealed(
        cls,
        batch_id: int,
        *,
        record_count: int,
        body_bytes: int,
        depends_on: Sequence[int] = (),
        submitting: bool = False,
    ) -> StoredBatch:
        """A batch as it is stored when sealed: nothing sent yet (``submitting``: with the
        intent to send it written, see ``NewBatch``)."""
        return cls(
            batch_id=batch_id,
            phase=BatchPhase.SUBMITTING if submitting else BatchPhase.SEALED,
            import_id=None,
            record_count=record_count,
            body_bytes=body_bytes,
            depends_on=tuple(depends_on),
            attempts=0,
            resubmits=0,
            in_doubt=0,
            polls=0,
            submitted_at=None,
            finished_at=None,
            status=None,
            submits=int(submitting),
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record that was not imported, with the reason.

    Args:
        source: where the record came from (``file:line``), when known.
        key: the record's key, when it could be read.
        reason: a rule id or the API's ``failureReason``, e.g. ``"json-nested-array"`` or
            ``"ContactEmailDoesNotExist"``.
        message: a human explanation (never the record's values).
        details: further explanations, e.g. the API's ``details``.
        import_id: the import that refused the record, for API failures.
        record: the raw record or line, so users can fix and replay it.
    """

    source: str | None
    key: str | None
    reason: str
    message: str
    details: tuple[str, ...] = ()
    import_id: str | None = None
    record: bytes | None = field(default=None, repr=False)

    def to_json(self) -> bytes:
        """Return this dead letter as one line of the dead-letter file, without the newline.

        The object has the keys ``source``, ``key``, ``reason``, ``message``, ``details``,
        ``import_id`` and ``record``; ``record`` is the record as JSON when it parses (its bytes
        kept exactly, so large numbers survive), else its raw text as a string.
        """
        return orjson.dumps(
            {
                "source": self.source,
                "key": self.key,
                "reason": self.reason,
                "message": self.message,
                "details": list(self.details),
                "import_id": self.import_id,
                "record": _record_json(self.record),
            }
        )


def _record_json(record: bytes | None) -> object:
    if record is None:
        return None
    raw = record.strip()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return record.decode("utf-8", errors="replace")
    # Embedding the bytes as they are keeps integers orjson would turn into floats; a line break
    # inside a pretty-printed record would split the dead-letter line, so re-encode those.
    if b"\n" in raw or b"\r" in raw:
        return parsed
    return orjson.Fragment(raw)


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A batch to seal: its body exactly as it will be sent, its records, what it waits for.

    Args:
        body: the request body.
        refs: the batch's records, in body order.
        depends_on: batch ids that must finish before this one is submitted.
        submitting: store it with the intent to PUT it written (phase SUBMITTING, ``submits``
            1), in the seal's transaction: for a body sent as soon as it is sealed. Ignored by
            ``split_batch``.
    """

    body: bytes | bytearray
    refs: Sequence[RecordRef]
    depends_on: Sequence[int] = ()
    submitting: bool = False


@dataclass(frozen=True, slots=True)
class RecordedRun:
    """What a journal holds, as ``Journal.recorded`` reads it without changing anything.

    Args:
        spec: the run's identity.
        complete: the run finished.
        inputs: one progress per ``spec.inputs`` entry.
    """

    spec: RunSpec
    complete: bool
    inputs: tuple[InputProgress, ...]


@dataclass(frozen=True, slots=True)
class RunState:
    """What ``Journal.open`` found: where to resume.

    Args:
        fresh: True when the journal held no run and a new one was created.
        inputs: one progress per ``RunSpec.inputs`` entry (``lines`` 0 when never read).
        unfinished: the batches not finished, in ``batch_id`` order.
        complete: a previous run was marked complete (nothing left to do).
        counters: the totals so far (``records_read``, ``submits_in_doubt``, ...).
    """

    fresh: bool
    inputs: tuple[InputProgress, ...]
    unfinished: tuple[StoredBatch, ...]
    complete: bool
    counters: Mapping[str, int]


class BatchStore(Protocol):
    """Where a sealed batch's state lives from its slot to its end: what ``Downstream`` calls.

    The journal of a one-shot run is one (``Journal`` extends it); the worker's adapter over an
    outbox store is another (``orchestrator.outbox.batches.OutboxBatches``), so everything after
    a sealed batch is the same code for both. Every method that changes a batch is one
    transaction and returns the batch as stored now.
    """

    #: Whether the store keeps the very body objects it is given rather than a copy. Then the
    #: caller must leave a sealed body as it is, and ``load_body`` returns that object itself:
    #: not one to free after sending, nor to build the next body in.
    keeps_bodies: bool

    async def add_counters(self, counters: Mapping[str, int]) -> None:
        """Add deltas to the run's counters, in one transaction.

        Args:
            counters: deltas to add, e.g. ``{"account_full_waits": 1}``.
        """
        ...

    async def mark_submitting(self, batch_id: int) -> StoredBatch:
        """Write the intent to PUT a batch (``submits`` + 1, phase SUBMITTING).

        Args:
            batch_id: the batch about to be sent.

        Returns:
            The batch as stored now (so for every method below that changes a batch).
        """
        ...

    async def mark_refused(self, batch_id: int, *, calls: int) -> StoredBatch:
        """Record a submit the API refused without starting an import (phase SEALED again).

        Args:
            batch_id: the batch whose PUT was refused (account full, rate limited).
            calls: PUT requests the refused submit made (``attempts`` grows by it).
        """
        ...

    async def mark_submitted(
        self, batch_id: int, import_id: str, submitted_at: float, *, calls: int = 1
    ) -> StoredBatch:
        """Record the import id the API gave a batch (phase SUBMITTED).

        Args:
            batch_id: the batch sent.
            import_id: the API's import id.
            submitted_at: epoch seconds of the submit.
            calls: PUT requests the submit made (``attempts`` grows by it).
        """
        ...

    async def mark_polled(self, batch_id: int, *, calls: int = 1) -> StoredBatch:
        """Count status requests sent for a batch's import (cheap: not fsync'd).

        Args:
            batch_id: the batch polled.
            calls: status requests to add to ``polls``.
        """
        ...

    async def mark_resubmit(self, batch_id: int) -> StoredBatch:
        """Put a batch whose import ended ``Failed`` back to SEALED to send it again.

        Args:
            batch_id: the batch to send again (``resubmits`` + 1, ``import_id`` cleared).
        """
        ...

    async def split_batch(self, batch_id: int, halves: Sequence[NewBatch]) -> list[int]:
        """Replace a batch the API found too large by smaller ones, in one transaction.

        The new batches are sealed; the old one is finished with status ``"split"``; every
        unfinished batch that depended on it depends on the new ones instead, so a crash at any
        point neither re-splits nor lets a later version of a key overtake the split records.

        Args:
            batch_id: the batch to split (not finished).
            halves: the batches that replace it, in order; their ``depends_on`` is ignored.

        Returns:
            The new batches' ids, in order.
        """
        ...

    async def mark_finished(
        self,
        batch_id: int,
        *,
        status: str,
        imported: int,
        dead_letters: Sequence[DeadLetter],
        finished_at: float,
        counters: Mapping[str, int],
    ) -> StoredBatch:
        """Finish a batch with its API failures and counter deltas; its body and refs are dropped.

        Args:
            batch_id: the batch that reached a terminal status.
            status: the raw final API status word, or a local reason such as ``"dead"``.
            imported: records the API reported imported.
            dead_letters: the records not imported.
            finished_at: epoch seconds of the terminal status.
            counters: deltas to add to the run's counters.
        """
        ...

    async def load_body(self, batch_id: int) -> bytes | bytearray:
        """Return the stored body of an unfinished batch.

        Args:
            batch_id: the batch.
        """
        ...


class Journal(BatchStore, Protocol):
    """The durable state of one run; every method that changes state is one transaction.

    Implementations: ``SqliteJournal`` (durable, the default) and ``MemoryJournal`` (the same
    semantics without durability, for embedded use). Both are async context managers that close
    on exit. A failed call raises ``JournalError`` and leaves the previous state intact.
    """

    async def open(
        self, spec: RunSpec, *, fresh: bool = False, start_after: Sequence[InputProgress] = ()
    ) -> RunState:
        """Open the run ``spec``, creating it when the journal is empty.

        A journal that holds another run raises ``JournalMismatchError``; ``fresh=True`` wipes any
        previous run first. A batch left in the SUBMITTING phase is in doubt: its ``in_doubt`` and
        the ``submits_in_doubt`` counter grow by one and it goes back to SEALED.

        Args:
            spec: the run to open.
            fresh: wipe whatever the journal holds and start a new run.
            start_after: with ``fresh``, where the new run's inputs start: the lines an earlier
                run already imported (their fingerprint is checked when they are skipped).
        """
        ...

    async def recorded(self) -> RecordedRun | None:
        """Return the run the journal holds, or ``None`` when it holds none; changes nothing."""
        ...

    async def seal_batches(
        self,
        *,
        batches: Sequence[NewBatch],
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> list[int]:
        """Store sealed batches with their progress, dead letters and counter deltas.

        One transaction: a crash keeps all of them, with their progress mark, or none.

        Args:
            batches: the batches, stored in order (their ids increase in that order).
            progress: the input progress these batches complete, if any.
            dead_letters: records rejected on the way.
            counters: deltas to add to the run's counters.

        Returns:
            The new batches' ids, in order.
        """
        ...

    async def save_progress(
        self,
        *,
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> None:
        """Like ``seal_batches`` without a batch: progress, dead letters and counter deltas at once.

        Args:
            progress: the input progress to record (one per input, applied in order), if any.
            dead_letters: records rejected on the way.
            counters: deltas to add to the run's counters.
        """
        ...

    async def load_refs(self, batch_id: int) -> RecordRefs:
        """Return the record refs of an unfinished batch, in body order.

        Args:
            batch_id: the batch.
        """
        ...

    async def mark_complete(self) -> None:
        """Mark the run complete: all input read and every batch finished."""
        ...

    async def dead_letters(self) -> list[DeadLetter]:
        """Return every dead letter of the run, in insertion order."""
        ...

    async def batches(self) -> list[StoredBatch]:
        """Return every batch of the run, in ``batch_id`` order."""
        ...

    async def counters(self) -> dict[str, int]:
        """Return the run's counters."""
        ...

    async def close(self) -> None:
        """Release the journal; safe to call twice."""
        ...

    async def __aenter__(self) -> Self:
        """Return the journal itself."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the journal."""
        ...


def progress_list(
    spec: RunSpec, progress: InputProgress | Sequence[InputProgress] | None
) -> tuple[InputProgress, ...]:
    """Return ``progress`` as a tuple; ``JournalStateError`` if one names an unknown input."""
    if progress is None:
        items: tuple[InputProgress, ...] = ()
    elif isinstance(progress, InputProgress):
        items = (progress,)
    else:
        items = tuple(progress)
    for item in items:
        if not 0 <= item.index < len(spec.inputs):
            raise JournalStateError(
                f"input progress index {item.index} is out of range: the run has "
                f"{len(spec.inputs)} input(s)"
            )
    return items


def check_phase(
    batch_id: int, phase: BatchPhase | None, allowed: tuple[BatchPhase, ...], action: str
) -> None:
    """Raise ``JournalStateError`` if a batch is unknown or its phase does not allow ``action``."""
    if phase is None:
        raise JournalStateError(f"cannot {action}: batch {batch_id} is not in the journal")
    if phase not in allowed:
        wanted = " or ".join(p.value for p in allowed)
        raise JournalStateError(f"cannot {action}: batch {batch_id} is {phase.value}, not {wanted}")


def redirected(depends_on: Sequence[int], old: int, new: Sequence[int]) -> tuple[int, ...]:
    """``depends_on`` with batch ``old`` replaced by the batches ``new`` it was split into."""
    return tuple(sorted({*(d for d in depends_on if d != old), *new}))


def mismatch_message(theirs: RunSpec, ours: RunSpec) -> str:
    """Explain why a journal's run is not ``ours``, and what to do."""
    differs = [
        name
        for name in ("collection", "scope", "collection_type", "inputs", "account")
        if getattr(theirs, name) != getattr(ours, name)
    ]
    return (
        f"this journal belongs to another run ({theirs.describe()}; differs in "
        f"{', '.join(differs)}); use another journal, or open this one with fresh=True to "
        "start over"
    )


class SealOne:
    """``seal_batch`` for journals that implement ``seal_batches``: one batch is a list of one."""

    async def seal_batches(
        self,
        *,
        batches: Sequence[NewBatch],
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> list[int]:
        raise NotImplementedError

    async def seal_batch(
        self,
        *,
        body: bytes | bytearray,
        refs: Sequence[RecordRef],
        depends_on: Sequence[int],
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> int:
        """Store one sealed batch; see ``Journal.seal_batches``.

        Args:
            body: the request body, exactly as it will be sent.
            refs: the batch's records, in body order.
            depends_on: batch ids that must finish before this one is submitted.
            progress: the input progress this batch completes (one per input), if any.
            dead_letters: records rejected on the way.
            counters: deltas to add to the run's counters.
        """
        (batch_id,) = await self.seal_batches(
            batches=[NewBatch(body, refs, depends_on)],
            progress=progress,
            dead_letters=dead_letters,
            counters=counters,
        )
        return batch_id

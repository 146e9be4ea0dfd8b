"""The read half of a claim, shared by the stores: raw pending rows in, a ``ClaimedRun`` out.

A store reads a queue's pending rows in id order, as stored bytes, page by page, and feeds each
page to a ``ClaimScan``; the scan validates and encodes them (one pass of the chunk encoder, as a
file's lines are read), keeps the latest valid row of each identity (last write wins), sets the
rows that break a record rule aside for the dead letters, holds back the rows whose identity is
in an import still in flight, and says when it has enough for the budget. ``result()`` gives the
rows that fit, in columns, with what the store must delete and dead-letter.
"""

from __future__ import annotations

from array import array
from collections.abc import Container, Sequence
from dataclasses import dataclass

import orjson

from orchestrator.chunks import RecordRun, encode_chunk
from orchestrator.errors import ConfigError, RecordError
from orchestrator.outbox.base import (
    COLLECTION_INVALID,
    RECORD_ORIGIN,
    Claim,
    ClaimedRun,
    OutboxQueue,
    Rejection,
    identity_text,
)
from orchestrator.provenance import Source
from orchestrator.records import Collection, EncodedRecord, Scope, encode_line

__all__ = ["ClaimScan", "Letter", "Scanned", "key_of_record"]

Letter = tuple[int, Rejection, str | None]
"""A row bound for the dead letters: its id, why, and its key when it could be read."""

_Valid = tuple[RecordRun, int] | EncodedRecord  # a record of a page's run, or one on its own
_Rejected = tuple[Rejection, str | None]  # why a row is not a record, and its key


@dataclass(frozen=True, slots=True)
class Scanned:
    """What a scan found (see ``Claim`` for the meaning of each count).

    Args:
        rows: the valid rows that fit the budget, in id order, each identity once.
        records_bytes: their records' bytes joined with commas.
        full: valid rows that would have fitted were left for lack of budget.
        superseded: ids of rows a later valid row of the same identity replaces (to delete).
        invalid: rows that break a record rule (to dead-letter).
        held_back: identities in flight that have a pending row (left pending).
    """

    rows: ClaimedRun
    records_bytes: int
    full: bool
    superseded: list[int]
    invalid: list[Letter]
    held_back: int

    def claim(self, queue: OutboxQueue, *, superseded: int, dead_lettered: int) -> Claim:
        """The claim of these rows, once the store deleted ``superseded`` rows and moved
        ``dead_lettered`` to the dead letters."""
        return Claim(
            queue=queue,
            rows=self.rows,
            records_bytes=self.records_bytes,
            full=self.full,
            superseded=superseded,
            dead_lettered=dead_lettered,
            held_back=self.held_back,
        )


class ClaimScan:
    """One claim's scan of a queue, fed page by page (see the module docstring).

    Args:
        queue: the queue the rows are of.
        in_flight: the hashes (``hash(identity text)``) of the identities in the queue's imports
            still in flight; a row whose identity hash is in it waits (a collision only makes a
            row wait longer, never join two imports).
        budget: the most bytes the returned records may take joined with commas.
    """

    def __init__(self, queue: OutboxQueue, in_flight: Container[int], budget: int) -> None:
        self._in_flight = in_flight
        self._budget = budget
        self._collection: Collection | None
        self._invalid_queue: Rejection | None = None
        try:
            self._collection = queue.target()
        except (ConfigError, ValueError) as error:
            self._collection = None
            self._invalid_queue = Rejection(COLLECTION_INVALID, str(error))
        # identity -> its latest valid row (id, size, record), in id order of those rows
        self._latest: dict[str, tuple[int, int, _Valid]] = {}
        self._held: dict[str, int] = {}  # identity in flight -> its latest pending row
        self._superseded: list[int] = []
        self._invalid: list[Letter] = []
        self._joined = -1  # bytes of the latest rows' records joined with commas
        self._rows = 0
        self._bytes = 0

    @property
    def wants_more(self) -> bool:
        """Whether the rows so far leave room in the budget (read another page if any)."""
        return self._joined <= self._budget

    def rows_wanted(self, least: int, most: int) -> int:
        """How many rows the next page should read: at least ``least`` (so that a later write
        within that many rows supersedes an earlier one before it goes out, however small the
        budget), more when the average row size so far says the budget needs more (5% over),
        at most ``most``."""
        wanted = least
        if self._rows:
            average = self._bytes / self._rows + 1
            missing = (self._budget - max(self._joined, 0)) / average
            wanted = max(least, int(missing * 1.05) + 1)
        return max(1, min(most, wanted))

    def add(self, page: Sequence[tuple[int, bytes]]) -> None:
        """Take one page of ``(row id, record as stored bytes)``, in id order after the last."""
        self._rows += len(page)
        self._bytes += sum(len(raw) for _, raw in page)
        collection = self._collection
        if collection is None:
            assert self._invalid_queue is not None
            self._invalid.extend(
                (row_id, self._invalid_queue, key_of_record(raw)) for row_id, raw in page
            )
            return
        latest, held = self._latest, self._held
        for row_id, encoded in _encode_page(page, collection):
            if isinstance(encoded, EncodedRecord):
                key, contact, size = encoded.key, encoded.contact, len(encoded.data)
            elif isinstance(encoded[0], Rejection):
                self._invalid.append((row_id, encoded[0], encoded[1]))
                continue
            else:
                run, index = encoded
                key = run.keys[index]
                contact = None
                if run.identifiers is not None:
                    contact = (run.identifiers[index], run.values[index])
                size = run.ends[index] - run.start_of(index)
            identity = identity_text(key, contact)
            if hash(identity) in self._in_flight:
                earlier = held.get(identity)
                if earlier is not None:
                    self._superseded.append(earlier)
                held[identity] = row_id
                continue
            previous = latest.pop(identity, None)
            if previous is not None:
                self._superseded.append(previous[0])
                self._joined -= previous[1] + 1
            latest[identity] = (row_id, size, encoded)
            self._joined += size + 1

    def result(self) -> Scanned:
        """The rows that fit the budget (one row larger than the budget comes alone), and the
        rows to delete and dead-letter."""
        kept: list[tuple[int, int, _Valid]] = []
        total = -1
        for row in self._latest.values():
            grown = total + row[1] + 1
            if grown > self._budget and kept:
                break
            kept.append(row)
            total = grown
        collection = self._collection
        contact_scope = collection is not None and collection.scope is Scope.CONTACT
        return Scanned(
            rows=_claimed_run(kept, contact_scope),
            records_bytes=max(total, 0),
            full=len(kept) < len(self._latest),
            superseded=self._superseded,
            invalid=self._invalid,
            held_back=len(self._held),
        )


def key_of_record(raw: str | bytes) -> str | None:
    """The key of a record's text when it can be read (for its dead letter), else ``None``."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    key = obj.get("key") if isinstance(obj, dict) else None
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return key if isinstance(key, str) else None


def _claimed_run(kept: Sequence[tuple[int, int, _Valid]], contact_scope: bool) -> ClaimedRun:
    """The kept rows as one run: consecutive records of a page's run are copied in one piece."""
    parts: list[bytes | memoryview] = []
    ends = array("q")
    keys: list[str] = []
    identifiers: list[str] = []
    values: list[str] = []
    lines = array("q")
    size = 0
    i = 0
    while i < len(kept):
        row_id, _, valid = kept[i]
        if isinstance(valid, EncodedRecord):
            parts += (valid.data, b"\n")
            size += len(valid.data) + 1
            ends.append(size - 1)
            keys.append(valid.key)
            identifier, value = valid.contact or ("", "")
            identifiers.append(identifier)
            values.append(value)
            lines.append(row_id)
            i += 1
            continue
        run, first = valid
        last = first
        i += 1
        while i < len(kept):
            following = kept[i][2]
            if isinstance(following, EncodedRecord) or following[0] is not run:
                break
            if following[1] != last + 1:
                break
            last += 1
            i += 1
        start, stop = run.start_of(first), run.ends[last] + 1
        parts.append(memoryview(run.segment)[start:stop])
        shift = size - start
        ends.extend([end + shift for end in run.ends[first : last + 1]])
        keys += run.keys[first : last + 1]
        if run.identifiers is not None:
            identifiers += run.identifiers[first : last + 1]
            values += run.values[first : last + 1]
        lines.extend(run.lines[first : last + 1])
        size += stop - start
    return ClaimedRun(
        RecordRun(
            b"".join(parts),
            ends,
            keys,
            identifiers if contact_scope else None,
            values if contact_scope else [],
            RECORD_ORIGIN,
            lines,
        )
    )


def _encode_page(
    page: Sequence[tuple[int, bytes]], collection: Collection
) -> list[tuple[int, _Valid | _Rejected]]:
    """Validate and encode a page of rows, in id order: one pass of the chunk encoder (as a file's
    lines are read) for rows that are one line each, the per-line encoder for the others."""
    contact_scope = collection.scope is Scope.CONTACT
    results: dict[int, _Valid | _Rejected] = {}
    lines: list[bytes] = []
    ids: list[int] = []
    for row_id, raw in page:
        if b"\n" in raw or b"\r" in raw or not raw.strip():
            results[row_id] = _encode_one(raw, collection, row_id)
            continue
        lines.append(raw)
        ids.append(row_id)
    if lines:
        data = b"\n".join(lines) + b"\n"
        encoded = encode_chunk(data, contact_scope=contact_scope, first_line=1)
        run = encoded.records(data, RECORD_ORIGIN, contact_scope=contact_scope)
        run.lines = array("q", [ids[line - 1] for line in run.lines])  # sources name the rows
        for index, row_id in enumerate(run.lines):
            results[row_id] = (run, index)
        for line, rule, message, key, _ in encoded.rejects:
            results[ids[line - 1]] = (Rejection(rule, message), key)
    return [(row_id, results[row_id]) for row_id, _ in page]


def _encode_one(raw: bytes, collection: Collection, row_id: int) -> EncodedRecord | _Rejected:
    try:
        return encode_line(raw, collection, source=Source(RECORD_ORIGIN, row_id))
    except RecordError as error:
        return (Rejection(error.rule, error.message), error.key)

"""Exact-size batch assembly: request bodies packed close to the cap, last write wins inside one.

Each record's bytes are copied once, into the growing body (a run of records from a file chunk in
one copy); their fields go into flat columns, indexed by identity (a re-added identity replaces the
older record and moves to the end). The size of the open body is tracked exactly, so no body ever
exceeds the cap and a batch is sealed only when the next record would not fit.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate

from orchestrator import errors
from orchestrator.chunks import RecordRun
from orchestrator.provenance import Source
from orchestrator.records import (
    Collection,
    EncodedRecord,
    IdentityHashes,
    identity_of,
)
from orchestrator.refs import RecordRefs

__all__ = ["Batch", "BatchAssembler", "record_spans", "split_batch"]


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed request body and the records in it.

    Args:
        body: the exact request body.
        refs: the records of the body, in the order they appear in it.
    """

    body: bytes | bytearray
    refs: RecordRefs

    @property
    def body_bytes(self) -> int:
        """The size of the body in bytes, as sent."""
        return len(self.body)

    @property
    def record_count(self) -> int:
        """How many records the body holds."""
        return len(self.refs)


class BatchAssembler:
    """Packs encoded records into request bodies of at most ``max_body_bytes`` bytes.

    Inside the open batch the last occurrence of an identity wins: the older record is dropped and
    reported to ``on_superseded``. Records keep their arrival order (a replacing record takes the
    place of the newest). Each record's bytes are copied once, into the growing body; the encoded
    records themselves die young.

    Args:
        collection: the collection the bodies are for (gives the envelope).
        max_body_bytes: the hard cap on one body, in bytes as sent.
        on_superseded: called with each record dropped because a later one has the same identity;
            it must not raise.

    Raises:
        errors.ConfigError: the cap cannot hold even the envelope and a minimal record.
    """

    __slots__ = (
        "_base",
        "_body",
        "_cap",
        "_dropped",
        "_ends",
        "_has_contact",
        "_identifiers",
        "_index",
        "_keys",
        "_lines",
        "_on_superseded",
        "_origin_numbers",
        "_origins",
        "_prefix",
        "_size",
        "_suffix",
        "_used",
        "_values",
    )

    def __init__(
        self,
        collection: Collection,
        *,
        max_body_bytes: int = 50_000_000,
        on_superseded: Callable[[EncodedRecord], None] | None = None,
    ) -> None:
        self._prefix, self._suffix = collection.envelope()
        self._base = len(self._prefix) + len(self._suffix)
        # the smallest record, {"key":"x","json":{}}, is 21 bytes
        if max_body_bytes < self._base + 21:
            raise errors.ConfigError(
                f"max_body_bytes={max_body_bytes} cannot hold a body for collection"
                f" {collection.name!r}: it needs at least {self._base + 21} bytes"
            )
        self._cap = max_body_bytes
        self._on_superseded = on_superseded
        self._reset()

    def _reset(self, body: bytearray | None = None) -> None:
        # The prefix, then each record followed by a comma, up to _used. A recycled body is
        # longer than that: its bytes past _used are stale and get overwritten.
        if body is None:
            body = bytearray(self._prefix)
        else:
            body[: len(self._prefix)] = self._prefix
        self._body = body
        self._used = len(self._prefix)
        self._ends = array("q")  # where each record's bytes end in the body
        # identity hash -> the place of the open record with that identity. Ints, not the
        # identities: a dict of ints is no work for the collector, and a batch's worth of
        # identity tuples alive at once set off passes that stall the event loop. A hash is
        # always checked against the record's columns (``_same``) before it counts as a match.
        self._index: dict[int, int] = {}
        # The records' fields in flat columns, as RecordRefs packs them: holding a tuple per
        # contact or a Source per record would cost an object per record, and sealing would
        # take them apart again.
        self._keys: list[str] = []
        self._identifiers: list[str] = []  # "" where there is no contact
        self._values: list[str] = []
        self._has_contact = bytearray()
        self._origins: dict[str | None, int] = {}  # origin -> its number
        self._origin_numbers = array("I")
        self._lines = array("q")
        self._size = 0  # sum of the open (not replaced) records' data lengths
        self._dropped: set[int] = set()  # places of records replaced by a later one

    def _span(self, index: int) -> tuple[int, int]:
        start = self._ends[index - 1] + 1 if index else len(self._prefix)
        return start, self._ends[index]

    def add(self, record: EncodedRecord) -> Batch | None:
        """Add a record to the open batch; return the batch sealed to make room for it, if any.

        Args:
            record: the encoded record.

        Raises:
            errors.RecordError: ``rule="record-too-large"``: the record alone does not fit in a
                body; the assembler is left unchanged.
        """
        data = record.data
        data_len = len(data)
        if self._base + data_len > self._cap:
            raise self._too_large(record)
        contact = record.contact
        key = record.key
        identity = hash(key if contact is None else (contact[0], contact[1], key))
        index = self._index
        old = index.get(identity)
        sealed = None
        if old is not None and not self._same(old, key, contact):
            # Another identity with the same hash (one pair in about 2**61): seal first, so
            # that within a batch a hash names one identity. fits() says so beforehand.
            sealed = self._seal()
            index = self._index
            old = None
        if old is not None:
            del index[identity]
            start, end = self._span(old)
            if self._on_superseded is not None:
                self._on_superseded(self._record_at(old, bytes(self._body[start:end])))
            self._dropped.add(old)
            self._size -= end - start
        # count commas: the n records already open plus this one need n separators
        if index and self._base + self._size + len(index) + data_len > self._cap:
            sealed = self._seal()
            index = self._index
        body = self._body
        keys = self._keys
        index[identity] = len(keys)
        end = self._used + data_len
        if end < len(body):  # a recycled body: write over what it held
            body[self._used : end] = data
            body[end] = 0x2C
        else:
            if self._used != len(body):
                del body[self._used :]
            body += data
            body += b","
        self._used = end + 1
        self._ends.append(end)
        keys.append(key)
        if contact is None:
            self._identifiers.append("")
            self._values.append("")
            self._has_contact.append(0)
        else:
            self._identifiers.append(contact[0])
            self._values.append(contact[1])
            self._has_contact.append(1)
        source = record.source
        origin = None if source is None else source.origin
        number = self._origins.get(origin)
        if number is None:
            number = self._origins[origin] = len(self._origins)
        self._origin_numbers.append(number)
        self._lines.append(0 if source is None else source.line)
        self._size += data_len
        return sealed

    def add_run(self, run: RecordRun, start: int = 0) -> int:
        """Add records of ``run`` from ``start`` on while they fit; return the index it stopped at.

        The bulk form of ``add`` for a chunk of input: one copy of the records' bytes, no object
        per record. It never seals: call it again from the index it returns; when that adds
        nothing (it returns ``start``), the open batch is full: seal it, then call again.

        Args:
            run: the records.
            start: the index of the first record to add.

        Raises:
            errors.RecordError: ``rule="record-too-large"``: record ``start`` alone does not fit in
                a body; nothing was added.
        """
        ends = run.ends
        total = len(ends)
        if start >= total:
            return total
        offset = run.start_of(start)
        count = len(self._index)
        # Records start..k-1 fit when the body's size after them, base + size + count (the
        # commas) + ends[k-1] - offset, stays within the cap.
        limit = self._cap - self._base - self._size - count + offset
        stop = bisect_right(ends, limit, start, total)
        hashes = run.identity_hashes()
        first = len(self._keys)
        fresh = dict(zip(hashes[start:stop], range(first, first + stop - start), strict=True))
        blocked = hashes[stop] if stop < total else None  # the first that does not fit
        if (
            len(fresh) != stop - start
            or not self._index.keys().isdisjoint(fresh)
            or (blocked is not None and (blocked in fresh or blocked in self._index))
        ):
            # rare: a key repeats in the batch (the record that does not fit may still replace
            # an older one and so fit), or two hashes are equal: one by one, exactly as add()
            # does
            return self._add_one_by_one(run, start)
        if stop == start:
            if self._base + ends[start] - offset > self._cap:
                raise self._too_large(run.record(start))  # as add() does, without sealing
            return start  # full
        self._index.update(fresh)
        body = self._body
        used = self._used
        shift = used - offset
        records = memoryview(run.segment)[offset : ends[stop - 1] + 1]
        if used + len(records) <= len(body):  # a recycled body: write over what it held
            body[used : used + len(records)] = records
        else:
            if used != len(body):
                del body[used:]
            body += records
        self._used = used + len(records)
        placed = array("q", [end + shift for end in ends[start:stop]])
        for end in placed:  # a segment's separators may be newlines: a body has commas
            body[end] = 0x2C
        self._ends.extend(placed)
        count = stop - start
        self._keys.extend(run.keys[start:stop])
        if run.identifiers is None:
            self._identifiers.extend([""] * count)
            self._values.extend([""] * count)
            self._has_contact.extend(bytes(count))
        else:
            self._identifiers.extend(run.identifiers[start:stop])
            self._values.extend(run.values[start:stop])
            self._has_contact.extend(b"\x01" * count)
        number = self._origins.get(run.origin)
        if number is None:
            number = self._origins[run.origin] = len(self._origins)
        self._origin_numbers.extend(array("I", [number]) * count)
        self._lines.extend(run.lines[start:stop])
        self._size += ends[stop - 1] - offset - (count - 1)
        return stop

    def _add_one_by_one(self, run: RecordRun, start: int) -> int:
        for index in range(start, len(run)):
            record = run.record(index)
            if self._base + len(record.data) > self._cap:
                if index == start:
                    raise self._too_large(record)
                return index  # the next call raises for it
            if not self.fits(record):
                return index
            self.add(record)  # never seals: it fits
        return len(run)

    def _too_large(self, record: EncodedRecord) -> errors.RecordError:
        return errors.RecordError(
            "record-too-large",
            f"the record encodes to {len(record.data)} bytes, more than fits in one request body"
            f" of at most {self._cap} bytes; make its json smaller",
            key=record.key,
            source=record.source,
        )

    def _record_at(self, index: int, data: bytes) -> EncodedRecord:
        origin = list(self._origins)[self._origin_numbers[index]]
        source = None if origin is None else Source(origin, self._lines[index])
        contact = None
        if self._has_contact[index]:
            contact = (self._identifiers[index], self._values[index])
        return EncodedRecord(self._keys[index], contact, data, source)

    def fits(self, record: EncodedRecord) -> bool:
        """Whether ``add(record)`` would keep the open batch (no seal needed to make room).

        Lets a caller seal first where sealing is cheap to move (e.g. to a worker thread).

        Args:
            record: the encoded record.
        """
        key, contact = record.key, record.contact
        old = self._index.get(hash(identity_of(key, contact)))
        count = len(self._index)
        size = self._size
        if old is not None and not self._same(old, key, contact):
            return False  # another identity with the same hash: add() would seal
        if old is not None:
            start, end = self._span(old)
            count -= 1
            size -= end - start
        return not count or self._base + size + count + len(record.data) <= self._cap

    def seal(self) -> Batch | None:
        """Seal the open batch now and return it; ``None`` when it holds no record."""
        if not self._index:
            return None
        return self._seal()

    def _seal(self) -> Batch:
        body = self._body
        del body[self._used :]  # what a recycled body held past the records
        keys, identifiers, values = self._keys, self._identifiers, self._values
        has_contact, numbers, lines = self._has_contact, self._origin_numbers, self._lines
        ends = self._ends
        if self._dropped:  # rare: rebuild without the replaced records
            kept = [i for i in range(len(keys)) if i not in self._dropped]
            view = memoryview(body)
            parts = [view[slice(*self._span(i))] for i in kept]
            body = bytearray(self._prefix) + b",".join(parts) + b","
            view.release()
            ends = array("q", accumulate(len(part) + 1 for part in parts))
            ends = array("q", [len(self._prefix) + end - 1 for end in ends])
            keys = [keys[i] for i in kept]
            identifiers = [identifiers[i] for i in kept]
            values = [values[i] for i in kept]
            has_contact = bytearray(has_contact[i] for i in kept)
            numbers = array("I", [numbers[i] for i in kept])
            lines = array("q", [lines[i] for i in kept])
        refs = RecordRefs._of_columns(
            keys,
            identifiers,
            values,
            bytes(has_contact),
            numbers,
            tuple(self._origins),
            lines,
            ends,
        )
        self._reset()
        # the body ends with the last record's comma: put the suffix in its place
        del body[-1:]
        body += self._suffix
        return Batch(body, refs)

    def recycle(self, body: bytes | bytearray) -> None:
        """Give back the body of a batch this assembler sealed, once nothing uses it any more.

        The next body is built in its memory: a body is up to 50 MB, and memory fresh from the
        system costs a page fault every 4 KB on first write, about as much as the copying.
        Only while the open batch is still empty (just after sealing); otherwise ignored.

        Args:
            body: ``Batch.body`` of a batch from ``seal`` (or ``add``); not to be used after.
        """
        if (
            isinstance(body, bytearray)
            and not self._index
            and len(body) > len(self._body)
            and body is not self._body
            and _resizable(body)
        ):
            self._reset(body)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, identity: object) -> bool:
        if isinstance(identity, str):
            key, contact = identity, None
        elif isinstance(identity, tuple) and len(identity) == 3:
            key, contact = identity[2], (identity[0], identity[1])
        else:
            return False
        place = self._index.get(hash(identity))
        return place is not None and self._same(place, key, contact)

    def identity_hashes(self) -> IdentityHashes:
        """The hashes of the identities in the open batch (what ``seal`` would seal): the
        index's own keys, much cheaper than hashing the sealed refs."""
        return dict.fromkeys(self._index)

    def holds_any(self, identity_hashes: Iterable[int]) -> bool:
        """Whether the open batch may hold any of these identities (by their hashes: a hash
        shared with another identity says yes too)."""
        return not self._index.keys().isdisjoint(identity_hashes)

    def _same(self, place: int, key: str, contact: tuple[str, str] | None) -> bool:
        """Whether the record at ``place`` has this identity (its hash matched)."""
        if self._keys[place] != key:
            return False
        if contact is None:
            return not self._has_contact[place]
        return (
            bool(self._has_contact[place])
            and self._identifiers[place] == contact[0]
            and self._values[place] == contact[1]
        )

    @property
    def pending_bytes(self) -> int:
        """The exact size of the body if the open batch were sealed now (0 when empty)."""
        count = len(self._index)
        if not count:
            return 0
        return self._base + self._size + count - 1


def _resizable(body: bytearray) -> bool:
    """Whether nothing holds a view of ``body`` (a bytearray with views cannot change size): a
    traceback or a profiler keeping an upload's frame alive keeps its view of the body too."""
    try:
        body.append(0)
    except BufferError:
        return False
    del body[-1]
    return True


def record_spans(batch: Batch, collection: Collection) -> list[tuple[int, int]]:
    """Where each record of a batch lies in its body, as ``(start, end)`` offsets.

    From the refs' offsets when they have them (every batch sealed by an assembler); else (a
    batch journaled before offsets were kept) by tokenising the body once, which takes about a
    second for 50 MB: run it in a worker thread.

    Raises:
        ValueError: the body was not built for ``collection`` or does not match its refs.
    """
    prefix, suffix = collection.envelope()
    body = batch.body
    if not (body.startswith(prefix) and body.endswith(suffix)):
        raise ValueError("the batch body was not built for this collection")
    ends = batch.refs.ends if isinstance(batch.refs, RecordRefs) else None
    if ends is None:
        ends = _tokenised_ends(body, len(prefix), len(body) - len(suffix))
    if len(ends) != len(batch.refs) or (ends and ends[-1] != len(body) - len(suffix)):
        raise ValueError(f"the batch body holds {len(ends)} records but has {len(batch.refs)} refs")
    starts = [len(prefix), *(end + 1 for end in ends[:-1])]
    return list(zip(starts, ends, strict=True))


# a JSON string, or one structural character; everything else (numbers, literals, whitespace)
# is skipped by the search
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


def _tokenised_ends(body: bytes | bytearray, start: int, stop: int) -> array[int]:
    """The end offset of each record in ``body[start:stop]`` (the inside of ``records``)."""
    ends = array("q")
    depth = 0
    for match in _TOKEN.finditer(body, start, stop):
        char = body[match.start()]
        if char == 0x22:  # a string
            continue
        if char == 0x7B or char == 0x5B:  # { [
            depth += 1
        elif char == 0x7D or char == 0x5D:  # } ]
            depth -= 1
        elif depth == 0:  # a comma between records
            ends.append(match.start())
    if stop > start:
        ends.append(stop)
    return ends


def split_batch(batch: Batch, collection: Collection) -> list[Batch]:
    """Split a batch into two halves with the same records, for a body the API found too large.

    The records' bytes are kept as they are, cut at their known offsets; refs stay aligned with
    the records and carry their new offsets. A batch of one record cannot be split and comes
    back as the only element of the list. Copies up to a body: run it in a worker thread.

    Args:
        batch: a batch sealed by a ``BatchAssembler`` for ``collection``.
        collection: the collection the batch was built for.

    Raises:
        ValueError: the body was not built for ``collection`` or does not match its refs.
    """
    spans = record_spans(batch, collection)
    if len(spans) < 2:
        return [batch]
    prefix, suffix = collection.envelope()
    view = memoryview(batch.body)
    half = len(spans) // 2
    halves = []
    for refs, part in ((batch.refs[:half], spans[:half]), (batch.refs[half:], spans[half:])):
        first, last = part[0][0], part[-1][1]
        shift = first - len(prefix)
        body = bytearray(prefix)
        body += view[first:last]
        body += suffix
        halves.append(Batch(body, refs.with_ends([end - shift for _, end in part])))
    view.release()
    return halves

"""The read half of a claim, shared by the stores: raw pending rows in, a ``ClaimedRun`` out.

A store reads a queue's pending rows in id order, as stored bytes, page by page, and feeds each
page to a ``ClaimScan``; the scan validates and encodes them (one pass of the chunk encoder, as a
file's lines are read), keeps the latest valid row of each identity (last write wins), sets the
rows that break a record rule aside for the dead letters, holds back the rows whose identity is
in an import still in flight, and says when it has enough for the budget. ``result()`` gives the
rows that fit, in columns, with what the store must delete and dead-letter.

A claim reads up to a body's worth of rows (50 MB, ~40,000 orders) on the worker's critical path,
so the scan keeps no object per row: each row read has a slot (its place in the scan), with its
id and size in arrays, and the latest row of each identity is an int in a dict keyed by the
identity's text. A page that is all valid one-line rows of new identities (the common case) is
taken in bulk. Given the worker's ``ParsePool``, pieces of 1,000 rows are encoded in its
processes, a few ahead of the one being taken in, while the store reads the next page.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Container, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice, pairwise
from typing import TYPE_CHECKING, cast

import orjson

from orchestrator.chunks import EncodedLines, RecordRun, encode_chunk
from orchestrator.errors import ConfigError, RecordError
from orchestrator.outbox.base import (
    COLLECTION_INVALID,
    RECORD_ORIGIN,
    Claim,
    ClaimedRun,
    OutboxQueue,
    Rejection,
    identity_text,
    identity_texts,
)
from orchestrator.provenance import Source
from orchestrator.records import Collection, EncodedRecord, Scope, encode_line

if TYPE_CHECKING:
    from orchestrator.parsing import ParsePool

__all__ = ["ClaimScan", "Letter", "Scanned", "key_of_record"]

Letter = tuple[int, Rejection, str | None]
"""A row bound for the dead letters: its id, why, and its key when it could be read."""

_Rejected = tuple[Rejection, str | None]  # why a row is not a record, and its key
_Rows = Sequence[tuple[int, bytes]]
# A piece of a page on its way in: its rows, their bytes, them joined as lines (None: a row
# spans lines), and the parse worker's result to come (None: encoded when taken in).
_Sent = tuple[_Rows, int, bytes | None, "Future[tuple[EncodedLines, int]] | None"]

_PIECE_ROWS = 1000  # rows a parse worker encodes at a time
_PROCESS_BYTES = 256 << 10  # smaller pieces are encoded in the calling thread


@dataclass(slots=True)
class _Page:
    """The valid records of one page of rows, by the rows' places in the page.

    Args:
        first: the slot of the page's first row.
        run: the records of its one-line rows (``run.lines`` are the rows' ids).
        places: the index in ``run`` of each row of the page (-1: not in it); ``None`` when row
            ``i`` is record ``i`` (every row of the page is a one-line record).
        singles: the records of rows of more than one line, by place in the page.
    """

    first: int
    run: RecordRun
    places: array[int] | None = None
    singles: dict[int, EncodedRecord] = field(default_factory=dict)

    def index(self, place: int) -> int:
        """The index in ``run`` of the row at ``place`` (-1: not in it)."""
        return place if self.places is None else self.places[place]


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
        pool: parse worker processes to encode large pages in (``None``: the calling thread).
        piece_rows: rows encoded at a time (a page is cut into pieces of that many).
    """

    def __init__(
        self,
        queue: OutboxQueue,
        in_flight: Container[int],
        budget: int,
        *,
        pool: ParsePool | None = None,
        piece_rows: int = _PIECE_ROWS,
    ) -> None:
        self._in_flight = in_flight
        self._piece_rows = piece_rows
        self._budget = budget
        self._pool = pool
        # pieces sent to the pool and not taken in yet: enough to keep every process busy
        self._ahead: deque[_Sent] = deque()
        self._ahead_bytes = 0
        self._depth = pool.processes + 1 if pool is not None else 0
        self._collection: Collection | None
        self._invalid_queue: Rejection | None = None
        try:
            self._collection = queue.target()
        except (ConfigError, ValueError) as error:
            self._collection = None
            self._invalid_queue = Rejection(COLLECTION_INVALID, str(error))
        # by slot (the place of a row in the scan): its id, and its record's size (0: none)
        self._ids = array("q")
        self._sizes = array("q")
        self._pages: list[_Page] = []
        self._firsts: list[int] = []  # each page's first slot, for finding a slot's page
        # identity text -> the slot of its latest valid row: ascending in insertion order, as a
        # later row of an identity is popped and inserted again
        self._latest: dict[str, int] = {}
        self._held: dict[str, int] = {}  # identity in flight -> its latest pending row's id
        self._superseded: list[int] = []
        self._invalid: list[Letter] = []
        self._joined = -1  # bytes of the latest rows' records joined with commas
        self._rows = 0
        self._bytes = 0

    @property
    def wants_more(self) -> bool:
        """Whether the rows so far leave room in the budget (read another page if any)."""
        return self._joined + self._ahead_bytes <= self._budget

    def rows_wanted(self, least: int, most: int) -> int:
        """How many rows the next page should read: at least ``least`` (so that a later write
        within that many rows supersedes an earlier one before it goes out, however small the
        budget), more when the average row size so far says the budget needs more (5% over),
        at most ``most``."""
        wanted = least
        if self._rows:
            average = self._bytes / self._rows + 1
            missing = (self._budget - max(self._joined, 0) - self._ahead_bytes) / average
            wanted = max(least, int(missing * 1.05) + 1)
        return max(1, min(most, wanted))

    def add(self, page: Sequence[tuple[int, bytes]]) -> None:
        """Take one page of ``(row id, record as stored bytes)``, in id order after the last
        (blocking: run it in a worker thread)."""
        self._rows += len(page)
        self._bytes += sum(len(raw) for _, raw in page)
        collection = self._collection
        if collection is None:
            assert self._invalid_queue is not None
            self._invalid.extend(
                (row_id, self._invalid_queue, key_of_record(raw)) for row_id, raw in page
            )
            return
        for start in range(0, len(page), self._piece_rows):
            piece = page[start : start + self._piece_rows]
            size = sum(len(raw) for _, raw in piece)
            data = _joined(piece)
            self._ahead.append((piece, size, data, self._send(data)))
            self._ahead_bytes += size
            while len(self._ahead) > self._depth:
                self._take(*self._ahead.popleft())

    def _send(self, data: bytes | None) -> Future[tuple[EncodedLines, int]] | None:
        """Hand a piece's lines to a parse worker, when there is a pool and the piece is big."""
        if self._pool is None or data is None or len(data) < _PROCESS_BYTES:
            return None
        assert self._collection is not None
        contact_scope = self._collection.scope is Scope.CONTACT
        sent = self._pool.submit_bytes(data, contact_scope=contact_scope)
        if sent is None:
            self._pool = None  # this claim goes on in its thread
        return sent

    def _take(
        self,
        page: Sequence[tuple[int, bytes]],
        size: int,
        data: bytes | None,
        sent: Future[tuple[EncodedLines, int]] | None,
    ) -> None:
        """Take in a piece sent ahead: encoded by then, or encoded here."""
        collection = self._collection
        assert collection is not None
        self._ahead_bytes -= size
        encoded = None
        if sent is not None:
            try:
                encoded = sent.result()[0]
            except BrokenProcessPool:  # a worker died: slower, not lost
                if self._pool is not None:
                    self._pool.lost()
                    self._pool = None
        first = len(self._ids)
        ids = array("q", [row_id for row_id, _ in page])
        records, texts, sizes, rejected = _encode_page(page, ids, collection, first, data, encoded)
        self._ids.extend(ids)
        self._sizes.extend(sizes)
        self._pages.append(records)
        self._firsts.append(first)
        self._invalid.extend((ids[place], rejection, key) for place, rejection, key in rejected)
        latest = self._latest
        if not rejected and not any(map(self._in_flight.__contains__, map(hash, texts))):
            # every row valid (each has its text) and none in flight
            fresh = dict(
                zip(cast("list[str]", texts), range(first, first + len(texts)), strict=True)
            )
            if len(fresh) == len(texts) and latest.keys().isdisjoint(fresh):
                # the common case, in bulk: each row of an identity not seen yet
                latest.update(fresh)
                self._joined += sum(sizes) + len(sizes)
                return
        held, in_flight = self._held, self._in_flight
        for place, text in enumerate(texts):
            if text is None:
                continue
            if hash(text) in in_flight:
                earlier = held.get(text)
                if earlier is not None:
                    self._superseded.append(earlier)
                held[text] = ids[place]
                continue
            previous = latest.pop(text, None)
            if previous is not None:
                self._superseded.append(self._ids[previous])
                self._joined -= self._sizes[previous] + 1
            latest[text] = first + place
            self._joined += sizes[place] + 1

    def result(self) -> Scanned:
        """The rows that fit the budget (one row larger than the budget comes alone), and the
        rows to delete and dead-letter (blocking: run it in a worker thread)."""
        while self._ahead:
            self._take(*self._ahead.popleft())
        slots = list(self._latest.values())
        sizes, budget = self._sizes, self._budget
        kept = 0
        total = -1
        for slot in slots:
            grown = total + sizes[slot] + 1
            if grown > budget and kept:
                break
            kept += 1
            total = grown
        collection = self._collection
        contact_scope = collection is not None and collection.scope is Scope.CONTACT
        return Scanned(
            # the identities as the scan keyed them: the seal stores them without making them again
            rows=self._claimed_run(slots[:kept], tuple(islice(self._latest, kept)), contact_scope),
            records_bytes=max(total, 0),
            full=kept < len(slots),
            superseded=self._superseded,
            invalid=self._invalid,
            held_back=len(self._held),
        )

    def _claimed_run(
        self, slots: Sequence[int], identities: tuple[str, ...], contact_scope: bool
    ) -> ClaimedRun:
        """The records of ``slots`` (ascending; ``identities``, theirs) as one run: each stretch
        of consecutive records of a page's run is copied in one piece."""
        parts: list[bytes | memoryview] = []
        ends = array("q")
        keys: list[str] = []
        identifiers: list[str] = []
        values: list[str] = []
        lines = array("q")
        size = 0
        i = 0
        while i < len(slots):
            slot = slots[i]
            page = self._pages[bisect_right(self._firsts, slot) - 1]
            place = slot - page.first
            single = page.singles.get(place)
            if single is not None:
                parts += (single.data, b"\n")
                size += len(single.data) + 1
                ends.append(size - 1)
                keys.append(single.key)
                identifier, value = single.contact or ("", "")
                identifiers.append(identifier)
                values.append(value)
                lines.append(self._ids[slot])
                i += 1
                continue
            run = page.run
            first = page.index(place)
            # the stretch: slots i..j-1 whose records are consecutive in the run; at most to the
            # run's end, and all of that when no slot in between is missing (the common case)
            j = min(len(slots), i + len(run) - first)
            if page.places is not None or slots[j - 1] - slot != j - 1 - i:
                page_end = page.first + (len(run) if page.places is None else len(page.places))
                j = i + 1
                while (
                    j < len(slots)
                    and slots[j] < page_end
                    and page.index(slots[j] - page.first) == first + j - i
                ):
                    j += 1
            last = first + j - i - 1
            i = j
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
            ),
            identities,
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


def _joined(page: Sequence[tuple[int, bytes]]) -> bytes | None:
    """The rows as lines of one chunk, or ``None`` when a row spans lines (or holds a CR)."""
    data = b"\n".join([raw for _, raw in page]) + b"\n"
    if data.count(b"\n") == len(page) and b"\r" not in data:
        return data
    return None


def _encode_page(
    page: Sequence[tuple[int, bytes]],
    ids: array[int],
    collection: Collection,
    first: int,
    data: bytes | None,
    encoded: EncodedLines | None = None,
) -> tuple[_Page, list[str | None], array[int], list[tuple[int, Rejection, str | None]]]:
    """Validate and encode a page of rows, in id order: one pass of the chunk encoder (as a file's
    lines are read) for rows that are one line each, the per-line encoder for the others.

    Args:
        data: ``_joined(page)``.
        encoded: ``encode_chunk(data)`` when a parse worker made it.

    Returns the page's records, and by place in the page: each row's identity text (``None``:
    not a record) and record size; then the rows that are not records, by place.
    """
    contact_scope = collection.scope is Scope.CONTACT
    count = len(page)
    places: array[int] | None = None
    singles: dict[int, EncodedRecord] = {}
    rejected: list[tuple[int, Rejection, str | None]] = []
    if data is not None and encoded is None:
        encoded = encode_chunk(data, contact_scope=contact_scope, first_line=1)
    if encoded is not None and encoded.read != count:  # a blank row (the encoder skips it)
        encoded = None
    if data is None or encoded is None:
        lines: list[bytes] = []
        line_places: list[int] = []
        for place, (row_id, raw) in enumerate(page):
            if b"\n" in raw or b"\r" in raw or not raw or raw.isspace():
                one = _encode_one(raw, collection, row_id)
                if isinstance(one, EncodedRecord):
                    singles[place] = one
                else:
                    rejected.append((place, *one))
                continue
            lines.append(raw)
            line_places.append(place)
        data = b"\n".join(lines) + b"\n" if lines else b""
        encoded = encode_chunk(data, contact_scope=contact_scope, first_line=1)
    else:
        line_places = list(range(count))
    run = encoded.records(data, RECORD_ORIGIN, contact_scope=contact_scope)
    run_places = [line_places[line - 1] for line in run.lines]
    run.lines = array("q", [ids[place] for place in run_places])  # sources name the rows
    rejected.extend(
        (line_places[line - 1], Rejection(rule, message), key)
        for line, rule, message, key, _ in encoded.rejects
    )
    run_texts = identity_texts(run.keys, run.identifiers, run.values)
    run_sizes = [end - before - 1 for before, end in pairwise([-1, *run.ends])]
    if len(run) == count:  # every row a record of the run: place i is record i
        return _Page(first, run), cast("list[str | None]", run_texts), array("q", run_sizes), []
    texts: list[str | None] = [None] * count
    sizes = array("q", bytes(8 * count))
    places = array("q", [-1]) * count
    for index, place in enumerate(run_places):
        places[place] = index
        texts[place] = run_texts[index]
        sizes[place] = run_sizes[index]
    for place, record in singles.items():
        texts[place] = identity_text(record.key, record.contact)
        sizes[place] = len(record.data)
    rejected.sort(key=lambda letter: letter[0])
    return _Page(first, run, places, singles), texts, sizes, rejected


def _encode_one(raw: bytes, collection: Collection, row_id: int) -> EncodedRecord | _Rejected:
    try:
        return encode_line(raw, collection, source=Source(RECORD_ORIGIN, row_id))
    except RecordError as error:
        return (Rejection(error.rule, error.message), error.key)

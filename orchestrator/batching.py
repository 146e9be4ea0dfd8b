"""Exact-size batch assembly: request bodies packed close to the cap, last write wins inside one.

Each record's bytes are copied once into its body: the open batch keeps the encoded records' bytes
and fields in flat lists, indexed by identity (a re-added identity replaces the older record and
moves to the end), and sealing joins them in one pass. The size of the open body is tracked
exactly, so no body ever exceeds the cap and a batch is sealed only when the next record would not
fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast, overload

from orchestrator import errors
from orchestrator.records import Collection, EncodedRecord, Source

__all__ = ["Batch", "BatchAssembler", "RecordRef", "RecordRefs", "split_batch"]


@dataclass(frozen=True, slots=True)
class RecordRef:
    """What is kept of a record once its bytes are in a body: enough to report its outcome.

    Args:
        key: the record's key.
        contact: ``(identifier, value)`` of the owning contact for contact scope, else ``None``.
        source: where the record came from, when known.
    """

    key: str
    contact: tuple[str, str] | None
    source: Source | None

    @property
    def identity(self) -> tuple[str, str, str] | str:
        """What "the same record" means to the API: the key, or (identifier, value, key)."""
        contact = self.contact
        if contact is None:
            return self.key
        return (contact[0], contact[1], self.key)


class RecordRefs(Sequence[RecordRef]):
    """The records of a batch, in body order, kept as a few flat lists.

    A batch can hold 100,000 records and a run keeps several batches in flight: one object per
    record would give the garbage collector hundreds of thousands of long-lived objects to walk on
    every full collection (a pause of the event loop). Here the fields live in lists of strings,
    tuples and ints, and a :class:`RecordRef` is only made when one is asked for.

    Args:
        keys: the records' keys.
        contacts: each record's ``(identifier, value)``, or ``None`` for account scope.
        origins: each record's source origin (``None`` when unknown).
        lines: each record's source line (ignored where the origin is ``None``).
    """

    __slots__ = ("_contacts", "_keys", "_lines", "_origins")

    def __init__(
        self,
        keys: list[str],
        contacts: list[tuple[str, str] | None],
        origins: list[str | None],
        lines: list[int],
    ) -> None:
        if not len(keys) == len(contacts) == len(origins) == len(lines):
            raise ValueError("keys, contacts, origins and lines must have the same length")
        self._keys = keys
        self._contacts = contacts
        self._origins = origins
        self._lines = lines

    @classmethod
    def of(cls, refs: Iterable[RecordRef]) -> RecordRefs:
        """Pack existing refs."""
        keys: list[str] = []
        contacts: list[tuple[str, str] | None] = []
        origins: list[str | None] = []
        lines: list[int] = []
        for ref in refs:
            keys.append(ref.key)
            contacts.append(ref.contact)
            origins.append(None if ref.source is None else ref.source.origin)
            lines.append(0 if ref.source is None else ref.source.line)
        return cls(keys, contacts, origins, lines)

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> RecordRef: ...

    @overload
    def __getitem__(self, index: slice) -> RecordRefs: ...

    def __getitem__(self, index: int | slice) -> RecordRef | RecordRefs:
        if isinstance(index, slice):
            return RecordRefs(
                self._keys[index], self._contacts[index], self._origins[index], self._lines[index]
            )
        origin = self._origins[index]
        source = None if origin is None else Source(origin, self._lines[index])
        return RecordRef(self._keys[index], self._contacts[index], source)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordRefs):
            return (self._keys, self._contacts, self._origins, self._lines) == (
                other._keys,
                other._contacts,
                other._origins,
                other._lines,
            )
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<RecordRefs of {len(self)} records>"

    def __iter__(self) -> Iterator[RecordRef]:
        for index in range(len(self._keys)):
            yield self[index]

    def columns(
        self,
    ) -> tuple[list[str], list[tuple[str, str] | None], list[str | None], list[int]]:
        """The flat lists (keys, contacts, origins, lines); read them, do not change them."""
        return self._keys, self._contacts, self._origins, self._lines

    def identities(self) -> Iterator[tuple[str, str, str] | str]:
        """Each record's identity, in order, without making a ref per record."""
        for key, contact in zip(self._keys, self._contacts, strict=True):
            yield key if contact is None else (contact[0], contact[1], key)


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed request body and the records in it.

    Args:
        body: the exact request body.
        refs: the records of the body, in the order they appear in it.
    """

    body: bytes
    refs: Sequence[RecordRef]

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
    place of the newest). The open batch is kept in flat lists (see :class:`RecordRefs`), so the
    encoded records themselves die young.

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
        "_cap",
        "_contacts",
        "_data",
        "_dropped",
        "_index",
        "_keys",
        "_lines",
        "_on_superseded",
        "_origins",
        "_prefix",
        "_size",
        "_suffix",
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

    def _reset(self) -> None:
        self._index: dict[tuple[str, str, str] | str, int] = {}
        self._data: list[bytes | None] = []  # None where a later record replaced this one
        self._keys: list[str] = []
        self._contacts: list[tuple[str, str] | None] = []
        self._origins: list[str | None] = []
        self._lines: list[int] = []
        self._size = 0  # sum of the open records' data lengths
        self._dropped = 0

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
            raise errors.RecordError(
                "record-too-large",
                f"the record encodes to {data_len} bytes, more than fits in one request body"
                f" of at most {self._cap} bytes; make its json smaller",
                key=record.key,
                source=record.source,
            )
        contact = record.contact
        key = record.key
        identity = key if contact is None else (contact[0], contact[1], key)
        old = self._index.get(identity)
        if old is not None:
            old_data = self._data[old]
            assert old_data is not None
            if self._on_superseded is not None:
                self._on_superseded(self._record_at(old, old_data))
            self._data[old] = None
            self._dropped += 1
            self._size -= len(old_data)
            del self._index[identity]
        sealed = None
        count = len(self._index)
        # count commas: the n records already open plus this one need n separators
        if count and self._base + self._size + count + data_len > self._cap:
            sealed = self._seal()
        self._index[identity] = len(self._data)
        self._data.append(data)
        self._keys.append(key)
        self._contacts.append(contact)
        source = record.source
        if source is None:
            self._origins.append(None)
            self._lines.append(0)
        else:
            self._origins.append(source.origin)
            self._lines.append(source.line)
        self._size += data_len
        return sealed

    def _record_at(self, index: int, data: bytes) -> EncodedRecord:
        origin = self._origins[index]
        source = None if origin is None else Source(origin, self._lines[index])
        return EncodedRecord(self._keys[index], self._contacts[index], data, source)

    def fits(self, record: EncodedRecord) -> bool:
        """Whether ``add(record)`` would keep the open batch (no seal needed to make room).

        Lets a caller seal first where sealing is cheap to move (e.g. to a worker thread).

        Args:
            record: the encoded record.
        """
        contact = record.contact
        identity = record.key if contact is None else (contact[0], contact[1], record.key)
        old = self._index.get(identity)
        count = len(self._index)
        size = self._size
        if old is not None:
            count -= 1
            size -= len(self._data[old] or b"")
        return not count or self._base + size + count + len(record.data) <= self._cap

    def seal(self) -> Batch | None:
        """Seal the open batch now and return it; ``None`` when it holds no record."""
        if not self._index:
            return None
        return self._seal()

    def _seal(self) -> Batch:
        data, keys, contacts = self._data, self._keys, self._contacts
        origins, lines = self._origins, self._lines
        if self._dropped:  # drop the replaced records' places from every list
            kept = [i for i, part in enumerate(data) if part is not None]
            data = [data[i] for i in kept]
            keys = [keys[i] for i in kept]
            contacts = [contacts[i] for i in kept]
            origins = [origins[i] for i in kept]
            lines = [lines[i] for i in kept]
        parts = cast(list[bytes], data)
        refs = RecordRefs(keys, contacts, origins, lines)
        self._reset()
        # one copy of every record: the envelope is glued to the first and last records only
        parts[0] = self._prefix + parts[0]
        parts[-1] = parts[-1] + self._suffix
        return Batch(b",".join(parts), refs)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, identity: object) -> bool:
        return identity in self._index

    @property
    def pending_bytes(self) -> int:
        """The exact size of the body if the open batch were sealed now (0 when empty)."""
        count = len(self._index)
        if not count:
            return 0
        return self._base + self._size + count - 1


# a JSON string, or one structural character; everything else (numbers, literals, whitespace)
# is skipped by the search
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


def _split_records(region: bytes) -> list[bytes]:
    """Split the inside of a ``records`` array into each record's bytes."""
    records: list[bytes] = []
    depth = 0
    start = 0
    for match in _TOKEN.finditer(region):
        char = region[match.start()]
        if char == 0x22:  # a string
            continue
        if char == 0x7B or char == 0x5B:  # { [
            depth += 1
        elif char == 0x7D or char == 0x5D:  # } ]
            depth -= 1
        elif depth == 0:  # a comma between records
            records.append(region[start : match.start()].strip())
            start = match.end()
    tail = region[start:].strip()
    if tail:
        records.append(tail)
    return records


def split_batch(batch: Batch, collection: Collection) -> list[Batch]:
    """Split a batch into two halves with the same records, for a body the API found too large.

    The records' bytes are kept as they are; refs stay aligned with the records. A batch of one
    record cannot be split and comes back as the only element of the list.

    Args:
        batch: a batch sealed by a ``BatchAssembler`` for ``collection``.
        collection: the collection the batch was built for.

    Raises:
        ValueError: the body was not built for ``collection`` or does not match its refs.
    """
    prefix, suffix = collection.envelope()
    body = batch.body
    if not (body.startswith(prefix) and body.endswith(suffix)):
        raise ValueError("the batch body was not built for this collection")
    records = _split_records(body[len(prefix) : len(body) - len(suffix)])
    if len(records) != len(batch.refs):
        raise ValueError(
            f"the batch body holds {len(records)} records but has {len(batch.refs)} refs"
        )
    if len(records) < 2:
        return [batch]
    half = len(records) // 2
    return [
        Batch(prefix + b",".join(records[:half]) + suffix, batch.refs[:half]),
        Batch(prefix + b",".join(records[half:]) + suffix, batch.refs[half:]),
    ]

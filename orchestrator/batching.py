"""Exact-size batch assembly: request bodies packed close to the cap, last write wins inside one.

Each record's bytes are copied once into its body: the open batch keeps the encoded records in a
dict keyed by identity (a re-added identity replaces the older record and moves to the end), and
sealing joins them in one pass. The size of the open body is tracked exactly, so no body ever
exceeds the cap and a batch is sealed only when the next record would not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from orchestrator import errors
from orchestrator.records import Collection, EncodedRecord, Source

__all__ = ["Batch", "BatchAssembler", "RecordRef", "split_batch"]


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


# Building refs field by field through their slots skips the generated __init__'s per-field
# object.__setattr__ calls: about half the cost, once per record sent.
_new = object.__new__
_set_key = cast(Any, RecordRef).key.__set__
_set_contact = cast(Any, RecordRef).contact.__set__
_set_source = cast(Any, RecordRef).source.__set__


def _ref(record: EncodedRecord) -> RecordRef:
    ref: RecordRef = _new(RecordRef)
    _set_key(ref, record.key)
    _set_contact(ref, record.contact)
    _set_source(ref, record.source)
    return ref


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed request body and the records in it.

    Args:
        body: the exact request body.
        refs: the records of the body, in the order they appear in it.
    """

    body: bytes
    refs: tuple[RecordRef, ...]

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
    place of the newest).

    Args:
        collection: the collection the bodies are for (gives the envelope).
        max_body_bytes: the hard cap on one body, in bytes as sent.
        on_superseded: called with each record dropped because a later one has the same identity;
            it must not raise.

    Raises:
        errors.ConfigError: the cap cannot hold even the envelope and a minimal record.
    """

    __slots__ = ("_base", "_cap", "_on_superseded", "_open", "_prefix", "_size", "_suffix")

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
        self._open: dict[tuple[str, str, str] | str, EncodedRecord] = {}
        self._size = 0  # sum of the open records' data lengths

    def add(self, record: EncodedRecord) -> Batch | None:
        """Add a record to the open batch; return the batch sealed to make room for it, if any.

        Args:
            record: the encoded record.

        Raises:
            errors.RecordError: ``rule="record-too-large"``: the record alone does not fit in a
                body; the assembler is left unchanged.
        """
        data_len = len(record.data)
        if self._base + data_len > self._cap:
            raise errors.RecordError(
                "record-too-large",
                f"the record encodes to {data_len} bytes, more than fits in one request body"
                f" of at most {self._cap} bytes; make its json smaller",
                key=record.key,
                source=record.source,
            )
        contact = record.contact
        identity = record.key if contact is None else (contact[0], contact[1], record.key)
        open_ = self._open
        old = open_.get(identity)
        if old is not None:
            if self._on_superseded is not None:
                self._on_superseded(old)
            del open_[identity]
            self._size -= len(old.data)
        sealed = None
        count = len(open_)
        # count commas: the n records already open plus this one need n separators
        if count and self._base + self._size + count + data_len > self._cap:
            sealed = self._seal()
            open_ = self._open
        open_[identity] = record
        self._size += data_len
        return sealed

    def fits(self, record: EncodedRecord) -> bool:
        """Whether ``add(record)`` would keep the open batch (no seal needed to make room).

        Lets a caller seal first where sealing is cheap to move (e.g. to a worker thread).

        Args:
            record: the encoded record.
        """
        contact = record.contact
        identity = record.key if contact is None else (contact[0], contact[1], record.key)
        old = self._open.get(identity)
        count = len(self._open) - (old is not None)
        size = self._size - (len(old.data) if old is not None else 0)
        return not count or self._base + size + count + len(record.data) <= self._cap

    def seal(self) -> Batch | None:
        """Seal the open batch now and return it; ``None`` when it holds no record."""
        if not self._open:
            return None
        return self._seal()

    def _seal(self) -> Batch:
        records = self._open.values()
        parts = [record.data for record in records]
        refs = tuple(map(_ref, records))
        self._open = {}
        self._size = 0
        # one copy of every record: the envelope is glued to the first and last records only
        parts[0] = self._prefix + parts[0]
        parts[-1] = parts[-1] + self._suffix
        return Batch(b",".join(parts), refs)

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, identity: object) -> bool:
        return identity in self._open

    @property
    def pending_bytes(self) -> int:
        """The exact size of the body if the open batch were sealed now (0 when empty)."""
        count = len(self._open)
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

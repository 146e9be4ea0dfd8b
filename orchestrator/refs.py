"""What is kept of each record once its bytes are in a body: ``RecordRef`` and the packed
``RecordRefs`` of a batch, enough to report every record's outcome by key and source.
"""

from __future__ import annotations

import copy
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import overload

from orchestrator.provenance import Source
from orchestrator.records import identity_of

__all__ = ["RecordRef", "RecordRefs", "RefColumns"]


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
        return identity_of(self.key, self.contact)


@dataclass(frozen=True, slots=True)
class RefColumns:
    """The fields of a batch's records as columns: no object per record (a batch can hold
    100,000), so building or reading them sets off none of the collector's passes.

    Args:
        keys: each record's key.
        identifiers: each record's contact identifier (``""`` where it has no contact).
        values: each record's contact value (``""`` where it has no contact).
        has_contact: 1 for each record with a contact, else 0.
        origin_numbers: each record's origin, as an index into ``origins``.
        origins: the inputs' display names (``None``: unknown).
        lines: each record's line number in its origin.
    """

    keys: Sequence[str]
    identifiers: Sequence[str]
    values: Sequence[str]
    has_contact: bytes | bytearray
    origin_numbers: Sequence[int]
    origins: Sequence[str | None]
    lines: Sequence[int]


class RecordRefs(Sequence[RecordRef]):
    """The records of a batch, in body order, packed into a few flat strings and arrays.

    A batch can hold 100,000 records and a run keeps several batches in flight: one object per
    record (or per field) would cost memory and give the garbage collector hundreds of thousands
    of objects to walk on every full collection, a pause of the event loop each time. Here the
    keys and contact identities are concatenated strings with arrays of end offsets, sources are
    arrays of line numbers and origin numbers; a :class:`RecordRef` is made only when asked for.

    Args:
        keys: the records' keys.
        contacts: each record's ``(identifier, value)``, or ``None`` for account scope.
        origins: each record's source origin (``None`` when unknown).
        lines: each record's source line (ignored where the origin is ``None``).
        ends: where each record's bytes end in its batch's body (the separator or the envelope's
            end follows); ``None`` when not known. With them a body is split, and a record's
            bytes found, by offsets alone.
    """

    __slots__ = (
        "_count",
        "_ends",
        "_has_contact",
        "_identifier_ends",
        "_identifiers",
        "_key_ends",
        "_keys",
        "_line_numbers",
        "_origin_numbers",
        "_origins",
        "_value_ends",
        "_values",
    )

    def __init__(
        self,
        keys: Sequence[str],
        contacts: Sequence[tuple[str, str] | None],
        origins: Sequence[str | None],
        lines: Sequence[int],
        ends: Sequence[int] | None = None,
    ) -> None:
        if not len(keys) == len(contacts) == len(origins) == len(lines):
            raise ValueError("keys, contacts, origins and lines must have the same length")
        if ends is not None and len(ends) != len(keys):
            raise ValueError("ends must have one offset per record")
        numbers: dict[str | None, int] = {}
        self._set(
            keys,
            [c[0] if c else "" for c in contacts],
            [c[1] if c else "" for c in contacts],
            bytes(c is not None for c in contacts),
            array("I", [numbers.setdefault(o, len(numbers)) for o in origins]),
            tuple(numbers),
            array("q", lines),
            None if ends is None else array("q", ends),
        )

    def _set(
        self,
        keys: Sequence[str],
        identifiers: Sequence[str],
        values: Sequence[str],
        has_contact: bytes,
        origin_numbers: array[int],
        origins: tuple[str | None, ...],
        lines: array[int],
        ends: array[int] | None,
    ) -> None:
        self._count = len(keys)
        self._ends = ends
        self._keys, self._key_ends = _pack(keys)
        self._identifiers, self._identifier_ends = _pack(identifiers)
        self._values, self._value_ends = _pack(values)
        self._has_contact = has_contact
        self._origin_numbers = origin_numbers
        self._origins = origins
        self._line_numbers = lines

    @classmethod
    def _of_columns(
        cls,
        keys: Sequence[str],
        identifiers: Sequence[str],
        values: Sequence[str],
        has_contact: bytes,
        origin_numbers: array[int],
        origins: tuple[str | None, ...],
        lines: array[int],
        ends: array[int] | None,
    ) -> RecordRefs:
        """Pack columns as an assembler keeps them (identifier and value ``""`` where
        ``has_contact`` is 0); no work per record beyond joining the strings."""
        refs: RecordRefs = object.__new__(cls)
        refs._set(keys, identifiers, values, has_contact, origin_numbers, origins, lines, ends)
        return refs

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
        return self._count

    def key(self, index: int) -> str:
        """The key of record ``index``."""
        return _unpack(self._keys, self._key_ends, index)

    def contact(self, index: int) -> tuple[str, str] | None:
        """The ``(identifier, value)`` of record ``index``, or ``None``."""
        if not self._has_contact[index]:
            return None
        return (
            _unpack(self._identifiers, self._identifier_ends, index),
            _unpack(self._values, self._value_ends, index),
        )

    def source(self, index: int) -> Source | None:
        """Where record ``index`` came from, when known."""
        origin = self._origins[self._origin_numbers[index]]
        return None if origin is None else Source(origin, self._line_numbers[index])

    @overload
    def __getitem__(self, index: int) -> RecordRef: ...

    @overload
    def __getitem__(self, index: slice) -> RecordRefs: ...

    def __getitem__(self, index: int | slice) -> RecordRef | RecordRefs:
        if isinstance(index, slice):
            columns = self.columns()
            return RecordRefs.of_columns(
                RefColumns(
                    keys=columns.keys[index],
                    identifiers=columns.identifiers[index],
                    values=columns.values[index],
                    has_contact=columns.has_contact[index],
                    origin_numbers=columns.origin_numbers[index],
                    origins=columns.origins,
                    lines=columns.lines[index],
                ),
                None if self._ends is None else self._ends[index],
            )
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("record index out of range")
        return RecordRef(self.key(index), self.contact(index), self.source(index))

    def __iter__(self) -> Iterator[RecordRef]:
        for index in range(self._count):
            yield self[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<RecordRefs of {len(self)} records>"

    @property
    def ends(self) -> array[int] | None:
        """Where each record's bytes end in the body, when known (see the class)."""
        return self._ends

    def with_ends(self, ends: Sequence[int]) -> RecordRefs:
        """The same records with the given body offsets (after the body was rebuilt)."""
        if len(ends) != self._count:
            raise ValueError("ends must have one offset per record")
        refs = copy.copy(self)  # the packed columns are immutable: shared, not copied
        refs._ends = array("q", ends)
        return refs

    def keys(self) -> list[str]:
        """Every record's key, in order."""
        return _unpack_all(self._keys, self._key_ends)

    def columns(self) -> RefColumns:
        """The records as plain columns (what the journal stores), with no object per record."""
        identifiers = _unpack_all(self._identifiers, self._identifier_ends)
        values = _unpack_all(self._values, self._value_ends)
        return RefColumns(
            keys=self.keys(),
            identifiers=identifiers,
            values=values,
            has_contact=self._has_contact,
            origin_numbers=self._origin_numbers,
            origins=self._origins,
            lines=self._line_numbers,
        )

    @classmethod
    def of_columns(cls, columns: RefColumns, ends: Sequence[int] | None = None) -> RecordRefs:
        """The refs of :meth:`columns` (read back from the journal, say)."""
        if not (
            len(columns.keys)
            == len(columns.identifiers)
            == len(columns.values)
            == len(columns.has_contact)
            == len(columns.origin_numbers)
            == len(columns.lines)
        ):
            raise ValueError("every column must have one entry per record")
        if ends is not None and len(ends) != len(columns.keys):
            raise ValueError("ends must have one offset per record")
        return cls._of_columns(
            columns.keys,
            columns.identifiers,
            columns.values,
            bytes(columns.has_contact),
            array("I", columns.origin_numbers),
            tuple(columns.origins),
            array("q", columns.lines),
            None if ends is None else array("q", ends),
        )

    def identities(self) -> Iterator[tuple[str, str, str] | str]:
        """Each record's identity, in order, without making a ref per record.

        Made one at a time from the packed columns: hashed and dropped at once, the identities
        of a batch (up to 100,000) are never all alive together. A list of them would count
        against the collector's threshold and set off passes over the young objects, and the
        asyncio objects alive at each pass would move on towards the full passes that walk the
        whole heap (tens of milliseconds with the loop stopped).
        """
        columns = self.columns()
        for key, identifier, value, has in zip(
            columns.keys, columns.identifiers, columns.values, columns.has_contact, strict=True
        ):
            yield (identifier, value, key) if has else key


def _pack(texts: Sequence[str]) -> tuple[str, array[int]]:
    return "".join(texts), array("q", accumulate(map(len, texts)))


def _unpack(text: str, ends: array[int], index: int) -> str:
    return text[ends[index - 1] if index else 0 : ends[index]]


def _unpack_all(text: str, ends: array[int]) -> list[str]:
    starts = [0, *ends[:-1]] if ends else []
    return [text[start:end] for start, end in zip(starts, ends, strict=True)]

"""The columnar chunk format: a chunk of JSON Lines validated and encoded in one pass.

``encode_chunk`` turns a chunk into ``EncodedLines`` (columns small enough to send back from a
worker process), which become a ``RecordRun``: consecutive encoded records of one input, the bulk
form of ``EncodedRecord`` that the batch assembler packs in one copy. The record rules themselves
live in :mod:`orchestrator.records`.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from orchestrator import errors
from orchestrator.provenance import Source
from orchestrator.records import (
    _ACCOUNT_HEAD,
    _CLOSE_OBJECT,
    _COMPACT_ACCOUNT_HEAD,
    _COMPACT_CONTACT_HEAD,
    _CONTACT_HEAD,
    _JSON_SYNTAX_MESSAGE,
    _MAX_CONTACT_VALUE,
    _NESTED_ARRAY_MESSAGE,
    _OVERSIZED,
    _STANDARD_IDENTIFIERS,
    Collection,
    EncodedRecord,
    RejectedRecord,
    Scope,
    _encode_parsed,
    _encoded,
    _has_nested_array,
    _nested_array_candidate,
    _oversized,
    _source,
)

__all__ = ["EncodedLines", "RecordRun", "RejectedLine", "encode_chunk", "encode_lines"]

_STRIPPED = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
_UNPARSABLE = object()
# The standard identifiers as a head spells them: one str object each for every record.
_STANDARD_SPELLED = {name.encode(): name for name in _STANDARD_IDENTIFIERS}


def _next_nested_array_candidate(data: bytes, start: int, end: int) -> int:
    """Where the next possible array inside an array of ``data[start:end]`` is, else ``end``."""
    found = _nested_array_candidate(data, start, end)
    return end if found == -1 else found


RejectedLine = tuple[int, str, str, "str | None", bytes]
"""A line that broke a rule, as ``encode_chunk`` reports it: (line, rule, message, key, raw)."""


@dataclass(slots=True)
class EncodedLines:
    """A chunk of JSON Lines validated and encoded, in columns: what ``encode_chunk`` returns.

    Small enough to send back from a worker process: the records' bytes are not copied but
    described as ranges of the chunk (``pieces``), which ``records`` turns into a body segment.

    Args:
        pieces: how the chunk's records become a body segment, in order: a ``(start, end)`` range
            of the chunk holding consecutive records one per line (each newline is the separator
            after its record), or ``bytes`` of one record already in body form, comma included
            (re-encoded, or stripped of surrounding whitespace).
        ends: where each record ends in the segment (its separator is at that offset).
        keys: each record's key.
        identifiers: each record's contact identifier (contact scope; empty for account scope).
        values: each record's contact value (contact scope; empty for account scope).
        lines: each record's 1-based line number.
        rejects: the lines that broke a rule, in order.
        read: how many non-blank lines the chunk held (records plus rejects).
        count: how many lines the chunk held (blank ones too).
    """

    pieces: list[tuple[int, int] | bytes]
    ends: array[int]
    keys: list[str]
    identifiers: list[str]
    values: list[str]
    lines: array[int]
    rejects: list[RejectedLine]
    read: int
    count: int

    def shift_lines(self, offset: int) -> None:
        """Add ``offset`` to every line number (for a chunk encoded before its place was known)."""
        if offset:
            self.lines = array("q", [line + offset for line in self.lines])
            self.rejects = [
                (line + offset, rule, message, key, raw)
                for line, rule, message, key, raw in self.rejects
            ]

    @property
    def whole(self) -> bool:
        """Whether the chunk is its own segment: every line a record, kept as it was."""
        return len(self.pieces) == 1 and self.pieces[0][0] == 0

    def segment(self, data: bytes) -> bytes:
        """The records as they go into a body, each followed by one separator byte: a newline
        where the record was followed by one in ``data``, else a comma. Packing the records into
        a body makes every separator a comma (``BatchAssembler.add_run``): that costs one store
        per record, where replacing the newlines here would cost a pass over every byte.

        Args:
            data: the chunk ``encode_chunk`` was given.
        """
        if self.whole:
            return data  # the common case: nothing to make
        return b"".join(
            piece if type(piece) is bytes else data[piece[0] : piece[1]] for piece in self.pieces
        )

    def records(
        self,
        data: bytes,
        origin: str,
        *,
        contact_scope: bool,
        segment: bytes | memoryview | None = None,
    ) -> RecordRun:
        """The records as a ``RecordRun`` (the bulk form of ``EncodedRecord``).

        Args:
            data: the chunk ``encode_chunk`` was given.
            origin: the input's display name for the records' sources.
            contact_scope: what ``encode_chunk`` was given.
            segment: ``segment(data)`` when already made (by a worker process; a view of
                shared memory that is valid until the next chunk is read).
        """
        return RecordRun(
            self.segment(data) if segment is None else segment,
            self.ends,
            self.keys,
            self.identifiers if contact_scope else None,
            self.values,
            origin,
            self.lines,
        )

    def rejected(self, origin: str) -> list[RejectedRecord]:
        """The rejected lines as ``RejectedRecord`` objects with their sources."""
        return [
            RejectedRecord(
                errors.RecordError(rule, message, key=key, source=Source(origin, line)), raw
            )
            for line, rule, message, key, raw in self.rejects
        ]


@dataclass(slots=True)
class RecordRun:
    """Consecutive encoded records of one input, in columns: the bulk form of ``EncodedRecord``.

    Args:
        segment: the records' bytes, each followed by one separator byte (a comma or a newline;
            a body gets commas); a view is only valid while its chunk is being consumed.
        ends: where each record ends in ``segment`` (its separator is at that offset).
        keys: each record's key.
        identifiers: each record's contact identifier, or ``None`` for account scope.
        values: each record's contact value (ignored for account scope).
        origin: the input's display name.
        lines: each record's 1-based line number in the input.
    """

    segment: bytes | memoryview
    ends: array[int]
    keys: list[str]
    identifiers: list[str] | None
    values: list[str]
    origin: str
    lines: array[int]
    _hashes: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def start_of(self, index: int) -> int:
        """Where record ``index`` starts in the segment."""
        return self.ends[index - 1] + 1 if index else 0

    def identity_hashes(self) -> list[int]:
        """The hash of each record's identity (``hash(identity_of(...))``), in order.

        No identity is kept: a chunk's worth of tuples alive at once would set off the
        collector's passes (see ``RecordRefs.identities``); ``zip`` hands ``hash`` one tuple
        again and again.
        """
        if self._hashes is None:
            if self.identifiers is None:
                self._hashes = list(map(hash, self.keys))
            else:
                self._hashes = list(
                    map(hash, zip(self.identifiers, self.values, self.keys, strict=True))
                )
        return self._hashes

    def record(self, index: int) -> EncodedRecord:
        """Record ``index`` as an ``EncodedRecord``."""
        contact = None
        if self.identifiers is not None:
            contact = (self.identifiers[index], self.values[index])
        data = bytes(self.segment[self.start_of(index) : self.ends[index]])
        return _encoded(self.keys[index], contact, data, _source(self.origin, self.lines[index]))


def encode_chunk(data: bytes, *, contact_scope: bool, first_line: int) -> EncodedLines:
    """Validate and encode a chunk of JSON Lines: the one implementation of the line rules.

    Pure and picklable in and out, so it can run in a worker thread or a worker process. Blank
    (whitespace-only) lines are skipped; every other line becomes a record or a reject. A line
    that already is exactly what the API wants keeps its own bytes (nothing is serialized again).

    Args:
        data: the lines, each followed by ``b"\\n"`` (an empty chunk is ``b""``).
        contact_scope: whether the collection is contact-scoped (its rules apply).
        first_line: the 1-based line number of the chunk's first line.

    Raises:
        ValueError: ``data`` is not empty and does not end with a newline.
    """
    if data and not data.endswith(b"\n"):
        raise ValueError("a chunk must end with a newline")
    fields = 3 if contact_scope else 2
    pieces: list[tuple[int, int] | bytes] = []
    ends = array("q")
    keys: list[str] = []
    identifiers: list[str] = []
    values: list[str] = []
    numbers = array("q")
    rejects: list[RejectedLine] = []
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    standard = _STANDARD_IDENTIFIERS
    standard_spelled = _STANDARD_SPELLED.get
    key: Any
    identifier: Any
    value: Any
    backslash = b"\\"
    number = first_line - 1
    read = 0
    run_start = -1  # where the open range of clean lines starts, -1 when none is open
    size = 0  # the segment's size so far
    find = data.find
    count = data.count
    match_head = (_CONTACT_HEAD if contact_scope else _ACCOUNT_HEAD).match
    match_compact = (_COMPACT_CONTACT_HEAD if contact_scope else _COMPACT_ACCOUNT_HEAD).match
    # Where the next "[" that may open an array inside an array is: found once for the chunk
    # (most chunks have none) instead of looked for in every line; past the end when none is.
    nested_candidate = _next_nested_array_candidate
    size_of_data = len(data)
    candidate = nested_candidate(data, 0, size_of_data)
    escapes = find(b"\\") != -1  # a field name could be spelled with escapes (memchr: cheap)
    view = memoryview(data)
    strip_bytes = _STRIPPED
    position = 0  # where the next line starts
    while (end := find(b"\n", position)) != -1:
        start = position
        position = end + 1
        number += 1
        # The common layout, inline: "key" first, then "contactIdentity" (contact scope), "json"
        # last. The head is matched, the json value parsed alone: that proves no field follows it
        # (or appears twice) without scanning the line again. Anything else takes the paths below.
        if end > start and data[end - 1] == _CLOSE_OBJECT:
            head = match_compact(data, start, end)
            plain = head is not None  # its strings hold no escapes: their bytes are their text
            if not plain:
                head = match_head(data, start, end)
            if head is not None:
                try:
                    json_value = loads(view[head.end() : end - 1])
                    if contact_scope:
                        quoted_key, quoted_identifier, quoted_value = head.groups()
                        identifier = standard_spelled(quoted_identifier)
                        value = (
                            quoted_value.decode()
                            if plain or backslash not in quoted_value
                            else loads(b'"%b"' % quoted_value)
                        )
                    else:
                        quoted_key = head.group(1)
                    key = (
                        quoted_key.decode()
                        if plain or backslash not in quoted_key
                        else loads(b'"%b"' % quoted_key)
                    )
                except ValueError:  # not JSON, or not UTF-8: the paths below name the rule
                    pass
                else:
                    if candidate < start:
                        candidate = nested_candidate(data, start, size_of_data)
                    if (
                        type(json_value) is dict
                        and key
                        and not key.isspace()
                        and (
                            not contact_scope
                            or (identifier is not None and 0 < len(value) <= _MAX_CONTACT_VALUE)
                        )
                        and not (candidate < end and _has_nested_array(json_value))
                    ):
                        read += 1
                        if run_start < 0:
                            run_start = start
                        size += end - start + 1
                        ends.append(size - 1)
                        keys.append(key)
                        if contact_scope:
                            identifiers.append(identifier)
                            values.append(value)
                        numbers.append(number)
                        continue
        # A line without whitespace around it is parsed in place (no copy of its bytes); others
        # are stripped first, as bytes.strip() does.
        if end > start and data[start] not in strip_bytes and data[end - 1] not in strip_bytes:
            raw: bytes | None = None
            try:
                obj = loads(view[start:end])
            except decode_error:
                obj = _UNPARSABLE
        else:
            raw = data[start:end].strip()
            if not raw:
                if run_start >= 0:
                    pieces.append((run_start, start))
                    run_start = -1
                continue
            try:
                obj = loads(raw)
            except decode_error:
                obj = _UNPARSABLE
        read += 1
        if obj is _UNPARSABLE:
            if raw is None:
                raw = data[start:end]
            if raw.startswith(_OVERSIZED) and (found := _oversized(raw))[1] is not raw:
                rejects.append((number, "record-too-large", found[0], None, found[1]))
            else:
                rejects.append((number, "json-syntax", _JSON_SYNTAX_MESSAGE, None, raw))
            if run_start >= 0:
                pieces.append((run_start, start))
                run_start = -1
            continue
        # The common case inline: exactly the allowed fields, a string key, a json object and a
        # standard identifier. Anything else takes the full path, which names the broken rule.
        if raw is None and type(obj) is dict and len(obj) == fields:
            key = obj.get("key")
            if type(key) is str and key and not key.isspace() and type(obj.get("json")) is dict:
                identifier = value = ""
                if contact_scope:
                    identity = obj.get("contactIdentity")
                    if type(identity) is dict and len(identity) == 2:
                        identifier = identity.get("identifier")
                        value = identity.get("value")
                        if not (
                            type(identifier) is str
                            and identifier in standard
                            and type(value) is str
                            and 0 < len(value) <= _MAX_CONTACT_VALUE
                        ):
                            key = None
                    else:
                        key = None
                # A field named twice reaches the dict once: such lines take the full path.
                if key is not None and (
                    (escapes and find(b"\\", start, end) != -1 and find(b"\\u", start, end) != -1)
                    or count(b'"key"', start, end) > 1
                    or count(b'"json"', start, end) > 1
                    or (contact_scope and count(b'"contactIdentity"', start, end) > 1)
                ):
                    key = None
                if key is not None:
                    if candidate < start:
                        candidate = nested_candidate(data, start, size_of_data)
                    if candidate < end and _has_nested_array(obj["json"]):
                        rejects.append(
                            (
                                number,
                                "json-nested-array",
                                _NESTED_ARRAY_MESSAGE,
                                key,
                                data[start:end],
                            )
                        )
                        if run_start >= 0:
                            pieces.append((run_start, start))
                            run_start = -1
                        continue
                    if run_start < 0:
                        run_start = start
                    size += end - start + 1
                    ends.append(size - 1)
                    keys.append(key)
                    if contact_scope:
                        identifiers.append(identifier)
                        values.append(value)
                    numbers.append(number)
                    continue
        # the full path: a rule broken, a record to re-encode, or a line to strip
        if raw is None:
            raw = data[start:end]
        if run_start >= 0:
            pieces.append((run_start, start))
            run_start = -1
        try:
            record = _encode_parsed(obj, raw, contact_scope, None)
        except errors.RecordError as error:
            rejects.append((number, error.rule, error.message, error.key, raw))
            continue
        piece = record.data + b","
        pieces.append(piece)
        size += len(piece)
        ends.append(size - 1)
        keys.append(record.key)
        if record.contact is not None:
            identifiers.append(record.contact[0])
            values.append(record.contact[1])
        numbers.append(number)
    if run_start >= 0:
        pieces.append((run_start, position))
    return EncodedLines(
        pieces, ends, keys, identifiers, values, numbers, rejects, read, number - first_line + 1
    )


def encode_lines(
    lines: Sequence[bytes], collection: Collection, *, origin: str, first_line: int
) -> list[EncodedRecord | RejectedRecord]:
    """Encode a run of JSON Lines lines into one result per non-blank line, in input order.

    The per-record form of ``encode_chunk`` (which the engine uses): every non-blank line gives
    exactly one result, an ``EncodedRecord`` or a ``RejectedRecord``.

    Args:
        lines: the lines' bytes, without or with their line terminators.
        collection: the collection the records go to.
        origin: the input's display name for ``Source`` (a path or ``"<stdin>"``).
        first_line: the 1-based line number of ``lines[0]``.
    """
    data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    contact_scope = collection.scope is Scope.CONTACT
    encoded = encode_chunk(data, contact_scope=contact_scope, first_line=first_line)
    run = encoded.records(data, origin, contact_scope=contact_scope)
    results: list[EncodedRecord | RejectedRecord] = [run.record(i) for i in range(len(run))]
    rejected = encoded.rejected(origin)
    if rejected:
        results.extend(rejected)
        results.sort(key=_line_of)
    return results


def _line_of(result: EncodedRecord | RejectedRecord) -> int:
    source = result.source if isinstance(result, EncodedRecord) else result.error.source
    assert source is not None
    return source.line

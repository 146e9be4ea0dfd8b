"""The record and collection model of Insight data, the record rules, and their encoding.

A record is validated and turned into the JSON bytes that go into a request body exactly once:
``encode_line`` for a JSON Lines input line (it keeps the line's own bytes when they are already
what the API wants), ``encode_record`` for a Python mapping. A record that breaks a rule raises
``errors.RecordError`` with a stable ``rule`` id:

=========================== ==========================================================
rule                        what is wrong
=========================== ==========================================================
``json-syntax``             the line is not valid JSON (or not UTF-8)
``json-unserializable``     a Python record holds a value JSON cannot represent
``not-object``              the record is not a JSON object
``key-missing``             no ``key`` field
``key-type``                ``key`` is not a string (integers are accepted and converted)
``key-empty``               ``key`` is empty or only whitespace
``unknown-field``           a top-level field other than key / json / contactIdentity
``json-missing``            no ``json`` field
``json-type``               ``json`` is not an object
``contact-identity-missing`` contact scope without ``contactIdentity``
``contact-identity-type``   ``contactIdentity`` is not an object of identifier + value
``contact-identifier``      identifier not email / mobileNumber / contactId / a custom name
``contact-value``           value not a non-empty string of at most 256 characters
``json-nested-array``       an array directly inside an array somewhere inside ``json``
``record-duplicate-field``  a top-level field (``key``, ``json``, ...) appears twice in a line
``record-too-large``        a line longer than the largest record a body can hold (the reader
                            cuts it off as it streams; ``batching`` also applies it to records)
=========================== ==========================================================

Every record leaves exactly as given. A line keeps its own bytes; when it must change (an integer
key becomes a string, an ignored ``contactIdentity`` is dropped) only those members' bytes are
edited, so the ``json`` member is never parsed into floats and written back: a number such as
``123456789012345678901234567890`` or ``0.1000000000000000055511151231257827`` goes out digit for
digit. A Python record is written by orjson: strings, booleans, null, ``int`` (any size) and
``float`` (the shortest text that reads back as the same float) are exact, and so is a finite
``decimal.Decimal`` (written as ``str(value)``); other types are rejected.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import orjson

from orchestrator import errors
from orchestrator.provenance import Source

__all__ = [
    "COLLECTION_TYPES",
    "OVERSIZED_LINE_START",
    "RULES",
    "Collection",
    "EncodedRecord",
    "RejectedRecord",
    "Scope",
    "encode_line",
    "encode_record",
    "oversized_line",
]


class Scope(enum.StrEnum):
    """Who owns the records of a collection: the account, or one contact each."""

    ACCOUNT = "account"
    CONTACT = "contact"


COLLECTION_TYPES: frozenset[str] = frozenset(
    {
        "cartInsight",
        "catalog",
        "consentInsight",
        "custom",
        "easyEditorExtensions",
        "nostoEmailCampaigns",
        "orders",
        "productCategories",
        "webInsight",
        "wishList",
    }
)

RULES: frozenset[str] = frozenset(
    {
        "json-syntax",
        "json-unserializable",
        "not-object",
        "key-missing",
        "key-type",
        "key-empty",
        "unknown-field",
        "json-missing",
        "json-type",
        "contact-identity-missing",
        "contact-identity-type",
        "contact-identifier",
        "contact-value",
        "json-nested-array",
        "record-duplicate-field",
        "record-too-large",
    }
)
"""The ids of the record rules above."""

_COLLECTION_NAME = re.compile(r"[-A-Za-z_][-A-Za-z0-9_]{1,255}")
_CUSTOM_IDENTIFIER = re.compile(r"[-A-Za-z0-9_]{1,50}")
_STANDARD_IDENTIFIERS = frozenset({"email", "mobileNumber", "contactId"})
_MAX_CONTACT_VALUE = 256
_ACCOUNT_FIELDS = frozenset({"key", "json"})
_CONTACT_FIELDS = frozenset({"key", "json", "contactIdentity"})
_IDENTITY_FIELDS = frozenset({"identifier", "value"})
_WHITESPACE = frozenset(b" \t\r\n")
_ELEMENT_BEFORE = frozenset(b"[,")
_COLON = ord(":")


@dataclass(frozen=True, slots=True)
class Collection:
    """An Insight data collection: where records go.

    Args:
        name: the collection name, 2-255 characters of ``[-A-Za-z0-9_]`` not starting with a digit.
        scope: ``Scope.ACCOUNT`` (default) or ``Scope.CONTACT``; the strings ``"account"`` and
            ``"contact"`` are accepted too.
        type: the collection type, one of ``COLLECTION_TYPES``; ``"custom"`` (default) for own data.

    Raises:
        errors.ConfigError: a value breaks the API's rules; the message names the rule.
    """

    name: str
    scope: Scope = Scope.ACCOUNT
    type: str = "custom"

    def __post_init__(self) -> None:
        name: object = self.name
        if not isinstance(name, str) or not 2 <= len(name) <= 255:
            raise errors.ConfigError(
                f"collection name {name!r} must be a string of 2 to 255 characters"
            )
        if _COLLECTION_NAME.fullmatch(name) is None:
            raise errors.ConfigError(
                f"collection name {name!r} may only use letters, digits, '-' and '_' and must not"
                " start with a digit (pattern ^[-A-Za-z_][-A-Za-z0-9_]{1,255}$)"
            )
        try:
            scope = Scope(self.scope)
        except ValueError:
            raise errors.ConfigError(
                f"collection scope {self.scope!r} is not one of 'account', 'contact'"
            ) from None
        object.__setattr__(self, "scope", scope)
        if self.type not in COLLECTION_TYPES:
            allowed = ", ".join(sorted(COLLECTION_TYPES))
            raise errors.ConfigError(
                f"collection type {self.type!r} is not one of: {allowed}"
                " (use 'custom' for own data)"
            )

    def envelope(self) -> tuple[bytes, bytes]:
        """Return the bytes before and after the records of a request body for this collection.

        A body is ``prefix + b",".join(records) + suffix``.
        """
        prefix = b"".join(
            (
                b'{"collectionName":',
                orjson.dumps(self.name),
                b',"collectionScope":',
                orjson.dumps(self.scope.value),
                b',"collectionType":',
                orjson.dumps(self.type),
                b',"records":[',
            )
        )
        return prefix, b"]}"


def identity_of(key: str, contact: tuple[str, str] | None) -> tuple[str, str, str] | str:
    """What "the same record" means to the API: the key (account scope), or the key per contact.

    Args:
        key: the record's key.
        contact: ``(identifier, value)`` of the owning contact, or ``None``.
    """
    return key if contact is None else (contact[0], contact[1], key)


IdentityHashes = dict[int, None]
"""The hashes of some records' identities, as the keys of a dict (the values are ``None``).

Not a set: a dict of ints only is not tracked by the garbage collector, while a set is, and
each full collection visited every element of every set: the batches in flight held hundreds
of thousands, and a full collection on the event loop took 60-70 ms."""


def hash_identities(identities: Iterable[object]) -> IdentityHashes:
    """The hashes of ``identities`` (one per record: run it off the event loop for a body)."""
    return dict.fromkeys(map(hash, identities))


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """A valid record, encoded once, ready to go into a request body.

    Args:
        key: the record's key (a string, as sent).
        contact: ``(identifier, value)`` of the owning contact for contact scope, else ``None``.
        data: the record's JSON exactly as it goes into the body.
        source: where the record came from, when known.
    """

    key: str
    contact: tuple[str, str] | None
    data: bytes
    source: Source | None

    @property
    def identity(self) -> tuple[str, str, str] | str:
        """What "the same record" means to the API: the key, or (identifier, value, key)."""
        return identity_of(self.key, self.contact)


# Building frozen dataclasses field by field through their slots skips the generated __init__'s
# per-field object.__setattr__ calls: about half the cost, on the hot path of every record.
_new = object.__new__
_set_origin = cast(Any, Source).origin.__set__
_set_line = cast(Any, Source).line.__set__
_set_key = cast(Any, EncodedRecord).key.__set__
_set_contact = cast(Any, EncodedRecord).contact.__set__
_set_data = cast(Any, EncodedRecord).data.__set__
_set_source = cast(Any, EncodedRecord).source.__set__


def _source(origin: str, line: int) -> Source:
    source: Source = _new(Source)
    _set_origin(source, origin)
    _set_line(source, line)
    return source


def _encoded(
    key: str, contact: tuple[str, str] | None, data: bytes, source: Source | None
) -> EncodedRecord:
    record: EncodedRecord = _new(EncodedRecord)
    _set_key(record, key)
    _set_contact(record, contact)
    _set_data(record, data)
    _set_source(record, source)
    return record


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record that broke a rule, kept so it can go to the dead-letter file.

    Args:
        error: the broken rule, with the record's key and source when known.
        raw: the offending line, or the record as JSON bytes; for the dead-letter file only, never
            logged.
    """

    error: errors.RecordError
    raw: bytes

    @classmethod
    def of(cls, error: errors.RecordError, obj: object) -> RejectedRecord:
        """Build a rejection for a Python record, encoding it as well as JSON allows.

        Args:
            error: the rule the record broke.
            obj: the record as it was given.
        """
        if isinstance(obj, bytes):
            return cls(error, obj)
        try:
            raw = orjson.dumps(obj, default=_lenient_default, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError:
            raw = orjson.dumps(repr(obj))
        return cls(error, raw)


def _lenient_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def _strict_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Decimal) and value.is_finite():
        return orjson.Fragment(str(value))  # its digits, exactly
    raise TypeError


def _fail(rule: str, message: str, key: str | None, source: Source | None) -> errors.RecordError:
    return errors.RecordError(rule, message, key=key, source=source)


def _check(
    obj: object, contact_scope: bool, source: Source | None
) -> tuple[str, tuple[str, str] | None, bool]:
    """Validate a parsed record; return (key, contact, clean).

    ``clean`` means the record already has exactly the fields the API wants with a string key, so
    its original bytes can go into the body unchanged.
    """
    if not isinstance(obj, Mapping):
        raise _fail(
            "not-object",
            'a record must be a JSON object like {"key": "...", "json": {...}}',
            None,
            source,
        )
    clean = True
    if "key" not in obj:
        raise _fail(
            "key-missing", 'add a "key" field holding the record\'s unique id', None, source
        )
    key = obj["key"]
    if type(key) is not str:
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
            clean = False
        else:
            raise _fail(
                "key-type",
                f'"key" must be a string (or an integer), not {_json_type(key)}',
                None,
                source,
            )
    if not key.strip():
        raise _fail("key-empty", '"key" must not be empty or only whitespace', None, source)
    allowed = _CONTACT_FIELDS if contact_scope else _ACCOUNT_FIELDS
    if obj.keys() != allowed:
        for field in obj:
            if field not in _CONTACT_FIELDS:
                shown = field if isinstance(field, str) and len(field) <= 40 else "(a long name)"
                raise _fail(
                    "unknown-field",
                    f"unknown top-level field {shown!r}: a record may only have"
                    ' "key", "json" and "contactIdentity"; move other data inside "json"',
                    key,
                    source,
                )
        # account scope with a contactIdentity: ignored (dropped) as the contract says
        clean = False
    if "json" not in obj:
        raise _fail("json-missing", 'add a "json" field holding the record\'s data', key, source)
    if not isinstance(obj["json"], Mapping):
        raise _fail(
            "json-type",
            f'"json" must be a JSON object, not {_json_type(obj["json"])}',
            key,
            source,
        )
    contact: tuple[str, str] | None = None
    if contact_scope:
        contact = _check_contact(obj, key, source)
    return key, contact, clean


def _check_contact(obj: Mapping[Any, Any], key: str, source: Source | None) -> tuple[str, str]:
    if "contactIdentity" not in obj:
        raise _fail(
            "contact-identity-missing",
            'a contact-scoped record needs "contactIdentity": {"identifier": "email",'
            ' "value": "..."}',
            key,
            source,
        )
    identity = obj["contactIdentity"]
    if not isinstance(identity, Mapping) or identity.keys() != _IDENTITY_FIELDS:
        raise _fail(
            "contact-identity-type",
            '"contactIdentity" must be an object with exactly "identifier" and "value"',
            key,
            source,
        )
    identifier = identity["identifier"]
    if not isinstance(identifier, str) or (
        identifier not in _STANDARD_IDENTIFIERS and _CUSTOM_IDENTIFIER.fullmatch(identifier) is None
    ):
        raise _fail(
            "contact-identifier",
            '"identifier" must be "email", "mobileNumber", "contactId" or a custom identifier'
            " name of at most 50 characters of letters, digits, '-' and '_'",
            key,
            source,
        )
    value = identity["value"]
    if not isinstance(value, str) or not value or len(value) > _MAX_CONTACT_VALUE:
        raise _fail(
            "contact-value",
            '"value" of "contactIdentity" must be a non-empty string of at most 256 characters',
            key,
            source,
        )
    return (identifier, value)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


def _maybe_nested_array(raw: bytes, start: int = 0, end: int | None = None) -> bool:
    """Cheap pre-filter: could ``raw[start:end]`` hold an array directly inside an array?"""
    return _nested_array_candidate(raw, start, len(raw) if end is None else end) != -1


def _nested_array_candidate(raw: bytes, start: int, end: int) -> int:
    """Where the first ``[`` of ``raw[start:end]`` that may open an array inside an array is, or -1.

    Structurally a ``[`` follows (after optional whitespace) ``:`` for an object member, or ``[`` /
    ``,`` for an array element; anything else before it means it sits inside a string. So only a
    ``[`` after ``[`` or ``,`` is a candidate (false positives only from strings).
    """
    find = raw.find
    i = find(b"[", start, end)
    while i != -1:
        if i > start and raw[i - 1] != _COLON:  # compact JSON: one comparison per bracket
            j = i - 1
            c = raw[j]
            while c in _WHITESPACE and j > start:
                j -= 1
                c = raw[j]
            if c in _ELEMENT_BEFORE:
                return i
        i = find(b"[", i + 1, end)
    return -1


def _has_nested_array(value: object) -> bool:
    stack = [value]
    pop = stack.pop
    push = stack.extend
    while stack:
        item = pop()
        if type(item) is dict:
            push(item.values())
        elif type(item) is list:
            for element in item:
                if type(element) is list:
                    return True
            push(item)
    return False


_NESTED_ARRAY_MESSAGE = (
    '"json" holds an array directly inside an array, which the API rejects; wrap the inner arrays'
    ' in objects, e.g. [{"values": [...]}]'
)


def encode_record(
    obj: object, collection: Collection, *, source: Source | None = None
) -> EncodedRecord:
    """Validate a record given as a Python mapping and encode it once.

    Integer keys are accepted and sent as their decimal string (the API wants string keys); floats,
    booleans, null and objects are rejected. For an account-scoped collection a ``contactIdentity``
    is ignored (not sent). Numbers are written exactly: ``int`` of any size, ``float`` as the
    shortest text that reads back as the same float, a finite ``decimal.Decimal`` as its digits;
    NaN and infinities are rejected (``json-unserializable``).

    Args:
        obj: a mapping with ``key``, ``json`` and (contact scope) ``contactIdentity``.
        collection: the collection the record goes to (its scope decides the rules).
        source: where the record came from, carried into errors and outcomes.

    Raises:
        errors.RecordError: the record breaks a rule; ``rule`` says which.
    """
    contact_scope = collection.scope is Scope.CONTACT
    key, contact, _ = _check(obj, contact_scope, source)
    assert isinstance(obj, Mapping)
    record: dict[str, Any] = {"key": key}
    if contact is not None:
        record["contactIdentity"] = {"identifier": contact[0], "value": contact[1]}
    record["json"] = obj["json"]
    data: bytes | None
    try:
        data = orjson.dumps(record, default=_strict_default)
    except orjson.JSONEncodeError:
        data = _dumps_big_integers(record)  # orjson writes integers up to 64 bits only
    if data is None or (b"null" in data and _has_non_finite(record["json"])):
        raise _fail(
            "json-unserializable",
            '"json" holds a value JSON cannot represent (e.g. a set, bytes, NaN or infinity);'
            " convert it to a string, number, list or object",
            key,
            source,
        )
    if _maybe_nested_array(data) and _has_nested_array(orjson.loads(data)["json"]):
        raise _fail("json-nested-array", _NESTED_ARRAY_MESSAGE, key, source)
    return EncodedRecord(key, contact, data, source)


_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def _dumps_big_integers(record: dict[str, Any]) -> bytes | None:
    """Encode a record holding integers beyond 64 bits exactly (as their digits), or None."""

    def exact(value: object) -> object:
        if type(value) is int and not _INT64_MIN <= value <= _UINT64_MAX:
            return orjson.Fragment(str(value))
        if isinstance(value, Mapping):
            return {name: exact(item) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [exact(item) for item in value]
        return value

    try:
        return orjson.dumps(exact(record), default=_strict_default)
    except (orjson.JSONEncodeError, ValueError):  # ValueError: more digits than str() allows
        return None


def _has_non_finite(value: object) -> bool:
    """Whether a NaN or an infinity (which orjson writes as null) is somewhere in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if item != item or item in (_INFINITY, -_INFINITY):
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


_INFINITY = float("inf")


def encode_line(line: bytes, collection: Collection, *, source: Source) -> EncodedRecord:
    """Validate one JSON Lines line and encode it as a record.

    When the line already is exactly what the API wants (only the allowed fields, a string key), the
    record's ``data`` is the line's own bytes without surrounding whitespace: nothing is serialized
    again. Otherwise only the members that change are edited in the line's bytes (an integer key
    becomes a string of the same digits, an ignored ``contactIdentity`` is dropped in account
    scope): the ``json`` member always goes out byte for byte.

    Args:
        line: the line's bytes (a trailing newline or CR is allowed).
        collection: the collection the record goes to (its scope decides the rules).
        source: the line's origin and number, carried into errors and outcomes.

    Raises:
        errors.RecordError: the line breaks a rule; ``rule`` says which.
    """
    return _encode_line(line.strip(), collection.scope is Scope.CONTACT, source)


def _encode_line(raw: bytes, contact_scope: bool, source: Source) -> EncodedRecord:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        if raw.startswith(_OVERSIZED) and (found := _oversized(raw))[1] is not raw:
            raise _fail("record-too-large", found[0], None, source) from None
        raise _json_syntax(source) from None
    return _encode_parsed(obj, raw, contact_scope, source)


# A line too long for any body is not kept: the reader (``sources``) puts this line in its place,
# which no JSON text can be (it starts with a NUL byte), so the parser rejects it wherever it runs.
OVERSIZED_LINE_START = b"\x00record-too-large\x00"
"""How every line ``oversized_line`` makes starts."""
_OVERSIZED = OVERSIZED_LINE_START


def oversized_line(size: int, limit: int, prefix: bytes) -> bytes:
    """The line a reader puts in place of a line of ``size`` bytes longer than ``limit``.

    The parser rejects it with the rule ``record-too-large``, keeping ``prefix`` (the line's
    first bytes, at most a few kilobytes) as the record of the dead letter.

    Args:
        size: the line's length in bytes.
        limit: the longest line accepted.
        prefix: the start of the line, without newlines.
    """
    return b"%s%d\x00%d\x00%s" % (_OVERSIZED, size, limit, prefix)


def _oversized(raw: bytes) -> tuple[str, bytes]:
    """The message and kept prefix of a line ``oversized_line`` made (or a json-syntax one's)."""
    try:
        size, limit, prefix = raw[len(_OVERSIZED) :].split(b"\x00", 2)
        int(size), int(limit)
    except ValueError:  # a line that only looks like one: it is not JSON
        return _JSON_SYNTAX_MESSAGE, raw
    message = (
        f"the line is {int(size)} bytes, longer than the largest record a request body can hold"
        f" ({int(limit)} bytes); it was skipped as it was read, and only its first"
        f" {len(prefix)} bytes are kept in this dead letter"
    )
    return message, prefix


_JSON_SYNTAX_MESSAGE = (
    "the line is not valid UTF-8 JSON; each line must hold one complete JSON object"
)


def _json_syntax(source: Source) -> errors.RecordError:
    return _fail("json-syntax", _JSON_SYNTAX_MESSAGE, None, source)


def _encode_parsed(
    obj: object, raw: bytes, contact_scope: bool, source: Source | None
) -> EncodedRecord:
    members: list[_Member] | None = None
    integer_key: _Member | None = None
    if type(obj) is dict:
        if _may_repeat(raw, 0, len(raw), _ALL_NAMES):
            members = _members(raw)
            _check_unique(members, obj, source)
        if type(obj.get("key")) in (int, float):
            # An integer key is sent as the digits it is written with: orjson reads one beyond
            # 64 bits as a float, and a float turned back into text would lose digits.
            members = _members(raw) if members is None else members
            integer_key = _member(members, "key")
            text = raw[integer_key.value_start : integer_key.value_end]
            if _INTEGER.fullmatch(text) is not None:
                obj = {**obj, "key": text.decode()}
            else:
                integer_key = None
    key, contact, clean = _check(obj, contact_scope, source)
    assert isinstance(obj, Mapping)
    if integer_key is not None or not clean:
        members = _members(raw) if members is None else members
        edits: list[tuple[int, int, bytes]] = []
        if integer_key is not None:
            start, end = integer_key.value_start, integer_key.value_end
            edits.append((start, end, b'"' + raw[start:end] + b'"'))
        if not clean:  # account scope: the ignored contactIdentity is not sent
            edits.append(_without(members, "contactIdentity"))
        raw = _splice(raw, edits)
    if _maybe_nested_array(raw) and _has_nested_array(obj["json"]):
        raise _fail("json-nested-array", _NESTED_ARRAY_MESSAGE, key, source)
    return _encoded(key, contact, raw, source)


# --------------------------------------------------------------------------- top-level members
# Editing a line in place needs where each top-level member starts and ends. The line already
# parsed, so it is valid JSON: these patterns only have to skip over strings and brackets.

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(rb"[^,}\] \t\r\n]+")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")
_OPENING = frozenset(b"[{")
_QUOTE, _CLOSE_OBJECT = ord('"'), ord("}")
_ALL_NAMES = (b'"key"', b'"json"', b'"contactIdentity"')
_WS = rb"[ \t\r\n]*"
# A string's contents (captured) without its quotes; raw control characters, which JSON does not
# allow in a string, never match, so a captured string without a backslash is its own text.
_STRING_GROUP = rb'"([^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*)"'


# The same strings without escapes: the captured bytes are then the string's own text.
_PLAIN_STRING_GROUP = rb'"([^"\\\x00-\x1f]*)"'


def _head(layout: bytes, *, compact: bool = False) -> re.Pattern[bytes]:
    """The start of a line, up to the value of its "json" member: ``S`` stands for a string
    (captured), a space for optional whitespace. ``compact``: no whitespace, strings without
    escapes (what most writers produce, matched in a third of the general pattern's time)."""
    space, string = (b"", _PLAIN_STRING_GROUP) if compact else (_WS, _STRING_GROUP)
    pattern = layout.replace(b" ", space).replace(b"S", string)
    return re.compile(pattern.replace(b"{", rb"\{").replace(b"}", rb"\}"))


_ACCOUNT_LAYOUT = b'{ "key" : S , "json" : '
_CONTACT_LAYOUT = (
    b'{ "key" : S , "contactIdentity" : { "identifier" : S , "value" : S } , "json" : '
)
_ACCOUNT_HEAD = _head(_ACCOUNT_LAYOUT)
_CONTACT_HEAD = _head(_CONTACT_LAYOUT)
_COMPACT_ACCOUNT_HEAD = _head(_ACCOUNT_LAYOUT, compact=True)
_COMPACT_CONTACT_HEAD = _head(_CONTACT_LAYOUT, compact=True)
_ACCOUNT_NAMES = _ALL_NAMES[:2]


@dataclass(frozen=True, slots=True)
class _Member:
    name: str
    start: int  # where its name starts
    value_start: int
    value_end: int


def _may_repeat(data: bytes, start: int, end: int, names: tuple[bytes, ...]) -> bool:
    """Cheap pre-filter: could the object in ``data[start:end]`` name one of ``names`` twice?

    A name spelled with escapes (``"k\\u0065y"``) is only possible where ``\\u`` appears; else
    each name must appear literally at least twice.
    """
    if data.find(b"\\u", start, end) != -1:
        return True
    count = data.count
    return any(count(name, start, end) > 1 for name in names)


def _members(data: bytes) -> list[_Member]:
    """The top-level members of the JSON object ``data`` (valid JSON), in order."""
    space = _after_space
    position = space(data, 1)
    members: list[_Member] = []
    if data[position] == _CLOSE_OBJECT:
        return members
    while True:
        match = _STRING.match(data, position)
        assert match is not None
        quoted = match.group()
        name = orjson.loads(quoted) if b"\\" in quoted else quoted[1:-1].decode()
        value_start = space(data, space(data, match.end()) + 1)  # past the colon
        value_end = _value_end(data, value_start)
        members.append(_Member(name, position, value_start, value_end))
        position = space(data, value_end)
        if data[position] == _CLOSE_OBJECT:
            return members
        position = space(data, position + 1)  # past the comma


def _after_space(data: bytes, position: int) -> int:
    while data[position] in _WHITESPACE:
        position += 1
    return position


def _value_end(data: bytes, position: int) -> int:
    first = data[position]
    if first == _QUOTE:
        match = _STRING.match(data, position)
    elif first in _OPENING:
        depth = 0
        search = _STRUCTURE.search
        while True:
            match = search(data, position)
            assert match is not None
            if data[match.start()] == _QUOTE:
                match = _STRING.match(data, match.start())
                assert match is not None
                position = match.end()
                continue
            position = match.end()
            depth += 1 if data[match.start()] in _OPENING else -1
            if not depth:
                return position
    else:
        match = _SCALAR.match(data, position)
    assert match is not None
    return match.end()


def _member(members: list[_Member], name: str) -> _Member:
    return next(member for member in members if member.name == name)


def _check_unique(members: list[_Member], obj: Mapping[Any, Any], source: Source | None) -> None:
    seen: set[str] = set()
    for member in members:
        if member.name in seen:
            key = obj.get("key")
            shown = member.name if len(member.name) <= 40 else "(a long name)"
            raise _fail(
                "record-duplicate-field",
                f"the field {shown!r} appears more than once in the record; keep one (which"
                " one counts would be up to whoever reads it)",
                key if type(key) is str else None,
                source,
            )
        seen.add(member.name)


def _without(members: list[_Member], name: str) -> tuple[int, int, bytes]:
    """The edit that removes member ``name``, with its comma (the object has other members)."""
    index = next(i for i, member in enumerate(members) if member.name == name)
    if index + 1 < len(members):
        return members[index].start, members[index + 1].start, b""
    return members[index - 1].value_end, members[index].value_end, b""


def _splice(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    parts: list[bytes] = []
    position = 0
    for start, end, replacement in sorted(edits):
        parts += (data[position:start], replacement)
        position = end
    parts.append(data[position:])
    return b"".join(parts)

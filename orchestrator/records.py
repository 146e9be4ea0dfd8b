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
=========================== ==========================================================
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson

from orchestrator import errors
from orchestrator.provenance import Source

__all__ = [
    "COLLECTION_TYPES",
    "RULES",
    "Collection",
    "EncodedRecord",
    "RejectedRecord",
    "Scope",
    "encode_line",
    "encode_record",
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
    }
)
"""The ids of the record rules above (``batching`` adds ``record-too-large``)."""

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
    """Cheap pre-filter: could ``raw[start:end]`` hold an array directly inside an array?

    Structurally a ``[`` follows (after optional whitespace) ``:`` for an object member, or ``[`` /
    ``,`` for an array element; anything else before it means it sits inside a string. So only a
    ``[`` after ``[`` or ``,`` is a candidate (false positives only from strings).
    """
    if end is None:
        end = len(raw)
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
                return True
        i = find(b"[", i + 1, end)
    return False


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
    is ignored (not sent).

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
    try:
        data = orjson.dumps(record, default=_strict_default)
    except orjson.JSONEncodeError:
        raise _fail(
            "json-unserializable",
            '"json" holds a value JSON cannot represent (e.g. a set, bytes, NaN keys, or an'
            " integer beyond 64 bits); convert it to a string, number, list or object",
            key,
            source,
        ) from None
    if _maybe_nested_array(data) and _has_nested_array(orjson.loads(data)["json"]):
        raise _fail("json-nested-array", _NESTED_ARRAY_MESSAGE, key, source)
    return EncodedRecord(key, contact, data, source)


def encode_line(line: bytes, collection: Collection, *, source: Source) -> EncodedRecord:
    """Validate one JSON Lines line and encode it as a record.

    When the line already is exactly what the API wants (only the allowed fields, a string key), the
    record's ``data`` is the line's own bytes without surrounding whitespace: nothing is serialized
    again. Otherwise the record is re-encoded with orjson (an integer key becomes a string, an
    ignored ``contactIdentity`` is dropped in account scope).

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
        raise _json_syntax(source) from None
    return _encode_parsed(obj, raw, contact_scope, source)


_JSON_SYNTAX_MESSAGE = (
    "the line is not valid UTF-8 JSON; each line must hold one complete JSON object"
)


def _json_syntax(source: Source) -> errors.RecordError:
    return _fail("json-syntax", _JSON_SYNTAX_MESSAGE, None, source)


def _encode_parsed(
    obj: object, raw: bytes, contact_scope: bool, source: Source | None
) -> EncodedRecord:
    key, contact, clean = _check(obj, contact_scope, source)
    assert isinstance(obj, Mapping)
    if not clean:
        record: dict[str, Any] = {"key": key}
        if contact is not None:
            record["contactIdentity"] = {"identifier": contact[0], "value": contact[1]}
        record["json"] = obj["json"]
        raw = orjson.dumps(record)
    if _maybe_nested_array(raw) and _has_nested_array(obj["json"]):
        raise _fail("json-nested-array", _NESTED_ARRAY_MESSAGE, key, source)
    return _encoded(key, contact, raw, source)

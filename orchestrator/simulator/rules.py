"""The Insight data API's rules for a bulk import body, as the simulator enforces them.

This module is part of the test oracle: it duplicates the API's constants instead of importing
the client's record rules, so a mistake on one side is caught by the other. Two layers, like the
real API: :func:`validate_body` refuses a whole body (``400 insightData:badJson``), and
:func:`analyse_records` turns per-record problems into the failures of a finished import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COLLECTION_SCOPES",
    "COLLECTION_TYPES",
    "KNOWN_IDENTIFIERS",
    "Analysis",
    "BodyError",
    "RecordFailure",
    "analyse_records",
    "default_contact_exists",
    "validate_body",
]

COLLECTION_SCOPES = frozenset({"account", "contact"})
COLLECTION_TYPES = frozenset(
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
KNOWN_IDENTIFIERS = frozenset({"email", "mobileNumber", "contactId"})

_COLLECTION_NAME = re.compile(r"[-A-Za-z_][-A-Za-z0-9_]{1,255}")
_CUSTOM_IDENTIFIER = re.compile(r"[-A-Za-z0-9_]{1,50}")
_JSON_FIELD_NAME = re.compile(r"[-A-Za-z0-9_]+")
_MAX_COLLECTION_NAME = 255
_MAX_IDENTITY_VALUE = 256
_BODY_FIELDS = frozenset({"collectionName", "collectionScope", "collectionType", "records"})
_ACCOUNT_RECORD_FIELDS = frozenset({"key", "json"})
_CONTACT_RECORD_FIELDS = frozenset({"key", "json", "contactIdentity"})
_IDENTITY_FIELDS = frozenset({"identifier", "value"})
# A body with thousands of broken records gets a readable error, not a megabyte of details.
_MAX_DETAILS = 50

# Field names repeat across records: remembering the valid ones makes the deep check a set lookup.
# Bounded, because some data uses ids as field names.
_MAX_REMEMBERED_NAMES = 100_000


class KnownFieldNames:
    """Field names already found valid, remembered by their owner (a simulator) across bodies."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: set[str] = set()


class BodyError(Exception):
    """The body is refused as a whole: ``400 insightData:badJson``.

    Args:
        details: ``(item, description)`` pairs, one per violation found (at most a few dozen).
    """

    def __init__(self, details: list[tuple[str, str]]) -> None:
        self.details = details
        super().__init__("; ".join(f"{item}: {text}" for item, text in details))


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """One record the import did not apply, as the finished status lists it.

    Args:
        index: the record's position in the body.
        reason: the API's ``failureReason`` word, e.g. ``"DuplicateKey"``.
        detail: one human sentence for ``details``.
    """

    index: int
    reason: str
    detail: str


@dataclass(slots=True)
class Analysis:
    """What processing one import yields: the records to upsert and the failures.

    Args:
        upserts: storage key -> record, in body order, last occurrence of a key only.
        failures: the records not applied, in body order.
    """

    upserts: dict[Any, dict[str, Any]] = field(default_factory=dict)
    failures: list[RecordFailure] = field(default_factory=list)


def validate_body(body: Any) -> tuple[str, str, str, list[dict[str, Any]]]:
    """Check a parsed body against the API's body-level rules in one pass over the records.

    Args:
        body: the parsed JSON body.

    Returns:
        ``(collection_name, collection_scope, collection_type, records)``.

    Raises:
        BodyError: with every violation found (up to a cap).
    """
    if not isinstance(body, dict):
        raise BodyError([("body", "The request body must be a JSON object.")])
    details: list[tuple[str, str]] = []
    for extra in sorted(set(body) - _BODY_FIELDS):
        details.append((extra, "Unknown field."))
    name = body.get("collectionName")
    if not isinstance(name, str):
        details.append(("collectionName", "Required; a string of 2-255 characters."))
    elif len(name) > _MAX_COLLECTION_NAME or _COLLECTION_NAME.fullmatch(name) is None:
        details.append(
            (
                "collectionName",
                "Must be 2-255 characters of [-A-Za-z0-9_] and must not start with a digit.",
            )
        )
    scope = body.get("collectionScope")
    if scope not in COLLECTION_SCOPES:
        details.append(("collectionScope", "Required; one of: account, contact."))
    ctype = body.get("collectionType")
    if ctype not in COLLECTION_TYPES:
        details.append(
            ("collectionType", "Required; one of: " + ", ".join(sorted(COLLECTION_TYPES)) + ".")
        )
    records = body.get("records")
    if not isinstance(records, list) or not records:
        details.append(("records", "Required; a non-empty array of records."))
    elif scope in COLLECTION_SCOPES:
        _validate_records(records, scope == "contact", details)
    if details:
        raise BodyError(details[:_MAX_DETAILS])
    return name, scope, ctype, records  # type: ignore[return-value]  # checked above


def _validate_records(
    records: list[Any], contact_scope: bool, details: list[tuple[str, str]]
) -> None:
    allowed = _CONTACT_RECORD_FIELDS if contact_scope else _ACCOUNT_RECORD_FIELDS
    for index, record in enumerate(records):
        if len(details) >= _MAX_DETAILS:
            return
        # The common case costs one type check, one set comparison and two isinstance calls.
        if (
            type(record) is dict
            and record.keys() == allowed
            and type(record["key"]) is str
            and type(record["json"]) is dict
            and (not contact_scope or _identity_ok(record["contactIdentity"]))
        ):
            continue
        details.extend(_record_violations(index, record, allowed, contact_scope))


def _identity_ok(identity: Any) -> bool:
    if type(identity) is not dict or identity.keys() != _IDENTITY_FIELDS:
        return False
    identifier, value = identity["identifier"], identity["value"]
    return (
        type(identifier) is str
        and (
            identifier in KNOWN_IDENTIFIERS or _CUSTOM_IDENTIFIER.fullmatch(identifier) is not None
        )
        and type(value) is str
        and len(value) <= _MAX_IDENTITY_VALUE
    )


def _record_violations(
    index: int, record: Any, allowed: frozenset[str], contact_scope: bool
) -> list[tuple[str, str]]:
    where = f"records[{index}]"
    if not isinstance(record, dict):
        return [(where, "A record must be a JSON object.")]
    found: list[tuple[str, str]] = []
    for extra in sorted(set(record) - allowed):
        found.append((f"{where}.{extra}", "Unknown field."))
    if not isinstance(record.get("key"), str):
        found.append((f"{where}.key", "Required; a string."))
    if not isinstance(record.get("json"), dict):
        found.append((f"{where}.json", "Required; a JSON object."))
    if contact_scope and not _identity_ok(record.get("contactIdentity")):
        found.append(
            (
                f"{where}.contactIdentity",
                "Required for contact scope: exactly {identifier, value}; identifier email, "
                "mobileNumber, contactId or a custom name of up to 50 [-A-Za-z0-9_]; "
                "value a string of up to 256 characters.",
            )
        )
    return found


def default_contact_exists(value: str) -> bool:
    """The simulator's default contact book: every contact exists except ``*.invalid`` ones.

    Args:
        value: the ``contactIdentity.value`` of a record.
    """
    return not value.lower().endswith(".invalid")


def analyse_records(
    records: Iterable[dict[str, Any]],
    *,
    contact_scope: bool,
    contact_exists: Callable[[str], bool],
    known: KnownFieldNames | None = None,
) -> Analysis:
    """Process validated records the way the API does: per-record failures, last key wins.

    A key seen again later in the same import fails the earlier occurrence(s) with
    ``DuplicateKey`` (per contact for contact scope); the last one is then checked on its own.

    Args:
        records: records that passed :func:`validate_body`.
        contact_scope: whether the collection is contact-scoped.
        contact_exists: tells whether a contact value is known to the account.
        known: field names found valid before (by the caller's simulator); else this call's.
    """
    names = (known if known is not None else KnownFieldNames()).names
    result = Analysis()
    last_index: dict[Any, int] = {}
    records = list(records)
    for index, record in enumerate(records):
        if contact_scope:
            identity = record["contactIdentity"]
            storage_key: Any = (identity["identifier"], identity["value"], record["key"])
        else:
            storage_key = record["key"]
        last_index[storage_key] = index
    for storage_key, index in last_index.items():
        record = records[index]
        failure = _record_failure(index, record, contact_scope, contact_exists, names)
        if failure is None:
            result.upserts[storage_key] = record
        else:
            result.failures.append(failure)
    if len(last_index) != len(records):
        kept = set(last_index.values())
        result.failures.extend(
            RecordFailure(index, "DuplicateKey", "A later record in this import has the same key.")
            for index in range(len(records))
            if index not in kept
        )
    result.failures.sort(key=lambda failure: failure.index)
    return result


def _record_failure(
    index: int,
    record: dict[str, Any],
    contact_scope: bool,
    contact_exists: Callable[[str], bool],
    names: set[str],
) -> RecordFailure | None:
    if contact_scope:
        identity = record["contactIdentity"]
        if not contact_exists(identity["value"]):
            identifier = identity["identifier"]
            if identifier == "email":
                return RecordFailure(
                    index, "ContactEmailDoesNotExist", "No contact has this email."
                )
            if identifier == "contactId":
                return RecordFailure(index, "ContactIdDoesNotExist", "No contact has this id.")
            return RecordFailure(
                index, "InvalidContactIdentifier", "No contact matches this identifier."
            )
    reason = _json_problem(record["json"], names)
    if reason is None:
        return None
    if reason == "JsonContainsNestedArray":
        return RecordFailure(index, reason, "An array directly inside an array is not allowed.")
    return RecordFailure(index, reason, "Field names may only contain [A-Za-z0-9_-].")


def _json_problem(value: dict[str, Any], names: set[str]) -> str | None:
    if not names.issuperset(value):
        return _json_problem_learning(value, names)
    # Every name is known to be valid (one C-level check): only the values can fail, and they
    # are checked in the same order as below, so the first problem found is the same.
    for item in value.values():
        kind = type(item)
        if kind is dict:
            problem = _json_problem(item, names)
            if problem is not None:
                return problem
        elif kind is list:
            problem = _array_problem(item, names)
            if problem is not None:
                return problem
    return None


def _json_problem_learning(value: dict[str, Any], names: set[str]) -> str | None:
    for name, item in value.items():
        if name not in names:
            if _JSON_FIELD_NAME.fullmatch(name) is None:
                return "JsonKeyInvalidCharacters"
            if len(names) < _MAX_REMEMBERED_NAMES:
                names.add(name)
        kind = type(item)
        if kind is dict:
            problem = _json_problem(item, names)
            if problem is not None:
                return problem
        elif kind is list:
            problem = _array_problem(item, names)
            if problem is not None:
                return problem
    return None


def _array_problem(items: list[Any], names: set[str]) -> str | None:
    for item in items:
        kind = type(item)
        if kind is list:
            return "JsonContainsNestedArray"
        if kind is dict:
            problem = _json_problem(item, names)
            if problem is not None:
                return problem
    return None

"""The wire types of the Insight data bulk import API and their parsers: what a status answer, a
submit answer and an error body hold, read defensively (the API's sets of words are open).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import orjson

from orchestrator.errors import ApiError, ApiErrorDetail
from orchestrator.logs import get_logger

__all__ = [
    "ImportState",
    "ImportStatus",
    "ImportSummary",
    "RecordFailure",
    "SubmitReceipt",
    "import_state",
    "parse_error_body",
]

_log = get_logger("orchestrator.wire")

_SUCCESS_WORDS: Final = frozenset({"Finished", "Complete"})
_FAILURE_WORDS: Final = frozenset(
    {
        "Failed",
        "RejectedByWatchdog",
        "InvalidFileFormat",
        "Unknown",
        "ExceedsAllowedContactLimit",
        "NotAvailableInThisVersion",
    }
)
_RUNNING_WORDS: Final = frozenset({"NotStarted", "Processing"})
_unknown_words_seen: set[str] = set()


class ImportState(enum.Enum):
    """Where an import stands, folded from the API's open set of status words."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """The counts a finished import reports."""

    total_records: int
    total_imported: int
    total_rejected: int


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """One record the API rejected; the record's contents (``json``) are deliberately dropped.

    Args:
        key: the record's key, when the API named it.
        reason: the API's ``failureReason`` (an open set of words, e.g. ``DuplicateKey``).
        details: the API's detail strings.
        contact_identity: ``(identifier, value)`` for a contact-scope record.
    """

    key: str | None
    reason: str
    details: tuple[str, ...]
    contact_identity: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class ImportStatus:
    """One status answer of an import.

    Args:
        import_id: the import's id.
        status: the raw status word the API sent.
        state: that word folded into running / succeeded / failed.
        summary: the counts, once the import is finished.
        failures: the per-record failures, once the import is finished.
    """

    import_id: str
    status: str
    state: ImportState
    summary: ImportSummary | None
    failures: tuple[RecordFailure, ...]


@dataclass(frozen=True, slots=True)
class SubmitReceipt:
    """What a successful bulk import submit returned, and what it took.

    Args:
        import_id: the id the API gave the import.
        attempts: PUT attempts made (``attempts - 1`` were re-sends).
        lost_responses: attempts whose answer was lost after the body was fully sent; each may
            have started a stray import that holds an account slot until it finishes.
    """

    import_id: str
    attempts: int
    lost_responses: int


def import_state(word: str) -> ImportState:
    """Fold an API status word into an :class:`ImportState`; unknown words count as running.

    Args:
        word: the ``status`` of a status answer.
    """
    if word in _SUCCESS_WORDS:
        return ImportState.SUCCEEDED
    if word in _FAILURE_WORDS:
        return ImportState.FAILED
    if word not in _RUNNING_WORDS and word not in _unknown_words_seen:
        _unknown_words_seen.add(word)
        _log.warning("status.unknown_word", status=word)
    return ImportState.RUNNING


def parse_error_body(raw: bytes) -> tuple[str | None, str | None, tuple[ApiErrorDetail, ...]]:
    """Read ``(errorCode, description, details)`` from an API error body, whatever it holds.

    Both documented detail shapes are read (``{"item", "description"}`` and ``{"item",
    "error"}``); a body that is not JSON, or not the expected shape, yields ``None``/empty parts.

    Args:
        raw: the answer's body bytes.
    """
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None, None, ()
    if not isinstance(data, dict):
        return None, None, ()
    code = data.get("errorCode")
    description = data.get("description", data.get("message"))
    details: list[ApiErrorDetail] = []
    raw_details = data.get("details")
    if isinstance(raw_details, list):
        for entry in raw_details:
            if isinstance(entry, dict):
                item = entry.get("item")
                text = entry.get("description", entry.get("error"))
                details.append(
                    ApiErrorDetail(
                        item=str(item) if item is not None else None,
                        description=str(text) if text is not None else None,
                    )
                )
            elif isinstance(entry, str):
                details.append(ApiErrorDetail(item=None, description=entry))
    return (
        str(code) if code is not None else None,
        str(description) if description is not None else None,
        tuple(details),
    )


def _parse_status(import_id: str, data: object) -> ImportStatus:
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise ApiError(
            f"the status answer of import {import_id} has no status word; "
            "check the base URL points at the Insight data API",
            status=200,
        )
    word: str = data["status"]
    summary = None
    raw_summary = data.get("summary")
    if isinstance(raw_summary, dict):
        summary = ImportSummary(
            total_records=int(raw_summary.get("totalRecords") or 0),
            total_imported=int(raw_summary.get("totalImported") or 0),
            total_rejected=int(raw_summary.get("totalRejected") or 0),
        )
    failures: list[RecordFailure] = []
    raw_failures = data.get("failures")
    if isinstance(raw_failures, list):
        for entry in raw_failures:
            if isinstance(entry, dict):
                failures.append(_parse_failure(entry))
    return ImportStatus(
        import_id=str(data.get("importId") or import_id),
        status=word,
        state=import_state(word),
        summary=summary,
        failures=tuple(failures),
    )


def _parse_failure(entry: dict[str, Any]) -> RecordFailure:
    key = entry.get("key")
    details = entry.get("details")
    identity = None
    owner = entry.get("collectionOwner")
    if isinstance(owner, dict):
        contact = owner.get("contactIdentity")
        if isinstance(contact, dict) and "identifier" in contact and "value" in contact:
            identity = (str(contact["identifier"]), str(contact["value"]))
    return RecordFailure(
        key=str(key) if key is not None else None,
        reason=str(entry.get("failureReason") or "Unknown"),
        details=tuple(str(d) for d in details) if isinstance(details, list) else (),
        contact_identity=identity,
    )

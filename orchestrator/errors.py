"""One exception tree for the whole library, grouped by what the caller can do about it.

    OrchestratorError                 base of everything raised here
    ├── ConfigError                   a setting is invalid: fix the configuration
    ├── InputError                    an input file cannot be read: fix the path or the file
    ├── RecordError                   one record breaks a rule: fix that record (the run goes on)
    ├── JournalError                  the journal cannot be read or written: fix the disk / path
    │   └── JournalMismatchError           the journal belongs to another run or the input changed
    └── ApiError                      the Insight data API answered with an error
        ├── AuthenticationError       401: check DOTDIGITAL_API_USER / DOTDIGITAL_API_PASSWORD
        ├── ForbiddenError            403: wrong region? check --region / --base-url
        ├── NotFoundError             404: the import id is unknown (or has expired)
        ├── BadRequestError           400: the body was refused as a whole
        ├── BodyTooLargeError         413: the body is over the API's limit (split it)
        ├── AccountFullError          429 too many active imports: wait for a slot, then retry
        ├── RateLimitedError          429 rate limit: wait ``retry_after`` seconds, then retry
        └── TransientError            5xx, connection reset, timeout: retried until the budget ends

Messages never contain credentials or record contents: a record is named by its key and its source
(``file:line``) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.provenance import Source

__all__ = [
    "AccountFullError",
    "ApiError",
    "ApiErrorDetail",
    "AuthenticationError",
    "BadRequestError",
    "BodyTooLargeError",
    "ConfigError",
    "ForbiddenError",
    "InputError",
    "JournalError",
    "JournalMismatchError",
    "NotFoundError",
    "OrchestratorError",
    "RateLimitedError",
    "RecordError",
    "TransientError",
]


class OrchestratorError(Exception):
    """Base class of every error raised by insight-orchestrator."""


class ConfigError(OrchestratorError):
    """A setting is invalid; the message names it and says what is allowed."""


class InputError(OrchestratorError):
    """An input cannot be read at all (missing file, not gzip, unreadable)."""


class RecordError(OrchestratorError):
    """One record breaks a rule of the Insight data API.

    Args:
        rule: a short stable identifier of the broken rule, e.g. ``"key-missing"``.
        message: what is wrong and how to fix it; never the record's contents.
        key: the record's key when it could be read.
        source: where the record came from (``file:line``), when known.
    """

    def __init__(
        self,
        rule: str,
        message: str,
        *,
        key: str | None = None,
        source: Source | None = None,
    ) -> None:
        self.rule = rule
        self.message = message
        self.key = key
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source is not None else ""
        which = f"record {self.key!r}" if self.key is not None else "record"
        return f"{where}{which} breaks rule {self.rule!r}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:  # keep keyword arguments through pickling
        return (_rebuild_record_error, (self.rule, self.message, self.key, self.source))


def _rebuild_record_error(
    rule: str, message: str, key: str | None, source: Source | None
) -> RecordError:
    return RecordError(rule, message, key=key, source=source)


class JournalError(OrchestratorError):
    """The journal could not be read or written; nothing after this point is recorded as done."""


class JournalMismatchError(JournalError):
    """The journal was written by a different run, or the input changed since it was written."""


@dataclass(frozen=True, slots=True)
class ApiErrorDetail:
    """One entry of an API error body's ``details`` list."""

    item: str | None
    description: str | None


class ApiError(OrchestratorError):
    """The API answered with an error status.

    Args:
        message: what happened and what to do about it.
        status: the HTTP status code (0 when no answer was received).
        error_code: the ``errorCode`` of the error body, e.g. ``"insightData:badJson"``.
        description: the ``description`` of the error body.
        details: the parsed ``details`` of the error body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_code: str | None = None,
        description: str | None = None,
        details: tuple[ApiErrorDetail, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.description = description
        self.details = details


class AuthenticationError(ApiError):
    """401: the API user or password is wrong; retrying cannot help."""


class ForbiddenError(ApiError):
    """403: usually the wrong regional host for this account; retrying cannot help."""


class NotFoundError(ApiError):
    """404: the import id is not known (or no longer kept) by the API."""


class BadRequestError(ApiError):
    """400: the API refused the body as a whole."""


class BodyTooLargeError(ApiError):
    """413: the body is over the API's size limit; split the batch and send again."""


class AccountFullError(ApiError):
    """429 too many active imports: the account's import slots are all taken; wait and retry."""


class RateLimitedError(ApiError):
    """429 rate limit: the account spent its calls for now.

    Args:
        retry_after: seconds to wait before the next call, from ``Retry-After`` or
            ``x-ratelimit-reset``.
    """

    def __init__(self, message: str, *, retry_after: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class TransientError(ApiError):
    """5xx, a reset connection or a timeout that outlived the retry budget."""

"""One exception tree for the whole library, grouped by what the caller can do about it.

    OrchestratorError                     base of everything raised here
    ├── ConfigurationError                fix the settings or credentials; retrying cannot help
    │   ├── ConfigError                   a setting is invalid (also a ValueError)
    │   ├── AuthenticationError   [api]   401: check DOTDIGITAL_API_USER / _PASSWORD
    │   └── ForbiddenError        [api]   403: wrong region? check the region or base URL
    ├── InvalidInputError                 fix the input: the file, record, body or import id
    │   ├── InputError                    an input file cannot be read: fix the path or file
    │   ├── RecordError                   one record breaks a rule (the run goes on)
    │   ├── BadRequestError       [api]   400: the body was refused as a whole
    │   ├── BodyTooLargeError     [api]   413: the body is over the API's limit (split it)
    │   ├── NotFoundError         [api]   404: the import id is unknown (or has expired)
    │   └── JournalMismatchError  [jrn]   the journal is another run's, or the input changed
    ├── RetryLaterError                   the same call can succeed later
    │   ├── AccountFullError      [api]   429 too many active imports: wait for a slot
    │   ├── RateLimitedError      [api]   429 rate limit: wait ``retry_after`` seconds
    │   └── TransientError                retried by the client itself until its budget ends
    │       ├── ServerError       [api]   5xx: the API is unwell
    │       └── TransportError            no answer: connection refused/reset, DNS, timeout
    ├── JournalError                      the journal cannot be read or written: fix disk/path
    │   ├── JournalMismatchError          (see above: marked [jrn])
    │   └── JournalStateError             a step out of order: not open, unknown batch
    └── ApiError                          an HTTP status came back (``status`` says which)
        └── every class marked [api]      (ApiError itself: an answer nothing else describes)

Two axes, as httpx draws its groups: the branches say what the caller can do; ``ApiError`` (an HTTP
status came back) and ``TransportError`` (no answer came back) say what happened on the wire.
Catch ``RetryLaterError`` to retry later, ``ConfigurationError`` to ask for other settings or
credentials, ``InvalidInputError`` to report the input.

Messages never contain credentials or record contents: a record is named by its key and its source
(``file:line``) only. They name library settings (``max_body_bytes``, ``fresh=True``), never
command-line flags: the command adds those.
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
    "ConfigurationError",
    "ForbiddenError",
    "InputError",
    "InvalidInputError",
    "JournalError",
    "JournalMismatchError",
    "JournalStateError",
    "NotFoundError",
    "OrchestratorError",
    "RateLimitedError",
    "RecordError",
    "RetryLaterError",
    "ServerError",
    "TransientError",
    "TransportError",
]


class OrchestratorError(Exception):
    """Base class of every error raised by insight-orchestrator."""


# -- what the caller can do -------------------------------------------------------------------


class ConfigurationError(OrchestratorError):
    """Fix the settings or the credentials: the same call fails again until they change."""


class InvalidInputError(OrchestratorError):
    """Fix the input (a file, a record, a request body, an import id): retrying it as is fails."""


class RetryLaterError(OrchestratorError):
    """Nothing is wrong with the call itself: the same call can succeed later."""


class TransientError(RetryLaterError):
    """A server error or no answer, retried by the client until its retry budget ran out."""


class JournalError(OrchestratorError):
    """The journal could not be read or written; nothing after this point is recorded as done."""


# -- the settings, the inputs and the journal --------------------------------------------------


class ConfigError(ConfigurationError, ValueError):
    """A setting is invalid; the message names it and says what is allowed."""


class InputError(InvalidInputError):
    """An input cannot be read at all (missing file, not gzip, unreadable)."""


class RecordError(InvalidInputError):
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


class JournalMismatchError(JournalError, InvalidInputError):
    """The journal was written by a different run, or the input changed since it was written."""


class JournalStateError(JournalError, ValueError):
    """A journal was asked for a step its state does not allow: it is not open, the batch is
    unknown, or the batch is in another phase (a programming error, or a journal edited by hand).
    """


# -- answers of the API, and no answer at all --------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiErrorDetail:
    """One entry of an API error body's ``details`` list."""

    item: str | None
    description: str | None


class ApiError(OrchestratorError):
    """The API answered with an error status.

    Args:
        message: what happened and what to do about it.
        status: the HTTP status code of the answer.
        error_code: the ``errorCode`` of the error body, e.g. ``"insightData:badJson"``.
        description: the ``description`` of the error body.
        details: the parsed ``details`` of the error body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: str | None = None,
        description: str | None = None,
        details: tuple[ApiErrorDetail, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.description = description
        self.details = details
        #: requests the failed call sent (its retries included), as the API saw them
        self.calls = 1


class AuthenticationError(ApiError, ConfigurationError):
    """401: the API user or password is wrong; retrying cannot help."""


class ForbiddenError(ApiError, ConfigurationError):
    """403: usually the wrong regional host for this account; retrying cannot help."""


class NotFoundError(ApiError, InvalidInputError):
    """404: the import id is not known (or no longer kept) by the API."""


class BadRequestError(ApiError, InvalidInputError):
    """400: the API refused the body as a whole."""


class BodyTooLargeError(ApiError, InvalidInputError):
    """413: the body is over the API's size limit; split the batch and send again."""


class AccountFullError(ApiError, RetryLaterError):
    """429 too many active imports: the account's import slots are all taken; wait and retry."""


class RateLimitedError(ApiError, RetryLaterError):
    """429 rate limit: the account spent its calls for now.

    Args:
        retry_after: seconds to wait before the next call, from ``Retry-After`` or
            ``x-ratelimit-reset``.
    """

    def __init__(self, message: str, *, retry_after: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(ApiError, TransientError):
    """5xx: the API failed to answer the call, also after the client's retries."""


class TransportError(TransientError):
    """No answer came back (connection refused or reset, DNS failure, timeout), also after the
    client's retries. A submit whose body was fully sent may still have started an import.
    """

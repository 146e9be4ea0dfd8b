"""insight-orchestrator: bulk imports into Dotdigital Insight data, fast, losing no record.

    async with Orchestrator(InsightClient(ClientSettings.from_env())) as orch:
        result = await orch.import_records(Collection("Orders", "contact", "orders"), records)

The public names are listed in ``__all__``; everything else is private.
"""

from orchestrator.batching import Batch, BatchAssembler, RecordRef
from orchestrator.client import (
    REGIONS,
    ClientSettings,
    ImportState,
    ImportStatus,
    ImportSummary,
    InsightClient,
    RecordFailure,
    RetryPolicy,
    SubmitReceipt,
)
from orchestrator.engine import Orchestrator
from orchestrator.errors import (
    AccountFullError,
    ApiError,
    AuthenticationError,
    BadRequestError,
    BodyTooLargeError,
    ConfigError,
    ForbiddenError,
    InputError,
    JournalError,
    JournalMismatch,
    NotFoundError,
    OrchestratorError,
    RateLimitedError,
    RecordError,
    TransientError,
)
from orchestrator.journal import DeadLetter, Journal, MemoryJournal, SqliteJournal
from orchestrator.outcomes import ImportOutcome, ImportResult, RunStats
from orchestrator.records import Collection, EncodedRecord, Scope, Source, encode_record
from orchestrator.settings import Settings

__all__ = [
    "REGIONS",
    "AccountFullError",
    "ApiError",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchAssembler",
    "BodyTooLargeError",
    "ClientSettings",
    "Collection",
    "ConfigError",
    "DeadLetter",
    "EncodedRecord",
    "ForbiddenError",
    "ImportOutcome",
    "ImportResult",
    "ImportState",
    "ImportStatus",
    "ImportSummary",
    "InputError",
    "InsightClient",
    "Journal",
    "JournalError",
    "JournalMismatch",
    "MemoryJournal",
    "NotFoundError",
    "Orchestrator",
    "OrchestratorError",
    "RateLimitedError",
    "RecordError",
    "RecordFailure",
    "RecordRef",
    "RetryPolicy",
    "RunStats",
    "Scope",
    "Settings",
    "Source",
    "SqliteJournal",
    "SubmitReceipt",
    "TransientError",
    "encode_record",
]

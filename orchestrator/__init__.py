"""insight-orchestrator: bulk imports into Dotdigital Insight data, fast, losing no record.

    async with Orchestrator(InsightClient(ClientSettings.from_env())) as orch:
        result = await orch.import_records(Collection("Orders", "contact", "orders"), records)

The public names are listed in ``__all__``; everything else is private. They are imported on
first use, so a process that needs one part (a parse worker needs only the record rules) does
not load the HTTP client and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.batching import Batch, BatchAssembler
    from orchestrator.client import REGIONS, ClientSettings, InsightClient, RetryPolicy
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
        JournalMismatchError,
        NotFoundError,
        OrchestratorError,
        RateLimitedError,
        RecordError,
        TransientError,
    )
    from orchestrator.journal import DeadLetter, Journal, MemoryJournal, SqliteJournal
    from orchestrator.outcomes import ImportOutcome, ImportResult, RunStats
    from orchestrator.provenance import Source
    from orchestrator.records import Collection, EncodedRecord, Scope, encode_record
    from orchestrator.refs import RecordRef
    from orchestrator.settings import Settings
    from orchestrator.wire import (
        ImportState,
        ImportStatus,
        ImportSummary,
        RecordFailure,
        SubmitReceipt,
    )

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
    "JournalMismatchError",
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

_MODULES: dict[str, str] = {
    "AccountFullError": "orchestrator.errors",
    "ApiError": "orchestrator.errors",
    "AuthenticationError": "orchestrator.errors",
    "BadRequestError": "orchestrator.errors",
    "Batch": "orchestrator.batching",
    "BatchAssembler": "orchestrator.batching",
    "BodyTooLargeError": "orchestrator.errors",
    "ClientSettings": "orchestrator.client",
    "Collection": "orchestrator.records",
    "ConfigError": "orchestrator.errors",
    "DeadLetter": "orchestrator.journal",
    "EncodedRecord": "orchestrator.records",
    "ForbiddenError": "orchestrator.errors",
    "ImportOutcome": "orchestrator.outcomes",
    "ImportResult": "orchestrator.outcomes",
    "ImportState": "orchestrator.wire",
    "ImportStatus": "orchestrator.wire",
    "ImportSummary": "orchestrator.wire",
    "InputError": "orchestrator.errors",
    "InsightClient": "orchestrator.client",
    "Journal": "orchestrator.journal",
    "JournalError": "orchestrator.errors",
    "JournalMismatchError": "orchestrator.errors",
    "MemoryJournal": "orchestrator.journal",
    "NotFoundError": "orchestrator.errors",
    "Orchestrator": "orchestrator.engine",
    "OrchestratorError": "orchestrator.errors",
    "REGIONS": "orchestrator.client",
    "RateLimitedError": "orchestrator.errors",
    "RecordError": "orchestrator.errors",
    "RecordFailure": "orchestrator.wire",
    "RecordRef": "orchestrator.refs",
    "RetryPolicy": "orchestrator.client",
    "RunStats": "orchestrator.outcomes",
    "Scope": "orchestrator.records",
    "Settings": "orchestrator.settings",
    "Source": "orchestrator.provenance",
    "SqliteJournal": "orchestrator.journal",
    "SubmitReceipt": "orchestrator.wire",
    "TransientError": "orchestrator.errors",
    "encode_record": "orchestrator.records",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

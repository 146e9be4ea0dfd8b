"""insight-orchestrator: bulk imports into Dotdigital Insight data, fast, losing no record.

    async with Orchestrator(InsightClient(ClientSettings.from_env())) as orch:
        result = await orch.import_records(Collection("Orders", "contact", "orders"), records)

The public names are listed once, in ``_PUBLIC`` (``__all__`` is made from it); everything else
is private. Each is imported on first use, so a process that needs one part (a parse worker needs
only the record rules) does not load the HTTP client and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What _PUBLIC below lists, for type checkers (``X as X``: an explicit re-export).
    from orchestrator.client import REGIONS as REGIONS
    from orchestrator.client import ClientSettings as ClientSettings
    from orchestrator.client import InsightClient as InsightClient
    from orchestrator.client import RetryPolicy as RetryPolicy
    from orchestrator.engine import Orchestrator as Orchestrator
    from orchestrator.errors import AccountFullError as AccountFullError
    from orchestrator.errors import ApiError as ApiError
    from orchestrator.errors import ApiErrorDetail as ApiErrorDetail
    from orchestrator.errors import AuthenticationError as AuthenticationError
    from orchestrator.errors import BadRequestError as BadRequestError
    from orchestrator.errors import BodyTooLargeError as BodyTooLargeError
    from orchestrator.errors import ConfigError as ConfigError
    from orchestrator.errors import ConfigurationError as ConfigurationError
    from orchestrator.errors import ForbiddenError as ForbiddenError
    from orchestrator.errors import InputError as InputError
    from orchestrator.errors import InvalidInputError as InvalidInputError
    from orchestrator.errors import JournalError as JournalError
    from orchestrator.errors import JournalMismatchError as JournalMismatchError
    from orchestrator.errors import JournalStateError as JournalStateError
    from orchestrator.errors import NotFoundError as NotFoundError
    from orchestrator.errors import OrchestratorError as OrchestratorError
    from orchestrator.errors import RateLimitedError as RateLimitedError
    from orchestrator.errors import RecordError as RecordError
    from orchestrator.errors import RetryLaterError as RetryLaterError
    from orchestrator.errors import ServerError as ServerError
    from orchestrator.errors import TransientError as TransientError
    from orchestrator.errors import TransportError as TransportError
    from orchestrator.journal import DeadLetter as DeadLetter
    from orchestrator.journal import Journal as Journal
    from orchestrator.journal import MemoryJournal as MemoryJournal
    from orchestrator.journal import SqliteJournal as SqliteJournal
    from orchestrator.outcomes import ImportOutcome as ImportOutcome
    from orchestrator.outcomes import ImportResult as ImportResult
    from orchestrator.outcomes import RunStats as RunStats
    from orchestrator.provenance import Source as Source
    from orchestrator.records import Collection as Collection
    from orchestrator.records import Scope as Scope
    from orchestrator.settings import Settings as Settings
    from orchestrator.simulator import Faults as Faults
    from orchestrator.simulator import Simulator as Simulator
    from orchestrator.simulator import SimulatorConfig as SimulatorConfig
    from orchestrator.wire import ImportState as ImportState
    from orchestrator.wire import ImportStatus as ImportStatus
    from orchestrator.wire import ImportSummary as ImportSummary
    from orchestrator.wire import RecordFailure as RecordFailure


# The public names, by the module each lives in: the one list. __all__ and the lookup below are
# made from it; the imports above repeat it for type checkers only (a test keeps them equal:
# reading them at run time would cost the import of ast and break bundles without sources).
_PUBLIC: dict[str, tuple[str, ...]] = {
    "orchestrator.client": ("REGIONS", "ClientSettings", "InsightClient", "RetryPolicy"),
    "orchestrator.engine": ("Orchestrator",),
    "orchestrator.errors": (
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
    ),
    "orchestrator.journal": ("DeadLetter", "Journal", "MemoryJournal", "SqliteJournal"),
    "orchestrator.outcomes": ("ImportOutcome", "ImportResult", "RunStats"),
    "orchestrator.provenance": ("Source",),
    "orchestrator.records": ("Collection", "Scope"),
    "orchestrator.settings": ("Settings",),
    "orchestrator.simulator": ("Faults", "Simulator", "SimulatorConfig"),
    "orchestrator.wire": ("ImportState", "ImportStatus", "ImportSummary", "RecordFailure"),
}
_MODULES = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULES, key=lambda name: (not name.isupper(), name))


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

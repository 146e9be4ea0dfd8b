"""The engine's settings: one frozen object with production defaults, validated on creation.

Every duration is given as a ``float`` of seconds or a :class:`datetime.timedelta`, and held as
float seconds (:func:`seconds` does that for the client's settings too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, TypeAlias

from orchestrator.errors import ConfigError

__all__ = ["Duration", "Settings", "api_limit_breaches", "seconds"]

#: What a duration setting accepts: seconds as a number, or a timedelta.
Duration: TypeAlias = float | timedelta

#: The API's documented body cap ("50 MB"), read as 50,000,000 bytes of body as sent.
API_MAX_BODY_BYTES = 50_000_000
#: The API's documented limit of concurrent bulk imports per account.
API_MAX_CONCURRENT = 5
#: The API's documented shortest gap between two status polls, in seconds.
API_MIN_POLL = 5.0

_DURATIONS = ("poll_min", "poll_max", "account_full_wait", "linger")
_COUNTS = (
    "max_concurrent",
    "max_body_bytes",
    "max_resubmits",
    "max_account_full_waits",
    "status_error_budget",
    "max_upload_bytes",
    "parse_processes",
)
_OPTIONAL = ("max_account_full_waits", "parse_processes")  # None has a meaning


def seconds(name: str, value: object, *, positive: bool = False) -> float:
    """A duration setting as float seconds, or ``ConfigError`` naming the setting.

    Args:
        name: the setting's name, for the message.
        value: a number of seconds or a :class:`datetime.timedelta`.
        positive: whether 0 is refused too.
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    ):
        return float(value)
    bound = "> 0" if positive else ">= 0"
    raise ConfigError(
        f"{name} must be a finite number of seconds {bound} or a timedelta, got {value!r}"
    )


def _whole(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be a whole number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How the engine batches, submits and polls; the defaults are the API's documented limits.

    Keyword-only. A duration (``poll_min``, ``poll_max``, ``account_full_wait``, ``linger``)
    is a float of seconds or a :class:`datetime.timedelta`; it is held as float seconds.

    Args:
        max_concurrent: bulk imports in flight per account (the API allows 5).
        max_body_bytes: hard cap on one request body, in bytes as sent.
        poll_min: seconds: never poll one import sooner than this after its submit or last poll.
        poll_max: seconds: never leave one import unpolled longer than this (unless the API asks to
            wait).
        max_resubmits: how many times a whole import that ends ``Failed`` is sent again before its
            records are dead-lettered.
        account_full_wait: seconds to wait before retrying a submit refused with "too many active
            imports" (another integration holds slots, or an earlier response was lost); doubles up
            to ``poll_max``.
        max_account_full_waits: how many such refusals in a row one batch tolerates before the run
            aborts; ``None`` waits forever.
        linger: seconds: the longest a record waits for company: a partly filled batch is sealed
            once its oldest record has waited this long and one of the account's slots is free
            (a busy account still gets full bodies; a trickle is sent within seconds).
        status_error_budget: consecutive failed status polls of one import (5xx, resets,
            timeouts; each is polled again within the poll window) before the run gives up.
        max_upload_bytes: bytes of request bodies loaded and being sent at once (one body always
            goes, however large). Bodies are the biggest thing a run holds, so this bounds its
            memory; the uploads share one network link anyway. Small bodies still go together.
        parse_processes: worker processes that parse and validate large input files (past their
            first 8 MB), owned by the ``Orchestrator``; ``None`` (the default): one per CPU.
            They start on the first large input, never import the program's main module, run
            niced below it and stop with the orchestrator; where processes cannot start (a
            daemonic process, a process limit) parsing falls back to a thread. ``0`` parses in
            a worker thread, which shares the GIL with the event loop: the loop then waits up
            to the interpreter's 5 ms switch interval each time it takes the GIL back.
        status_calls_per_minute: the most status polls a minute (in any 60 s) for the account,
            all its imports and collections together; polls wait their turn, which may stretch
            a gap past ``poll_max`` (logged as ``poll.budget_stretched``). The default stays
            under the 35 calls a minute of Dotdigital's Basic tier, which counts the account's
            other integrations and submits too. ``None``: no budget (the API's 429 still
            holds calls back). With ``poll_min`` under the API's 5 s (a time-scaled run against
            the simulator, as :meth:`scaled` makes) the minute shrinks in proportion: see
            :attr:`status_budget_window`.
    """

    max_concurrent: int = API_MAX_CONCURRENT
    max_body_bytes: int = API_MAX_BODY_BYTES
    poll_min: float = 5.0
    poll_max: float = 30.0
    max_resubmits: int = 2
    account_full_wait: float = 5.0
    max_account_full_waits: int | None = None
    linger: float = 5.0
    status_error_budget: int = 60
    max_upload_bytes: int = 60_000_000
    parse_processes: int | None = None
    status_calls_per_minute: float | None = 30.0

    if TYPE_CHECKING:  # the dataclass's own __init__ runs; this tells type checkers about timedelta

        def __init__(
            self,
            *,
            max_concurrent: int = ...,
            max_body_bytes: int = ...,
            poll_min: Duration = ...,
            poll_max: Duration = ...,
            max_resubmits: int = ...,
            account_full_wait: Duration = ...,
            max_account_full_waits: int | None = ...,
            linger: Duration = ...,
            status_error_budget: int = ...,
            max_upload_bytes: int = ...,
            parse_processes: int | None = ...,
            status_calls_per_minute: float | None = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        for name in _DURATIONS:
            object.__setattr__(self, name, seconds(name, getattr(self, name)))
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                _whole(name, value)
        if not 1 <= self.max_concurrent <= 100:
            raise ConfigError(
                f"max_concurrent must be between 1 and 100, got {self.max_concurrent}; "
                f"the API allows {API_MAX_CONCURRENT} imports in flight per account"
            )
        if not 256 <= self.max_body_bytes <= API_MAX_BODY_BYTES:
            raise ConfigError(
                f"max_body_bytes must be between 256 and {API_MAX_BODY_BYTES} "
                f"(the API's limit), got {self.max_body_bytes}"
            )
        if self.poll_max < self.poll_min:
            raise ConfigError(
                f"poll_max ({self.poll_max}) must be at least poll_min ({self.poll_min})"
            )
        if self.max_resubmits < 0:
            raise ConfigError(f"max_resubmits must be >= 0, got {self.max_resubmits}")
        if self.max_account_full_waits is not None and self.max_account_full_waits < 1:
            raise ConfigError(
                f"max_account_full_waits must be >= 1 or None, got {self.max_account_full_waits}"
            )
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes}")
        if self.parse_processes is not None and not 0 <= self.parse_processes <= 64:
            raise ConfigError(
                f"parse_processes must be between 0 and 64 or None, got {self.parse_processes}"
            )
        rate = self.status_calls_per_minute
        if rate is not None and not (
            isinstance(rate, int | float) and math.isfinite(rate) and rate >= 1
        ):
            raise ConfigError(
                f"status_calls_per_minute must be a number >= 1 or None, got {rate!r}; "
                "Dotdigital's Basic tier allows 35 calls a minute per account"
            )
        if self.status_error_budget < 1:
            raise ConfigError(f"status_error_budget must be >= 1, got {self.status_error_budget}")

    @property
    def status_budget_window(self) -> float:
        """Seconds over which ``status_calls_per_minute`` is counted: 60, or less in proportion
        when ``poll_min`` is under the API's 5 s minimum (time-scaled runs keep their budget's
        shape instead of being held to real minutes)."""
        return 60.0 * min(1.0, self.poll_min / API_MIN_POLL)

    @classmethod
    def scaled(cls, factor: float, **overrides: object) -> Settings:
        """Production settings with every interval multiplied by ``factor`` (for tests and demos).

        Args:
            factor: e.g. ``0.01`` turns 5–30 s polling into 0.05–0.3 s (and so the status-call
                budget's minute into 0.6 s).
            overrides: any other field.

        Raises:
            ConfigError: an override names no setting, or a value is invalid.
        """
        base = cls()
        values: dict[str, object] = {
            "poll_min": base.poll_min * factor,
            "poll_max": base.poll_max * factor,
            "account_full_wait": base.account_full_wait * factor,
            "linger": base.linger * factor,
        }
        values.update(overrides)
        unknown = sorted(set(values) - {field.name for field in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**values)  # type: ignore[arg-type]


def api_limit_breaches(settings: Settings) -> list[str]:
    """The settings that break the API's published limits, each said with the rule it breaks.

    The engine runs with any valid settings (tests and the simulator need short intervals); a
    program that talks to Dotdigital itself checks these before it starts.

    Args:
        settings: the settings to check.
    """
    breaches = []
    if settings.max_concurrent > API_MAX_CONCURRENT:
        breaches.append(
            f"max_concurrent {settings.max_concurrent} puts more than {API_MAX_CONCURRENT} "
            f"imports in flight; Dotdigital allows {API_MAX_CONCURRENT} concurrent bulk imports "
            "per account"
        )
    if settings.poll_min < API_MIN_POLL:
        breaches.append(
            f"poll_min {settings.poll_min:g} s polls an import more often than every "
            f"{API_MIN_POLL:g} s; Dotdigital asks for status polls 5–30 s apart"
        )
    return breaches

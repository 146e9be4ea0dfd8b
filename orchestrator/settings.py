"""The engine's settings: one frozen object with production defaults, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.errors import ConfigError

__all__ = ["Settings", "api_limit_breaches"]

#: The API's documented body cap ("50 MB"), read as 50,000,000 bytes of body as sent.
API_MAX_BODY_BYTES = 50_000_000
#: The API's documented limit of concurrent bulk imports per account.
API_MAX_CONCURRENT = 5
#: The API's documented polling rhythm: status polls of one import 5–30 s apart.
API_MIN_POLL_INTERVAL = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How the engine batches, submits and polls; the defaults are the API's documented limits.

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
        seal_after: seconds: seal a partly filled batch when the input pauses this long (a trickle
            from an async source still gets imported).
        status_error_budget: consecutive failed status polls of one import (5xx, resets,
            timeouts; each is polled again within the poll window) before the run gives up.
        max_upload_bytes: bytes of request bodies loaded and being sent at once (one body always
            goes, however large). Bodies are the biggest thing a run holds, so this bounds its
            memory; the uploads share one network link anyway. Small bodies still go together.
        parse_processes: worker processes that parse and validate large input files (past their
            first 8 MB), shared by the whole process; ``None``: one per CPU. The default, ``0``,
            parses in a worker thread: starting processes is the embedding application's call
            (its main module must be import-safe, ``if __name__ == "__main__":``). The CLI uses
            one per CPU.
    """

    max_concurrent: int = API_MAX_CONCURRENT
    max_body_bytes: int = API_MAX_BODY_BYTES
    poll_min: float = 5.0
    poll_max: float = 30.0
    max_resubmits: int = 2
    account_full_wait: float = 5.0
    max_account_full_waits: int | None = None
    seal_after: float = 2.0
    status_error_budget: int = 60
    max_upload_bytes: int = 60_000_000
    parse_processes: int | None = 0

    def __post_init__(self) -> None:
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
        for name in ("poll_min", "poll_max", "account_full_wait", "seal_after"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
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
        if self.status_error_budget < 1:
            raise ConfigError(f"status_error_budget must be >= 1, got {self.status_error_budget}")

    @classmethod
    def scaled(cls, factor: float, **overrides: object) -> Settings:
        """Production settings with every interval multiplied by ``factor`` (for tests and demos).

        Args:
            factor: e.g. ``0.01`` turns 5–30 s polling into 0.05–0.3 s.
            overrides: any other field.
        """
        base = cls()
        values: dict[str, object] = {
            "poll_min": base.poll_min * factor,
            "poll_max": base.poll_max * factor,
            "account_full_wait": base.account_full_wait * factor,
            "seal_after": base.seal_after * factor,
        }
        values.update(overrides)
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
    if settings.poll_min < API_MIN_POLL_INTERVAL:
        breaches.append(
            f"poll_min {settings.poll_min:g} s polls an import more often than every "
            f"{API_MIN_POLL_INTERVAL:g} s; Dotdigital asks for status polls 5–30 s apart"
        )
    return breaches

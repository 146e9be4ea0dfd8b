"""Settings validate on creation and scale for tests and demos."""

from __future__ import annotations

import pytest

from orchestrator import ConfigError, Settings


def test_defaults_are_the_api_limits() -> None:
    """Production defaults: 5 slots, 50,000,000 bytes, 5–30 s polling."""
    settings = Settings()
    assert (settings.max_concurrent, settings.max_body_bytes) == (5, 50_000_000)
    assert (settings.poll_min, settings.poll_max) == (5.0, 30.0)
    assert settings.status_calls_per_minute == 30.0  # under the Basic tier's 35 a minute
    assert Settings(status_calls_per_minute=None).status_calls_per_minute is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_concurrent", 0, "max_concurrent"),
        ("max_body_bytes", 50_000_001, "max_body_bytes"),
        ("poll_min", -1.0, "poll_min"),
        ("poll_max", float("inf"), "poll_max"),
        ("max_resubmits", -1, "max_resubmits"),
        ("max_account_full_waits", 0, "max_account_full_waits"),
        ("status_error_budget", 0, "status_error_budget"),
        ("status_calls_per_minute", 0.5, "status_calls_per_minute"),
        ("status_calls_per_minute", float("nan"), "status_calls_per_minute"),
        ("status_calls_per_minute", "30", "status_calls_per_minute"),
    ],
)
def test_invalid_values_name_the_setting(field: str, value: object, message: str) -> None:
    """Each invalid value raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=message):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_poll_max_below_poll_min_is_refused() -> None:
    """The polling window must not be empty."""
    with pytest.raises(ConfigError, match="poll_max"):
        Settings(poll_min=10, poll_max=5)


def test_scaled_multiplies_every_interval() -> None:
    """scaled(0.01) turns 5–30 s into 0.05–0.3 s and keeps overrides."""
    settings = Settings.scaled(0.01, max_concurrent=2)
    assert settings.poll_min == pytest.approx(0.05)
    assert settings.poll_max == pytest.approx(0.3)
    assert settings.max_concurrent == 2
    assert settings.status_budget_window == pytest.approx(0.6)  # the budget's minute too
    assert Settings().status_budget_window == 60.0

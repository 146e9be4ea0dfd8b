"""Settings validate on creation and scale for tests and demos."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from datetime import timedelta
from typing import Any

import pytest

from orchestrator import ConfigError, Orchestrator, Settings
from orchestrator.client import ClientSettings, RetryPolicy


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


CONFIG_CLASSES = [Settings, ClientSettings, RetryPolicy]


@pytest.mark.parametrize(
    ("make", "read"),
    [
        (lambda d: Settings(poll_min=d, poll_max=d * 4), lambda s: (s.poll_min, s.poll_max)),
        (lambda d: Settings(account_full_wait=d, linger=d), lambda s: (s.linger,)),
        (lambda d: RetryPolicy(timeout=d, wait_initial=d, wait_max=d, wait_jitter=d), None),
        (lambda d: RetryPolicy.immediate(timeout=d), lambda s: (s.timeout,)),
        (
            lambda d: ClientSettings(
                username="u", password="p", request_timeout=d, connect_timeout=d
            ),
            lambda s: (s.request_timeout, s.connect_timeout),
        ),
    ],
)
def test_durations_accept_a_timedelta_and_hold_float_seconds(make: Any, read: Any) -> None:
    """A timedelta and the same seconds as a float give equal settings, holding floats."""
    from_delta = make(timedelta(milliseconds=1500))
    assert from_delta == make(1.5)
    for value in read(from_delta) if read else (from_delta.timeout, from_delta.wait_max):
        assert type(value) is float


@pytest.mark.parametrize(
    "make",
    [
        lambda: Settings(max_concurrent="5"),
        lambda: Settings(max_upload_bytes=1.5),
        lambda: Settings(poll_min="soon"),
        lambda: Settings(linger=timedelta(seconds=-1)),
        lambda: Settings.scaled(0.1, no_such_setting=1),
        lambda: RetryPolicy(wait_max="x"),
        lambda: ClientSettings(username="u", password="p", connect_timeout=timedelta(0)),
    ],
)
def test_wrong_types_are_config_errors_not_type_errors(make: Any) -> None:
    """A value of the wrong type or an unknown name raises ConfigError, never a bare TypeError."""
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_configuration_is_keyword_only(cls: type) -> None:
    """Every config object takes keywords only, so a reordered field never shifts a value."""
    parameters = inspect.signature(cls).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    engine = inspect.signature(Orchestrator).parameters
    assert engine["settings"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_the_typed_signature_lists_every_field(cls: type) -> None:
    """The signature type checkers see (with timedelta) names every field, in order."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))  # type: ignore[arg-type]
    (klass,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    (init,) = [
        n
        for block in klass.body
        if isinstance(block, ast.If)
        for n in block.body
        if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    ]
    assert [a.arg for a in init.args.kwonlyargs] == [f.name for f in dataclasses.fields(cls)]


def test_reprs_show_settings_but_never_secrets() -> None:
    """Reprs name every setting that helps debugging, never the password or the token."""
    client = ClientSettings(username="u", password="s3cret-pw", integration_token="t0ken")
    text = repr(client)
    assert "s3cret-pw" not in text
    assert "t0ken" not in text
    assert "username='u'" in text
    assert "retry=RetryPolicy(attempts=8" in text
    assert repr(Settings()).startswith("Settings(max_concurrent=5, max_body_bytes=50000000")

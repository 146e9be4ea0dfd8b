"""The CLI's options: one table of names, types and defaults, resolved flag > env > file > default.

Every option of ``insight-import run`` can also be set by an environment variable
``INSIGHT_IMPORT_<OPTION>`` (dashes as underscores) and in a TOML file given with ``--config``
(keys spelled like the flags, dashes or underscores). ``config/default.toml`` lists them all.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

__all__ = ["OPTIONS", "Option", "resolve_options", "unknown_environment"]

ENV_PREFIX = "INSIGHT_IMPORT_"
#: ``INSIGHT_IMPORT_*`` variables that are not ``run`` options but are read elsewhere.
OTHER_ENV_NAMES = frozenset(
    {ENV_PREFIX + "CONFIG", ENV_PREFIX + "DATABASE", ENV_PREFIX + "ACCOUNTS"}
)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its flag name, how to parse a text value, its default and its meaning."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def is_flag(self) -> bool:
        """A switch: given on the command line without a value."""
        return self.parse is _bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("collection", str, None, "the Insight data collection to import into"),
    Option("scope", str, "account", "collection scope", ("account", "contact")),
    Option("type", str, "custom", "collection type (custom for your own data)"),
    Option("base-url", str, None, "API root (default: the --region host)"),
    Option(
        "region",
        str,
        "r1",
        "Dotdigital region: r1 Europe, r2 North America, r3 Asia Pacific; auto takes the "
        "region the account-info call names",
        ("r1", "r2", "r3", "auto"),
    ),
    Option("max-concurrent", int, 5, "bulk imports in flight per account (the API allows 5)"),
    Option("max-body-bytes", int, 50_000_000, "hard cap on one request body, in bytes as sent"),
    Option(
        "poll-min",
        float,
        5.0,
        "seconds: least time between two status polls of one import (the API asks for >= 5)",
    ),
    Option("poll-max", float, 30.0, "seconds: most time between two status polls of one import"),
    Option("max-resubmits", int, 2, "times a Failed import is sent again before dead-lettering"),
    Option("request-timeout", float, 120.0, "seconds allowed for one API call"),
    Option("parse-processes", int, None, "processes parsing large inputs (default: one per CPU)"),
    Option("journal", str, None, "SQLite journal (default: one per command in the state dir)"),
    Option(
        "dead-letter", str, None, "dead-letter JSONL (default: beside the journal, named after it)"
    ),
    Option("report", str, None, "write a JSON summary of the run here"),
    Option("fresh", _bool, False, "forget what the journal holds and start over"),
    Option(
        "allow-unsafe-limits",
        _bool,
        False,
        "let --max-concurrent and --poll-min go beyond the API's published limits on a "
        "non-local host (the account may be throttled or blocked)",
    ),
    Option("progress", str, "auto", "live progress display on stderr", ("auto", "on", "off")),
    Option(
        "log-level",
        str,
        "auto",
        "lowest log level shown; auto: info, but warning on a terminal (the progress display "
        "tells the rest)",
        ("auto", "debug", "info", "warning", "error"),
    ),
    Option(
        "progress-interval",
        float,
        10.0,
        "seconds between two run.progress log lines when the live display is off; 0: none",
    ),
    Option(
        "log-format",
        str,
        "auto",
        "log format: console on a TTY, json otherwise",
        ("auto", "console", "json"),
    ),
)

_BY_DEST = {option.dest: option for option in OPTIONS}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into {dest: value}; unknown keys are an error (typos are common)."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in _BY_DEST:
            known = ", ".join(option.name for option in OPTIONS)
            raise ConfigError(f"config file {path}: unknown setting {key!r}; known: {known}")
        values[dest] = value
    return values


def resolve_options(
    flags: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Merge flag > environment > config file > default into {dest: value}, checked.

    Args:
        flags: values given on the command line ({dest: value}); ``None`` means not given.
        environ: the environment (``os.environ`` when omitted).
        config_path: a TOML file, or ``None`` (``INSIGHT_IMPORT_CONFIG`` is read too).
    """
    environ = os.environ if environ is None else environ
    config_path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    from_file = load_config_file(config_path) if config_path else {}
    resolved: dict[str, Any] = {}
    for option in OPTIONS:
        if flags.get(option.dest) is not None:
            value, origin = flags[option.dest], f"--{option.name}"
        elif option.env in environ:
            value, origin = environ[option.env], option.env
        elif option.dest in from_file:
            value, origin = from_file[option.dest], f"{config_path}: {option.name}"
        else:
            resolved[option.dest] = option.default
            continue
        resolved[option.dest] = _convert(option, value, origin)
    return resolved


def _convert(option: Option, value: Any, origin: str) -> Any:
    try:
        if isinstance(value, str) or option.parse is _bool:
            converted = option.parse(str(value)) if isinstance(value, str) else bool(value)
        elif option.parse is float and isinstance(value, int | float):
            converted = float(value)
        elif option.parse is int and isinstance(value, int) and not isinstance(value, bool):
            converted = value
        else:
            converted = option.parse(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{origin}: {value!r} is not a valid {option.parse.__name__.strip('_')} "
            f"for {option.name}"
        ) from None
    if option.choices is not None and converted not in option.choices:
        raise ConfigError(
            f"{origin}: {converted!r} is not one of {', '.join(option.choices)} for {option.name}"
        )
    return converted


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for ``INSIGHT_IMPORT_*`` variables that name no option, with the closest name.

    Args:
        environ: the environment (``os.environ`` when omitted).
    """
    environ = os.environ if environ is None else environ
    known = sorted({option.env for option in OPTIONS} | OTHER_ENV_NAMES)
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
        warnings.append(f"the environment variable {name} names no option, it is ignored{hint}")
    return warnings

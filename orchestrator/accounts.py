"""The accounts file: which Dotdigital accounts the worker imports into, and as whom.

    [accounts.acme]
    user = "apiuser-1@apiconnector.com"
    password_env = "ACME_DOTDIGITAL_PASSWORD"   # or password_file = "/run/secrets/acme"
    region = "r1"                               # or base_url = "https://r1-api.dotdigital.com"
    integration_token_env = "ACME_DDG_TOKEN"    # optional
    max_concurrent = 5                          # optional

Secrets never sit in the file: it names the environment variable or the file that holds each
one. Without a file there is one account, ``default``, from ``DOTDIGITAL_API_USER`` and
``DOTDIGITAL_API_PASSWORD`` (and ``DOTDIGITAL_INTEGRATION_TOKEN``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.client import ClientSettings
from orchestrator.errors import ConfigError

__all__ = ["ACCOUNTS_ENV", "DEFAULT_ACCOUNT", "Account", "load_accounts"]

ACCOUNTS_ENV = "INSIGHT_IMPORT_ACCOUNTS"
"""The environment variable naming the accounts file when none is given."""

DEFAULT_ACCOUNT = "default"
"""The one account's name when there is no accounts file."""

_KEYS = frozenset(
    {
        "user",
        "password_env",
        "password_file",
        "region",
        "base_url",
        "integration_token_env",
        "max_concurrent",
    }
)
_SECRETS = {
    "password": "password_env or password_file",
    "integration_token": "integration_token_env",
    "token": "integration_token_env",
}
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Account:
    """One account the worker imports into.

    Args:
        name: the name outbox rows give in their ``account`` column.
        client: how to reach the API as this account (its repr hides the secrets).
        max_concurrent: imports in flight for this account, or ``None`` for the worker's
            ``--max-concurrent``.
    """

    name: str
    client: ClientSettings
    max_concurrent: int | None = None


def load_accounts(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    **client_options: Any,
) -> dict[str, Account]:
    """Read the accounts, by name.

    Args:
        path: the accounts file; when ``None``, the file ``INSIGHT_IMPORT_ACCOUNTS`` names, else
            the one ``default`` account from ``DOTDIGITAL_API_USER`` / ``DOTDIGITAL_API_PASSWORD``.
        environ: where to read the variables the file (or the default account) names.
        client_options: other ``ClientSettings`` fields for every account (``request_timeout``,
            ``retry``); ``region`` and ``base_url`` apply to accounts that set neither.

    Raises:
        errors.ConfigError: the file cannot be read, or an account is incomplete or names a
            secret that is not there; the message names the file, the account and the fix,
            never a secret.
    """
    if path is None:
        path = environ.get(ACCOUNTS_ENV) or None
    if path is None:
        client = ClientSettings.from_env(environ, **client_options)
        return {DEFAULT_ACCOUNT: Account(DEFAULT_ACCOUNT, client)}
    file = Path(path).expanduser()
    try:
        with file.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(
            f"accounts file {file}: cannot read it: {error.strerror or error}; check the accounts "
            f"file path (or {ACCOUNTS_ENV})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"accounts file {file}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"accounts"})
    if unknown:
        raise ConfigError(
            f"accounts file {file}: unknown top-level key(s) {', '.join(unknown)}; the file "
            "holds only [accounts.NAME] tables"
        )
    tables = document.get("accounts")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(
            f"accounts file {file}: no accounts; add at least one [accounts.NAME] table with "
            "user and password_env (or password_file)"
        )
    return {
        name: _account(file, name, table, environ, client_options) for name, table in tables.items()
    }


def _account(
    file: Path,
    name: str,
    table: object,
    environ: Mapping[str, str],
    client_options: Mapping[str, Any],
) -> Account:
    where = f"accounts file {file}, account {name!r}"
    if _NAME.fullmatch(name) is None:
        raise ConfigError(
            f"{where}: the name may only use letters, digits, '.', '-' and '_' (1-100 of them)"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table, written [accounts.{name}]")
    for key, fix in _SECRETS.items():
        if key in table:
            raise ConfigError(
                f"{where}: {key!r} must not be in the file (secrets never are); remove it and "
                f"use {fix} to name where the secret is"
            )
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}"
        )
    user = table.get("user")
    if not isinstance(user, str) or not user:
        raise ConfigError(f'{where}: set user = "apiuser-...@apiconnector.com"')
    password = _password(where, table, environ)
    options: dict[str, Any] = dict(client_options)
    if "region" in table or "base_url" in table:
        if "region" in table and "base_url" in table:
            raise ConfigError(f"{where}: set region or base_url, not both")
        options.pop("region", None)
        options.pop("base_url", None)
        for key in ("region", "base_url"):
            if key in table:
                options[key] = _string(where, table, key)
    token_env = table.get("integration_token_env")
    token = None
    if token_env is not None:
        variable = _variable(where, table, "integration_token_env")
        token = environ.get(variable) or None
        if token is None:
            raise ConfigError(
                f"{where}: integration_token_env names {variable}, which is not set: export it, "
                "or remove integration_token_env"
            )
    options["integration_token"] = token  # the file's, never DOTDIGITAL_INTEGRATION_TOKEN
    max_concurrent = table.get("max_concurrent")
    if max_concurrent is not None and (
        type(max_concurrent) is not int or not 1 <= max_concurrent <= 100
    ):
        raise ConfigError(f"{where}: max_concurrent must be a whole number from 1 to 100")
    try:
        client = ClientSettings(username=user, password=password, **options)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except TypeError:
        unknown = sorted(set(options) - set(ClientSettings.__dataclass_fields__))
        raise ConfigError(f"{where}: unknown client setting(s): {', '.join(unknown)}") from None
    return Account(name, client, max_concurrent)


def _password(where: str, table: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    if ("password_env" in table) == ("password_file" in table):
        raise ConfigError(
            f"{where}: set exactly one of password_env (an environment variable's name) or "
            "password_file (a file holding the password)"
        )
    if "password_env" in table:
        variable = _variable(where, table, "password_env")
        password = environ.get(variable, "")
        if not password:
            raise ConfigError(
                f"{where}: password_env names {variable}, which is not set: export it with the "
                "API user's password"
            )
        return password
    secret = Path(_string(where, table, "password_file")).expanduser()
    try:
        # One trailing line break is the file's, not the password's (as Docker secrets are).
        password = secret.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(
            f"{where}: cannot read password_file {secret}: {reason}; check the path and that "
            "this user may read it"
        ) from None
    if not password:
        raise ConfigError(f"{where}: password_file {secret} is empty: write the password into it")
    return password


def _string(where: str, table: Mapping[str, Any], key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _variable(where: str, table: Mapping[str, Any], key: str) -> str:
    value = _string(where, table, key)
    if _ENV_NAME.fullmatch(value) is None:
        raise ConfigError(
            f"{where}: {key} must be the name of an environment variable (letters, digits and "
            "'_'), not a value"
        )
    return value

"""The accounts file: per-account client settings, secrets named but never written or shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.accounts import DEFAULT_ACCOUNT, load_accounts
from orchestrator.errors import ConfigError

ENV = {"ACME_PASSWORD": "s3cret-acme", "ACME_TOKEN": "tok-acme"}


def write(tmp_path: Path, text: str) -> Path:
    """An accounts file with ``text``."""
    path = tmp_path / "accounts.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_accounts_from_a_file(tmp_path: Path) -> None:
    """Each table becomes an account with its user, secret, host, token and slots."""
    secret = tmp_path / "beta-secret"
    secret.write_text("s3cret-beta\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"""
        [accounts.acme]
        user = "apiuser-1@apiconnector.com"
        password_env = "ACME_PASSWORD"
        region = "r2"
        integration_token_env = "ACME_TOKEN"
        max_concurrent = 3

        [accounts.beta]
        user = "apiuser-2@apiconnector.com"
        password_file = "{secret}"
        base_url = "http://127.0.0.1:8787"
        """,
    )
    accounts = load_accounts(path, environ=ENV, request_timeout=7.0)
    acme, beta = accounts["acme"], accounts["beta"]
    assert (acme.client.username, acme.client.password) == (
        "apiuser-1@apiconnector.com",
        "s3cret-acme",
    )
    assert acme.client.api_root == "https://r2-api.dotdigital.com"
    assert (acme.client.integration_token, acme.max_concurrent) == ("tok-acme", 3)
    assert acme.client.request_timeout == 7.0
    assert (beta.client.password, beta.client.api_root) == ("s3cret-beta", "http://127.0.0.1:8787")
    assert (beta.client.integration_token, beta.max_concurrent) == (None, None)
    for account in accounts.values():
        assert "s3cret" not in repr(account)
        assert "tok-acme" not in repr(account)


def test_without_a_file_there_is_one_default_account() -> None:
    """DOTDIGITAL_API_USER / _PASSWORD and the given region make the `default` account."""
    env = {"DOTDIGITAL_API_USER": "apiuser-0@apiconnector.com", "DOTDIGITAL_API_PASSWORD": "pw"}
    accounts = load_accounts(environ=env, region="r3")
    assert list(accounts) == [DEFAULT_ACCOUNT]
    assert accounts[DEFAULT_ACCOUNT].client.api_root == "https://r3-api.dotdigital.com"
    with pytest.raises(ConfigError, match="DOTDIGITAL_API_USER"):
        load_accounts(environ={})


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    """INSIGHT_IMPORT_ACCOUNTS names the file when none is given."""
    path = write(tmp_path, '[accounts.acme]\nuser = "u"\npassword_env = "ACME_PASSWORD"\n')
    accounts = load_accounts(environ={**ENV, "INSIGHT_IMPORT_ACCOUNTS": str(path)})
    assert list(accounts) == ["acme"]


def test_a_region_given_to_all_applies_where_the_file_sets_none(tmp_path: Path) -> None:
    """--region/--base-url fill in for accounts that name no host."""
    path = write(tmp_path, '[accounts.acme]\nuser = "u"\npassword_env = "ACME_PASSWORD"\n')
    accounts = load_accounts(path, environ=ENV, base_url="http://127.0.0.1:1")
    assert accounts["acme"].client.api_root == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('user = "u"\npassword = "s3cret-inline"', "'password' must not be in the file"),
        (
            'user = "u"\npassword_env = "P"\nintegration_token = "s3cret-inline"',
            "integration_token_env",
        ),
        ('user = "u"\npassword_env = "NOT_SET"', "NOT_SET, which is not set"),
        ('user = "u"', "exactly one of password_env"),
        ('user = "u"\npassword_env = "ACME_PASSWORD"\npassword_file = "/x"', "exactly one"),
        ('user = "u"\npassword_file = "/nonexistent/secret"', "cannot read password_file"),
        ('password_env = "ACME_PASSWORD"', "set user"),
        ('user = "u"\npassword_env = "s3cret inline!"', "name of an environment variable"),
        ('user = "u"\npassword_env = "ACME_PASSWORD"\nregion = "r9"', "region must be one of"),
        (
            'user = "u"\npassword_env = "ACME_PASSWORD"\nregion = "r1"\nbase_url = "http://x"',
            "not both",
        ),
        ('user = "u"\npassword_env = "ACME_PASSWORD"\nmax_concurrent = 0', "max_concurrent"),
        ('user = "u"\npassword_env = "ACME_PASSWORD"\nslots = 2', "unknown key(s) slots"),
        ('user = "u"\npassword_env = "ACME_PASSWORD"\nintegration_token_env = "NOPE"', "NOPE"),
    ],
)
def test_mistakes_name_the_file_the_account_and_the_fix(
    tmp_path: Path, body: str, message: str
) -> None:
    """Each mistake is a ConfigError naming file and account; no secret is ever shown."""
    path = write(tmp_path, f"[accounts.acme]\n{body}\n")
    with pytest.raises(ConfigError) as raised:
        load_accounts(path, environ={**ENV, "P": "s3cret-env"})
    text = str(raised.value)
    assert message in text
    assert f"accounts file {path}, account 'acme'" in text
    assert "s3cret" not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[accounts]\n", "no accounts"),
        ("[other]\nx = 1\n", "unknown top-level key(s) other"),
        ("[accounts.acme\n", "not valid TOML"),
        ('[accounts."a b"]\nuser = "u"\n', "may only use letters"),
        ("accounts = { acme = 3 }\n", "must be a table"),
    ],
)
def test_a_broken_file_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    """An empty, foreign or unparsable file says what is wrong with it."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_accounts(write(tmp_path, text), environ=ENV)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not there names itself and the option."""
    with pytest.raises(ConfigError, match=r"cannot read it.*accounts file path"):
        load_accounts(tmp_path / "nope.toml", environ=ENV)

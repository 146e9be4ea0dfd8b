from __future__ import annotations

import itertools

import orjson
import pytest

from orchestrator import errors
from orchestrator.chunks import encode_lines
from orchestrator.records import Collection, EncodedRecord, RejectedRecord, Scope
from orchestrator.sample import UNKNOWN_CONTACT_DOMAIN, generate_orders

CONTACT = Collection("Orders", scope=Scope.CONTACT, type="orders")
ACCOUNT = Collection("Orders", type="orders")


def test_orders_are_valid_realistic_and_deterministic() -> None:
    """Generated orders are valid contact records of 0.5-2 KB, the same for the same seed."""
    lines = list(generate_orders(300, seed=3))
    assert lines == list(generate_orders(300, seed=3))
    assert lines != list(generate_orders(300, seed=4))
    assert all(line.endswith(b"\n") for line in lines)
    assert all(400 <= len(line) <= 2100 for line in lines)
    results = encode_lines(lines, CONTACT, origin="sample", first_line=1)
    assert all(isinstance(r, EncodedRecord) for r in results)
    first = orjson.loads(lines[0])
    assert first["contactIdentity"]["identifier"] == "email"
    assert isinstance(first["json"]["items"], list)
    assert len({orjson.loads(line)["key"] for line in lines}) == 300


def test_account_scope_has_no_contact_identity() -> None:
    """Account-scoped orders carry the email inside json and validate for account scope."""
    lines = list(generate_orders(50, scope="account"))
    assert all("contactIdentity" not in orjson.loads(line) for line in lines)
    results = encode_lines(lines, ACCOUNT, origin="sample", first_line=1)
    assert all(
        isinstance(r, EncodedRecord) and r.data == line[:-1]
        for r, line in zip(results, lines, strict=True)
    )


def test_fractions_of_bad_unknown_and_duplicate() -> None:
    """Bad lines are rejected locally; unknown contacts end in .invalid; duplicates keep contact."""
    lines = list(
        generate_orders(
            2000, seed=1, bad_fraction=0.1, unknown_contact_fraction=0.2, duplicate_fraction=0.1
        )
    )
    results = encode_lines(lines, CONTACT, origin="sample", first_line=1)
    rejected = [r for r in results if isinstance(r, RejectedRecord)]
    assert 100 < len(rejected) < 300
    assert len({r.error.rule for r in rejected}) == 6
    good = [r for r in results if isinstance(r, EncodedRecord)]
    unknown = [r for r in good if r.contact and r.contact[1].endswith(UNKNOWN_CONTACT_DOMAIN)]
    assert 0.1 < len(unknown) / len(good) < 0.3
    contacts: dict[str, tuple[str, str] | None] = {}
    for record in good:
        assert contacts.setdefault(record.key, record.contact) == record.contact
    assert len(contacts) < len(good)


def test_endless_stream_and_bad_arguments() -> None:
    """n=None streams without end; out-of-range settings raise ConfigError."""
    assert len(list(itertools.islice(generate_orders(None), 5))) == 5
    with pytest.raises(errors.ConfigError, match="bad_fraction"):
        next(generate_orders(1, bad_fraction=2))
    with pytest.raises(errors.ConfigError, match="scope"):
        next(generate_orders(1, scope="global"))

"""The poll planner's history kept between runs: one small file per account."""

from __future__ import annotations

from pathlib import Path

import orjson

from orchestrator.poll_history import MAX_AGE, history_path, load_history, save_history

USER = "apiuser-secret-name@apiconnector.com"


def test_a_saved_history_loads_back(tmp_path: Path) -> None:
    """What is saved is what the next run loads; saving again replaces it, leaving no temp file."""
    path = history_path(tmp_path, api_root="https://r1-api.dotdigital.com", username=USER)
    save_history(path, [(1_000, 12.5), (250, 3.25)], now=1_000.0)
    assert load_history(path, now=1_060.0) == [(1_000, 12.5), (250, 3.25)]
    save_history(path, [(10, 1.0)], now=2_000.0)
    assert load_history(path, now=2_000.0) == [(10, 1.0)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_each_account_has_its_own_file_named_without_its_user(tmp_path: Path) -> None:
    """The file is per account (API root and user), and neither its name nor its content holds
    the user name."""
    one = history_path(tmp_path, api_root="https://r1-api.dotdigital.com", username=USER)
    other_user = history_path(tmp_path, api_root="https://r1-api.dotdigital.com", username="b")
    other_region = history_path(tmp_path, api_root="https://r2-api.dotdigital.com", username=USER)
    assert len({one, other_user, other_region}) == 3
    save_history(one, [(5, 1.0)])
    assert "apiuser" not in one.name
    assert b"apiuser" not in one.read_bytes()


def test_a_missing_stale_or_malformed_history_is_empty(tmp_path: Path) -> None:
    """The history is a hint: anything that cannot be used is no history at all."""
    path = tmp_path / "polls.json"
    assert load_history(path) == []
    save_history(path, [(5, 1.0)], now=0.0)
    assert load_history(path, now=MAX_AGE + 1.0) == []  # too old
    assert load_history(path, now=-10.0) == []  # saved in the future: a clock went back
    for content in (
        b"",
        b"{not json",
        b"[]",
        orjson.dumps({"version": 99, "saved_at": 0.0, "imports": [[5, 1.0]]}),
        orjson.dumps({"version": 1, "saved_at": 0.0, "imports": [[5]]}),
        orjson.dumps({"version": 1, "saved_at": "x", "imports": []}),
    ):
        path.write_bytes(content)
        assert load_history(path, now=1.0) == [], content
    directory = tmp_path / "dir.json"
    directory.mkdir()
    assert load_history(directory) == []  # unreadable

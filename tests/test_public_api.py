"""The public index: every name in __all__ exists, is documented, and nothing private leaks."""

from __future__ import annotations

import inspect

import orchestrator


def test_all_names_exist_and_are_documented() -> None:
    """Each public name resolves and classes/functions carry a docstring."""
    assert len(set(orchestrator.__all__)) == len(orchestrator.__all__)
    for name in orchestrator.__all__:
        value = getattr(orchestrator, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def test_all_is_sorted_and_has_no_private_names() -> None:
    """__all__ lists public names only, sorted, so additions are reviewed on purpose."""
    names = orchestrator.__all__
    assert all(not name.startswith("_") for name in names)
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))


def test_main_entry_points_are_exported() -> None:
    """What the README's example imports is public."""
    for name in (
        "Orchestrator",
        "InsightClient",
        "ClientSettings",
        "Collection",
        "Scope",
        "Settings",
        "SqliteJournal",
        "ImportResult",
        "ImportOutcome",
        "DeadLetter",
    ):
        assert name in orchestrator.__all__


def test_names_load_on_first_use() -> None:
    """Each public name comes from where the index says; unknown names are AttributeErrors."""
    import importlib

    import pytest

    for name in orchestrator.__all__:
        module = importlib.import_module(orchestrator._MODULES[name])
        assert getattr(orchestrator, name) is getattr(module, name)
    assert set(orchestrator._MODULES) == set(orchestrator.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        orchestrator.no_such_name  # noqa: B018

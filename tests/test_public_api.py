"""The public index: one list of names, each documented, loaded on first use, nothing private."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_what_an_embedder_uses_is_public_and_the_machinery_is_not() -> None:
    """The orchestrator, client, settings, journals, results, errors and simulator are public;
    the assembler, refs, receipts and encoding helpers are not."""
    public = {
        *("Orchestrator", "InsightClient", "ClientSettings", "RetryPolicy", "Settings"),
        *("Collection", "Scope", "Journal", "SqliteJournal", "MemoryJournal", "DeadLetter"),
        *("ImportResult", "ImportOutcome", "RunStats", "ImportStatus", "ImportState"),
        *("REGIONS", "Simulator", "SimulatorConfig", "Faults", "OrchestratorError"),
    }
    assert public <= set(orchestrator.__all__)
    internal = {"Batch", "BatchAssembler", "RecordRef", "SubmitReceipt", "EncodedRecord"}
    assert not internal & set(orchestrator.__all__)
    assert "encode_record" not in orchestrator.__all__


def test_every_error_of_the_tree_is_public() -> None:
    """Whatever the library can raise at a caller can be imported from the package."""
    from orchestrator import errors

    assert set(errors.__all__) <= set(orchestrator.__all__)


def test_names_load_on_first_use_from_the_one_list() -> None:
    """Each public name comes from the module the list names; unknown names are AttributeErrors."""
    for module, names in orchestrator._PUBLIC.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert getattr(orchestrator, name) is getattr(loaded, name)
    assert sorted(orchestrator.__all__) == sorted(
        name for names in orchestrator._PUBLIC.values() for name in names
    )
    with pytest.raises(AttributeError, match="no_such_name"):
        orchestrator.no_such_name  # noqa: B018


def test_type_checkers_see_the_same_list() -> None:
    """The TYPE_CHECKING imports re-export exactly the names of the list, from the same modules."""
    tree = ast.parse(Path(orchestrator.__file__).read_text())
    (block,) = (
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    seen: dict[str, list[str]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            assert alias.asname == alias.name  # `X as X`: an explicit re-export
            seen.setdefault(str(node.module), []).append(alias.name)
    assert {m: sorted(n) for m, n in seen.items()} == {
        m: sorted(n) for m, n in orchestrator._PUBLIC.items()
    }


def test_a_parse_worker_loads_neither_the_http_client_nor_the_engine() -> None:
    """Importing the package and the parse worker (what a worker process does) stays light."""
    probe = (
        "import sys, orchestrator, orchestrator.parse_worker\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'tenacity', 'anyio')\n"
        "         or m in ('orchestrator.engine', 'orchestrator.client', 'orchestrator.journal')]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, check=True, timeout=60
    )
    assert done.stdout.decode().strip() == ""

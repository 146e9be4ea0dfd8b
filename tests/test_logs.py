"""The library's logging: silent until the application configures it, through stdlib logging."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from orchestrator.logs import capture_events, get_logger

EMBEDDED = """
import asyncio
{setup}
from orchestrator import Collection, Orchestrator, Scope, Settings
from orchestrator.simulator import Faults, Simulator, SimulatorConfig
from orchestrator.client import ClientSettings, InsightClient, RetryPolicy

async def main():
    config = SimulatorConfig(records_per_second=50_000.0)
    async with Simulator(config, faults=Faults({faults})) as sim:
        client = InsightClient(ClientSettings(
            username=config.username, password=config.password, base_url=sim.base_url,
            retry=RetryPolicy.immediate(),
        ))
        records = ({{"key": f"k{{i}}", "json": {{"n": i}}}} for i in range(300))
        settings = Settings.scaled(0.01, max_body_bytes=4_000)
        async with Orchestrator(client, settings=settings) as orch:
            result = await orch.import_records(Collection("Quiet", Scope.ACCOUNT), records)
        assert result.records_imported == 300, result.counters

asyncio.run(main())
"""


def embed(setup: str = "", faults: str = "") -> subprocess.CompletedProcess[str]:
    script = EMBEDDED.format(setup=textwrap.dedent(setup), faults=faults)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_embedding_program_that_configures_nothing_sees_nothing() -> None:
    """An import by a program with no logging set up prints nothing on stdout or stderr."""
    done = embed()
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_retried_calls_print_nothing_when_nothing_is_configured() -> None:
    """Retries after 5xx answers and a lost response print nothing anywhere, with nothing set up."""
    done = embed(faults="server_errors=2, resets_after_accept=1")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_standard_logging_set_up_by_the_application_shows_the_events() -> None:
    """`logging.basicConfig(level=INFO)` is all an application needs to see the library's events."""
    done = embed("import logging; logging.basicConfig(level=logging.INFO)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "INFO:orchestrator.lifecycle:import.finished" in done.stderr
    assert "collection='Quiet'" in done.stderr


def test_capture_events_collects_dicts_and_restores_the_level() -> None:
    """capture_events sees each event with its keys and level, then leaves the logger as it was."""
    library = logging.getLogger("orchestrator")
    before = library.level
    log = get_logger("orchestrator.test")
    with capture_events() as events:
        log.debug("thing.done", count=3)
        log.warning("thing.odd", why="because")
    log.warning("thing.after")
    assert events == [
        {"event": "thing.done", "count": 3, "log_level": "debug"},
        {"event": "thing.odd", "why": "because", "log_level": "warning"},
    ]
    assert library.level == before


@pytest.mark.parametrize("level", ["debug", "info"])
def test_a_quiet_logger_costs_no_rendering(level: str) -> None:
    """Events below the configured level are dropped before any processing."""
    log = get_logger("orchestrator.test")
    with capture_events(logging.WARNING) as events:
        getattr(log, level)("thing.hidden")
    assert events == []

"""Shared fixtures: the asyncio backend, and the simulator served as its own process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator.client import ClientSettings, RetryPolicy
from orchestrator.simulator import Simulator

POSTGRES_ENV = "INSIGHT_IMPORT_TEST_POSTGRES"


def postgres_server() -> str:
    """The test PostgreSQL's URL; skips without one, but fails under CI (it must have one)."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        reason = f"no PostgreSQL to test with: set {POSTGRES_ENV} (.ci/postgres.sh starts one)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI is set, so this is a failure", pytrace=False)
        pytest.skip(reason)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of the test PostgreSQL whose tables live in a fresh schema of their own."""
    with fresh_schema(postgres_server()) as url:
        yield url


@contextlib.contextmanager
def fresh_schema(server: str, *, prefix: str = "test") -> Iterator[str]:
    """A URL of ``server`` whose tables live in a new schema, dropped with them at the end
    (the benchmarks use it too)."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in server else "?"
    try:
        yield f"{server}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


def sim_client_settings(sim: Simulator, **overrides: Any) -> ClientSettings:
    """Client settings for an in-process simulator: its credentials and URL, short timeouts,
    no waits between retries (override any field, e.g. ``retry=``)."""
    values: dict[str, Any] = {
        "username": sim.config.username,
        "password": sim.config.password,
        "base_url": sim.base_url,
        "request_timeout": 5.0,
        "retry": RetryPolicy.immediate(timeout=10.0),
    }
    values.update(overrides)
    return ClientSettings(**values)


# --------------------------------------------------------------------------- CLI fixtures

SIM_USER = "apiuser-demo@apiconnector.com"
SIM_PASSWORD = "demo-password"


@dataclass
class SimulatorProcess:
    """The bundled simulator served by `insight-import simulator` in its own process."""

    base_url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as answer:
            return orjson.loads(answer.read())

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return orjson.loads(answer.read())

    def records(self, collection: str) -> list[dict[str, Any]]:
        try:
            answer = self.get(f"/_simulator/collections/{collection}")
        except urllib.error.HTTPError:
            return []
        return list(answer["records"])

    def imports(self, collection: str) -> list[dict[str, Any]]:
        stats = self.get("/_simulator/stats")
        return [i for i in stats["imports"] if i["collection"] == collection]


@contextlib.contextmanager
def serve_simulator(*extra: str) -> Iterator[SimulatorProcess]:
    """`insight-import simulator EXTRA...` on a free loopback port, stopped on leaving."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "simulator",
            "--port",
            "0",
            "--records-per-second",
            "4000",
            "--jitter",
            "0.5",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert "listening on" in line, line
        base_url = line.rsplit(" ", 1)[-1].strip()
        yield SimulatorProcess(base_url, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def simulator_process() -> Iterator[SimulatorProcess]:
    """`insight-import simulator` on a free loopback port, for tests that run the real command."""
    with serve_simulator() as sim:
        yield sim


def run_env() -> dict[str, str]:
    """The environment of a command run by a test: no INSIGHT_IMPORT_* or DOTDIGITAL_* from the
    caller, the simulator's credentials."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("INSIGHT_IMPORT_", "DOTDIGITAL_"))
    }
    environ.update(DOTDIGITAL_API_USER=SIM_USER, DOTDIGITAL_API_PASSWORD=SIM_PASSWORD)
    return environ


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m orchestrator ARGS` as a user would, with the simulator's credentials."""
    environ = run_env()
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        input=stdin,
        capture_output=True,
        env=environ,
        timeout=timeout,
        check=False,
    )


def fast_run_args(sim: SimulatorProcess, tmp: Path, collection: str) -> list[str]:
    """Options that point `run` at the simulator with polls scaled down 100 times."""
    return [
        "--collection",
        collection,
        "--base-url",
        sim.base_url,
        "--poll-min",
        "0.05",
        "--poll-max",
        "0.3",
        "--journal",
        str(tmp / "journal.sqlite"),
        "--report",
        str(tmp / "report.json"),
        "--dead-letter",
        str(tmp / "dead-letter.jsonl"),
        "--progress",
        "off",
        "--log-format",
        "json",
    ]

"""The `insight-import` command, run as a real process against the simulator in another process."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from orchestrator.errors import ConfigError
from orchestrator.options import OPTIONS, load_config_file, resolve_options
from tests.conftest import SIM_PASSWORD, SimulatorProcess, fast_run_args, run_cli

ROOT = Path(__file__).resolve().parent.parent


def orders(n: int, *, prefix: str = "o", unknown: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "key": f"{prefix}{i}",
            "json": {"total": i, "secret_note": f"record-content-{prefix}{i}"},
            "contactIdentity": {
                "identifier": "email",
                "value": f"c{i % 37}@{'nowhere.invalid' if i in unknown else 'x.io'}",
            },
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[Any], *, extra: bytes = b"") -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + extra)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def test_run_imports_a_file_and_writes_the_report(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A clean file imports fully: exit 0, the report adds up, the dead-letter file is empty."""
    data = write_jsonl(tmp_path / "orders.jsonl", orders(500))
    args = fast_run_args(simulator_process, tmp_path, "CliClean")
    done = run_cli("run", str(data), *args, "--scope", "contact", "--max-body-bytes", "20000")
    assert done.returncode == 0, done.stderr.decode()
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["collection"] == "CliClean"
    assert report["records_read"] == report["records_imported"] == 500
    assert report["records_rejected"] == report["records_failed"] == 0
    assert sum(entry["records"] for entry in report["imports"]) == 500
    assert all(entry["body_bytes"] <= 20_000 for entry in report["imports"])
    assert all(entry["status"] == "Finished" for entry in report["imports"])
    assert (tmp_path / "dead-letter.jsonl").read_bytes() == b""
    assert len(simulator_process.records("CliClean")) == 500
    assert b"Imported 500 of 500 records" in done.stdout


def test_bad_and_rejected_records_exit_1_with_dead_letters(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """Bad lines and unknown contacts end in the dead-letter file with source and reason."""
    records = orders(50, unknown=(7,))
    data = write_jsonl(
        tmp_path / "in.jsonl", records, extra=b'{"key": "x", "json": [1]}\nnot json\n'
    )
    args = fast_run_args(simulator_process, tmp_path, "CliBad")
    done = run_cli("run", str(data), *args, "--scope", "contact")
    assert done.returncode == 1, done.stderr.decode()
    letters = {(d["source"], d["reason"]) for d in read_jsonl(tmp_path / "dead-letter.jsonl")}
    assert letters == {
        (f"{data.resolve()}:8", "ContactEmailDoesNotExist"),
        (f"{data.resolve()}:51", "json-type"),
        (f"{data.resolve()}:52", "json-syntax"),
    }
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert (report["records_read"], report["records_rejected"], report["records_failed"]) == (
        52,
        2,
        1,
    )
    assert report["records_imported"] == 49


def test_gzip_and_stdin_inputs(simulator_process: SimulatorProcess, tmp_path: Path) -> None:
    """A .gz file and standard input are read like plain files."""
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in orders(30))))
    stdin = b"".join(orjson.dumps(r) + b"\n" for r in orders(20, prefix="s"))
    args = fast_run_args(simulator_process, tmp_path, "CliMixed")
    done = run_cli("run", str(packed), "-", *args, "--scope", "contact", stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    assert len(simulator_process.records("CliMixed")) == 50


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "missing.jsonl", "--collection", "Cc"], {}, b"missing.jsonl"),
        (["run", "{data}"], {}, b"--collection is required"),
        (["run", "{data}", "--collection", "9bad"], {}, b"collection"),
        (["run", "{data}", "--collection", "Cc", "--poll-min", "40"], {}, b"poll_max"),
        (
            ["run", "{data}", "--collection", "Cc"],
            {"DOTDIGITAL_API_USER": ""},
            b"DOTDIGITAL_API_USER",
        ),
        (
            ["run", "{data}", "--collection", "Cc"],
            {"INSIGHT_IMPORT_MAX_CONCURRENT": "x"},
            b"MAX_CONC",
        ),
    ],
)
def test_usage_and_configuration_errors_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], message: bytes
) -> None:
    """Mistakes found before any import exit 2 and name the problem."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    argv = [a.replace("{data}", str(data)) for a in args]
    done = run_cli(*argv, "--journal", str(tmp_path / "j.sqlite"), env=env)
    assert done.returncode == 2, done.stderr.decode()
    assert message in done.stderr


def test_bad_credentials_abort_with_3(simulator_process: SimulatorProcess, tmp_path: Path) -> None:
    """A wrong password exits 3 and never prints the password."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(3))
    args = fast_run_args(simulator_process, tmp_path, "CliAuth")
    done = run_cli("run", str(data), *args, env={"DOTDIGITAL_API_PASSWORD": "hunter2-wrong"})
    assert done.returncode == 3
    assert b"DOTDIGITAL_API_PASSWORD" in done.stderr
    assert b"hunter2-wrong" not in done.stderr + done.stdout


def test_debug_logs_hold_no_credentials_nor_record_contents(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """At debug level the JSON logs name imports and keys' counts, never secrets or contents."""
    simulator_process.post("/_simulator/faults", {"server_errors": 1, "resets_after_accept": 1})
    data = write_jsonl(tmp_path / "in.jsonl", orders(200, unknown=(3,)))
    args = fast_run_args(simulator_process, tmp_path, "CliLogs")
    done = run_cli(
        "run",
        str(data),
        *args,
        "--scope",
        "contact",
        "--log-level",
        "debug",
        env={"DOTDIGITAL_INTEGRATION_TOKEN": "tok-do-not-log"},
    )
    assert done.returncode == 1, done.stderr.decode()
    logs = done.stderr
    events = [orjson.loads(line)["event"] for line in logs.splitlines() if line.startswith(b"{")]
    assert "import.finished" in events
    assert "batch.sealed" in events
    for secret in (SIM_PASSWORD.encode(), b"tok-do-not-log", b"record-content-", b"@x.io"):
        assert secret not in logs


def imported_modules(stderr: bytes) -> set[str]:
    """The modules a process loaded, from its PYTHONPROFILEIMPORTTIME report on stderr."""
    return {
        line.rsplit(b"|", 1)[1].strip().decode()
        for line in stderr.splitlines()
        if line.startswith(b"import time:")
    }


def test_run_help_loads_no_client_engine_journal_or_logging() -> None:
    """`run --help` imports the parser's needs only: no HTTP client, engine, journal, structlog."""
    done = run_cli("run", "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr.decode()
    modules = imported_modules(done.stderr)
    assert "orchestrator.options" in modules
    heavy = {"aiohttp", "structlog", "rich.console", "orchestrator.engine", "orchestrator.journal"}
    assert not heavy & modules


@pytest.mark.parametrize("progress", ["off", "on"])
def test_a_run_loads_rich_only_for_its_progress_display(
    simulator_process: SimulatorProcess, tmp_path: Path, progress: str
) -> None:
    """A run imports rich only to show progress, and never the simulator, the demo or samples."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(20))
    args = fast_run_args(simulator_process, tmp_path, f"CliImports{progress}")
    args[args.index("--progress") + 1] = progress
    done = run_cli("run", str(data), *args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr.decode()
    modules = imported_modules(done.stderr)
    assert {"aiohttp", "orchestrator.engine", "structlog"} <= modules
    never = {"aiohttp.web", "orchestrator.simulator", "orchestrator.demo", "orchestrator.sample"}
    assert not never & modules
    # (an import that was tried and refused is listed too: rich's own modules show it loaded)
    assert ("rich.console" in modules) == (progress == "on")
    assert ("orchestrator.progress" in modules) == (progress == "on")


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT], [signal.SIGTERM], [signal.SIGTERM, signal.SIGINT]],
    ids=["sigint", "sigterm", "second-signal-quits-at-once"],
)
def test_a_signal_saves_state_exits_130_and_the_rerun_finishes(
    simulator_process: SimulatorProcess, tmp_path: Path, signals: list[signal.Signals]
) -> None:
    """SIGINT/SIGTERM stop with exit 130 (a second one at once); the same command then resumes."""
    collection = "CliSignal" + "".join(sig.name for sig in signals).replace("SIG", "")
    # Every answer takes 0.1 s, so the run is surely mid-way when the signal comes.
    simulator_process.post("/_simulator/faults", {"slow_responses": 100_000, "slow_delay_s": 0.1})
    data = write_jsonl(tmp_path / "in.jsonl", orders(3000))
    args = [*fast_run_args(simulator_process, tmp_path, collection), "--scope", "contact"]
    argv = [
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        str(data),
        *args,
        "--max-body-bytes",
        "8000",
    ]
    env = {
        **os.environ,
        "DOTDIGITAL_API_USER": "apiuser-demo@apiconnector.com",
        "DOTDIGITAL_API_PASSWORD": SIM_PASSWORD,
    }
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None
    for line in process.stderr:
        if b'"import.finished"' in line:
            break
    for sig in signals:
        process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    simulator_process.post("/_simulator/faults", {"slow_responses": 0})
    assert process.returncode == 130, err.decode()
    # A single signal ends gracefully and says how to resume; a second one leaves at once.
    assert (b"Run the same command again to resume" in err) == (len(signals) == 1)
    assert 0 < len(simulator_process.records(collection)) < 3000
    done = run_cli("run", str(data), *args, "--max-body-bytes", "8000")
    assert done.returncode == 0, done.stderr.decode()
    assert len(simulator_process.records(collection)) == 3000


def test_demo_runs_the_whole_job(tmp_path: Path) -> None:
    """`insight-import demo` imports its sample into the in-process simulator and explains it."""
    done = run_cli("demo", "--records", "3000", "--output", str(tmp_path / "demo"), timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Imported" in done.stdout
    assert (tmp_path / "demo" / "report.json").exists()
    assert read_jsonl(tmp_path / "demo" / "dead-letter.jsonl")


def test_status_prints_an_import_as_json(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """`status IMPORT_ID` shows what the API says about an import."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(5))
    args = fast_run_args(simulator_process, tmp_path, "CliStatus")
    assert run_cli("run", str(data), *args, "--scope", "contact").returncode == 0
    import_id = orjson.loads((tmp_path / "report.json").read_bytes())["imports"][0]["import_id"]
    done = run_cli("status", import_id, "--base-url", simulator_process.base_url)
    assert done.returncode == 0, done.stderr.decode()
    answer = orjson.loads(done.stdout)
    assert (answer["import_id"], answer["status"], answer["state"]) == (
        import_id,
        "Finished",
        "succeeded",
    )


def test_option_precedence_flag_env_file_default(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the config file, which beats the default."""
    config = tmp_path / "c.toml"
    config.write_text('poll-min = 1.5\npoll_max = 9\nscope = "contact"\n')
    resolved = resolve_options(
        {"poll_min": 2.5},
        environ={"INSIGHT_IMPORT_POLL_MAX": "7", "INSIGHT_IMPORT_CONFIG": str(config)},
    )
    assert resolved["poll_min"] == 2.5
    assert resolved["poll_max"] == 7.0
    assert resolved["scope"] == "contact"
    assert resolved["max_concurrent"] == 5


def test_config_file_errors_are_named(tmp_path: Path) -> None:
    """Unknown keys and wrong types in the config file are reported with the file's name."""
    config = tmp_path / "c.toml"
    config.write_text("pol-min = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'pol-min'"):
        resolve_options({}, environ={}, config_path=str(config))
    config.write_text('max-concurrent = "many"\n')
    with pytest.raises(ConfigError, match="max-concurrent"):
        resolve_options({}, environ={}, config_path=str(config))


def test_default_toml_lists_every_option_with_its_default() -> None:
    """config/default.toml states the real defaults (commented out where there is none)."""
    text = (ROOT / "config" / "default.toml").read_text()
    values = load_config_file(ROOT / "config" / "default.toml")
    for option in OPTIONS:
        assert option.name in text, option.name
        if option.default is not None:
            assert values[option.dest] == option.default, option.name


def test_an_unusable_journal_is_a_clear_error_before_any_import(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A journal that cannot be created stops the run at once (exit 2), naming the path."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(3))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the journal's folder should be")
    args = fast_run_args(simulator_process, tmp_path, "CliJournal")
    args[args.index("--journal") + 1] = str(blocker / "journal.sqlite")
    done = run_cli("run", str(data), *args, "--scope", "contact")
    assert done.returncode == 2, done.stderr.decode()
    assert str(blocker).encode() in done.stderr
    assert simulator_process.records("CliJournal") == []

"""The `insight-import` command, run as a real process against the simulator in another process."""

from __future__ import annotations

import gzip
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from orchestrator.errors import ConfigError
from orchestrator.options import OPTIONS, load_config_file, resolve_options
from tests.conftest import (
    SIM_PASSWORD,
    SimulatorProcess,
    fast_run_args,
    run_cli,
    run_env,
    serve_simulator,
)

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


def test_a_later_run_of_the_account_aims_its_first_polls(tmp_path: Path) -> None:
    """What a run learned of the account's import times is kept beside its journal: the next
    command with a journal there aims its first imports' polls instead of probing for them."""
    first = write_jsonl(tmp_path / "monday.jsonl", orders(200, prefix="m"))
    second = write_jsonl(tmp_path / "tuesday.jsonl", orders(200, prefix="t"))
    with serve_simulator("--min-processing", "1.0", "--jitter", "0") as sim:
        polls = []
        for data, journal in ((first, "monday.sqlite"), (second, "tuesday.sqlite")):
            args = [*fast_run_args(sim, tmp_path, "CliHistory"), "--poll-max", "1.5"]
            args += ["--journal", str(tmp_path / journal), "--max-body-bytes", "20000"]
            done = run_cli("run", str(data), *args, "--scope", "contact")
            assert done.returncode == 0, done.stderr.decode()
            report = orjson.loads((tmp_path / "report.json").read_bytes())
            polls.append([entry["polls"] for entry in report["imports"]])
    histories = list(tmp_path.glob("polls-*.json"))
    assert len(histories) == 1
    assert b"apiuser" not in histories[0].read_bytes()
    # probed: 0.05, 0.125, 0.24, 0.41, 0.66, 1.04 s; aimed: one poll just after 1 s
    assert min(polls[0]) >= 5, polls
    assert max(polls[1]) <= 3, polls


def test_the_reports_call_counts_are_the_calls_the_api_saw(tmp_path: Path) -> None:
    """Through 5xx answers, a lost response, a Failed import, rate limits and slots held by
    another integration, the report counts every PUT and status call the simulator received."""
    data = write_jsonl(tmp_path / "orders.jsonl", orders(1_200))
    with serve_simulator("--records-per-second", "2000") as sim:
        sim.post(
            "/_simulator/faults",
            {
                "server_errors": 4,
                "resets_after_accept": 1,
                "failed_imports": 1,
                "rate_limit_calls": 2,
                "rate_limit_reset_s": 0.05,
                "foreign_active_imports": 4,
            },
        )
        args = fast_run_args(sim, tmp_path, "CliCalls")
        done = run_cli("run", str(data), *args, "--scope", "contact", "--max-body-bytes", "9000")
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        calls = sim.get("/_simulator/stats")["calls"]
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert (
        report["submit_calls"]
        == calls["PUT import"]
        == sum(entry["attempts"] for entry in report["imports"])
    )
    assert (
        report["status_calls"]
        == calls["GET import"]
        == sum(entry["polls"] for entry in report["imports"])
    )
    assert report["account_full_waits"] >= 1
    assert report["status_calls"] > 0


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
    """`insight-import demo` imports its sample into the simulator, through the faults it names."""
    done = run_cli("demo", "--records", "3000", "--output", str(tmp_path / "demo"), timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Imported" in done.stdout
    report = orjson.loads((tmp_path / "demo" / "report.json").read_bytes())
    assert read_jsonl(tmp_path / "demo" / "dead-letter.jsonl")
    # the faults it announces happen on the way: a lost response, a Failed import resubmitted
    assert report["lost_responses"] == 1
    assert report["resubmits"] >= 1
    assert b"failed imports re-sent: " in done.stdout


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
    assert b"pass another --journal" in done.stderr
    assert simulator_process.records("CliJournal") == []


# --------------------------------------------------------------------------- re-runs


def default_paths_args(sim: SimulatorProcess, tmp: Path, collection: str) -> list[str]:
    """fast_run_args without --journal and --dead-letter: the defaults, in tmp's state dir."""
    args = fast_run_args(sim, tmp, collection)
    for option in ("--journal", "--dead-letter"):
        at = args.index(option)
        del args[at : at + 2]
    return args


def state_env(tmp: Path) -> dict[str, str]:
    """The environment that puts the user's state dir (default journals) under tmp."""
    return {"XDG_STATE_HOME": str(tmp / "state")}


def state_files(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "state" / "insight-orchestrator").iterdir())


def test_a_finished_run_imports_new_content_at_the_same_path(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """Appended lines are sent alone, new content is a new run, the same content nothing to do."""
    data = write_jsonl(tmp_path / "daily.jsonl", orders(20, prefix="d1-"))
    args = [*default_paths_args(simulator_process, tmp_path, "CliDaily"), "--scope", "contact"]
    env = state_env(tmp_path)
    assert run_cli("run", str(data), *args, env=env).returncode == 0
    with data.open("ab") as handle:
        handle.write(b"".join(orjson.dumps(r) + b"\n" for r in orders(5, prefix="d1b-")))
    grown = run_cli("run", str(data), *args, env=env)
    assert grown.returncode == 0, grown.stderr.decode()
    assert b"first 20 lines were imported by the journal's finished run" in grown.stdout
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert (report["records_read"], report["records_imported"]) == (5, 5)
    assert report["inputs"][0]["skipped_lines"] == 20
    assert len(simulator_process.records("CliDaily")) == 25
    write_jsonl(data, orders(7, prefix="d2-"))
    replaced = run_cli("run", str(data), *args, env=env)
    assert replaced.returncode == 0, replaced.stderr.decode()
    assert b"changed since the journal's finished run" in replaced.stdout
    assert orjson.loads((tmp_path / "report.json").read_bytes())["records_imported"] == 7
    assert len(simulator_process.records("CliDaily")) == 32
    same = run_cli("run", str(data), *args, env=env)
    assert same.returncode == 0
    assert b"Nothing to do" in same.stdout
    assert len(simulator_process.imports("CliDaily")) == 3


def test_standard_input_is_never_skipped(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A second run from stdin imports its data: stdin is never resumed, and says so."""
    args = [*fast_run_args(simulator_process, tmp_path, "CliStdinTwice"), "--scope", "contact"]
    first = b"".join(orjson.dumps(r) + b"\n" for r in orders(10, prefix="a"))
    assert run_cli("run", "-", *args, stdin=first).returncode == 0
    second = b"".join(orjson.dumps(r) + b"\n" for r in orders(10, prefix="b"))
    done = run_cli("run", "-", *args, stdin=second)
    assert done.returncode == 0, done.stderr.decode()
    assert b"standard input cannot be read again" in done.stdout
    assert len(simulator_process.records("CliStdinTwice")) == 20


@pytest.mark.parametrize("edit", ["append", "rewrite"])
def test_an_unfinished_run_resumes_a_grown_input_and_refuses_a_changed_one(
    simulator_process: SimulatorProcess, tmp_path: Path, edit: str
) -> None:
    """After a crash, appended lines are imported with the rest; an edited input exits 2."""
    collection = f"CliCrashEdit{edit.title()}"
    data = write_jsonl(tmp_path / "in.jsonl", orders(600))
    args = [*fast_run_args(simulator_process, tmp_path, collection), "--scope", "contact"]
    args += ["--max-body-bytes", "8000"]
    crashed = run_cli("run", str(data), *args, env={"INSIGHT_IMPORT_FAILPOINT": "finished:1"})
    assert crashed.returncode == -signal.SIGKILL
    if edit == "append":
        with data.open("ab") as handle:
            handle.write(b"".join(orjson.dumps(r) + b"\n" for r in orders(30, prefix="late")))
    else:
        write_jsonl(data, orders(600, prefix="other"))
    done = run_cli("run", str(data), *args)
    if edit == "append":
        assert done.returncode == 0, done.stderr.decode()
        assert len(simulator_process.records(collection)) == 630
    else:
        assert done.returncode == 2
        assert b"changed since the journal recorded" in done.stderr
        assert b"Traceback" not in done.stderr


# --------------------------------------------------------------------------- dead letters, replay


def test_each_journal_has_its_own_dead_letter_file(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """The default dead-letter file is named after its journal: another command keeps off it."""
    env = state_env(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", orders(5), extra=b"not json\n")
    good = write_jsonl(tmp_path / "good.jsonl", orders(5))
    one = ["--scope", "contact"]
    first = run_cli(
        "run", str(bad), *default_paths_args(simulator_process, tmp_path, "CliDlA"), *one, env=env
    )
    assert first.returncode == 1, first.stderr.decode()
    second = run_cli(
        "run", str(good), *default_paths_args(simulator_process, tmp_path, "CliDlB"), *one, env=env
    )
    assert second.returncode == 0, second.stderr.decode()
    journals = [name for name in state_files(tmp_path) if name.endswith(".sqlite")]
    assert len(journals) == 2
    letters = {}
    for journal in journals:
        stem = journal.removesuffix(".sqlite")
        path = tmp_path / "state" / "insight-orchestrator" / f"{stem}.dead-letter.jsonl"
        letters[stem.split("-")[0]] = read_jsonl(path)
    assert [letter["reason"] for letter in letters["CliDlA"]] == ["json-syntax"]
    assert letters["CliDlB"] == []


def test_replay_sends_the_records_of_a_dead_letter_file_again(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """--replay sends each `record` again; a line without one is reported and kept, exit 1."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(5), extra=b'{"key": "fix-me", "json": [1]}\n')
    args = [*fast_run_args(simulator_process, tmp_path, "CliReplay"), "--scope", "contact"]
    assert run_cli("run", str(data), *args).returncode == 1
    (letter,) = read_jsonl(tmp_path / "dead-letter.jsonl")
    assert letter["record"] == {"key": "fix-me", "json": [1]}
    letter["record"] = {**orders(1)[0], "key": "fix-me", "json": {"fixed": 12345678901234567890}}
    no_record = {"source": "x:1", "key": "k", "reason": "Gone", "message": "m", "record": None}
    replayed = tmp_path / "to-replay.jsonl"
    write_jsonl(replayed, [letter, no_record])
    replay_args = [
        *default_paths_args(simulator_process, tmp_path, "CliReplay"),
        "--scope",
        "contact",
    ]
    done = run_cli("run", "--replay", str(replayed), *replay_args, env=state_env(tmp_path))
    assert done.returncode == 1, done.stderr.decode()
    assert b"without a record, not sent again (lines 2)" in done.stdout
    stored = {r["key"]: r["json"] for r in simulator_process.records("CliReplay")}
    assert stored["fix-me"] == {"fixed": 12345678901234567890}
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["replay"] == {"file": str(replayed), "lines_without_record": [2]}
    assert (report["records_read"], report["records_imported"]) == (1, 1)
    kept = Path(report["dead_letter_file"])
    assert kept.name.endswith(".dead-letter.jsonl")
    assert read_jsonl(kept) == [no_record]
    again = run_cli("run", "--replay", str(replayed), *replay_args, env=state_env(tmp_path))
    assert again.returncode == 1
    assert b"Nothing to do" in again.stdout


def test_replay_refuses_a_line_that_is_not_a_dead_letter(tmp_path: Path) -> None:
    """A dead-letter file with a broken line exits 2 naming file:line, before any import."""
    replayed = tmp_path / "dl.jsonl"
    replayed.write_bytes(b'{"record": {"key": "a", "json": {}}}\n{broken\n')
    done = run_cli(
        "run",
        "--replay",
        str(replayed),
        "--collection",
        "CliReplayBad",
        "--journal",
        str(tmp_path / "j.sqlite"),
        "--base-url",
        "http://127.0.0.1:9",
    )
    assert done.returncode == 2
    assert f"{replayed}:2: not a dead letter".encode() in done.stderr
    assert not (tmp_path / "j.sqlite").exists()


# --------------------------------------------------------------------------- errors, report


@pytest.mark.parametrize("change", [["--collection", "CliOther"], ["--scope", "account"]])
def test_a_journal_of_another_run_exits_2_without_a_traceback(
    simulator_process: SimulatorProcess, tmp_path: Path, change: list[str]
) -> None:
    """Re-using a journal with another collection or scope: one message, exit 2."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(3))
    args = [*fast_run_args(simulator_process, tmp_path, "CliMine"), "--scope", "contact"]
    assert run_cli("run", str(data), *args).returncode == 0
    done = run_cli("run", str(data), *args, *change)
    assert done.returncode == 2
    assert b"this journal belongs to another run" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize("option", ["--dead-letter", "--report", "--journal"])
def test_an_output_path_that_cannot_be_written_exits_2_before_importing(
    simulator_process: SimulatorProcess, tmp_path: Path, option: str
) -> None:
    """A dead-letter file, report or journal under a regular file: exit 2, nothing imported."""
    collection = "CliUnwritable" + option.strip("-").replace("-", "").title()
    data = write_jsonl(tmp_path / "in.jsonl", orders(5), extra=b"not json\n")
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    args = fast_run_args(simulator_process, tmp_path, collection)
    at = args.index(option)
    args[at + 1] = str(blocker / "out")
    done = run_cli("run", str(data), *args, "--scope", "contact")
    assert done.returncode == 2, done.stderr.decode()
    assert f"{blocker} is not a directory".encode() in done.stderr
    assert b"Traceback" not in done.stderr
    assert simulator_process.imports(collection) == []
    assert not (tmp_path / "journal.sqlite").exists() or option == "--journal"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_on_an_output_file_exits_3_with_no_partial_file(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """ENOSPC on the dead-letter file (run and re-run) or report: a message, exit 3, no .tmp."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(5), extra=b"not json\n")
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    args = [*fast_run_args(simulator_process, tmp_path, "CliDiskFull"), "--scope", "contact"]
    for _ in range(2):  # the run, then its re-run with nothing left to import
        done = run_cli("run", str(data), *args, "--dead-letter", str(full))
        assert done.returncode == 3, done.stderr.decode()
        assert f"cannot write the dead-letter file {full}: No space left".encode() in done.stderr
        assert b"Traceback" not in done.stderr
    assert len(simulator_process.records("CliDiskFull")) == 5
    done = run_cli("run", str(data), *args, "--report", "/dev/full")
    assert done.returncode == 3
    assert b"cannot write the report /dev/full: No space left" in done.stderr
    assert b"Traceback" not in done.stderr
    assert full.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert read_jsonl(tmp_path / "dead-letter.jsonl")[0]["reason"] == "json-syntax"


def test_the_report_holds_inputs_start_exit_status_and_reasons(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """The report names the inputs with fingerprints, started_at, exit status and reasons."""
    data = write_jsonl(
        tmp_path / "in.jsonl", orders(20, unknown=(3,)), extra=b"not json\n{also not\n"
    )
    args = [*fast_run_args(simulator_process, tmp_path, "CliReport"), "--scope", "contact"]
    done = run_cli("run", str(data), *args)
    assert done.returncode == 1, done.stderr.decode()
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["exit_status"] == 1
    assert report["started_at"].endswith("Z")
    (entry,) = report["inputs"]
    assert (entry["path"], entry["lines"], entry["skipped_lines"]) == (str(data.resolve()), 22, 0)
    assert len(entry["fingerprint"]) == 32
    assert report["dead_letter_file"] == str(tmp_path / "dead-letter.jsonl")
    assert report["dead_letters_by_reason"] == {"json-syntax": 2, "ContactEmailDoesNotExist": 1}


def test_a_journal_of_another_run_hints_at_fresh_and_journal(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """Reusing a journal for another collection exits 2; the command names --fresh and --journal."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(3))
    first = run_cli("run", str(data), *fast_run_args(simulator_process, tmp_path, "CliFirst"))
    assert first.returncode == 0, first.stderr.decode()
    done = run_cli("run", str(data), *fast_run_args(simulator_process, tmp_path, "CliOther"))
    assert done.returncode == 2, done.stderr.decode()
    assert b"fresh=True" in done.stderr  # the library's words
    assert b"hint: --fresh starts over" in done.stderr  # and the command's flags
    assert b"--journal PATH" in done.stderr
    assert simulator_process.records("CliOther") == []


# --------------------------------------------------------------------------- API limits


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        (["--max-concurrent", "8"], "5 concurrent bulk imports"),
        (["--poll-min", "1"], "5–30 s apart"),
    ],
)
def test_settings_beyond_the_api_limits_are_refused_on_a_dotdigital_host(
    tmp_path: Path, flags: list[str], rule: str
) -> None:
    """--max-concurrent 8 or --poll-min 1 on Dotdigital exit 2, naming the rule and the override."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    done = run_cli(
        "run", str(data), "--collection", "Cc", *flags, "--journal", str(tmp_path / "j.sqlite")
    )
    assert done.returncode == 2, done.stderr.decode()
    err = done.stderr.decode()
    assert rule in err
    assert "--allow-unsafe-limits" in err
    assert "r1-api.dotdigital.com" in err
    assert not (tmp_path / "j.sqlite").exists()


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--allow-unsafe-limits"], {}),
        ([], {"INSIGHT_IMPORT_ALLOW_UNSAFE_LIMITS": "1"}),
    ],
    ids=["flag", "env"],
)
def test_the_override_lifts_the_api_limits_with_a_warning(
    tmp_path: Path, flags: list[str], env: dict[str, str]
) -> None:
    """With the override the limits pass (with a warning): the run gets as far as its journal."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the journal's folder should be")
    journal = str(blocker / "j.sqlite")
    done = run_cli(
        "run", str(data), "--collection", "Cc", "--max-concurrent", "8", *flags,
        "--journal", journal, env=env,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "warning: max_concurrent 8" in err
    assert journal in err  # it stopped at the journal, past the limit check


def test_a_mistyped_environment_variable_is_named_with_the_closest_option(tmp_path: Path) -> None:
    """INSIGHT_IMPORT_MAX_CONCURENT is not ignored silently: a warning names the right variable."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    done = run_cli("run", str(data), env={"INSIGHT_IMPORT_MAX_CONCURENT": "3"})
    err = done.stderr.decode()
    assert "INSIGHT_IMPORT_MAX_CONCURENT" in err
    assert "did you mean INSIGHT_IMPORT_MAX_CONCURRENT?" in err


# --------------------------------------------------------------------------- first contact


def test_a_wrong_password_is_found_before_the_input_is_read(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A wrong password exits 3 at once, while standard input is still open and unread."""
    args = fast_run_args(simulator_process, tmp_path, "CliFirstAuth")
    env = {**run_env(), "DOTDIGITAL_API_PASSWORD": "wrong-password"}
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 3, err.decode()
    assert b"DOTDIGITAL_API_PASSWORD" in err


def test_an_unreachable_host_fails_fast_naming_host_and_cause(tmp_path: Path) -> None:
    """A refused first contact exits 3 within seconds and names the host and the cause."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    started = time.monotonic()
    done = run_cli(
        "run", str(data), "--collection", "Cc", "--base-url", f"http://127.0.0.1:{port}",
        "--journal", str(tmp_path / "j.sqlite"), "--progress", "off", timeout=30,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr.decode()
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}".encode() in done.stderr
    assert b"connection refused" in done.stderr


def test_an_account_of_another_region_is_told_which_region_to_use(tmp_path: Path) -> None:
    """When account-info names another region's host, the run exits 3 saying --region r2."""
    with serve_simulator("--api-endpoint", "https://r2-api.dotdigital.com") as sim:
        data = write_jsonl(tmp_path / "in.jsonl", orders(3))
        done = run_cli("run", str(data), *fast_run_args(sim, tmp_path, "CliRegion"))
        assert done.returncode == 3, done.stderr.decode()
        assert b"--region r2" in done.stderr
        assert b"--region auto" in done.stderr
        assert sim.records("CliRegion") == []


def test_region_auto_takes_the_account_api_endpoint(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """--region auto imports into the API root that account-info names."""
    with serve_simulator("--api-endpoint", simulator_process.base_url) as first:
        data = write_jsonl(tmp_path / "in.jsonl", orders(4))
        args = fast_run_args(first, tmp_path, "CliAuto")
        done = run_cli("run", str(data), *args, "--scope", "contact", "--region", "auto")
        assert done.returncode == 0, done.stderr.decode()
        assert first.records("CliAuto") == []
    assert len(simulator_process.records("CliAuto")) == 4


# --------------------------------------------------------------------------- the command itself


def test_version_and_help_show_defaults_and_exit_codes() -> None:
    """--version prints the version; run --help shows each default and the exit codes."""
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.decode().startswith("insight-import ")
    helped = run_cli("run", "--help").stdout.decode()
    assert "(default: 5)" in helped
    assert "(default: 50000000)" in helped
    assert "exit status:" in helped
    assert "130" in helped


def test_a_run_loads_only_what_it_needs(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A whole `run` imports none of the outbox, the worker, the simulator, the extras, rich
    or importlib.metadata: each would add to every cron run's start-up."""
    data = write_jsonl(tmp_path / "orders.jsonl", orders(20))
    args = fast_run_args(simulator_process, tmp_path, "CliLean")
    loaded = tmp_path / "modules.txt"
    script = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        "code = main(sys.argv[2:])\n"
        "open(sys.argv[1], 'w').write('\\n'.join(sorted(sys.modules)))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(loaded), "run", str(data), *args, "--scope", "contact"],
        capture_output=True,
        env=run_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    modules = set(loaded.read_text().split())
    assert "orchestrator.engine" in modules  # the run did run
    unneeded = {
        "orchestrator.outbox",  # the package; its commands' parsers live in outbox_cli
        "orchestrator.worker",
        "orchestrator.worker_http",
        "orchestrator.simulator",
        "psycopg",
        "prometheus_client",
        "rich",
        "importlib.metadata",
    }
    assert modules & unneeded == set()


def test_simulator_on_a_taken_port_says_so_in_one_line() -> None:
    """`simulator --port N` with N taken exits 2 with one line, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("simulator", "--port", str(port), timeout=30)
    assert done.returncode == 2, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert f"port {port}".encode() in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_summary_says_1_record_not_1_records(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """One record makes `1 record` and `1 import` in the summary."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(1))
    args = fast_run_args(simulator_process, tmp_path, "CliOne")
    done = run_cli("run", str(data), *args, "--scope", "contact")
    assert done.returncode == 0, done.stderr.decode()
    assert b"Imported 1 of 1 record into" in done.stdout
    assert b"with 1 import." in done.stdout


# --------------------------------------------------------------------------- what a person sees


def json_events(stderr: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]


def test_without_a_terminal_progress_is_a_periodic_run_progress_event(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """stderr not a terminal: run.progress events say records, bytes, percent, rates, imports."""
    simulator_process.post("/_simulator/faults", {"slow_responses": 20, "slow_delay_s": 0.1})
    data = write_jsonl(tmp_path / "in.jsonl", orders(2000))
    args = fast_run_args(simulator_process, tmp_path, "CliProgress")
    done = run_cli(
        "run", str(data), *args, "--scope", "contact", "--max-body-bytes", "20000",
        "--progress-interval", "0.2",
    )  # fmt: skip
    simulator_process.post("/_simulator/faults", {"slow_responses": 0})
    assert done.returncode == 0, done.stderr.decode()
    progress = [e for e in json_events(done.stderr) if e["event"] == "run.progress"]
    assert len(progress) >= 2
    last = progress[-1]
    size = data.stat().st_size
    assert (last["bytes_read"], last["input_bytes"], last["percent"]) == (size, size, 100.0)
    assert (last["records_read"], last["records_imported"]) == (2000, 2000)
    assert last["imports_in_flight"] == 0
    assert last["elapsed_s"] > 0
    for key in ("records_per_s", "bytes_per_s", "eta_s", "imports_finished", "records_invalid"):
        assert key in last


def test_on_a_terminal_the_output_is_calm(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """On a terminal at the default level: the live line, no log line per import."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(300))
    args = fast_run_args(simulator_process, tmp_path, "CliCalm")
    for flag in ("--progress", "--log-format"):  # leave both to their terminal defaults
        del args[args.index(flag) : args.index(flag) + 2]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(data), *args, "--scope", "contact",
         "--max-body-bytes", "8000"],
        env={**run_env(), "COLUMNS": "200", "TERM": "xterm"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    screen = b""
    while True:
        try:
            piece = os.read(primary, 65536)
        except OSError:  # the other end closed: the command ended
            break
        if not piece:
            break
        screen += piece
    out, _ = process.communicate(timeout=60)
    os.close(primary)
    assert process.returncode == 0, screen.decode(errors="replace")
    assert b"Imported 300 of 300 records" in out
    assert b"imports:" in screen
    assert b"MB" in screen
    for noisy in (b"import.finished", b"import.submitted", b"batch.sealed"):
        assert noisy not in screen


def test_a_resumed_run_counts_what_earlier_runs_did(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """After an interrupted run, the resumed run's progress counts the records read before too."""
    simulator_process.post("/_simulator/faults", {"slow_responses": 100_000, "slow_delay_s": 0.1})
    data = write_jsonl(tmp_path / "in.jsonl", orders(3000))
    args = [*fast_run_args(simulator_process, tmp_path, "CliResumeCounts"), "--scope", "contact"]
    args += ["--max-body-bytes", "8000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(data), *args],
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    finished = 0
    for line in process.stderr:
        finished += b'"import.finished"' in line
        if finished == 3:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    simulator_process.post("/_simulator/faults", {"slow_responses": 0})
    assert process.returncode == 130, err.decode()
    done = run_cli("run", str(data), *args)
    assert done.returncode == 0, done.stderr.decode()
    last = [e for e in json_events(done.stderr) if e["event"] == "run.progress"][-1]
    assert last["resumed"] is True
    assert last["records_read"] == last["records_imported"] == 3000


def test_each_retry_is_logged_once(simulator_process: SimulatorProcess, tmp_path: Path) -> None:
    """Two 5xx answers make two log lines, not two or three per retry."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(5))
    args = fast_run_args(simulator_process, tmp_path, "CliRetryLines")
    # the first contact is not retried by the faults: they start once it passed
    simulator_process.post("/_simulator/faults", {"server_errors": 0})
    before = simulator_process.get("/_simulator/stats")["requests"]
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-", *args, "--scope", "contact"],
        env=run_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while simulator_process.get("/_simulator/stats")["requests"] == before:  # the first contact
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # its answer is on the way; the run now waits for standard input
    simulator_process.post("/_simulator/faults", {"server_errors": 2})
    _, err = process.communicate(data.read_bytes(), timeout=60)
    assert process.returncode == 0, err.decode()
    events = [e["event"] for e in json_events(err)]
    retries = [e for e in events if "retr" in e or e == "api.call_failed"]
    assert retries == ["api.call_failed", "api.call_failed"], events


def test_a_newline_free_gzip_bomb_is_dead_lettered_in_bounded_memory(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """400 MB of zeros in one line: peak memory stays far below it, the line is dead-lettered
    as record-too-large with its file:line, the lines after it are imported."""

    data = tmp_path / "bomb.jsonl.gz"
    squeeze = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with data.open("wb") as out:
        out.write(squeeze.compress(b'{"key": "first", "json": {}}\n{"key": "big", "json": "'))
        for _ in range(400):
            out.write(squeeze.compress(zeros))
        out.write(squeeze.compress(b'"}\n{"key": "after", "json": {}}\n'))
        out.write(squeeze.flush())
    args = fast_run_args(simulator_process, tmp_path, "CliBomb")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INSIGHT_", "DOTDIGITAL_"))}
    environ.update(DOTDIGITAL_API_USER="apiuser-demo@apiconnector.com")
    environ.update(DOTDIGITAL_API_PASSWORD=SIM_PASSWORD)
    command = [sys.executable, "-m", "orchestrator", "run", str(data), *args]
    command += ["--max-body-bytes", "1000000"]
    process = subprocess.Popen(
        command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    assert process.returncode == 1
    assert peak < 200_000_000, peak
    [letter] = read_jsonl(tmp_path / "dead-letter.jsonl")
    assert (letter["source"], letter["reason"]) == (f"{data.resolve()}:2", "record-too-large")
    assert letter["record"].startswith('{"key": "big", "json": "\x00')
    assert len(letter["record"]) == 1024
    assert sorted(r["key"] for r in simulator_process.records("CliBomb")) == ["after", "first"]


def _cli_env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INSIGHT_", "DOTDIGITAL_"))}
    environ.update(DOTDIGITAL_API_USER="apiuser-demo@apiconnector.com")
    environ.update(DOTDIGITAL_API_PASSWORD=SIM_PASSWORD)
    return environ


def _fifo_writer(fifo: Path, data: bytes, *, then_sleep: float = 0.0) -> subprocess.Popen[bytes]:
    """A process that writes ``data`` into the named pipe in small pieces, then waits."""
    script = (
        "import sys, time\n"
        "data = sys.stdin.buffer.read()\n"
        "with open(sys.argv[1], 'wb', buffering=0) as out:\n"
        "    for i in range(0, len(data), 4096):\n"
        "        out.write(data[i:i + 4096]); time.sleep(0.001)\n"
        "    time.sleep(float(sys.argv[2]))\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(fifo), str(then_sleep)], stdin=subprocess.PIPE
    )
    assert writer.stdin is not None
    writer.stdin.write(data)
    writer.stdin.close()
    return writer


def test_a_named_pipe_is_read_once_like_stdin(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A FIFO fed by a writer process imports every record: the up-front check leaves it alone."""
    fifo = tmp_path / "orders.fifo"
    os.mkfifo(fifo)
    writer = _fifo_writer(
        fifo, gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in orders(400)))
    )
    args = fast_run_args(simulator_process, tmp_path, "CliFifo")
    done = run_cli("run", str(fifo), *args, "--scope", "contact", timeout=60)
    assert writer.wait(timeout=10) == 0
    assert done.returncode == 0, done.stderr.decode()
    assert len(simulator_process.records("CliFifo")) == 400
    opened = [line for line in done.stderr.splitlines() if b'"input.opened"' in line]
    assert opened
    assert orjson.loads(opened[0])["resumable"] is False
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["records_read"] == 400


def test_process_substitution_is_read_like_stdin(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """`run <(cat file)` (a /dev/fd/N path) imports the file; it is not refused as missing."""
    data = write_jsonl(tmp_path / "in.jsonl", orders(300, prefix="p"))
    args = " ".join(fast_run_args(simulator_process, tmp_path, "CliProcSub"))
    command = f'"{sys.executable}" -m orchestrator run <(cat "{data}") {args} --scope contact'
    done = subprocess.run(
        ["bash", "-c", command], env=_cli_env(), capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert len(simulator_process.records("CliProcSub")) == 300


@pytest.mark.parametrize("through", ["fifo", "stdin"])
def test_sigterm_while_a_pipe_writer_is_slow_exits_130(
    simulator_process: SimulatorProcess, tmp_path: Path, through: str
) -> None:
    """A run reading a FIFO or piped stdin whose writer has gone quiet stops on one SIGTERM
    with exit 130, at once (it does not wait for the writer)."""
    lines = b"".join(orjson.dumps(r) + b"\n" for r in orders(50, prefix="q"))
    args = [*fast_run_args(simulator_process, tmp_path, "CliQuiet"), "--scope", "contact"]
    writer: subprocess.Popen[bytes] | None = None
    target = "-"
    if through == "fifo":
        target = str(tmp_path / "slow.fifo")
        os.mkfifo(target)
        writer = _fifo_writer(Path(target), lines, then_sleep=120)
    logs = tmp_path / "stderr.log"
    with logs.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", target, *args],
            env=_cli_env(),
            stdin=None if writer else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        if process.stdin is not None:
            process.stdin.write(lines)  # and left open: the writer is quiet, not gone
            process.stdin.flush()
        deadline = time.monotonic() + 30
        while b'"input.opened"' not in logs.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 130, logs.read_text()
        assert b"interrupted" in logs.read_bytes()
    finally:
        process.kill()
        process.wait()
        if process.stdin is not None:
            process.stdin.close()
        if writer is not None:
            writer.kill()
            writer.wait()

"""The `insight-import` command, run as a real process against the simulator in another process."""

from __future__ import annotations

import gzip
import os
import signal
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

"""Benchmark: the worker draining the outbox, against `run` on the same records as a file.

Three measurements, each command a real process against a fresh simulator process:

- **throughput**: the same sample orders as a JSON Lines file (`insight-import run`, the baseline)
  and as outbox rows (`insight-import worker --burst`; the rows are inserted before the clock
  starts). Ratio = run's wall time / the worker's (goal >= 0.9x);
- **latency** under a trickle: a running worker, one row inserted every ``--trickle-every``
  seconds; the time from each INSERT's commit to the record showing in the simulator's
  collection (sampled every 20 ms), p50 and p99 (goal p99 <= linger + processing + poll_max);
- **peak RSS** of the worker draining a large backlog (``--backlog-mb``, goal < 400 MB).

    python -m benchmarks.worker [--mb 100] [--backlog-mb 400] [--trickle 150]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks._common import (
    credentials_env,
    ensure_bytecode,
    goal,
    percentile,
    sim_stats,
    simulator_process,
)
from benchmarks._data import record_section, write_orders_jsonl
from orchestrator.outbox import migrate

TITLE = "Worker: outbox drain, trickle latency, backlog memory (benchmarks.worker)"
COLLECTION = "Orders"
POLL = ("--poll-min", "0.1", "--poll-max", "0.5")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def _fill_outbox(database: Path, jsonl: Path) -> int:
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
    rows = 0
    with jsonl.open("rb") as lines:
        batch = []
        for line in lines:
            batch.append(("default", COLLECTION, "contact", "orders", line.rstrip(b"\n").decode()))
            if len(batch) == 10_000:
                conn.executemany(
                    "INSERT INTO insight_outbox (account, collection, scope, collection_type,"
                    " record) VALUES (?, ?, ?, ?, ?)",
                    batch,
                )
                conn.commit()
                rows += len(batch)
                batch = []
        if batch:
            conn.executemany(
                "INSERT INTO insight_outbox (account, collection, scope, collection_type, record)"
                " VALUES (?, ?, ?, ?, ?)",
                batch,
            )
            conn.commit()
            rows += len(batch)
    conn.close()
    return rows


def _worker_args(base_url: str, database: Path, *extra: str) -> list[str]:
    return _cli(
        "worker",
        "--database",
        f"sqlite:///{database}",
        "--base-url",
        base_url,
        *POLL,
        "--log-level",
        "warning",
        "--log-format",
        "json",
        *extra,
    )


def _timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, sampled every 50 ms) of a command."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=credentials_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    watched = psutil.Process(process.pid)
    peak = 0
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    reader.join()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{command[3]} exited {process.returncode}: {errors[0][-2000:]!r}")
    return elapsed, peak


def throughput(folder: Path, mb: float, rps: float) -> dict[str, Any]:
    jsonl = folder / "orders.jsonl"
    lines, size = write_orders_jsonl(jsonl, mb=mb, seed=3)
    database = folder / "throughput.sqlite"
    _fill_outbox(database, jsonl)
    with simulator_process(records_per_second=rps) as base_url:
        run_s, run_rss = _timed(
            _cli(
                "run",
                str(jsonl),
                "--collection",
                COLLECTION,
                "--scope",
                "contact",
                "--type",
                "orders",
                "--base-url",
                base_url,
                *POLL,
                "--journal",
                str(folder / "journal.sqlite"),
                "--progress",
                "off",
                "--log-level",
                "warning",
            )
        )
        run_imports = len(sim_stats(base_url)["imports"])
    with simulator_process(records_per_second=rps) as base_url:
        worker_s, worker_rss = _timed(_worker_args(base_url, database, "--burst"))
        worker_imports = len(sim_stats(base_url)["imports"])
    return {
        "lines": lines,
        "mb": size / 1e6,
        "run_s": run_s,
        "worker_s": worker_s,
        "run_rss": run_rss,
        "worker_rss": worker_rss,
        "run_imports": run_imports,
        "worker_imports": worker_imports,
    }


def _records_seen(base_url: str) -> set[str]:
    try:
        with urllib.request.urlopen(
            f"{base_url}/_simulator/collections/{COLLECTION}", timeout=10
        ) as answer:
            data = orjson.loads(answer.read())
    except urllib.error.HTTPError:
        return set()
    return {r["key"] for r in data["records"]}


def latency(
    folder: Path, count: int, every: float, linger: float, processing: float
) -> dict[str, Any]:
    database = folder / "trickle.sqlite"
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
    with simulator_process(records_per_second=100_000, min_processing=processing) as base_url:
        process = subprocess.Popen(
            _worker_args(base_url, database, "--linger", str(linger), "--poll-interval", "0.2"),
            env=credentials_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)  # started and listening to the store
            written: dict[str, float] = {}
            seen: dict[str, float] = {}
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    now = time.monotonic()
                    for key in _records_seen(base_url) - seen.keys():
                        seen[key] = now
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            for i in range(count):
                key = f"trickle-{i}"
                record = orjson.dumps(
                    {
                        "key": key,
                        "json": {"n": i},
                        "contactIdentity": {"identifier": "email", "value": f"c{i}@x.io"},
                    }
                ).decode()
                conn.execute(
                    "INSERT INTO insight_outbox (account, collection, scope, collection_type,"
                    " record) VALUES ('default', ?, 'contact', 'orders', ?)",
                    (COLLECTION, record),
                )
                conn.commit()
                written[key] = time.monotonic()
                time.sleep(every)
            deadline = time.monotonic() + 30
            while len(seen) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            watcher.join()
        finally:
            process.terminate()
            process.wait(timeout=30)
    conn.close()
    waits = [seen[key] - at for key, at in written.items() if key in seen]
    return {
        "count": count,
        "seen": len(waits),
        "p50": percentile(waits, 0.5),
        "p99": percentile(waits, 0.99),
        "max": max(waits) if waits else float("nan"),
    }


def backlog(folder: Path, mb: float, rps: float) -> dict[str, Any]:
    jsonl = folder / "backlog.jsonl"
    lines, size = write_orders_jsonl(jsonl, mb=mb, seed=5)
    database = folder / "backlog.sqlite"
    _fill_outbox(database, jsonl)
    jsonl.unlink()
    with simulator_process(records_per_second=rps) as base_url:
        seconds, peak = _timed(_worker_args(base_url, database, "--burst"))
    return {"lines": lines, "mb": size / 1e6, "seconds": seconds, "peak": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="MB of orders for throughput")
    parser.add_argument("--backlog-mb", type=float, default=400.0, help="MB of backlog for RSS")
    parser.add_argument("--trickle", type=int, default=150, help="rows of the trickle")
    parser.add_argument("--trickle-every", type=float, default=0.1, help="seconds between rows")
    parser.add_argument("--linger", type=float, default=1.0, help="the worker's linger")
    parser.add_argument("--processing", type=float, default=0.2, help="seconds per import")
    parser.add_argument("--rps", type=float, default=200_000, help="simulator records/s")
    parser.add_argument(
        "--only", choices=("throughput", "backlog"), help="one measurement, printed, not recorded"
    )
    args = parser.parse_args(argv)
    ensure_bytecode()  # start-ups as an installed copy makes them
    if args.only:
        with tempfile.TemporaryDirectory(prefix="worker-bench-") as scratch:
            if args.only == "throughput":
                t = throughput(Path(scratch), args.mb, args.rps)
                print(f"throughput: {t} ratio {t['run_s'] / t['worker_s']:.2f}x")
            else:
                b = backlog(Path(scratch), args.backlog_mb, args.rps)
                print(f"backlog: {b} peak {b['peak'] / 1e6:.0f} MB")
        return
    folder = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    print(f"working in {folder}", file=sys.stderr)

    t = throughput(folder, args.mb, args.rps)
    ratio = t["run_s"] / t["worker_s"]
    print(f"throughput: {t}", file=sys.stderr)
    lat = latency(folder, args.trickle, args.trickle_every, args.linger, args.processing)
    print(f"latency: {lat}", file=sys.stderr)
    bound = args.linger + args.processing + 0.5 + 0.2  # + poll_max + the store's poll interval
    b = backlog(folder, args.backlog_mb, args.rps)
    print(f"backlog: {b}", file=sys.stderr)
    shutil.rmtree(folder)  # the databases, and the body files of imports a stop left in flight

    run_row = (
        f"| `run` on a {t['mb']:.0f} MB file ({t['lines']:,} orders) | {t['run_s']:.2f} "
        f"| {t['lines'] / t['run_s']:,.0f} | {t['run_imports']} "
        f"| {t['run_rss'] / 1e6:.0f} | 1.00x |"
    )
    worker_row = (
        f"| `worker --burst` on the same rows in the outbox | {t['worker_s']:.2f} "
        f"| {t['lines'] / t['worker_s']:,.0f} | {t['worker_imports']} "
        f"| {t['worker_rss'] / 1e6:.0f} | {ratio:.2f}x |"
    )
    rss_goal = goal(b["peak"] < 400e6)
    body = f"""
Simulator in its own process at {args.rps:,.0f} records/s; polls 0.1-0.5 s; both commands as
real processes (`run` parsing in processes, as the command does).

| measurement | seconds | records/s | imports | peak RSS MB | vs run |
|---|---:|---:|---:|---:|---:|
{run_row}
{worker_row}

**Throughput ratio: {ratio:.2f}x** (goal >= 0.9x: {goal(ratio >= 0.9)}).

Trickle: {lat["count"]} rows, one every {args.trickle_every} s, linger {args.linger} s, imports
of {args.processing} s, store looked at every 0.2 s: INSERT to imported p50 **{lat["p50"]:.2f} s**,
p99 **{lat["p99"]:.2f} s**, max {lat["max"]:.2f} s ({lat["seen"]} of {lat["count"]} seen; sampled
every 20 ms). Goal p99 <= linger + processing + poll_max + the store's poll = {bound:.1f} s:
{goal(lat["p99"] <= bound)}.

Backlog: {b["mb"]:.0f} MB ({b["lines"]:,} orders) drained by `worker --burst` in
{b["seconds"]:.1f} s, **peak RSS {b["peak"] / 1e6:.0f} MB** (goal < 400 MB: {rss_goal}).
"""
    print(body)
    record_section(TITLE, body)


if __name__ == "__main__":
    main()

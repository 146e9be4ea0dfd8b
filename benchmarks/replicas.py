"""Benchmark: 1, 2 and 3 `insight-import worker` replicas sharing one PostgreSQL outbox.

- **throughput**: the same orders, enqueued for 3 accounts (a simulator process each), drained
  by N replicas (real processes, continuous mode, stopped once the outbox is empty); records/s
  and the ratio to 1 replica;
- **claim overhead**: time in ``claim`` + ``seal`` per batch of one replica's store (in this
  process, the body assembled between them is not counted).

The PostgreSQL server is the one of the tests: ``INSIGHT_IMPORT_TEST_POSTGRES`` (each run gets a
fresh schema); without it the benchmark says so and exits.

    INSIGHT_IMPORT_TEST_POSTGRES=postgresql://... python -m benchmarks.replicas [--mb 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio

from benchmarks._common import SIM_PASSWORD, credentials_env, simulator_process
from benchmarks._data import record_section, write_orders_jsonl

TITLE = "Replicas: workers sharing a PostgreSQL outbox (benchmarks.replicas)"
ACCOUNTS = ("acme", "globex", "initech")
COLLECTION = "Orders"
ENV = "INSIGHT_IMPORT_TEST_POSTGRES"


@contextlib.contextmanager
def fresh_schema(server: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in server else "?"
    try:
        yield f"{server}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def fill(url: str, lines: list[str]) -> None:
    import psycopg

    from orchestrator.outbox.postgres import INSERT_ROW

    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        for account in ACCOUNTS:
            cursor.executemany(
                INSERT_ROW, [(account, COLLECTION, "contact", "orders", line) for line in lines]
            )


def left(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM insight_outbox) + (SELECT count(*) FROM insight_import)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def drain(url: str, accounts: Path, replicas: int, max_body: int) -> float:
    """Seconds from starting ``replicas`` workers to an empty outbox."""
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "worker",
        "--database",
        url,
        "--accounts",
        str(accounts),
        "--poll-min",
        "0.1",
        "--poll-max",
        "0.5",
        "--linger",
        "0.2",
        "--poll-interval",
        "0.2",
        "--max-body-bytes",
        str(max_body),
        "--log-level",
        "warning",
        "--log-format",
        "json",
    ]
    env = {**credentials_env(), "SIM_PASSWORD": SIM_PASSWORD}
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(replicas)
    ]
    try:
        while left(url):
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a replica exited before the outbox was drained")
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


async def claim_overhead(url: str, lines: list[str], max_body: int) -> dict[str, float]:
    """Mean and p50 milliseconds of claim + seal per batch of one store, and batches."""
    from orchestrator.outbox.base import OutboxQueue
    from orchestrator.outbox.postgres import PostgresOutbox
    from orchestrator.worker import _assemble

    queue = OutboxQueue("acme", COLLECTION, "contact", "orders")
    times: list[float] = []
    async with PostgresOutbox(url, worker=True, name="bench") as store:
        await store.enqueue(queue.account, queue.target(), lines, check=False)
        while True:
            began = time.perf_counter()
            claim = await store.claim(queue, budget_bytes=max_body - 200)
            spent = time.perf_counter() - began
            if not claim.rows:
                break
            batch, rows, _ = _assemble(queue.target(), max_body, claim.rows)
            assert batch is not None
            assert batch.refs.ends is not None
            began = time.perf_counter()
            held = await store.seal(queue, rows, batch.body, ends=batch.refs.ends)
            times.append(spent + time.perf_counter() - began)
            await store.mark_submitting(held.ref)
            await store.mark_submitted(held.ref, f"bench-{held.ref}")
            await store.finish(held.ref)
    return {
        "batches": len(times),
        "mean_ms": statistics.fmean(times) * 1e3,
        "p50_ms": statistics.median(times) * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of orders per account")
    parser.add_argument("--rps", type=float, default=200_000, help="simulator records/s")
    parser.add_argument("--max-body-mb", type=float, default=2.0, help="body cap, MB")
    args = parser.parse_args(argv)
    server = os.environ.get(ENV, "")
    if not server:
        print(f"benchmarks.replicas: skipped, set {ENV} to a PostgreSQL URL", file=sys.stderr)
        return
    max_body = int(args.max_body_mb * 1e6)
    folder = Path(tempfile.mkdtemp(prefix="replicas-bench-"))
    jsonl = folder / "orders.jsonl"
    count, size = write_orders_jsonl(jsonl, mb=args.mb, seed=5)
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    jsonl.unlink()
    results: dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        sims = [
            stack.enter_context(simulator_process(records_per_second=args.rps, seed=i))
            for i in range(len(ACCOUNTS))
        ]
        accounts = folder / "accounts.toml"
        accounts.write_text(
            "".join(
                f'[accounts.{name}]\nuser = "apiuser-demo@apiconnector.com"\n'
                f'password_env = "SIM_PASSWORD"\nbase_url = "{url}"\n\n'
                for name, url in zip(ACCOUNTS, sims, strict=True)
            )
        )
        for replicas in (1, 2, 3):
            with fresh_schema(server) as url:
                subprocess.run(
                    [sys.executable, "-m", "orchestrator", "outbox", "init", "--database", url],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                fill(url, lines)
                results[replicas] = drain(url, accounts, replicas, max_body)
                print(f"{replicas} replicas: {results[replicas]:.2f} s", file=sys.stderr)
    with fresh_schema(server) as url:
        overhead = anyio.run(claim_overhead, url, lines, max_body)
    accounts.unlink()
    os.rmdir(folder)
    total = count * len(ACCOUNTS)
    rows = "\n".join(
        f"| {n} | {seconds:.2f} | {total / seconds:,.0f} | {results[1] / seconds:.2f}x |"
        for n, seconds in results.items()
    )
    body = f"""
{len(ACCOUNTS)} accounts, a simulator process each at {args.rps:,.0f} records/s; {size / 1e6:.0f} MB
({count:,} orders) enqueued per account before the replicas start; the wall time runs from
starting the replicas (real processes) to an empty outbox, so it includes their start-up;
bodies of up to {args.max_body_mb:g} MB.

| replicas | seconds | records/s | vs 1 replica |
|---:|---:|---:|---:|
{rows}

Claim overhead (one store, {overhead["batches"]:.0f} batches of up to {args.max_body_mb:g} MB):
claim + seal **{overhead["mean_ms"]:.1f} ms** a batch on average (p50 {overhead["p50_ms"]:.1f} ms).
"""
    print(body)
    record_section(TITLE, body)


if __name__ == "__main__":
    main()

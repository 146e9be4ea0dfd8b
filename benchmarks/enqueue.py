"""Benchmark: enqueueing through ``orchestrator.outbox.enqueue`` vs plain SQL inserts.

An application writes sample order records into ``insight_outbox`` on a SQLite file (WAL, as the
store leaves it), one committed transaction per ``--batch`` records, as a service would. The
baseline, measured in the same run on a fresh file each time, is ``executemany`` of the contract's
``INSERT`` with the record texts ready; the helper checks every record with the record rules
first (lines as ``str``, and mappings, which it also encodes). Figures are rows per second.

    python -m benchmarks.enqueue [--records 100000] [--batch 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from benchmarks._data import best_of, record_section
from orchestrator.outbox import enqueue, migrate
from orchestrator.outbox.sqlite import INSERT_ROW
from orchestrator.records import Collection, Scope
from orchestrator.sample import generate_orders

TITLE = "Enqueue into the outbox (benchmarks.enqueue)"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="records per run")
    parser.add_argument("--batch", type=int, default=1000, help="records per transaction")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept")
    args = parser.parse_args(argv)

    collection = Collection("Orders", Scope.CONTACT, "orders")
    texts = [line.rstrip(b"\n").decode() for line in generate_orders(args.records, seed=1)]
    mappings = [orjson.loads(text) for text in texts]
    size = sum(len(text) for text in texts)
    print(f"{len(texts):,} records, {size / 1e6:.1f} MB of record JSON", file=sys.stderr)
    folder = Path(tempfile.mkdtemp(prefix="enqueue-bench-"))
    runs = 0

    def timed(write: Callable[[sqlite3.Connection, Sequence[object]], None]) -> float:
        def once() -> None:
            nonlocal runs
            runs += 1
            path = folder / f"run-{runs}.sqlite"
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn)
            records: Sequence[object] = mappings if write is helper_mappings else texts
            for start in range(0, len(records), args.batch):
                write(conn, records[start : start + args.batch])
                conn.commit()
            count = conn.execute("SELECT count(*) FROM insight_outbox").fetchone()[0]
            assert count == len(records), count
            conn.close()
            path.unlink()

        return best_of(args.repeat, once)

    queue = ("default", collection.name, collection.scope.value, collection.type)

    def plain_sql(conn: sqlite3.Connection, batch: Sequence[object]) -> None:
        conn.executemany(INSERT_ROW, [(*queue, text) for text in batch])

    def helper_lines(conn: sqlite3.Connection, batch: Sequence[object]) -> None:
        enqueue(conn, collection=collection, records=batch)  # type: ignore[arg-type]

    def helper_mappings(conn: sqlite3.Connection, batch: Sequence[object]) -> None:
        enqueue(conn, collection=collection, records=batch)  # type: ignore[arg-type]

    base_s = timed(plain_sql)
    lines_s = timed(helper_lines)
    mappings_s = timed(helper_mappings)
    folder.rmdir()
    n = len(texts)
    rows = [
        ("plain SQL `executemany(INSERT ...)` of ready texts", base_s),
        ("`outbox.enqueue(connection, records=lines)` (str lines, checked)", lines_s),
        ("`outbox.enqueue(connection, records=mappings)` (checked, encoded)", mappings_s),
    ]
    table = "| measurement | best s | rows/s | vs baseline |\n|---|---:|---:|---:|\n" + "".join(
        f"| {label} | {seconds:.3f} | {n / seconds:,.0f} | {base_s / seconds:.2f}x |\n"
        for label, seconds in rows
    )
    ratio = base_s / lines_s
    body = (
        f"{table}\n{n:,} contact-scoped order records ({size / n:,.0f} B each on average), one "
        f"committed transaction per {args.batch:,} rows, on a SQLite file in WAL mode with "
        f"synchronous=FULL; best of {args.repeat} runs each, a fresh file per run. "
        f"**Ratio: {ratio:.2f}x** for lines, {base_s / mappings_s:.2f}x for mappings."
    )
    record_section(TITLE, body)
    print(body)
    print(f"ratio {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()

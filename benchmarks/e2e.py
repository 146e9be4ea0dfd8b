"""End-to-end makespan against the simulator, compared with its lower bound and a naive client.

The simulator (its own process) processes ``records_per_second`` chosen so one full batch takes
``--batch-seconds``; polling is scaled down (``--poll-min``/``--poll-max``). We import a file of
about ``--batches`` full batches with the library API and report:

- makespan / lower bound, where the bound is ``ceil(batches / 5) * max(processing, poll_min)`` plus
  one round trip (the time until the simulator accepted the first import: reading, encoding and
  uploading the first batch; plus one status GET) -- goal <= 1.15;
- naive makespan / ours (fixed 4000-record batches, one at a time, a poll every ``poll_max``, stdlib
  json: ``benchmarks/naive.py``) on the same file and an identical fresh simulator -- goal >= 5;
- status calls per import (goal <= 3 on average) and the most imports active at once (<= 5).

    python -m benchmarks.e2e [--batches 25] [--max-body-bytes 2000000] [--batch-seconds 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DATA_DIR,
    SIM_PASSWORD,
    SIM_USER,
    goal,
    quiet_logs,
    sim_stats,
    simulator_process,
    status_rtt,
)
from benchmarks._data import record_section, write_orders_jsonl
from benchmarks.naive import run_naive
from orchestrator import (
    ClientSettings,
    Collection,
    InsightClient,
    Orchestrator,
    Settings,
    SqliteJournal,
)

COLLECTION = Collection("Orders", "contact", "orders")
MAX_CONCURRENT = 5


def _import_figures(stats: dict[str, Any], started: float) -> dict[str, Any]:
    imports = stats["imports"]
    durations = [i["planned_finish_at"] - i["accepted_at"] for i in imports]
    full = [d for d, i in zip(durations, imports, strict=True) if i["records"] > 0]
    polls = [len(i["polls"]) for i in imports]
    first_accept = min(i["accepted_at"] for i in imports) - started
    late = [
        max(0.0, min(p for p in i["polls"] if p >= i["finished_at"]) - i["finished_at"])
        for i in imports
        if i["finished_at"] is not None and any(p >= i["finished_at"] for p in i["polls"])
    ]
    return {
        "imports": len(imports),
        "processing_s": statistics.median(full),
        "polls": polls,
        "polls_per_import": sum(polls) / len(polls),
        "max_active": stats["max_active_seen"],
        "first_accept_s": first_accept,
        "detect_late_s": statistics.mean(late) if late else math.nan,
        "rejected_too_many_active": stats["rejected_too_many_active"],
        "records": sum(i["records"] for i in imports),
    }


def _timeline(stats: dict[str, Any], started: float) -> None:
    for i in stats["imports"]:
        accepted = i["accepted_at"] - started
        planned = i["planned_finish_at"] - started
        polls = " ".join(f"{p - started:.2f}" for p in i["polls"])
        print(
            f"{i['records']:>6} accepted {accepted:6.2f} planned {planned:6.2f}"
            f" finished {i['finished_at'] - started:6.2f} polls {polls}"
        )


async def _ours(path: Path, base_url: str, settings: Settings, journal_dir: Path) -> float:
    client = InsightClient(
        ClientSettings(username=SIM_USER, password=SIM_PASSWORD, base_url=base_url)
    )
    async with (
        SqliteJournal(journal_dir / "journal.sqlite") as journal,
        Orchestrator(client, settings=settings) as orch,
    ):
        start = time.monotonic()
        result = await orch.import_files(COLLECTION, [str(path)], journal=journal)
        makespan = time.monotonic() - start
    if not result.ok:
        raise SystemExit(f"our import did not succeed: {result.counters}")
    return makespan


def main() -> None:
    """Run the end-to-end benchmark and record its section of RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=25, help="full batches in the file")
    parser.add_argument("--max-body-bytes", type=int, default=2_000_000)
    parser.add_argument("--batch-seconds", type=float, default=1.5, help="processing of a batch")
    parser.add_argument("--poll-min", type=float, default=0.5)
    parser.add_argument("--poll-max", type=float, default=3.0)
    parser.add_argument("--naive-batch", type=int, default=4000)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--timeline", action="store_true", help="print each import's times")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()
    quiet_logs()

    DATA_DIR.mkdir(exist_ok=True)
    path = DATA_DIR / f"e2e-{args.batches}x{args.max_body_bytes}.jsonl"
    # a body is the records joined by commas plus a ~100-byte envelope: 0.995 leaves the last
    # batch nearly full without spilling into one more
    lines, size = write_orders_jsonl(path, mb=args.batches * args.max_body_bytes * 0.995 / 1e6)
    records_per_batch = args.max_body_bytes / (size / lines)
    rps = records_per_batch / args.batch_seconds
    settings = Settings(
        max_body_bytes=args.max_body_bytes, poll_min=args.poll_min, poll_max=args.poll_max
    )
    print(
        f"file: {lines:,} records, {size / 1e6:.1f} MB; simulator: {rps:,.0f} records/s "
        f"(a full batch ~{args.batch_seconds} s), polls {args.poll_min}-{args.poll_max} s"
    )
    try:
        with (
            simulator_process(records_per_second=rps) as base_url,
            tempfile.TemporaryDirectory(prefix="e2e-") as tmp,
        ):
            rtt = status_rtt(base_url)
            started = time.monotonic()
            ours_s = asyncio.run(_ours(path, base_url, settings, Path(tmp)))
            raw = sim_stats(base_url)
            ours = _import_figures(raw, started)
            if args.timeline:
                _timeline(raw, started)
        naive = None
        if not args.skip_naive:
            with simulator_process(records_per_second=rps) as base_url:
                naive = asyncio.run(
                    run_naive(
                        path,
                        base_url=base_url,
                        batch_records=args.naive_batch,
                        poll_every=args.poll_max,
                    )
                )
                naive_stats = _import_figures(sim_stats(base_url), time.monotonic())
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)

    batches = ours["imports"]
    rounds = math.ceil(batches / MAX_CONCURRENT)
    per_round = max(ours["processing_s"], args.poll_min)
    bound = rounds * per_round + ours["first_accept_s"] + rtt
    bound_ratio = ours_s / bound
    rows = [
        ("imports (batches)", f"{batches}", ""),
        ("records", f"{ours['records']:,}", ""),
        ("processing time of one batch (median, simulator)", f"{ours['processing_s']:.3f} s", ""),
        ("first import accepted after", f"{ours['first_accept_s']:.3f} s", ""),
        ("status GET round trip (median)", f"{rtt * 1000:.1f} ms", ""),
        (
            "lower bound",
            f"{bound:.2f} s",
            f"ceil({batches}/5)={rounds} x {per_round:.3f} s + first accept + GET",
        ),
        ("our makespan", f"{ours_s:.2f} s", ""),
        (
            "**makespan / lower bound**",
            f"**{bound_ratio:.3f}x**",
            f"goal <= 1.15: {goal(bound_ratio <= 1.15)}",
        ),
        (
            "status calls per import (ours)",
            f"{ours['polls_per_import']:.2f}",
            f"goal <= 3: {goal(ours['polls_per_import'] <= 3)}; per import: {ours['polls']}",
        ),
        (
            "finish seen after the import ended (mean)",
            f"{ours['detect_late_s'] * 1000:.0f} ms",
            "",
        ),
        (
            "max imports active at once (ours)",
            f"{ours['max_active']}",
            f"must be <= 5: {goal(ours['max_active'] <= MAX_CONCURRENT)}",
        ),
        ("429 too many active imports", f"{ours['rejected_too_many_active']}", ""),
    ]
    speedup = None
    if naive is not None:
        speedup = naive.makespan_s / ours_s
        rows += [
            (
                "naive makespan",
                f"{naive.makespan_s:.2f} s",
                f"{naive.imports} imports of {args.naive_batch}, one at a time",
            ),
            (
                "naive status calls per import",
                f"{sum(naive.polls) / max(1, len(naive.polls)):.2f}",
                f"{naive_stats['imports']} imports seen by its simulator",
            ),
            ("**speed-up over naive**", f"**{speedup:.2f}x**", f"goal >= 5: {goal(speedup >= 5)}"),
        ]
    table = "| figure | value | note |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    setup = (
        f"Simulator in its own process: {rps:,.0f} records/s, jitter 0; "
        f"`max_body_bytes={args.max_body_bytes:,}`, polls {args.poll_min}-{args.poll_max} s; "
        f"{lines:,} sample orders ({size / 1e6:.1f} MB) imported with the library API "
        "(`Orchestrator.import_files`, SQLite journal). Baselines measured in the same run: "
        "the lower bound (from the simulator's own processing times) and the naive client "
        "(`benchmarks/naive.py`) against a fresh simulator with the same settings."
    )
    record_section("End to end: makespan, status calls, naive baseline", setup + "\n\n" + table)
    print(table)
    print(f"makespan / lower bound: {bound_ratio:.3f}x (goal <= 1.15)")
    print(f"status calls per import: {ours['polls_per_import']:.2f} (goal <= 3)")
    print(f"max concurrent imports: {ours['max_active']} (must be <= 5)")
    if speedup is not None:
        print(f"speed-up over naive: {speedup:.2f}x (goal >= 5)")


if __name__ == "__main__":
    main()

"""Peak RSS of ``insight-import run`` on big inputs: flat whatever the size, far below the input.

Each import runs as its own child process (``python -m orchestrator run FILE ...`` with the default
50 MB body cap), against the simulator in ANOTHER process (so its memory is not counted), with a
fast processing rate and ``--poll-min 0.05 --poll-max 0.5``. The peak is the child's own
``ru_maxrss`` (from ``os.wait4``), exact, plus the peak PSS of its helper processes (parse
workers and their forkserver) sampled every 50 ms.

The first size is a file of unique keys (a generated base re-emitted with key prefixes); larger
sizes repeat that file (the same keys again: a nightly full re-sync), which keeps the simulator's
stored collection -- in its process, not ours -- at the first size.

Baseline, measured in the same run: the peak RSS of a child that loads the first file whole
(``orjson.loads`` of every line into a list); ``--baseline-fraction F`` loads only the first F of
the lines and extrapolates linearly above the interpreter's own RSS.

    python -m benchmarks.memory [--sizes-gb 1,3] [--baseline-fraction 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psutil

from benchmarks._common import (
    DATA_DIR,
    credentials_env,
    ensure_bytecode,
    ensure_free_disk,
    goal,
    replicate,
    simulator_process,
    write_big_orders,
)
from benchmarks._data import record_section

GOAL_MB = 400.0

_LOADER = """
import orjson, resource, sys
path, fraction = sys.argv[1], float(sys.argv[2])
limit = int(fraction * int(sys.argv[3]))
records = []
with open(path, "rb") as source:
    for number, line in enumerate(source):
        if number >= limit:
            break
        records.append(orjson.loads(line))
print(len(records))
"""


def _run_child(command: list[str], **kwargs: object) -> tuple[int, float, float, float]:
    """Run a child; return (exit code, its peak RSS in MB, its helpers' peak RSS in MB, wall s).

    The child's own peak is exact (``ru_maxrss``). Its helper processes (the parse workers and
    the forkserver that starts them) are sampled every 50 ms: the peak of their summed PSS
    (proportional set size: a page shared by n processes counts 1/n in each, so the libraries and
    modules they share are not counted once per process).
    """
    start = time.monotonic()
    proc = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    helpers_peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal helpers_peak
        try:
            parent = psutil.Process(proc.pid)
            while not done.wait(0.05):
                total = 0
                for helper in parent.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += helper.memory_full_info().pss
                helpers_peak = max(helpers_peak, total / 2**20)
        except psutil.Error:
            return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, helpers_peak, time.monotonic() - start


def _import(path: Path, base_url: str, tmp: Path) -> dict[str, float]:
    report = tmp / "report.json"
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        str(path),
        "--collection",
        "Orders",
        "--scope",
        "contact",
        "--type",
        "orders",
        "--base-url",
        base_url,
        "--poll-min",
        "0.05",
        "--poll-max",
        "0.5",
        "--journal",
        str(tmp / "journal.sqlite"),
        "--dead-letter",
        str(tmp / "dead-letter.jsonl"),
        "--report",
        str(report),
        "--log-level",
        "warning",
        "--progress",
        "off",
        "--fresh",
    ]
    code, own, helpers, wall = _run_child(
        command, env=credentials_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if code != 0:
        raise SystemExit(f"insight-import run exited {code} on {path}")
    result = orjson.loads(report.read_bytes())
    return {
        "own_mb": own,
        "helpers_mb": helpers,
        "peak_mb": own + helpers,
        "wall_s": wall,
        "records": result["records_imported"],
        "imports": len(result["imports"]),
        "size_gb": path.stat().st_size / 1e9,
    }


def _baseline(path: Path, lines: int, fraction: float) -> tuple[float, float]:
    """Peak MB of loading ``path`` whole (extrapolated from ``fraction``), and its wall seconds."""
    code, idle, _, _ = _run_child(
        [sys.executable, "-c", _LOADER, str(path), "0", str(lines)], stdout=subprocess.DEVNULL
    )
    code, peak, _, wall = _run_child(
        [sys.executable, "-c", _LOADER, str(path), str(fraction), str(lines)],
        stdout=subprocess.DEVNULL,
    )
    if code != 0:
        raise SystemExit("the baseline loader failed")
    return idle + (peak - idle) / fraction, wall


def main() -> None:
    """Run the memory benchmark and record its section of RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="1,3", help="comma-separated input sizes in GB")
    parser.add_argument("--baseline-fraction", type=float, default=1.0)
    parser.add_argument("--records-per-second", type=float, default=2_000_000.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    ensure_bytecode()  # start-ups as an installed copy makes them
    sizes = sorted(float(s) for s in args.sizes_gb.split(","))
    if not 0 < args.baseline_fraction <= 1:
        parser.error("--baseline-fraction must be in (0, 1]")
    # every file at once, plus the journal (up to ~6 bodies of 50 MB) and some slack
    ensure_free_disk(DATA_DIR, int(sum(sizes) * 1e9 + 1e9))
    files: list[Path] = []
    rows = []
    try:
        first = DATA_DIR / f"memory-{sizes[0]:g}gb.jsonl"
        started = time.monotonic()
        lines = write_big_orders(first, mb=sizes[0] * 1000)
        files.append(first)
        for size in sizes[1:]:
            path = DATA_DIR / f"memory-{size:g}gb.jsonl"
            replicate(first, path, total_bytes=int(size * 1e9), same_keys=True)
            files.append(path)
        print(
            f"data: {', '.join(f'{p.stat().st_size / 1e9:.2f} GB' for p in files)} "
            f"in {time.monotonic() - started:.0f} s"
        )
        baseline_mb, baseline_s = _baseline(first, lines, args.baseline_fraction)
        print(f"baseline (load {sizes[0]:g} GB whole): {baseline_mb:,.0f} MB in {baseline_s:.0f} s")
        for path in files:
            with (
                simulator_process(records_per_second=args.records_per_second) as base_url,
                tempfile.TemporaryDirectory(prefix="memory-", dir=DATA_DIR) as tmp,
            ):
                figures = _import(path, base_url, Path(tmp))
            rows.append(figures)
            print(
                f"{figures['size_gb']:.2f} GB: peak RSS {figures['peak_mb']:.0f} MB"
                f" ({figures['own_mb']:.0f} MB + {figures['helpers_mb']:.0f} MB of helpers), "
                f"{figures['records']:,.0f} records in {figures['imports']:.0f} imports, "
                f"{figures['wall_s']:.0f} s"
            )
    finally:
        if not args.keep:
            for path in files:
                path.unlink(missing_ok=True)

    peaks = [row["peak_mb"] for row in rows]
    spread = max(peaks) / min(peaks)
    worst = max(peaks)
    table = "| input | records | imports | wall | peak RSS (run + helpers) | baseline / peak |\n"
    table += "|---|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {row['size_gb']:.2f} GB | {row['records']:,.0f} | {row['imports']:.0f} | "
        f"{row['wall_s']:.0f} s | {row['peak_mb']:.0f} MB ({row['own_mb']:.0f} +"
        f" {row['helpers_mb']:.0f}) | {baseline_mb / row['peak_mb']:.1f}x |"
        for row in rows
    )
    extrapolated = (
        "" if args.baseline_fraction == 1 else f" (extrapolated from {args.baseline_fraction:g})"
    )
    body = (
        "Each import is `python -m orchestrator run FILE` (default 50 MB body cap, SQLite journal "
        "in a temp dir, `--poll-min 0.05 --poll-max 0.5`) against the simulator in another process "
        f"({args.records_per_second:,.0f} records/s); peak RSS is the child's `ru_maxrss` plus"
        " the peak of its helper processes' summed PSS (the parse workers and their forkserver,"
        " sampled every 50 ms; a page they share counts once, split between them). "
        f"The {sizes[0]:g} GB file has unique keys; larger files repeat it (same keys again).\n\n"
        f"Baseline (same run): loading the {sizes[0]:g} GB file whole with `orjson.loads` per "
        f"line into a list: **{baseline_mb:,.0f} MB**{extrapolated}.\n\n"
        + table
        + "\n\n"
        + f"- largest / smallest peak: **{spread:.3f}x** "
        + f"(goal within 10%: {goal(spread <= 1.10)})\n"
        + f"- worst peak: **{worst:.0f} MB** (goal < {GOAL_MB:.0f} MB: {goal(worst < GOAL_MB)})\n"
        + f"- baseline / worst peak: **{baseline_mb / worst:.1f}x**\n"
    )
    record_section("Memory: peak RSS of `insight-import run` on 1 GB and 3 GB", body)
    print(f"peak RSS largest / smallest input: {spread:.3f}x (goal <= 1.10)")
    print(f"worst peak RSS: {worst:.0f} MB (goal < {GOAL_MB:.0f} MB)")
    print(f"baseline (load whole) / worst peak: {baseline_mb / worst:.1f}x")


if __name__ == "__main__":
    main()

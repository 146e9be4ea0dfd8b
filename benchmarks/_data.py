"""Shared helpers of the benchmarks: sample data files, timing, and the RESULTS.md sections."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.sample import generate_orders

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_orders_jsonl(
    path: str | os.PathLike[str],
    *,
    mb: float | None = None,
    records: int | None = None,
    scope: str = "contact",
    seed: int = 0,
    bad_fraction: float = 0.0,
    unknown_contact_fraction: float = 0.0,
    duplicate_fraction: float = 0.0,
    compress: bool = False,
) -> tuple[int, int]:
    """Write sample orders as JSON Lines until ``records`` lines or ``mb`` megabytes are written.

    Args:
        path: the file to write (gzip-compressed when ``compress``).
        mb: stop once this many megabytes (10**6 bytes, uncompressed) are written.
        records: stop after this many lines.
        scope: ``"contact"`` or ``"account"`` records.
        seed: the random seed; the same settings give the same file.
        bad_fraction: the share of lines that break a local record rule.
        unknown_contact_fraction: the share of orders for contacts the simulator does not know.
        duplicate_fraction: the share of orders repeating an earlier key.
        compress: write a gzip file.

    Returns:
        ``(lines, uncompressed_bytes)`` written.
    """
    if (mb is None) == (records is None):
        raise ValueError("give exactly one of mb= or records=")
    limit = None if mb is None else int(mb * 1_000_000)
    lines = written = 0
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        for line in generate_orders(
            records,
            seed=seed,
            scope=scope,
            bad_fraction=bad_fraction,
            unknown_contact_fraction=unknown_contact_fraction,
            duplicate_fraction=duplicate_fraction,
            customers=None if records else 50_000,
        ):
            handle.write(line)
            lines += 1
            written += len(line)
            if limit is not None and written >= limit:
                break
    return lines, written


def best_of(repeat: int, function: Callable[[], object]) -> float:
    """Run ``function`` ``repeat`` times and return the best wall time in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> str:
    """A one-line description of this machine: CPU model, cores, Python, OS."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.system()} {platform.release()}"
    )


def record_section(title: str, body: str) -> None:
    """Add or replace the ``## title`` section of benchmarks/RESULTS.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    command = "python -m " + Path(sys.argv[0]).with_suffix("").as_posix().replace("/", ".")
    command = re.sub(r"^python -m .*benchmarks\.", "python -m benchmarks.", command)
    args = " ".join(sys.argv[1:])
    section = (
        f"## {title}\n\n"
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}{' ' + args if args else ''}`\n\n"
        f"{body.strip()}\n"
    )
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n", encoding="utf-8")

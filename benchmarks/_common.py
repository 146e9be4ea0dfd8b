"""Helpers of the end-to-end benchmarks: a simulator in its own process, its stats, big inputs.

The simulator runs as ``python -m orchestrator simulator --port 0`` so its CPU work (parsing 50 MB
bodies) and its memory (every imported record) are not counted against the client under test.
"""

from __future__ import annotations

import base64
import compileall
import contextlib
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from benchmarks._data import write_orders_jsonl

DATA_DIR = Path(__file__).with_name("data")
SIM_USER = "apiuser-demo@apiconnector.com"
SIM_PASSWORD = "demo-password"
_LISTENING = re.compile(rb"listening on (http://\S+)")
_KEY_PREFIX = b'{"key":"order-'


def quiet_logs() -> None:
    """Drop the library's info logs: the benchmarks measure the work, not a log renderer."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def ensure_bytecode() -> None:
    """Compile the package's modules to bytecode, as an installed copy has them.

    A command's start-up is measured as users meet it: pip compiles what it installs, and a
    source tree's first run writes its caches. Where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine sets it), no run writes them, and each one compiled every module again (~0.2 s of
    CPU per start-up). Caches written here are read even so.
    """
    import orchestrator

    compileall.compile_dir(Path(orchestrator.__file__).parent, quiet=1)


def credentials_env() -> dict[str, str]:
    """The current environment plus the simulator's default credentials."""
    return {**os.environ, "DOTDIGITAL_API_USER": SIM_USER, "DOTDIGITAL_API_PASSWORD": SIM_PASSWORD}


@contextlib.contextmanager
def simulator_process(
    *, records_per_second: float, min_processing: float = 0.0, jitter: float = 0.0, seed: int = 1
) -> Iterator[str]:
    """Run the bundled simulator in a child process on a free loopback port; yield its base URL."""
    with simulator_child(
        records_per_second=records_per_second,
        min_processing=min_processing,
        jitter=jitter,
        seed=seed,
    ) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def simulator_child(
    *,
    records_per_second: float,
    min_processing: float = 0.0,
    jitter: float = 0.0,
    seed: int = 1,
    extra: Sequence[str] = (),
) -> Iterator[tuple[str, int]]:
    """Like ``simulator_process``, yielding ``(base_url, pid)``; ``extra`` are more flags."""
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--records-per-second",
        str(records_per_second),
        "--min-processing",
        str(min_processing),
        "--jitter",
        str(jitter),
        "--seed",
        str(seed),
        *extra,
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=credentials_env()
    )
    drain: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None
        base_url = None
        deadline = time.monotonic() + 30
        while base_url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = _LISTENING.search(line)
            if found:
                base_url = found.group(1).decode()
        if base_url is None:
            raise RuntimeError("the simulator did not start")
        # keep draining its stdout so the child never blocks on a full pipe
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
        proc.stdout.close()
        yield base_url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.wait()  # ends once the simulator closed its end of the pipe


def sim_stats(base_url: str) -> dict[str, Any]:
    """The simulator's ``/_simulator/stats`` (not counted by the simulator)."""
    with urllib.request.urlopen(f"{base_url}/_simulator/stats", timeout=30) as answer:
        data: dict[str, Any] = orjson.loads(answer.read())
    return data


def status_rtt(base_url: str, probes: int = 20) -> float:
    """Median seconds of a status GET round trip (an unknown id: answered 404 at once)."""
    token = base64.b64encode(f"{SIM_USER}:{SIM_PASSWORD}".encode()).decode()
    url = f"{base_url}/insightData/v3/import/00000000-0000-4000-8000-000000000000"
    times = []
    for _ in range(probes):
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        start = time.perf_counter()
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as error:
            error.read()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ensure_free_disk(path: Path, need_bytes: int) -> None:
    """Exit politely when ``path``'s file system has less than ``need_bytes`` free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        sys.exit(
            f"not enough free disk in {path}: {free / 1e9:.1f} GB free, this run needs about "
            f"{need_bytes / 1e9:.1f} GB; free some space or choose smaller sizes"
        )


def write_big_orders(path: Path, *, mb: float, base_mb: float = 256.0, seed: int = 7) -> int:
    """Write ``mb`` MB of unique-key orders fast: one generated base, re-emitted with key prefixes.

    Generating orders costs ~30 s/GB; rewriting a base file with ``p<N>-`` key prefixes is I/O
    bound, so a 1 GB file takes ~10 s. Returns the number of lines written.
    """
    base = path.with_name(path.name + ".base")
    base_mb = min(base_mb, mb)
    write_orders_jsonl(base, mb=base_mb, seed=seed)
    return replicate(base, path, total_bytes=int(mb * 1_000_000), base_to_delete=True)


def replicate(
    base: Path,
    path: Path,
    *,
    total_bytes: int,
    base_to_delete: bool = False,
    same_keys: bool = False,
) -> int:
    """Write ``base`` over and over to ``path`` until ``total_bytes``; each pass gets its own key
    prefix unless ``same_keys`` (then later passes update the same records). Returns lines."""
    written = lines = 0
    with path.open("wb") as out:
        for turn in range(1_000_000):
            prefix = _KEY_PREFIX if same_keys else b'{"key":"p%d-order-' % turn
            with base.open("rb") as source:
                for line in source:
                    if not same_keys:
                        line = prefix + line[len(_KEY_PREFIX) :]
                    out.write(line)
                    written += len(line)
                    lines += 1
                    if written >= total_bytes:
                        break
            if written >= total_bytes:
                break
    if base_to_delete:
        base.unlink()
    return lines


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def goal(met: bool) -> str:
    """``met`` or ``NOT met``, for the results tables."""
    return "met" if met else "**NOT met**"

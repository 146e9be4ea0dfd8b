"""Benchmark: batch assembly vs serializing the same records with orjson.

Records already encoded in memory are packed into request bodies by ``BatchAssembler`` at the
default 50 MB cap; the figure is MB of body per second, compared with ``orjson.dumps`` of the same
records as Python dicts (one list, one call) measured in the same run. Goal: >= 0.8x.

    python -m benchmarks.batching [--mb 220] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import sys

import orjson

from benchmarks._data import best_of, record_section
from orchestrator.batching import Batch, BatchAssembler
from orchestrator.provenance import Source
from orchestrator.records import Collection, EncodedRecord, Scope, encode_line
from orchestrator.sample import generate_orders

TITLE = "Batch assembly (benchmarks.batching)"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=220.0, help="MB of records (default 220)")
    parser.add_argument("--records", type=int, help="number of records (overrides --mb)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept")
    parser.add_argument("--cap", type=int, default=50_000_000, help="max body bytes")
    args = parser.parse_args(argv)

    collection = Collection("Orders", scope=Scope.CONTACT, type="orders")
    limit = int(args.mb * 1_000_000)
    dicts: list[object] = []
    encoded: list[EncodedRecord] = []
    size = 0
    for number, line in enumerate(generate_orders(args.records, seed=1), start=1):
        dicts.append(orjson.loads(line))
        encoded.append(encode_line(line, collection, source=Source("bench.jsonl", number)))
        size += len(line) - 1
        if args.records is None and size >= limit:
            break
    print(f"{len(encoded):,} records, {size / 1e6:.1f} MB of record JSON", file=sys.stderr)

    baseline_out = 0

    def baseline() -> None:
        nonlocal baseline_out
        baseline_out = len(orjson.dumps(dicts))

    batches: list[Batch] = []

    def assemble() -> None:
        batches.clear()
        assembler = BatchAssembler(collection, max_body_bytes=args.cap)
        add = assembler.add
        for record in encoded:
            batch = add(record)
            if batch is not None:
                batches.append(batch)
        last = assembler.seal()
        if last is not None:
            batches.append(last)

    gc.collect()
    # the garbage collector stays on, as in a real run: sealing allocates one ref per record
    base_s = best_of(args.repeat, baseline)
    ours_s = best_of(args.repeat, assemble)
    body_bytes = sum(batch.body_bytes for batch in batches)
    assert sum(batch.record_count for batch in batches) == len(encoded)
    assert all(batch.body_bytes <= args.cap for batch in batches)
    base_rate = baseline_out / base_s / 1e6
    ours_rate = body_bytes / ours_s / 1e6
    ratio = ours_rate / base_rate
    full = [batch.body_bytes for batch in batches[:-1]] or [batches[-1].body_bytes]
    fill = min(full) / args.cap
    body = (
        f"| measurement | MB | best s | MB/s |\n|---|---:|---:|---:|\n"
        f"| orjson.dumps(list of {len(dicts):,} dicts) | {baseline_out / 1e6:.1f} | {base_s:.3f}"
        f" | {base_rate:.0f} |\n"
        f"| BatchAssembler -> {len(batches)} bodies (cap {args.cap:,} B, full ones >= {fill:.2%})"
        f" | {body_bytes / 1e6:.1f} | {ours_s:.3f} | {ours_rate:.0f} |\n\n"
        f"Best of {args.repeat} runs each, garbage collector on. **Ratio: {ratio:.2f}x**"
        f" (goal >= 0.8x)."
    )
    record_section(TITLE, body)
    print(body)
    print(f"ratio {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()

"""The naive baseline: how existing connectors import Insight data (the Magento 2 connector's way).

Fixed-count batches of 4000 records, one import at a time, a status poll every ``poll_every``
seconds, stdlib ``json`` for parsing and encoding, plain aiohttp. Used by ``benchmarks.e2e``;
runnable alone as ``python -m benchmarks.naive FILE --base-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks._common import SIM_PASSWORD, SIM_USER

_DONE = {"Finished", "Complete"}
_FAILED = {"Failed", "RejectedByWatchdog", "InvalidFileFormat", "Unknown"}


@dataclass(slots=True)
class NaiveResult:
    """What one naive run did."""

    makespan_s: float
    imports: int = 0
    records: int = 0
    polls: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)


async def run_naive(
    path: Path,
    *,
    base_url: str,
    collection: str = "Orders",
    scope: str = "contact",
    collection_type: str = "orders",
    batch_records: int = 4000,
    poll_every: float = 30.0,
) -> NaiveResult:
    """Import ``path`` the naive way and return the makespan and per-import poll counts."""
    start = time.monotonic()
    result = NaiveResult(makespan_s=0.0)
    auth = aiohttp.BasicAuth(SIM_USER, SIM_PASSWORD)
    async with aiohttp.ClientSession(auth=auth) as session:

        async def send(records: list[object]) -> None:
            body = json.dumps(
                {
                    "collectionName": collection,
                    "collectionScope": scope,
                    "collectionType": collection_type,
                    "records": records,
                }
            )
            async with session.put(
                f"{base_url}/insightData/v3/import",
                data=body.encode(),
                headers={"Content-Type": "application/json"},
            ) as answer:
                answer.raise_for_status()
                import_id = json.loads(await answer.read())["importId"]
            polls = 0
            while True:
                await asyncio.sleep(poll_every)
                polls += 1
                async with session.get(f"{base_url}/insightData/v3/import/{import_id}") as answer:
                    answer.raise_for_status()
                    status = json.loads(await answer.read())["status"]
                if status in _DONE or status in _FAILED:
                    break
            result.imports += 1
            result.records += len(records)
            result.polls.append(polls)
            result.statuses.append(status)

        batch: list[object] = []
        with path.open("rb") as source:
            for line in source:
                record = json.loads(line)
                if scope == "account":
                    record.pop("contactIdentity", None)
                batch.append(record)
                if len(batch) >= batch_records:
                    await send(batch)
                    batch = []
        if batch:
            await send(batch)
    result.makespan_s = time.monotonic() - start
    return result


def main() -> None:
    """Run the naive import of one file against a running simulator."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--batch-records", type=int, default=4000)
    parser.add_argument("--poll-every", type=float, default=30.0)
    args = parser.parse_args()
    result = asyncio.run(
        run_naive(
            args.file,
            base_url=args.base_url,
            batch_records=args.batch_records,
            poll_every=args.poll_every,
        )
    )
    print(
        f"naive: {result.records} records in {result.imports} imports, "
        f"{result.makespan_s:.2f} s, {sum(result.polls)} status calls"
    )


if __name__ == "__main__":
    main()

"""``insight-import demo``: the whole job on the embedded default, with no account needed.

It writes a realistic sample (orders of a few thousand contacts, with some bad records, some
unknown contacts and some updated orders), starts the bundled simulator in-process with a few
faults (a 5xx, a lost response, a failed import), and imports the sample with the same code path
as ``insight-import run``, with poll intervals scaled down so it ends within a minute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from orchestrator.client import ClientSettings, RetryPolicy
from orchestrator.records import Collection, Scope
from orchestrator.sample import generate_orders
from orchestrator.settings import Settings
from orchestrator.simulator import Faults, Simulator, SimulatorConfig

__all__ = ["run_demo"]

#: Bodies are capped at 1 MB in the demo (instead of 50 MB) so the sample makes several imports.
DEMO_MAX_BODY_BYTES = 1_000_000
#: 5–30 s polling scaled to 0.1–0.6 s.
DEMO_TIME_SCALE = 0.02


async def run_demo(
    output: Path,
    records: int,
    progress: bool,
    execute: Callable[[Any], Awaitable[int]],
    make_job: Callable[..., Any],
) -> int:
    """Generate the sample, serve the simulator and import the sample into it.

    Args:
        output: folder for the sample, journal, report and dead-letter file.
        records: how many sample orders to write.
        progress: show the live progress line.
        execute: the CLI's import runner (the same one ``run`` uses).
        make_job: the CLI's job type.
    """
    sample = output / "orders.jsonl"

    def write_sample() -> None:
        output.mkdir(parents=True, exist_ok=True)
        with sample.open("wb") as handle:
            handle.writelines(
                generate_orders(
                    records,
                    seed=7,
                    scope="contact",
                    unknown_contact_fraction=0.01,
                    bad_fraction=0.002,
                    duplicate_fraction=0.05,
                )
            )

    await anyio.to_thread.run_sync(write_sample)
    config = SimulatorConfig(records_per_second=4_000.0, jitter=0.3, seed=7)
    # The first import accepted loses its response, so whatever it ends with is never seen: its
    # batch is sent again. The second fault of failed_imports therefore lands on an import whose
    # answer arrives: that is the Failed import the run sees and resubmits.
    faults = Faults(server_errors=1, resets_after_accept=1, failed_imports=2)
    async with Simulator(config, faults=faults) as sim:
        print(f"Demo: {records:,} sample orders in {sample}")
        print(f"Demo: the bundled Insight API simulator listens on {sim.base_url}")
        print(
            "Demo: injected faults: one 5xx answer, one lost response, one failed import; "
            f"bodies capped at {DEMO_MAX_BODY_BYTES:,} bytes to make several imports\n"
        )
        job = make_job(
            inputs=(str(sample.resolve()),),
            collection=Collection("DemoOrders", Scope.CONTACT, "orders"),
            client=ClientSettings(
                username=config.username,
                password=config.password,
                base_url=sim.base_url,
                request_timeout=10.0,
                retry=RetryPolicy(wait_initial=0.05, wait_max=0.5, timeout=60.0),
            ),
            settings=Settings.scaled(DEMO_TIME_SCALE, max_body_bytes=DEMO_MAX_BODY_BYTES),
            journal=output / "journal.sqlite",
            dead_letter=output / "dead-letter.jsonl",
            report=output / "report.json",
            fresh=True,
            progress=progress,
        )
        code = await execute(job)
        stored = sum(len(records) for records in sim.collections.values())
        print(
            f"\nThe simulator now holds {stored:,} distinct records (an updated order overwrote "
            f"its earlier version) and saw at most {sim.stats.max_active_seen} imports running "
            "at once (the API allows 5)."
        )
        print(
            "Next: run against your account with DOTDIGITAL_API_USER and DOTDIGITAL_API_PASSWORD "
            "set:\n  insight-import run orders.jsonl --collection Orders --scope contact"
        )
        # Rejected records are part of the sample on purpose: the demo succeeded if it finished.
        return 0 if code in (0, 1) else code

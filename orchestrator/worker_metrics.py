"""The worker's Prometheus metrics, in a registry of its own (never the process-wide default).

Events (API calls, imports ending, records dead-lettered) are counted as they happen; state
(pending rows, imports in flight, slots) is read from the worker when scraped. Labels are
account and collection names only: never keys, records or credentials.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["AccountState", "QueueState", "WorkerMetrics"]

#: Import durations from the accepted submit to the end, in seconds.
_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
#: Body sizes, in bytes (up to the API's 50 MB).
_BODY_BUCKETS = (*(float(2**n) for n in range(10, 26, 2)), 50_000_000.0)


@dataclass(slots=True)
class QueueState:
    """What the metrics read of one queue (account, collection) when scraped."""

    pending_rows: int = 0
    oldest_age_s: float = 0.0


@dataclass(slots=True)
class AccountState:
    """What the metrics read of one account when scraped."""

    imports_in_flight: int = 0
    slots_in_use: int = 0
    slots: int = 0
    unfinished: int = 0


@dataclass(slots=True)
class _Events:
    records_imported: Counter[tuple[str, str]] = field(default_factory=Counter)
    records_rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    records_dead_lettered: Counter[tuple[str, str]] = field(default_factory=Counter)
    rows_superseded: Counter[tuple[str, str]] = field(default_factory=Counter)
    imports_finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    api_calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rate_limit_waits: Counter[str] = field(default_factory=Counter)
    account_full_waits: Counter[str] = field(default_factory=Counter)


class WorkerMetrics:
    """The worker's metrics and its own ``CollectorRegistry``.

    Args:
        queues: called at scrape time: each queue's state by ``(account, collection)``.
        accounts: called at scrape time: each account's state by name.
        heartbeat: called at scrape time: epoch seconds of the worker's last loop tick.
    """

    def __init__(
        self,
        *,
        queues: Callable[[], dict[tuple[str, str], QueueState]],
        accounts: Callable[[], dict[str, AccountState]],
        heartbeat: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = _Events()
        self._queues = queues
        self._accounts = accounts
        self._heartbeat = heartbeat
        self.import_duration = Histogram(
            "insight_import_duration_seconds",
            "Seconds from an import's accepted submit to its terminal status.",
            ["account", "collection"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.body_bytes = Histogram(
            "insight_import_body_bytes",
            "Size of each import's request body, in bytes as sent.",
            ["account", "collection"],
            buckets=_BODY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def trace_config(self, account: str) -> aiohttp.TraceConfig:
        """An aiohttp trace config that counts the account's API calls by method and status."""
        trace = aiohttp.TraceConfig()
        calls = self.events.api_calls
        throttled = self.events.rate_limit_waits

        async def ended(
            session: aiohttp.ClientSession,
            context: object,
            params: aiohttp.TraceRequestEndParams,
        ) -> None:
            status = params.response.status
            calls[(account, params.method, str(status))] += 1
            if status == 429:
                throttled[account] += 1

        async def failed(
            session: aiohttp.ClientSession,
            context: object,
            params: aiohttp.TraceRequestExceptionParams,
        ) -> None:
            calls[(account, params.method, "error")] += 1

        trace.on_request_end.append(ended)
        trace.on_request_exception.append(failed)
        return trace


class _StateCollector(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # collected on each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        events = metrics.events
        pending = GaugeMetricFamily(
            "insight_outbox_pending_rows",
            "Outbox rows waiting to be imported (held back behind an import included).",
            labels=["account", "collection"],
        )
        oldest = GaugeMetricFamily(
            "insight_outbox_oldest_age_seconds",
            "Seconds the oldest pending outbox row has waited (0 when none).",
            labels=["account", "collection"],
        )
        for (account, collection), queue in sorted(metrics._queues().items()):
            pending.add_metric([account, collection], queue.pending_rows)
            oldest.add_metric([account, collection], queue.oldest_age_s)
        yield pending
        yield oldest
        in_flight = GaugeMetricFamily(
            "insight_imports_in_flight", "Imports holding a slot now.", labels=["account"]
        )
        unfinished = GaugeMetricFamily(
            "insight_imports_unfinished",
            "Imports sealed and not yet ended (waiting for a slot included).",
            labels=["account"],
        )
        used = GaugeMetricFamily(
            "insight_slots_in_use", "Import slots of the account in use.", labels=["account"]
        )
        slots = GaugeMetricFamily(
            "insight_slots", "Import slots of the account (max_concurrent).", labels=["account"]
        )
        for account, state in sorted(metrics._accounts().items()):
            in_flight.add_metric([account], state.imports_in_flight)
            unfinished.add_metric([account], state.unfinished)
            used.add_metric([account], state.slots_in_use)
            slots.add_metric([account], state.slots)
        yield from (in_flight, unfinished, used, slots)
        for name, help_text, counts in (
            ("insight_records_imported", "Records the API imported.", events.records_imported),
            (
                "insight_records_rejected",
                "Records rejected one by one (a record rule, or the API's per-record failure).",
                events.records_rejected,
            ),
            (
                "insight_records_dead_lettered",
                "Outbox rows moved to insight_dead_letter (rejected, or their import given up).",
                events.records_dead_lettered,
            ),
            (
                "insight_outbox_rows_superseded",
                "Outbox rows deleted because a later row has the same key (last write wins).",
                events.rows_superseded,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["account", "collection"])
            for labels, value in sorted(counts.items()):
                family.add_metric(list(labels), value)
            yield family
        finished = CounterMetricFamily(
            "insight_imports_finished",
            "Imports that reached their end, by final status.",
            labels=["account", "collection", "status"],
        )
        for status_labels, value in sorted(events.imports_finished.items()):
            finished.add_metric(list(status_labels), value)
        yield finished
        calls = CounterMetricFamily(
            "insight_api_calls",
            "HTTP requests made to the API, by method and status ('error': no answer).",
            labels=["account", "method", "status"],
        )
        for call_labels, value in sorted(events.api_calls.items()):
            calls.add_metric(list(call_labels), value)
        yield calls
        for name, help_text, per_account in (
            (
                "insight_rate_limit_waits",
                "429 answers of the API (rate limit or account full), each waited out.",
                events.rate_limit_waits,
            ),
            (
                "insight_account_full_waits",
                "Submits refused with 'too many active imports', each waited out.",
                events.account_full_waits,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["account"])
            for account, value in sorted(per_account.items()):
                family.add_metric([account], value)
            yield family
        beat = GaugeMetricFamily(
            "insight_worker_heartbeat_timestamp_seconds",
            "Epoch seconds of the worker loops' last tick.",
        )
        beat.add_metric([], metrics._heartbeat())
        yield beat

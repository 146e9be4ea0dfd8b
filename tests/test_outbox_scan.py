"""The claim scan against a row-by-row model of what a claim promises.

The model reads each row on its own (``encode_line``), keeps the latest valid row of each identity
(``identity_text``), holds back identities in flight and cuts at the budget. The scan, fed the
same rows in pages of any size, must give the same rows, bytes, deletions, dead letters and
counts, whatever mix of duplicates, invalid, blank, multi-line and in-flight rows they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from orchestrator.errors import RecordError
from orchestrator.outbox.base import OutboxQueue, identity_text, identity_texts
from orchestrator.outbox.scan import ClaimScan
from orchestrator.provenance import Source
from orchestrator.records import Collection, EncodedRecord, Scope, encode_line

ORDERS = Collection("Orders", Scope.ACCOUNT, "orders")
CONTACT_ORDERS = Collection("Orders", Scope.CONTACT, "orders")
_KEYS = ["a", "b", "c", "é"]
_EMAILS = ["x@example.com", "y@example.com"]


def _record(key: str, email: str, n: int, *, contact: bool, pretty: bool, pad: int = 0) -> bytes:
    record: dict[str, object] = {"key": key, "json": {"n": n, "pad": "p" * (n % 7 + pad)}}
    if contact:
        record["contactIdentity"] = {"identifier": "email", "value": email}
    return orjson.dumps(record, option=orjson.OPT_INDENT_2 if pretty else 0)


_row_kinds = st.one_of(
    st.tuples(st.just("valid"), st.sampled_from(_KEYS), st.sampled_from(_EMAILS)),
    st.tuples(st.just("pretty"), st.sampled_from(_KEYS), st.sampled_from(_EMAILS)),
    st.sampled_from([("blank",), ("not json",), ("no key",), ("nested",)]),
)


def _rows(kinds: list[tuple[str, ...]], *, contact: bool, pad: int = 0) -> list[tuple[int, bytes]]:
    rows = []
    for row_id, kind in enumerate(kinds, start=1):
        if kind[0] in ("valid", "pretty"):
            pretty = kind[0] == "pretty"
            raw = _record(kind[1], kind[2], row_id, contact=contact, pretty=pretty, pad=pad)
        else:
            raw = {
                "blank": b"  ",
                "not json": b"not json",
                "no key": b'{"json": {}}',
                "nested": b'{"key": "z", "json": {"m": [[1]]}}',
            }[kind[0]]
        rows.append((row_id, raw))
    return rows


@dataclass
class _Expected:
    rows: list[tuple[int, EncodedRecord]]
    records_bytes: int
    full: bool
    superseded: list[int]
    invalid: list[tuple[int, str, str | None]]
    held_back: int


def _model(
    rows: list[tuple[int, bytes]], collection: Collection, in_flight: set[str], budget: int
) -> _Expected:
    latest: dict[str, tuple[int, EncodedRecord]] = {}
    held: dict[str, int] = {}
    superseded: list[int] = []
    invalid: list[tuple[int, str, str | None]] = []
    for row_id, raw in rows:
        try:
            record = encode_line(raw, collection, source=Source("insight_outbox", row_id))
        except RecordError as error:
            invalid.append((row_id, error.rule, error.key))
            continue
        identity = identity_text(record.key, record.contact)
        if identity in in_flight:
            if identity in held:
                superseded.append(held[identity])
            held[identity] = row_id
            continue
        if identity in latest:
            superseded.append(latest.pop(identity)[0])
        latest[identity] = (row_id, record)
    kept: list[tuple[int, EncodedRecord]] = []
    total = -1
    for row_id, record in latest.values():
        if total + len(record.data) + 1 > budget and kept:
            break
        kept.append((row_id, record))
        total += len(record.data) + 1
    return _Expected(kept, max(total, 0), len(kept) < len(latest), superseded, invalid, len(held))


@given(
    kinds=st.lists(_row_kinds, min_size=1, max_size=40),
    contact=st.booleans(),
    page_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    in_flight_keys=st.sets(st.sampled_from(_KEYS), max_size=2),
    budget=st.integers(1, 2_000),
    piece_rows=st.integers(1, 13),
)
@example(  # a page that is all valid new rows, then one that supersedes its middle
    kinds=[("valid", k, _EMAILS[0]) for k in "abc"] + [("valid", "b", _EMAILS[0])],
    contact=False,
    page_sizes=[3, 1],
    in_flight_keys=set(),
    budget=2_000,
    piece_rows=13,
)
@settings(max_examples=300, deadline=None)
def test_a_scan_claims_what_reading_row_by_row_would(
    kinds: list[tuple[str, ...]],
    contact: bool,
    page_sizes: list[int],
    in_flight_keys: set[str],
    budget: int,
    piece_rows: int,
) -> None:
    collection = CONTACT_ORDERS if contact else ORDERS
    rows = _rows(kinds, contact=contact)
    in_flight = {
        identity_text(key, ("email", email) if contact else None)
        for key in in_flight_keys
        for email in _EMAILS
    }
    queue = OutboxQueue.of("acme", collection)
    hashes = {hash(t) for t in in_flight}
    scan = ClaimScan(queue, hashes, budget, piece_rows=piece_rows)
    position = 0
    for size in page_sizes * len(rows):  # pages of the drawn sizes, in turn, until the end
        if position >= len(rows):
            break
        scan.add(rows[position : position + size])
        position += size
        # nothing is left ahead without a pool: the budget's test counts what was taken in
        assert scan.wants_more == (scan._joined <= budget)
    scanned = scan.result()
    expected = _model(rows, collection, in_flight, budget)

    assert [(row.row_id, row.record) for row in scanned.rows] == expected.rows
    # the identities the seal stores come with the claim, as each record's own
    assert scanned.rows.identities() == tuple(
        identity_text(record.key, record.contact) for _, record in expected.rows
    )
    assert scanned.records_bytes == expected.records_bytes
    assert len(b",".join(record.data for _, record in expected.rows)) == scanned.records_bytes
    assert scanned.full == expected.full
    assert scanned.superseded == expected.superseded
    assert [(i, r.reason, key) for i, r, key in scanned.invalid] == expected.invalid
    assert scanned.held_back == expected.held_back
    # the claimed run's bytes are the records, each followed by one separator
    run = scanned.rows.run
    assert bytes(run.segment) == b"".join(record.data + b"\n" for _, record in expected.rows)


@given(
    keys=st.lists(st.text(max_size=8), max_size=20),
    values=st.lists(st.text(max_size=8), max_size=20),
)
def test_identities_in_bulk_are_each_ones_text(keys: list[str], values: list[str]) -> None:
    values = (values * len(keys))[: len(keys)] if values else ["v"] * len(keys)
    identifiers = ["email"] * len(keys)
    assert identity_texts(keys, None, []) == [identity_text(key, None) for key in keys]
    assert identity_texts(keys, identifiers, values) == [
        identity_text(key, ("email", value)) for key, value in zip(keys, values, strict=True)
    ]


def test_a_scan_with_parse_workers_claims_what_one_in_a_thread_does() -> None:
    """Pages big enough go to the parse worker processes a few pieces ahead: the same rows,
    bytes, deletions and dead letters as encoding them in the calling thread; a pool whose
    workers died is dropped, and the scan goes on in its thread."""
    from orchestrator.parsing import ParsePool

    kinds: list[tuple[str, ...]] = []
    for i in range(3000):  # pieces of 1,000 rows of ~700 bytes: each sent to a worker
        kinds.append(("valid", f"k{i % 2500}", _EMAILS[i % 2]) if i % 97 else ("not json",))
    rows = _rows(kinds, contact=True, pad=600)

    def scanned(pool: ParsePool | None) -> tuple[object, ...]:
        scan = ClaimScan(OutboxQueue.of("acme", CONTACT_ORDERS), set(), 1_500_000, pool=pool)
        for start in range(0, len(rows), 1200):
            scan.add(rows[start : start + 1200])
        found = scan.result()
        return (
            [(row.row_id, row.record) for row in found.rows],
            found.records_bytes,
            found.full,
            found.superseded,
            [(i, r.reason, key) for i, r, key in found.invalid],
        )

    alone = scanned(None)
    superseded, invalid, full = alone[3], alone[4], alone[2]
    assert superseded  # the case holds rows superseded,
    assert invalid  # rows to dead-letter
    assert full  # and rows left for the next claim
    pool = ParsePool(2)
    try:
        assert scanned(pool) == alone
        executor = pool.started()
        assert executor._processes  # the pieces went to the workers
        for process in list(executor._processes.values()):
            process.kill()
            process.join()
        assert scanned(pool) == alone  # workers gone: encoded in the thread
    finally:
        pool._shutdown()

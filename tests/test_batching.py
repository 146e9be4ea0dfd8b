from __future__ import annotations

import gc
import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import errors
from orchestrator.batching import Batch, BatchAssembler, record_spans, split_batch
from orchestrator.chunks import encode_chunk
from orchestrator.provenance import Source
from orchestrator.records import Collection, EncodedRecord, Scope, encode_line, encode_record
from orchestrator.refs import RecordRef, RecordRefs

ACCOUNT = Collection("Orders")
CONTACT = Collection("Orders", scope=Scope.CONTACT)


def make(key: str, size: int = 0, *, email: str | None = None, line: int = 1) -> EncodedRecord:
    """An encoded record with a json payload of about ``size`` bytes."""
    obj: dict[str, object] = {"key": key, "json": {"p": "x" * size}}
    collection = ACCOUNT
    if email is not None:
        obj["contactIdentity"] = {"identifier": "email", "value": email}
        collection = CONTACT
    return encode_record(obj, collection, source=Source("t", line))


def records_of(batch: Batch) -> list[object]:
    return list(orjson.loads(batch.body)["records"])


def test_seal_builds_an_exact_body() -> None:
    """A sealed body is the envelope around the records, comma-separated, sized exactly."""
    assembler = BatchAssembler(ACCOUNT)
    a, b = make("a", 3), make("b", 5)
    assert assembler.pending_bytes == 0
    assert assembler.add(a) is None
    assert assembler.add(b) is None
    expected_size = assembler.pending_bytes
    assert len(assembler) == 2
    batch = assembler.seal()
    assert batch is not None
    prefix, suffix = ACCOUNT.envelope()
    assert batch.body == prefix + a.data + b"," + b.data + suffix
    assert batch.body_bytes == len(batch.body) == expected_size
    assert batch.record_count == 2
    assert batch.refs == (
        RecordRef("a", None, Source("t", 1)),
        RecordRef("b", None, Source("t", 1)),
    )
    assert len(assembler) == 0
    assert assembler.seal() is None


def test_last_write_wins_within_a_batch() -> None:
    """A repeated identity replaces the older record, which is reported, and moves to the end."""
    superseded: list[EncodedRecord] = []
    assembler = BatchAssembler(ACCOUNT, on_superseded=superseded.append)
    first = make("a", 1, line=1)
    assembler.add(first)
    assembler.add(make("b", 1, line=2))
    assembler.add(make("a", 2, line=3))
    assert superseded == [first]
    assert "a" in assembler
    assert "c" not in assembler
    batch = assembler.seal()
    assert batch is not None
    assert [ref.key for ref in batch.refs] == ["b", "a"]
    assert batch.refs[1].source == Source("t", 3)
    assert records_of(batch)[1] == {"key": "a", "json": {"p": "xx"}}
    assert batch.body_bytes == len(batch.body)


def test_contact_scope_identity_includes_the_contact() -> None:
    """In contact scope the same key for two contacts is two records."""
    assembler = BatchAssembler(CONTACT)
    assembler.add(make("k", email="a@x.io"))
    assembler.add(make("k", email="b@x.io"))
    assert ("email", "a@x.io", "k") in assembler
    batch = assembler.seal()
    assert batch is not None
    assert batch.record_count == 2
    assert batch.refs[0].identity == ("email", "a@x.io", "k")
    assert batch.refs[0].contact == ("email", "a@x.io")


def test_full_batch_is_sealed_and_returned() -> None:
    """When the next record would overflow the cap, the open batch is sealed and returned."""
    a = make("a", 10)
    prefix, suffix = ACCOUNT.envelope()
    cap = len(prefix) + len(suffix) + 2 * len(a.data) + 1  # exactly two records
    assembler = BatchAssembler(ACCOUNT, max_body_bytes=cap)
    assert assembler.add(a) is None
    assert assembler.add(make("b", 10)) is None
    assert assembler.pending_bytes == cap
    sealed = assembler.add(make("c", 10))
    assert sealed is not None
    assert sealed.body_bytes == cap
    assert [ref.key for ref in sealed.refs] == ["a", "b"]
    assert len(assembler) == 1
    assert "c" in assembler


def test_too_large_record_is_rejected_and_state_kept() -> None:
    """A record that alone exceeds the cap raises record-too-large and changes nothing."""
    prefix, suffix = ACCOUNT.envelope()
    small = make("a", 1)
    cap = len(prefix) + len(suffix) + len(small.data) + 40
    superseded: list[EncodedRecord] = []
    assembler = BatchAssembler(ACCOUNT, max_body_bytes=cap, on_superseded=superseded.append)
    assembler.add(small)
    before = assembler.pending_bytes
    with pytest.raises(errors.RecordError) as caught:
        assembler.add(make("a", 100, line=9))
    assert caught.value.rule == "record-too-large"
    assert caught.value.key == "a"
    assert caught.value.source == Source("t", 9)
    assert assembler.pending_bytes == before
    assert superseded == []
    batch = assembler.seal()
    assert batch is not None
    assert records_of(batch) == [orjson.loads(small.data)]


def test_a_record_exactly_at_the_cap_fits() -> None:
    """A record whose body is exactly the cap is accepted."""
    record = make("a", 50)
    prefix, suffix = ACCOUNT.envelope()
    cap = len(prefix) + len(suffix) + len(record.data)
    assembler = BatchAssembler(ACCOUNT, max_body_bytes=cap)
    assembler.add(record)
    batch = assembler.seal()
    assert batch is not None
    assert batch.body_bytes == cap


def test_cap_too_small_for_any_record() -> None:
    """A cap that cannot hold the envelope and a minimal record is a ConfigError."""
    with pytest.raises(errors.ConfigError, match="max_body_bytes"):
        BatchAssembler(ACCOUNT, max_body_bytes=50)


def test_small_records_fill_a_1mb_body() -> None:
    """With small records, bodies are packed to at least 95% of a 1 MB cap."""
    cap = 1_000_000
    assembler = BatchAssembler(ACCOUNT, max_body_bytes=cap)
    sealed = []
    for i in range(20_000):
        batch = assembler.add(make(f"k{i}", 100 + i % 300))
        if batch is not None:
            sealed.append(batch)
    assert len(sealed) >= 3
    assert all(0.95 * cap <= batch.body_bytes <= cap for batch in sealed)


def test_split_batch_halves_and_keeps_bytes() -> None:
    """split_batch cuts a body into two exact halves with refs aligned and bytes unchanged."""
    assembler = BatchAssembler(CONTACT)
    tricky = encode_record(
        {
            "key": 'x,"}]',
            "json": {"s": 'a"b\\",{[', "items": [{"a": [1, 2]}, {}]},
            "contactIdentity": {"identifier": "email", "value": "z@x.io"},
        },
        CONTACT,
    )
    originals = [make(f"k{i}", i, email=f"{i}@x.io") for i in range(4)] + [tricky]
    for record in originals:
        assembler.add(record)
    batch = assembler.seal()
    assert batch is not None
    halves = split_batch(batch, CONTACT)
    assert [half.record_count for half in halves] == [2, 3]
    prefix, suffix = CONTACT.envelope()
    assert halves[0].body == prefix + b",".join(r.data for r in originals[:2]) + suffix
    assert halves[1].body == prefix + b",".join(r.data for r in originals[2:]) + suffix
    assert [*halves[0].refs, *halves[1].refs] == list(batch.refs)
    quarters = split_batch(halves[0], CONTACT)
    assert [quarter.record_count for quarter in quarters] == [1, 1]
    assert split_batch(quarters[0], CONTACT) == [quarters[0]]
    last = split_batch(split_batch(halves[1], CONTACT)[1], CONTACT)[1]
    assert last.body == prefix + tricky.data + suffix
    assert last.refs[0].key == 'x,"}]'


def test_split_batch_refuses_a_foreign_body() -> None:
    """split_batch raises ValueError for a body of another collection or with wrong refs."""
    assembler = BatchAssembler(ACCOUNT)
    assembler.add(make("a"))
    batch = assembler.seal()
    assert batch is not None
    with pytest.raises(ValueError, match="collection"):
        split_batch(batch, CONTACT)
    with pytest.raises(ValueError, match="refs"):
        split_batch(Batch(batch.body, ()), ACCOUNT)


record_plans = st.lists(
    st.tuples(st.integers(0, 15), st.integers(0, 400), st.sampled_from(["a@x.io", "b@x.io"])),
    min_size=1,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(plan=record_plans, cap_extra=st.integers(0, 3000), contact=st.booleans())
def test_batching_invariants(
    plan: list[tuple[int, int, str]], cap_extra: int, contact: bool
) -> None:
    """Caps are kept, packing is tight, last occurrence wins, and no record goes missing."""
    collection = CONTACT if contact else ACCOUNT
    prefix, suffix = collection.envelope()
    cap = len(prefix) + len(suffix) + 60 + cap_extra
    superseded: list[EncodedRecord] = []
    too_large: set[int] = set()
    assembler = BatchAssembler(collection, max_body_bytes=cap, on_superseded=superseded.append)
    batches: list[tuple[Batch, int]] = []  # (batch, line of the record that sealed it)
    added: dict[int, EncodedRecord] = {}
    for line, (key_no, size, email) in enumerate(plan, start=1):
        record = make(f"k{key_no}", size, email=email if contact else None, line=line)
        added[line] = record
        pending_before = assembler.pending_bytes
        identity_open = record.identity in assembler
        try:
            sealed = assembler.add(record)
        except errors.RecordError as error:
            assert error.rule == "record-too-large"  # noqa: PT017 - a property over many adds
            assert len(prefix) + len(suffix) + len(record.data) > cap
            assert assembler.pending_bytes == pending_before
            too_large.add(line)
            continue
        if sealed is not None:
            batches.append((Batch(bytes(sealed.body), sealed.refs), line))
            # sealed only because this record would not fit next to the batch
            assert sealed.body_bytes + 1 + len(record.data) > cap
            assembler.recycle(sealed.body)  # refused: the open batch holds this record already
        elif pending_before and not identity_open:
            assert assembler.pending_bytes == pending_before + 1 + len(record.data)
    final = assembler.seal()
    if final is not None:
        batches.append((final, len(plan) + 1))

    in_batches: list[int] = []
    for batch, sealed_at in batches:
        assert batch.body_bytes <= cap
        body = orjson.loads(batch.body)
        assert body["collectionName"] == "Orders"
        assert body["collectionScope"] == collection.scope.value
        assert len(body["records"]) == batch.record_count >= 1
        for ref, sent in zip(batch.refs, body["records"], strict=True):
            assert ref.source is not None
            original = added[ref.source.line]
            assert sent == orjson.loads(original.data)
            assert (ref.key, ref.contact, ref.identity) == (
                original.key,
                original.contact,
                original.identity,
            )
            # no later valid occurrence of the identity arrived before the batch was sealed
            assert not any(
                other.identity == ref.identity and line not in too_large
                for line, other in added.items()
                if ref.source.line < line < sealed_at
            )
        lines = [ref.source.line for ref in batch.refs if ref.source is not None]
        assert lines == sorted(lines)
        in_batches.extend(lines)

    # every record is in exactly one batch, or was superseded, or was too large
    superseded_lines = [r.source.line for r in superseded if r.source is not None]
    accounted = in_batches + superseded_lines + sorted(too_large)
    assert sorted(accounted) == list(range(1, len(plan) + 1))
    for line in superseded_lines:
        identity = added[line].identity
        assert any(
            other.identity == identity and later not in too_large
            for later, other in added.items()
            if later > line
        )


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.text(min_size=1).filter(str.strip), st.text(), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_split_batch_keeps_any_records(values: list[tuple[str, str, bool]]) -> None:
    """Any records, spaced or compact, split into halves whose bytes concatenate to the original."""
    from orchestrator.records import encode_line

    assembler = BatchAssembler(ACCOUNT)
    originals = []
    for line_no, (key, text, spaced) in enumerate(values, start=1):
        obj = {"key": f"{key}{line_no}", "json": {"t": text, "l": [text, {"n": [1]}]}}
        option = orjson.OPT_INDENT_2 if spaced else 0
        record = encode_line(orjson.dumps(obj, option=option), ACCOUNT, source=Source("t", line_no))
        originals.append(record)
        assert assembler.add(record) is None
    batch = assembler.seal()
    assert batch is not None
    halves = split_batch(batch, ACCOUNT)
    assert len(halves) == (1 if len(values) == 1 else 2)
    prefix, suffix = ACCOUNT.envelope()
    inner = [h.body[len(prefix) : len(h.body) - len(suffix)] for h in halves]
    assert b",".join(inner) == b",".join(r.data for r in originals)
    assert [ref for half in halves for ref in half.refs] == list(batch.refs)
    for half in halves:
        assert len(orjson.loads(half.body)["records"]) == half.record_count


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=60),
    keys=st.lists(st.integers(min_value=0, max_value=8), min_size=60, max_size=60),
    cap=st.integers(min_value=400, max_value=3_000),
)
def test_fits_predicts_whether_add_seals(sizes: list[int], keys: list[int], cap: int) -> None:
    """`fits(record)` is true exactly when `add(record)` returns no sealed batch."""
    collection = Collection("Fits")
    assembler = BatchAssembler(collection, max_body_bytes=cap)
    for size, key in zip(sizes, keys, strict=False):
        record = encode_record({"key": f"k{key}", "json": {"p": "x" * size}}, collection)
        if len(record.data) + 100 > cap:
            continue
        predicted = assembler.fits(record)
        assert (assembler.add(record) is None) == predicted


@settings(max_examples=200, deadline=None)
@given(
    plan=record_plans,
    cap_extra=st.integers(0, 3000),
    contact=st.booleans(),
    cuts=st.lists(st.integers(1, 120), max_size=6),
)
def test_add_run_packs_exactly_like_add(
    plan: list[tuple[int, int, str]], cap_extra: int, contact: bool, cuts: list[int]
) -> None:
    """Runs of records (as file chunks give them) make the same bodies as adding one by one."""
    collection = CONTACT if contact else ACCOUNT
    prefix, suffix = collection.envelope()
    cap = len(prefix) + len(suffix) + 60 + cap_extra
    lines = [
        make(f"k{key_no}", size, email=email if contact else None).data
        for key_no, size, email in plan
    ]

    one_by_one = BatchAssembler(collection, max_body_bytes=cap)
    expected: list[Batch] = []
    rejected: list[int] = []
    for line, data in enumerate(lines, start=1):
        record = encode_line(data, collection, source=Source("f", line))
        if len(prefix) + len(suffix) + len(record.data) > cap:
            rejected.append(line)
            continue
        if not one_by_one.fits(record):  # as the engine adds one record: seal first if full
            sealed = one_by_one.seal()
            assert sealed is not None
            expected.append(sealed)
        assert one_by_one.add(record) is None
    last = one_by_one.seal()
    if last is not None:
        expected.append(last)

    in_runs = BatchAssembler(collection, max_body_bytes=cap)
    got: list[Batch] = []
    got_rejected: list[int] = []
    bounds = sorted({0, len(lines), *(c for c in cuts if c < len(lines))})
    for first, end in itertools.pairwise(bounds):
        data = b"".join(line + b"\n" for line in lines[first:end])
        encoded = encode_chunk(data, contact_scope=contact, first_line=first + 1)
        run = encoded.records(data, "f", contact_scope=contact)
        position = 0
        while position < len(run):
            try:
                stop = in_runs.add_run(run, position)
            except errors.RecordError as error:
                assert error.rule == "record-too-large"  # noqa: PT017 - many adds
                got_rejected.append(run.lines[position])
                position += 1
                continue
            if stop == position:  # full
                sealed = in_runs.seal()
                assert sealed is not None
                got.append(Batch(bytes(sealed.body), sealed.refs))
                in_runs.recycle(sealed.body)  # the next body is built over this one
            position = stop
    last = in_runs.seal()
    if last is not None:
        got.append(last)

    assert got_rejected == rejected
    assert [bytes(batch.body) for batch in got] == [bytes(batch.body) for batch in expected]
    assert [list(batch.refs) for batch in got] == [list(batch.refs) for batch in expected]


@settings(max_examples=150, deadline=None)
@given(plan=record_plans, cap_extra=st.integers(0, 3000), contact=st.booleans())
def test_a_recycled_body_gives_the_same_bodies(
    plan: list[tuple[int, int, str]], cap_extra: int, contact: bool
) -> None:
    """Bodies built over recycled ones (longer or shorter than the next) are byte for byte the
    bodies a fresh assembler makes."""
    collection = CONTACT if contact else ACCOUNT
    prefix, suffix = collection.envelope()
    cap = len(prefix) + len(suffix) + 60 + cap_extra
    records = [
        make(f"k{key_no}", size, email=email if contact else None, line=line)
        for line, (key_no, size, email) in enumerate(plan, start=1)
    ]

    def bodies(recycle: bool) -> list[bytes]:
        assembler = BatchAssembler(collection, max_body_bytes=cap)
        made: list[bytes] = []

        def seal() -> None:
            sealed = assembler.seal()
            if sealed is not None:
                made.append(bytes(sealed.body))
                if recycle:
                    assembler.recycle(sealed.body)

        for record in records:
            if len(prefix) + len(suffix) + len(record.data) > cap:
                continue
            if not assembler.fits(record):
                seal()
            assert assembler.add(record) is None
        seal()
        return made

    assert bodies(recycle=True) == bodies(recycle=False)


def test_a_body_something_still_views_is_not_recycled() -> None:
    """A body handed back while a view of it is alive (an upload's frame kept by a traceback,
    say) cannot change size: the next body is built in fresh memory, not over it."""
    assembler = BatchAssembler(ACCOUNT)
    for key in ("a", "b", "c"):
        assembler.add(make(key, 50))
    sealed = assembler.seal()
    assert sealed is not None
    kept = bytes(sealed.body)
    view = memoryview(sealed.body)
    assembler.recycle(sealed.body)
    assert assembler.add(make("d", 3)) is None
    line = b'{"key":"e","json":{}}\n'
    run = encode_chunk(line, contact_scope=False, first_line=1).records(
        line, "t", contact_scope=False
    )
    assert assembler.add_run(run) == 1
    batch = assembler.seal()
    assert batch is not None
    assert [r["key"] for r in records_of(batch)] == ["d", "e"]
    assert view.tobytes() == kept  # the viewed body was left as it was
    view.release()


def test_identity_hashes_are_those_of_the_sealed_refs() -> None:
    """The hashes taken from the open batch are the hashes of the records sealed (replaced
    records not included)."""
    assembler = BatchAssembler(CONTACT)
    for key, email in [("a", "x@y.io"), ("b", "x@y.io"), ("a", "z@y.io"), ("a", "x@y.io")]:
        assembler.add(make(key, 3, email=email))
    hashes = assembler.identity_hashes()
    batch = assembler.seal()
    assert batch is not None
    assert batch.record_count == 3
    assert hashes == {hash(identity): None for identity in batch.refs.identities()}
    # held by every batch in flight: a container the collector skips (a set it would traverse)
    assert not gc.is_tracked(hashes)


@settings(max_examples=200, deadline=None)
@given(plan=record_plans, cap_extra=st.integers(0, 3000), contact=st.booleans())
def test_record_offsets_match_the_body(
    plan: list[tuple[int, int, str]], cap_extra: int, contact: bool
) -> None:
    """Each sealed batch knows where its records lie in the body (replaced ones included), the
    same places the body's own tokens give; splitting by them keeps every record's bytes."""
    collection = CONTACT if contact else ACCOUNT
    prefix, suffix = collection.envelope()
    cap = len(prefix) + len(suffix) + 60 + cap_extra
    assembler = BatchAssembler(collection, max_body_bytes=cap)
    batches: list[Batch] = []
    for line, (key_no, size, email) in enumerate(plan, start=1):
        record = make(f"k{key_no}", size, email=email if contact else None, line=line)
        try:
            sealed = assembler.add(record)
        except errors.RecordError:
            continue
        if sealed is not None:
            batches.append(sealed)
    last = assembler.seal()
    if last is not None:
        batches.append(last)
    for batch in batches:
        spans = record_spans(batch, collection)
        legacy = Batch(
            batch.body, RecordRefs.of_columns(batch.refs.columns())
        )  # refs without offsets
        assert spans == record_spans(legacy, collection)
        records = orjson.loads(batch.body)["records"]
        assert [orjson.loads(batch.body[start:end]) for start, end in spans] == records
        halves = split_batch(batch, collection)
        assert [r for half in halves for r in orjson.loads(half.body)["records"]] == records
        for half in halves:
            assert record_spans(half, collection) == record_spans(
                Batch(half.body, RecordRefs.of_columns(half.refs.columns())), collection
            )


class CollidingKey(str):
    """A key whose hash every other CollidingKey shares: distinct identities, one hash."""

    def __hash__(self) -> int:
        return 42


def colliding(key: str, *, email: str | None = None) -> EncodedRecord:
    record = make(key, 3, email=email)
    return EncodedRecord(CollidingKey(key), record.contact, record.data, record.source)


@pytest.mark.parametrize("email", [None, "x@y.io"])
def test_identities_with_one_hash_are_never_taken_for_each_other(email: str | None) -> None:
    """The open batch is indexed by identity hash, but a shared hash is never a repeat: the
    batch is sealed before another identity with its hash goes in (fits() says so first), so
    nothing is dropped, and a real repeat still replaces the older record."""
    assembler = BatchAssembler(CONTACT if email else ACCOUNT)
    sealed = []
    for key in ["a", "a", "b", "c", "c"]:
        record = colliding(key, email=email)
        identity = record.identity
        if len(assembler) and not assembler.fits(record):
            assert identity not in assembler  # the hash matches, the identity does not
            sealed.append(assembler.seal())
        assert assembler.add(record) is None
        assert identity in assembler
    sealed.append(assembler.seal())
    assert [[r["key"] for r in records_of(b)] for b in sealed if b] == [["a"], ["b"], ["c"]]


def test_a_run_with_one_hash_falls_back_to_one_by_one() -> None:
    """Records of a run whose identities share a hash are packed one batch each, none lost."""
    data = b"".join(
        orjson.dumps({"key": key, "json": {"n": n}}) + b"\n" for n, key in enumerate("abcab")
    )
    encoded = encode_chunk(data, contact_scope=False, first_line=1)
    run = encoded.records(data, "t", contact_scope=False)
    run.keys = [CollidingKey(key) for key in run.keys]
    assembler = BatchAssembler(ACCOUNT)
    batches, position = [], 0
    while position < len(run):
        stopped = assembler.add_run(run, position)
        if stopped == position:
            batches.append(assembler.seal())
        position = stopped
    batches.append(assembler.seal())
    assert [[r["json"]["n"] for r in records_of(b)] for b in batches if b] == [
        [i] for i in range(5)
    ]


def test_packing_a_chunk_leaves_no_object_per_record() -> None:
    """The open batch holds its records in flat columns and a dict of ints: a body's worth of
    records adds no object the collector tracks per record (each would bring its passes over
    the young objects, and the full ones that stop the event loop, closer)."""
    lines = b"".join(
        orjson.dumps(
            {
                "key": f"k{n}",
                "contactIdentity": {"identifier": "email", "value": f"c{n}@x.io"},
                "json": {"n": n},
            }
        )
        + b"\n"
        for n in range(20_000)
    )
    encoded = encode_chunk(lines, contact_scope=True, first_line=1)
    run = encoded.records(lines, "t", contact_scope=True)
    assembler = BatchAssembler(CONTACT)
    gc.collect()
    before = len(gc.get_objects())
    assert assembler.add_run(run) == len(run)
    hashes = assembler.identity_hashes()
    held = len(gc.get_objects()) - before
    assert held < 100, held
    batch = assembler.seal()
    assert batch is not None
    assert len(hashes) == batch.record_count == 20_000

from __future__ import annotations

import pickle
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import InsightClient, Orchestrator, Settings, errors
from orchestrator.chunks import encode_lines
from orchestrator.provenance import Source
from orchestrator.records import (
    COLLECTION_TYPES,
    RULES,
    Collection,
    EncodedRecord,
    RejectedRecord,
    Scope,
    encode_line,
    encode_record,
    oversized_line,
)
from orchestrator.simulator import Simulator, SimulatorConfig
from tests.conftest import sim_client_settings

ACCOUNT = Collection("Orders")
CONTACT = Collection("Orders", scope=Scope.CONTACT, type="orders")
SRC = Source("in.jsonl", 7)
EMAIL = {"identifier": "email", "value": "a@b.io"}

# (scope, line, expected rule): every rule of the module, at least once
BAD_LINES: list[tuple[Collection, bytes, str]] = [
    (ACCOUNT, b'{"key": "a", "json": {}', "json-syntax"),
    (ACCOUNT, b"not json at all", "json-syntax"),
    (ACCOUNT, b'{"key": "\xff\xfe", "json": {}}', "json-syntax"),
    (ACCOUNT, b'{"key": "a", "json": {"n": NaN}}', "json-syntax"),
    (ACCOUNT, b'["key", "json"]', "not-object"),
    (ACCOUNT, b'"just a string"', "not-object"),
    (ACCOUNT, b"42", "not-object"),
    (ACCOUNT, b'{"json": {}}', "key-missing"),
    (ACCOUNT, b'{"key": 1.5, "json": {}}', "key-type"),
    (ACCOUNT, b'{"key": true, "json": {}}', "key-type"),
    (ACCOUNT, b'{"key": null, "json": {}}', "key-type"),
    (ACCOUNT, b'{"key": {"id": 1}, "json": {}}', "key-type"),
    (ACCOUNT, b'{"key": ["a"], "json": {}}', "key-type"),
    (ACCOUNT, b'{"key": "", "json": {}}', "key-empty"),
    (ACCOUNT, b'{"key": " \\t ", "json": {}}', "key-empty"),
    (ACCOUNT, b'{"key": "a"}', "json-missing"),
    (ACCOUNT, b'{"key": "a", "json": [1, 2]}', "json-type"),
    (ACCOUNT, b'{"key": "a", "json": "text"}', "json-type"),
    (ACCOUNT, b'{"key": "a", "json": null}', "json-type"),
    (ACCOUNT, b'{"key": "a", "json": {}, "extra": 1}', "unknown-field"),
    (CONTACT, b'{"key": "a", "json": {}, "contactidentity": {}}', "unknown-field"),
    (CONTACT, b'{"key": "a", "json": {}}', "contact-identity-missing"),
    (CONTACT, b'{"key": "a", "json": {}, "contactIdentity": "a@b.io"}', "contact-identity-type"),
    (
        CONTACT,
        b'{"key": "a", "json": {}, "contactIdentity": {"value": "x"}}',
        "contact-identity-type",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"email","value":"x","y":1}}',
        "contact-identity-type",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"e mail","value":"x"}}',
        "contact-identifier",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"' + b"x" * 51 + b'","value":"x"}}',
        "contact-identifier",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":5,"value":"x"}}',
        "contact-identifier",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"email","value":""}}',
        "contact-value",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"email","value":5}}',
        "contact-value",
    ),
    (
        CONTACT,
        b'{"key":"a","json":{},"contactIdentity":{"identifier":"email","value":"'
        + b"v" * 257
        + b'"}}',
        "contact-value",
    ),
    (ACCOUNT, b'{"key": "a", "json": {"m": [[1, 2], [3]]}}', "json-nested-array"),
    (ACCOUNT, b'{"key":"a","json":{"m":[1,[2]]}}', "json-nested-array"),
    (ACCOUNT, b'{"key":"a","json":{"m":[1 ,\t [2]]}}', "json-nested-array"),
    (ACCOUNT, b'{"key":"a","json":{"m":[{"x":[{"y":[[]]}]}]}}', "json-nested-array"),
    (ACCOUNT, b'{"key": "a", "key": "b", "json": {}}', "record-duplicate-field"),
    (ACCOUNT, b'{"key": "a", "json": {}, "json": {"n": 1}}', "record-duplicate-field"),
    (ACCOUNT, b'{"key": "a", "k\\u0065y": "b", "json": {}}', "record-duplicate-field"),
    (ACCOUNT, b'{"key": 1, "json": {}, "key": 2}', "record-duplicate-field"),
    (
        ACCOUNT,
        b'{"key":"a","json":{},"contactIdentity":{},"contactIdentity":{}}',
        "record-duplicate-field",
    ),
    (
        CONTACT,
        b'{"key":"a","contactIdentity":{"identifier":"email","value":"a@b.io"},"json":{},'
        b'"contactIdentity":{"identifier":"email","value":"misplaced@b.io"}}',
        "record-duplicate-field",
    ),
]


@pytest.mark.parametrize(("collection", "line", "rule"), BAD_LINES)
def test_bad_line_breaks_its_rule(collection: Collection, line: bytes, rule: str) -> None:
    """Each bad line is rejected with its stable rule id, its source, and no record values."""
    with pytest.raises(errors.RecordError) as caught:
        encode_line(line, collection, source=SRC)
    error = caught.value
    assert error.rule == rule
    assert error.source == SRC
    assert str(SRC) in str(error)
    assert "a@b.io" not in str(error)
    assert "misplaced" not in str(error)


@pytest.mark.parametrize(("collection", "line", "rule"), BAD_LINES)
def test_bad_line_in_a_chunk_breaks_its_rule(
    collection: Collection, line: bytes, rule: str
) -> None:
    """encode_lines (with its inline fast path) rejects each bad line with the same rule."""
    results = encode_lines([line], collection, origin="in.jsonl", first_line=7)
    assert len(results) == 1
    rejected = results[0]
    assert isinstance(rejected, RejectedRecord)
    assert rejected.error.rule == rule
    assert rejected.error.source == SRC
    assert rejected.raw == line.strip()


def test_every_rule_is_in_the_corpus() -> None:
    """The bad-input corpus covers every rule the module documents for lines."""
    from orchestrator import records

    documented = {
        line.split("``")[1]
        for line in (records.__doc__ or "").splitlines()
        if line.startswith("``") and line.split("``")[1] in RULES
    }
    covered = {rule for _, _, rule in BAD_LINES} | {"json-unserializable", "record-too-large"}
    assert documented == covered == RULES


def test_error_carries_the_key_when_known() -> None:
    """A rule broken after the key was read names the key."""
    with pytest.raises(errors.RecordError) as caught:
        encode_line(b'{"key": "k1", "json": 3}', ACCOUNT, source=SRC)
    assert caught.value.key == "k1"
    assert "'k1'" in str(caught.value)


def test_unknown_field_is_named() -> None:
    """The unknown-field error names the field (a name, not contents)."""
    with pytest.raises(errors.RecordError) as caught:
        encode_line(b'{"key": "k", "json": {}, "price": 3}', ACCOUNT, source=SRC)
    assert "'price'" in caught.value.message


def test_record_error_pickles() -> None:
    """A RecordError survives pickling with its rule, key and source (worker processes)."""
    with pytest.raises(errors.RecordError) as caught:
        encode_line(b'{"key": "k", "json": 3}', ACCOUNT, source=SRC)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.rule, copy.key, copy.source) == ("json-type", "k", SRC)


def test_clean_line_keeps_its_own_bytes() -> None:
    """A line that already is what the API wants goes into the body byte for byte."""
    line = b'{"key": "k1",  "json": {"total": 12.50, "items": [{"a": 1}]}}'
    record = encode_line(b"  " + line + b"\r\n", ACCOUNT, source=SRC)
    assert record.data == line
    assert record.key == "k1"
    assert record.contact is None
    assert record.source == SRC
    assert record.identity == "k1"


def test_clean_contact_line_keeps_its_own_bytes() -> None:
    """A contact-scoped line with a valid identity is kept as is, identity included."""
    line = b'{"contactIdentity":{"identifier":"email","value":"a@b.io"},"key":"k","json":{}}'
    record = encode_line(line, CONTACT, source=SRC)
    assert record.data is not None
    assert record.data == line
    assert record.contact == ("email", "a@b.io")
    assert record.identity == ("email", "a@b.io", "k")


def test_integer_key_becomes_a_string() -> None:
    """An integer key is sent as its decimal string (re-encoded)."""
    record = encode_line(b'{"key": 24938, "json": {"a": 1}}', ACCOUNT, source=SRC)
    assert record.key == "24938"
    assert orjson.loads(record.data) == {"key": "24938", "json": {"a": 1}}


def test_contact_scope_integer_key_is_re_encoded() -> None:
    """A contact-scoped line with an integer key keeps its identity when re-encoded."""
    line = b'{"key": 7, "contactIdentity": {"identifier": "email", "value": "a@b.io"}, "json": {}}'
    record = encode_line(line, CONTACT, source=SRC)
    assert orjson.loads(record.data) == {"key": "7", "contactIdentity": EMAIL, "json": {}}
    assert record.identity == ("email", "a@b.io", "7")


def test_key_type_message_names_the_python_type() -> None:
    """A Python record with an odd key type is named by its type, not its value."""
    with pytest.raises(errors.RecordError, match="not bytes"):
        encode_record({"key": b"secret", "json": {}}, ACCOUNT)


def test_account_scope_drops_contact_identity() -> None:
    """In account scope a contactIdentity is ignored: it is not sent."""
    line = b'{"key": "k", "json": {"a": 1}, "contactIdentity": {"identifier": "email"}}'
    record = encode_line(line, ACCOUNT, source=SRC)
    assert orjson.loads(record.data) == {"key": "k", "json": {"a": 1}}
    assert record.contact is None


def test_custom_identifier_is_accepted() -> None:
    """A custom identifier name of letters, digits, '-' and '_' up to 50 chars is accepted."""
    ident = {"identifier": "crm_id-2" + "x" * 42, "value": "v" * 256}
    record = encode_record({"key": "k", "json": {}, "contactIdentity": ident}, CONTACT)
    assert record.contact == (ident["identifier"], ident["value"])


def test_nested_array_prefilter_false_positive_in_string() -> None:
    """Brackets inside strings look like nested arrays to the pre-filter but are accepted."""
    line = b'{"key": "[[", "json": {"note": "a, [b] [[c]]", "list": ["x", "[y]"]}}'
    record = encode_line(line, ACCOUNT, source=SRC)
    assert record.data == line


def test_arrays_of_objects_are_fine() -> None:
    """Arrays of objects holding arrays, and spaced arrays in objects, are not nested arrays."""
    line = b'{"key":"k","json":{"items":[{"tags":["a","b"]},{"tags":[]}],"m" : [ 1 , 2 ]}}'
    assert encode_line(line, ACCOUNT, source=SRC).data == line


def test_encode_record_round_trips() -> None:
    """A Python record encodes to JSON that parses back to the expected API record."""
    obj = {"json": {"total": 1.5, "items": [{"sku": "A"}]}, "key": "k", "contactIdentity": EMAIL}
    record = encode_record(obj, CONTACT, source=Source("<records>", 1))
    assert orjson.loads(record.data) == {"key": "k", "contactIdentity": EMAIL, "json": obj["json"]}
    assert record.source == Source("<records>", 1)


def test_encode_record_accepts_any_mapping() -> None:
    """Mappings other than dict are accepted, nested ones too."""

    class Frozen(Mapping[str, object]):
        def __init__(self, **items: object) -> None:
            self._items = items

        def __getitem__(self, key: str) -> object:
            return self._items[key]

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(self._items)

        def __len__(self) -> int:
            return len(self._items)

    record = encode_record(Frozen(key="k", json=Frozen(a=Frozen(b=1))), ACCOUNT)
    assert orjson.loads(record.data) == {"key": "k", "json": {"a": {"b": 1}}}


@pytest.mark.parametrize(
    ("obj", "rule"),
    [
        ({"key": "k", "json": {"s": {1, 2}}}, "json-unserializable"),
        ({"key": "k", "json": {"n": [float("nan")]}}, "json-unserializable"),
        ({"key": "k", "json": {"n": {"m": float("-inf")}}}, "json-unserializable"),
        ({"key": "k", "json": {"n": Decimal("NaN")}}, "json-unserializable"),
        ({"key": "k", "json": {"n": 1 << 70, "s": {1}}}, "json-unserializable"),
        ({"key": "k", "json": {"n": 10**5000}}, "json-unserializable"),
        ({"key": "k", "json": {"m": [(1, 2)]}}, "json-nested-array"),
        ({"key": False, "json": {}}, "key-type"),
        (["k", {}], "not-object"),
        ({"key": "k", "json": {}, 1: 2}, "unknown-field"),
    ],
)
def test_encode_record_rules(obj: object, rule: str) -> None:
    """Python records break the same rules, plus json-unserializable."""
    with pytest.raises(errors.RecordError) as caught:
        encode_record(obj, ACCOUNT)
    assert caught.value.rule == rule


def test_rejected_record_of_keeps_what_it_can() -> None:
    """RejectedRecord.of encodes a bad Python record for the dead-letter file."""
    error = errors.RecordError("json-unserializable", "x", key="k")
    rejected = RejectedRecord.of(error, {"key": "k", "json": {"s": {1}}})
    assert orjson.loads(rejected.raw) == {"key": "k", "json": {"s": [1]}}
    assert RejectedRecord.of(error, b"raw").raw == b"raw"
    assert orjson.loads(RejectedRecord.of(error, object()).raw).startswith("<object")
    assert orjson.loads(RejectedRecord.of(error, {"n": 1 << 70}).raw).startswith("{")


def test_encode_lines_skips_blank_lines_and_keeps_order() -> None:
    """encode_lines gives one result per non-blank line, in order, with line numbers."""
    lines = [
        b'{"key": "a", "json": {}}',
        b"",
        b"   \t",
        b'{"key": "b"}',
        b'{"key": "c", "json": {}}\r',
    ]
    results = encode_lines(lines, ACCOUNT, origin="f.jsonl", first_line=10)
    assert len(results) == 3
    first, second, third = results
    assert isinstance(first, EncodedRecord)
    assert first.source == Source("f.jsonl", 10)
    assert isinstance(second, RejectedRecord)
    assert second.error.rule == "json-missing"
    assert second.error.source == Source("f.jsonl", 13)
    assert second.raw == b'{"key": "b"}'
    assert isinstance(third, EncodedRecord)
    assert third.source == Source("f.jsonl", 14)
    assert third.data == b'{"key": "c", "json": {}}'


def test_collection_accepts_scope_string_and_builds_envelope() -> None:
    """A scope given as a string becomes a Scope; the envelope is exact JSON."""
    collection = Collection("Orders", scope="contact", type="orders")  # type: ignore[arg-type]
    assert collection.scope is Scope.CONTACT
    prefix, suffix = collection.envelope()
    assert prefix == (
        b'{"collectionName":"Orders","collectionScope":"contact",'
        b'"collectionType":"orders","records":['
    )
    body = prefix + b'{"key":"k","json":{}}' + suffix
    assert orjson.loads(body)["records"] == [{"key": "k", "json": {}}]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": "a"}, "2 to 255"),
        ({"name": "x" * 256}, "2 to 255"),
        ({"name": "1abc"}, "must not"),
        ({"name": "has space"}, "letters, digits"),
        ({"name": "Orders", "scope": "global"}, "scope"),
        ({"name": "Orders", "type": "Orders"}, "custom"),
        ({"name": 42}, "string"),
    ],
)
def test_collection_rules(kwargs: dict[str, object], words: str) -> None:
    """An invalid collection raises ConfigError naming the broken rule."""
    with pytest.raises(errors.ConfigError, match=words):
        Collection(**kwargs)  # type: ignore[arg-type]


def test_collection_name_bounds() -> None:
    """Names of 2 and 255 characters, with '-' or '_' first, are valid."""
    assert Collection("-a").name == "-a"
    assert Collection("_" + "a" * 254).name.startswith("_")
    assert len(COLLECTION_TYPES) == 10


def test_source_str() -> None:
    """A Source prints as origin:line."""
    assert str(Source("data/orders.jsonl", 12)) == "data/orders.jsonl:12"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(st.dictionaries(st.text(), children), max_size=3)
        | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    key=st.text(min_size=1).filter(str.strip),
    json=st.dictionaries(st.text(), json_values, max_size=5),
    spaced=st.booleans(),
)
def test_good_records_round_trip(key: str, json: dict[str, object], spaced: bool) -> None:
    """Any valid record (no nested arrays) parses back from data to exactly the record."""
    record = {"key": key, "json": json}
    line = orjson.dumps(record, option=orjson.OPT_INDENT_2).replace(b"\n", b" ")
    line = line if spaced else orjson.dumps(record)
    encoded = encode_line(line, ACCOUNT, source=SRC)
    assert orjson.loads(encoded.data) == record
    assert encode_record(record, ACCOUNT).data == orjson.dumps(record)
    assert encode_lines([line], ACCOUNT, origin="in.jsonl", first_line=7) == [encoded]


@given(
    key=st.text(min_size=1).filter(str.strip),
    identifier=st.sampled_from(["email", "mobileNumber", "contactId", "crm-id_2"]),
    value=st.text(min_size=1, max_size=256),
    json=st.dictionaries(st.text(), json_values, max_size=3),
    extra=st.booleans(),
)
def test_contact_records_agree_on_every_path(
    key: str, identifier: str, value: str, json: dict[str, object], extra: bool
) -> None:
    """encode_line, encode_lines and encode_record agree on contact-scoped records."""
    record: dict[str, object] = {
        "key": key,
        "contactIdentity": {"identifier": identifier, "value": value},
        "json": json,
    }
    line = orjson.dumps(record)
    single = encode_line(line, CONTACT, source=SRC)
    assert encode_lines([line], CONTACT, origin="in.jsonl", first_line=7) == [single]
    assert single.data == line == encode_record(record, CONTACT, source=SRC).data
    assert single.identity == (identifier, value, key)
    if extra:
        with pytest.raises(errors.RecordError, match="unknown-field"):
            encode_line(orjson.dumps({**record, "extra": 1}), CONTACT, source=SRC)


@given(
    json=st.dictionaries(
        st.text(max_size=3),
        st.recursive(
            st.integers(0, 9) | st.text(alphabet="[],", max_size=3),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=2), children, max_size=2)
            ),
            max_leaves=8,
        ),
        max_size=3,
    )
)
def test_nested_array_detection_is_exact(json: dict[str, object]) -> None:
    """The pre-filter plus tree walk flags exactly the records with an array inside an array."""

    def nested(value: object) -> bool:
        if isinstance(value, list):
            return any(isinstance(v, list) or nested(v) for v in value)
        if isinstance(value, dict):
            return any(nested(v) for v in value.values())
        return False

    line = orjson.dumps({"key": "k", "json": json})
    if nested(json):
        with pytest.raises(errors.RecordError, match="json-nested-array"):
            encode_line(line, ACCOUNT, source=SRC)
    else:
        assert encode_line(line, ACCOUNT, source=SRC).data == line


_LINE_PARTS = [
    b'{"key":"a","json":{"n":1}}',
    b'{"key":"b","contactIdentity":{"identifier":"email","value":"x@y.io"},"json":{"l":[1,2]}}',
    b'{"key":"c","contactIdentity":{"identifier":"loyaltyId","value":"L1"},"json":{}}',
    b'{"key":7,"json":{"n":[{"m":[1]}]}}',
    b'{"key":"d","json":{"m":[1 ,\t [2]]}}',
    b'{"key":"e","json":{"s":"[[ in a string"}}',
    b'{"key":"f","json":[1]}',
    b'{"key":"","json":{}}',
    b'{"json":{}}',
    b'{"key":"g","json":{},"extra":1}',
    b'{"key":"i","json":{},"key":"i"}',
    b'{"key":"j","contactIdentity":{"identifier":"email","value":"x@y.io"},"json":{},"json":{}}',
    b'{"key":12345678901234567890123,"contactIdentity":{"identifier":"email","value":"x"},"json":{}}',
    b'[{"key":"h"}]',
    b'{"key":"a\x01","json":{}}',
    b'{"key":"\xff","json":{}}',
    b'{"key":"caf\\u00e9","json":{"n":[1,[2]]}}',
    b'{"key":"q\\"","contactIdentity":{"identifier":"em\\u0061il","value":"x"},"json":{}}',
    b'{"key":"r","contactIdentity":{"identifier":"email","value":"\\u00e9\\n"},"json":{}}',
    b'{"key":"\xc2\xa0","json":{}}',
    b'{"key":"\\u3000","json":{}}',
    b'{"key":"s","json":{"t":"a\tb"}}',
    b"{not json",
    b'"just a string"',
    b"",
]
_PADDING = [b"", b" ", b"\t", b"\r", b"\x0c", b"\x0b", b"  \t"]


@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(_PADDING), st.sampled_from(_LINE_PARTS), st.sampled_from(_PADDING)
        ),
        max_size=25,
    ),
    contact=st.booleans(),
    first_line=st.integers(1, 10_000),
)
def test_a_chunk_encodes_each_line_as_encode_line_does(
    lines: list[tuple[bytes, bytes, bytes]], contact: bool, first_line: int
) -> None:
    """encode_chunk (in place, one pass over the chunk) agrees with encode_line line by line:
    the same records with the same bytes, the same rules broken, blank lines skipped."""
    collection = CONTACT if contact else ACCOUNT
    raw_lines = [before + part + after for before, part, after in lines]
    assert _chunk_results(raw_lines, collection, first_line) == _line_results(
        raw_lines, collection, first_line
    )


@pytest.mark.parametrize("collection", [ACCOUNT, CONTACT])
@pytest.mark.parametrize("reverse", [False, True])
def test_a_chunk_of_bare_lines_encodes_each_line_as_encode_line_does(
    collection: Collection, reverse: bool
) -> None:
    """Every corpus line without padding (the inline head paths) encodes as encode_line does."""
    raw_lines = _LINE_PARTS[::-1] if reverse else _LINE_PARTS
    assert _chunk_results(raw_lines, collection, 1) == _line_results(raw_lines, collection, 1)


def _chunk_results(lines: list[bytes], collection: Collection, first_line: int) -> list[object]:
    results = encode_lines(lines, collection, origin="f", first_line=first_line)
    return [
        result
        if isinstance(result, EncodedRecord)
        else (result.error.rule, str(result.error.source), result.error.key)
        for result in results
    ]


def _line_results(lines: list[bytes], collection: Collection, first_line: int) -> list[object]:
    expected: list[object] = []
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            expected.append(encode_line(line, collection, source=Source("f", number)))
        except errors.RecordError as error:
            expected.append((error.rule, str(error.source), error.key))
    return expected


# --------------------------------------------------------------------------- exactness

BIG = b"123456789012345678901234567890"
LONG = b"0.1000000000000000055511151231257827"


def test_re_encoded_line_keeps_its_numbers_exactly() -> None:
    """An integer key and a dropped contactIdentity are edited in place: json's numbers stay."""
    json = b'{"big": ' + BIG + b', "long": ' + LONG + b', "list": [1e-400, -0.0, 1.5e308]}'
    line = (
        b'{"key": ' + BIG + b', "contactIdentity": {"identifier": "email"},  "json": ' + json + b"}"
    )
    expected = b'{"key": "' + BIG + b'", "json": ' + json + b"}"
    record = encode_line(line, ACCOUNT, source=SRC)
    assert (record.key, record.data) == (BIG.decode(), expected)
    [chunked] = encode_lines([line], ACCOUNT, origin="in.jsonl", first_line=7)
    assert chunked == record


def test_contact_line_with_an_integer_key_keeps_its_identity_and_numbers() -> None:
    """In contact scope an integer key is quoted where it stands; nothing else changes."""
    line = (
        b'{"json":{"n":'
        + LONG
        + b'},"contactIdentity":{"identifier":"email","value":"a@b.io"},"key":-0}'
    )
    record = encode_line(line, CONTACT, source=SRC)
    assert record.data == line.replace(b'"key":-0', b'"key":"-0"')
    assert record.identity == ("email", "a@b.io", "-0")


def test_last_member_is_dropped_with_its_comma() -> None:
    """A contactIdentity dropped from the end of a line takes the comma before it along."""
    line = b'{"key":"k","json":{"n":' + BIG + b'} , "contactIdentity" : {"value": "x"} }'
    assert encode_line(line, ACCOUNT, source=SRC).data == b'{"key":"k","json":{"n":' + BIG + b"} }"


def test_a_float_key_is_still_a_key_type_error() -> None:
    """Only integer literals are keys: 1.0 and 1e3 stay key-type errors, escaped names work."""
    for text in (b"1.0", b"1e3", b"12345678901234567890123.5"):
        with pytest.raises(errors.RecordError, match="key-type"):
            encode_line(b'{"key": ' + text + b', "json": {}}', ACCOUNT, source=SRC)
    line = b'{"k\\u0065y": "a", "json": {"s": "\\u00e9 \\"key\\" [\\\\"}}'
    assert encode_line(line, ACCOUNT, source=SRC).data == line


def test_encode_record_writes_big_integers_and_decimals_exactly() -> None:
    """Python ints beyond 64 bits and finite Decimals go out as their digits."""
    obj = {"key": 10**30, "json": {"i": [1 << 70, -(1 << 64)], "d": Decimal(LONG.decode())}}
    record = encode_record(obj, ACCOUNT)
    assert record.key == str(10**30)
    assert record.data == (
        b'{"key":"1000000000000000000000000000000","json":{"i":[1180591620717411303424,'
        b'-18446744073709551616],"d":' + LONG + b"}}"
    )


def test_oversized_line_marker_is_rejected_with_its_prefix() -> None:
    """The reader's stand-in for an over-long line is rejected as record-too-large, prefix kept."""
    marker = oversized_line(10**9, 49_999_000, b'{"key": "a", "json": {"x": "000')
    [rejected] = encode_lines([b"{}", marker], ACCOUNT, origin="in.jsonl", first_line=1)[1:]
    assert isinstance(rejected, RejectedRecord)
    assert rejected.error.rule == "record-too-large"
    assert rejected.raw == b'{"key": "a", "json": {"x": "000'
    assert "1000000000 bytes" in rejected.error.message
    assert "49999000" in rejected.error.message
    with pytest.raises(errors.RecordError, match="record-too-large"):
        encode_line(marker, ACCOUNT, source=SRC)


_NUMBERS = st.one_of(
    st.integers(min_value=2**64, max_value=10**60).map(lambda n: str(n).encode()),
    st.integers(-(10**20), 10**20).map(lambda n: str(n).encode()),
    st.tuples(st.integers(-(10**20), 10**20), st.integers(0, 10**40), st.integers(-400, 280)).map(
        lambda t: b"%d.%de%d" % t
    ),
    st.decimals(-(10**30), 10**30, allow_nan=False, allow_infinity=False).map(
        lambda d: str(d).encode()
    ),
)
_TEXT = st.text(max_size=8).map(lambda t: orjson.dumps(t))
_VALUES = st.recursive(
    _NUMBERS | _TEXT | st.sampled_from([b"true", b"false", b"null"]),
    lambda children: (
        st.lists(st.tuples(_TEXT, children), max_size=3).map(
            lambda items: b"{" + b",".join(name + b": " + value for name, value in items) + b"}"
        )
        | st.lists(st.tuples(_TEXT, children), max_size=3).map(
            lambda items: b"[" + b" , ".join(b"{" + n + b":" + v + b"}" for n, v in items) + b"]"
        )
    ),
    max_leaves=12,
)


@given(
    json=st.lists(st.tuples(_TEXT, _VALUES), max_size=5).map(
        lambda items: b"{" + b",".join(name + b":" + value for name, value in items) + b"}"
    ),
    key=st.one_of(
        st.integers(min_value=-(10**40), max_value=10**40).map(lambda n: str(n).encode()),
        st.text(min_size=1).filter(str.strip).map(lambda t: orjson.dumps(t)),
    ),
    contact=st.booleans(),
    order=st.permutations(range(3)),
    space=st.sampled_from([b"", b" ", b"\t ", b" \r\t"]),
)
def test_the_json_member_goes_out_byte_for_byte(
    json: bytes, key: bytes, contact: bool, order: list[int], space: bytes
) -> None:
    """For any record with big integers and long decimals, the data holds the json member's
    bytes exactly, on the per-line and the chunk path, and parses to the same record."""
    members = [
        b'"key"' + space + b":" + key,
        b'"json":' + space + json,
        b'"contactIdentity": {"identifier": "email", "value": "a@b.io"}',
    ]
    line = b"{" + space + (b"," + space).join(members[i] for i in order if contact or i < 2) + b"}"
    record = encode_line(line, ACCOUNT, source=SRC)
    [chunked] = encode_lines([line], ACCOUNT, origin="in.jsonl", first_line=7)
    assert chunked == record
    assert b'"json":' + space + json in record.data
    assert b'"contactIdentity"' not in record.data
    quoted = key if key.startswith(b'"') else b'"' + key + b'"'
    assert b'"key"' + space + b":" + quoted in record.data
    assert orjson.loads(record.data) == {"key": orjson.loads(quoted), "json": orjson.loads(json)}


@pytest.mark.anyio
@pytest.mark.parametrize("processes", [0, 1])
async def test_the_simulator_receives_every_number_exactly(tmp_path: Path, processes: int) -> None:
    """End to end, from a file and from Python records: the bodies hold the exact digits."""
    json = b'{"big": ' + BIG + b', "long": ' + LONG + b"}"
    lines = [
        b'{"key": "clean", "json": ' + json + b"}",
        b'{"key": ' + BIG + b', "json": ' + json + b"}",
        b'{"key": "dropped", "contactIdentity": {"identifier": "email", "value": "a@b.io"}, '
        b'"json": ' + json + b"}",
        b'{"key": "twice", "json": {}, "key": "twice"}',
    ]
    data = tmp_path / "numbers.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    collection = Collection("Numbers")
    async with Simulator(SimulatorConfig(keep_bodies=True, seed=1)) as sim:
        client = InsightClient(sim_client_settings(sim))
        async with Orchestrator(
            client, settings=Settings.scaled(0.01, parse_processes=processes)
        ) as orch:
            result = await orch.import_files(collection, [str(data)])
            python = await orch.import_records(
                Collection("Decimals"),
                [{"key": 1 << 70, "json": {"d": Decimal(LONG.decode()), "i": 10**30}}],
            )
        bodies = b"".join(sim.stats.bodies.values())
    assert [(d.source, d.reason) for d in result.dead_letters] == [
        (f"{data}:4", "record-duplicate-field")
    ]
    assert python.ok
    for record in (
        lines[0],
        b'{"key": "' + BIG + b'", "json": ' + json + b"}",
        b'{"key": "dropped", "json": ' + json + b"}",
        b'{"key":"1180591620717411303424","json":{"d":'
        + LONG
        + b',"i":'
        + b"1"
        + b"0" * 30
        + b"}}",
    ):
        assert record in bodies
    assert b"e+29" not in bodies

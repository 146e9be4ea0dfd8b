"""The bundled API simulator, exercised over loopback with a real aiohttp client."""

from __future__ import annotations

import asyncio
import gc
import io
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.simulator import Faults, Simulator, SimulatorConfig, serve
from orchestrator.simulator.app import _collector_paused, _parse
from orchestrator.simulator.rules import analyse_records, default_contact_exists

pytestmark = pytest.mark.anyio

USER = "apiuser-demo@apiconnector.com"
PASSWORD = "demo-password"
AUTH = {"Authorization": aiohttp.encode_basic_auth(USER, PASSWORD)}
IMPORT = "/insightData/v3/import"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def fast_config(**changes: Any) -> SimulatorConfig:
    """A config whose imports finish in milliseconds."""
    values: dict[str, Any] = {"records_per_second": 1_000_000.0, "jitter": 0.0, "seed": 7}
    values.update(changes)
    return SimulatorConfig(**values)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """A running simulator with fast imports."""
    async with Simulator(fast_config()) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that sends the demo credentials."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


def body(
    records: list[dict[str, Any]],
    *,
    name: str = "Orders",
    scope: str = "account",
    ctype: str = "custom",
) -> dict[str, Any]:
    """A bulk import body."""
    return {
        "collectionName": name,
        "collectionScope": scope,
        "collectionType": ctype,
        "records": records,
    }


def contact(value: str, key: str = "k1", identifier: str = "email", **json: Any) -> dict[str, Any]:
    """A contact-scoped record."""
    return {
        "key": key,
        "contactIdentity": {"identifier": identifier, "value": value},
        "json": json or {"n": 1},
    }


async def put(
    http: aiohttp.ClientSession, sim: Simulator, payload: Any, **kwargs: Any
) -> tuple[int, Any, Any]:
    """PUT a body (a dict is JSON-encoded) and return status, parsed body and headers."""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with http.put(sim.base_url + IMPORT, data=data, **kwargs) as response:
        return response.status, orjson.loads(await response.read()), response.headers


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """GET a URL and return status, parsed body and headers."""
    async with http.get(url, **kwargs) as response:
        return response.status, orjson.loads(await response.read()), response.headers


async def submit(http: aiohttp.ClientSession, sim: Simulator, payload: Any) -> str:
    """PUT a body that must be accepted and return its import id."""
    status, answer, _ = await put(http, sim, payload)
    assert status == 202, answer
    return str(answer["importId"])


async def wait_done(
    http: aiohttp.ClientSession, sim: Simulator, import_id: str, limit_s: float = 10.0
) -> dict[str, Any]:
    """Poll an import until its status is terminal and return the last answer."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status, answer, _ = await get(http, f"{sim.base_url}{IMPORT}/{import_id}")
        assert status == 200, answer
        if answer["status"] in ("Finished", "Failed"):
            return dict(answer)
        await asyncio.sleep(0.01)
    raise AssertionError(f"import {import_id} did not finish in {limit_s} s")


async def test_success_flow_stores_records(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """An accepted import finishes and upserts its records by key."""
    payload = body([{"key": "1", "json": {"total": 1.5}}, {"key": "2", "json": {"a": {"b": [1]}}}])
    status, answer, _ = await put(http, sim, payload)
    assert status == 202
    assert UUID.fullmatch(answer["importId"])
    done = await wait_done(http, sim, answer["importId"])
    assert done["status"] == "Finished"
    assert done["collectionName"] == "Orders"
    assert done["summary"] == {"totalRecords": 2, "totalImported": 2, "totalRejected": 0}
    assert done["failures"] == []
    assert sim.collections["Orders"] == {
        "1": {"key": "1", "json": {"total": 1.5}},
        "2": {"key": "2", "json": {"a": {"b": [1]}}},
    }
    stats = sim.stats.imports[answer["importId"]]
    assert stats.status == "Finished"
    assert stats.records == 2
    assert stats.body_bytes == len(orjson.dumps(payload))
    assert stats.finished_at is not None
    assert stats.finished_at >= stats.accepted_at
    assert stats.polls
    assert not sim.stats.imports[answer["importId"]].lost_response


async def test_status_goes_not_started_processing_finished(http: aiohttp.ClientSession) -> None:
    """An import is NotStarted briefly, then Processing, then Finished after its duration."""
    async with Simulator(fast_config(min_processing_s=1.0)) as sim:
        import_id = await submit(http, sim, body([{"key": "1", "json": {}}]))
        url = f"{sim.base_url}{IMPORT}/{import_id}"
        _, first, _ = await get(http, url)
        assert first["status"] == "NotStarted"
        assert "summary" not in first
        await asyncio.sleep(0.15)
        _, second, _ = await get(http, url)
        assert second["status"] == "Processing"
        done = await wait_done(http, sim, import_id)
        stats = sim.stats.imports[import_id]
        assert done["status"] == "Finished"
        assert stats.finished_at is not None
        assert stats.finished_at - stats.accepted_at >= 1.0


async def test_records_are_applied_at_finish_without_polls(http: aiohttp.ClientSession) -> None:
    """Records reach the collection when the import finishes, even if nobody polls."""
    async with Simulator(fast_config(min_processing_s=0.2)) as sim:
        import_id = await submit(http, sim, body([{"key": "1", "json": {}}]))
        assert "Orders" not in sim.collections
        await asyncio.sleep(0.6)
        assert sim.collections["Orders"] == {"1": {"key": "1", "json": {}}}
        assert sim.stats.imports[import_id].status == "Finished"
        assert sim.stats.imports[import_id].polls == []


async def test_contact_scope_stores_per_contact(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Contact-scoped records are keyed by contact identity and key: same key, two contacts."""
    records = [contact("a@x.io", "k1", n=1), contact("b@x.io", "k1", n=2)]
    done = await wait_done(http, sim, await submit(http, sim, body(records, scope="contact")))
    assert done["summary"]["totalImported"] == 2
    assert sim.collections["Orders"] == {
        ("email", "a@x.io", "k1"): records[0],
        ("email", "b@x.io", "k1"): records[1],
    }


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("not an object", [], "body"),
    ("unknown top-level field", {**body([{"key": "1", "json": {}}]), "extra": 1}, "extra"),
    (
        "missing name",
        {**body([{"key": "1", "json": {}}]), "collectionName": None},
        "collectionName",
    ),
    ("name too short", body([{"key": "1", "json": {}}], name="a"), "collectionName"),
    ("name leading digit", body([{"key": "1", "json": {}}], name="1abc"), "collectionName"),
    ("name with a space", body([{"key": "1", "json": {}}], name="ab c"), "collectionName"),
    ("name of 256 chars", body([{"key": "1", "json": {}}], name="a" * 256), "collectionName"),
    ("bad scope", body([{"key": "1", "json": {}}], scope="global"), "collectionScope"),
    ("bad type", body([{"key": "1", "json": {}}], ctype="Orders"), "collectionType"),
    ("records missing", {**body([]), "records": None}, "records"),
    ("records empty", body([]), "records"),
    ("records not a list", {**body([]), "records": {"key": "1"}}, "records"),
    ("record not an object", body([["1"]]), "records[0]"),
    ("key missing", body([{"json": {}}]), "records[0].key"),
    ("key a number", body([{"key": 1, "json": {}}]), "records[0].key"),
    ("json missing", body([{"key": "1"}]), "records[0].json"),
    ("json an array", body([{"key": "1", "json": [1]}]), "records[0].json"),
    ("extra record field", body([{"key": "1", "json": {}, "x": 1}]), "records[0].x"),
    (
        "contactIdentity on account scope",
        body([contact("a@x.io")]),
        "records[0].contactIdentity",
    ),
    (
        "contactIdentity missing",
        body([{"key": "1", "json": {}}], scope="contact"),
        "records[0].contactIdentity",
    ),
    (
        "custom identifier of 51 chars",
        body([contact("v", identifier="a" * 51)], scope="contact"),
        "records[0].contactIdentity",
    ),
    (
        "identifier with a dot",
        body([contact("v", identifier="my.id")], scope="contact"),
        "records[0].contactIdentity",
    ),
    (
        "value of 257 chars",
        body([contact("v" * 257)], scope="contact"),
        "records[0].contactIdentity",
    ),
    (
        "value not a string",
        body(
            [{"key": "1", "json": {}, "contactIdentity": {"identifier": "contactId", "value": 5}}],
            scope="contact",
        ),
        "records[0].contactIdentity",
    ),
    (
        "extra identity field",
        body(
            [
                {
                    "key": "1",
                    "json": {},
                    "contactIdentity": {"identifier": "email", "value": "a@x.io", "x": 1},
                }
            ],
            scope="contact",
        ),
        "records[0].contactIdentity",
    ),
    (
        "second record broken",
        body([{"key": "1", "json": {}}, {"key": "2", "json": "x"}]),
        "records[1].json",
    ),
]


@pytest.mark.parametrize(
    ("payload", "item"), [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES]
)
async def test_body_violations_answer_bad_json(
    sim: Simulator, http: aiohttp.ClientSession, payload: Any, item: str
) -> None:
    """A body breaking a body-level rule answers 400 badJson naming the item; no import starts."""
    status, answer, _ = await put(http, sim, payload)
    assert status == 400
    assert answer["errorCode"] == "insightData:badJson"
    assert answer["description"]
    assert item in [detail["item"] for detail in answer["details"]]
    assert all(detail["description"] for detail in answer["details"])
    assert sim.stats.imports == {}


async def test_unparseable_json_answers_bad_json(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Bytes that are not JSON answer 400 badJson."""
    status, answer, _ = await put(http, sim, b'{"collectionName": ')
    assert status == 400
    assert answer["errorCode"] == "insightData:badJson"


@pytest.mark.parametrize(
    "payload",
    [
        body([{"key": "1", "json": {}}], name="a" * 255),
        body([{"key": "1", "json": {}}], name="-x"),
        body([{"key": "", "json": {}}], name="_x", ctype="wishList"),
        body([contact("v" * 256, identifier="a" * 50)], scope="contact"),
        body([contact("+4470000", identifier="mobileNumber")], scope="contact"),
    ],
    ids=["name of 255", "leading dash", "empty key", "limits of identity", "mobile"],
)
async def test_bodies_at_the_limits_are_accepted(
    sim: Simulator, http: aiohttp.ClientSession, payload: Any
) -> None:
    """Bodies right at the documented limits are accepted."""
    status, answer, _ = await put(http, sim, payload)
    assert status == 202, answer


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": aiohttp.encode_basic_auth(USER, "wrong")},
        {"Authorization": aiohttp.encode_basic_auth("other@apiconnector.com", PASSWORD)},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Bearer abc"},
    ],
    ids=["none", "bad password", "bad user", "garbage", "other scheme"],
)
async def test_bad_credentials_answer_401(sim: Simulator, headers: dict[str, str]) -> None:
    """Missing or wrong Basic auth answers 401 with an error body on every API endpoint."""
    async with aiohttp.ClientSession(headers=headers) as anonymous:
        status, answer, _ = await put(anonymous, sim, body([{"key": "1", "json": {}}]))
        assert status == 401
        assert answer["errorCode"]
        status, answer, _ = await get(anonymous, f"{sim.base_url}/v2/account-info")
        assert status == 401
    assert sim.stats.imports == {}


async def test_integration_token_is_required_when_configured(http: aiohttp.ClientSession) -> None:
    """With an integration token configured, calls without the matching header answer 401."""
    token = "4b1d1e2f-0000-4000-8000-000000000001"
    async with Simulator(fast_config(integration_token=token)) as sim:
        payload = body([{"key": "1", "json": {}}])
        status, _, _ = await put(http, sim, payload)
        assert status == 401
        status, _, _ = await put(http, sim, payload, headers={"x-ddg-integration-token": "nope"})
        assert status == 401
        status, _, _ = await put(http, sim, payload, headers={"x-ddg-integration-token": token})
        assert status == 202


async def test_wrong_region_answers_403(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A Host naming another region answers 403 wrong region; the region lookup answers anywhere."""
    status, answer, _ = await put(
        http, sim, body([{"key": "1", "json": {}}]), headers={"Host": "r2-api.dotdigital.com"}
    )
    assert status == 403
    assert "wrong region" in answer["description"]
    status, _, _ = await put(
        http, sim, body([{"key": "1", "json": {}}]), headers={"Host": "r1-api.dotdigital.com"}
    )
    assert status == 202
    status, info, _ = await get(
        http, f"{sim.base_url}/v2/account-info", headers={"Host": "r3-api.dotdigital.com"}
    )
    assert status == 200
    assert {"name": "ApiEndpoint", "type": "String", "value": sim.base_url} in info["properties"]


async def test_unknown_and_malformed_ids(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """An unknown GUID answers 404 importNotFound; a malformed one 400 invalidId."""
    status, answer, _ = await get(
        http, f"{sim.base_url}{IMPORT}/3f2504e0-4f89-41d3-9a0c-0305e82c3301"
    )
    assert (status, answer["errorCode"]) == (404, "insightData:importNotFound")
    status, answer, _ = await get(http, f"{sim.base_url}{IMPORT}/not-a-guid")
    assert (status, answer["errorCode"]) == (400, "insightData:invalidId")


async def test_ids_are_matched_case_insensitively(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A GUID sent in upper case finds the same import."""
    import_id = await submit(http, sim, body([{"key": "1", "json": {}}]))
    status, answer, _ = await get(http, f"{sim.base_url}{IMPORT}/{import_id.upper()}")
    assert status == 200
    assert answer["importId"] == import_id


async def test_body_over_the_limit_answers_413(http: aiohttp.ClientSession) -> None:
    """A body over max_body_bytes answers 413, by Content-Length or by bytes read; at it, 202."""
    async with Simulator(fast_config(max_body_bytes=2_000)) as sim:
        fits = body([{"key": "1", "json": {"pad": ""}}])
        fits["records"][0]["json"]["pad"] = "x" * (2_000 - len(orjson.dumps(fits)))
        assert len(orjson.dumps(fits)) == 2_000
        status, _, _ = await put(http, sim, fits)
        assert status == 202
        too_big = orjson.dumps(body([{"key": "1", "json": {"pad": "x" * 2_000}}]))
        status, answer, _ = await put(http, sim, too_big)
        assert status == 413
        assert answer["errorCode"]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(too_big), 500):
                yield too_big[start : start + 500]

        async with http.put(sim.base_url + IMPORT, data=chunks()) as response:
            assert response.status == 413
        assert sim.stats.rejected_too_large == 2
        assert len(sim.stats.imports) == 1


async def test_sixth_concurrent_import_answers_429(http: aiohttp.ClientSession) -> None:
    """With 5 imports active a 6th PUT answers 429 tooManyActiveImports, without rate headers."""
    async with Simulator(fast_config(min_processing_s=30.0)) as sim:
        for n in range(5):
            await submit(http, sim, body([{"key": str(n), "json": {}}]))
        status, answer, headers = await put(http, sim, body([{"key": "6", "json": {}}]))
        assert status == 429
        assert answer["errorCode"] == "insightData:tooManyActiveImports"
        assert "X-RateLimit-Reset" not in headers
        assert "Retry-After" not in headers
        assert sim.stats.rejected_too_many_active == 1
        assert sim.stats.max_active_seen == 5
        assert len(sim.stats.imports) == 5


async def test_foreign_imports_hold_slots(http: aiohttp.ClientSession) -> None:
    """Slots held by another integration count against the limit of 5."""
    faults = Faults(foreign_active_imports=3)
    async with Simulator(fast_config(min_processing_s=30.0), faults=faults) as sim:
        await submit(http, sim, body([{"key": "1", "json": {}}]))
        await submit(http, sim, body([{"key": "2", "json": {}}]))
        status, answer, _ = await put(http, sim, body([{"key": "3", "json": {}}]))
        assert (status, answer["errorCode"]) == (429, "insightData:tooManyActiveImports")
        assert sim.stats.max_active_seen == 2
        assert sim.stats.max_active_seen_with_foreign == 5
        sim.faults.foreign_active_imports = 0
        await submit(http, sim, body([{"key": "3", "json": {}}]))


async def test_a_finished_import_frees_its_slot(http: aiohttp.ClientSession) -> None:
    """Once an import finishes, its slot takes a new import."""
    async with Simulator(fast_config(max_active_imports=1, min_processing_s=0.05)) as sim:
        first = await submit(http, sim, body([{"key": "1", "json": {}}]))
        status, _, _ = await put(http, sim, body([{"key": "2", "json": {}}]))
        assert status == 429
        await wait_done(http, sim, first)
        await submit(http, sim, body([{"key": "2", "json": {}}]))


async def test_rate_limit_fault_sends_headers(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The rate limit fault answers 429 with X-RateLimit-* and Retry-After, then lets calls by."""
    sim.faults.rate_limit_calls = 2
    sim.faults.rate_limit_reset_s = 0.25
    for _ in range(2):
        status, answer, headers = await put(http, sim, body([{"key": "1", "json": {}}]))
        assert status == 429
        assert answer["errorCode"] == "rateLimitExceeded"
        assert headers["X-RateLimit-Reset"] == "0.25"
        assert headers["Retry-After"] == "0.25"
        assert int(headers["X-RateLimit-Limit"]) > 0
        assert headers["X-RateLimit-Scope"]
    await submit(http, sim, body([{"key": "1", "json": {}}]))
    assert sim.stats.status_counts[429] == 2
    assert sim.stats.rejected_too_many_active == 0


async def test_server_error_fault_rotates(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The 5xx fault answers 500, 502, 503 with error bodies, creating no import."""
    sim.faults.server_errors = 3
    seen = []
    for _ in range(3):
        status, answer, _ = await put(http, sim, body([{"key": "1", "json": {}}]))
        seen.append(status)
        assert answer["errorCode"]
    assert seen == [500, 502, 503]
    assert sim.stats.imports == {}
    await submit(http, sim, body([{"key": "1", "json": {}}]))


async def test_server_error_fault_hits_status_calls(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Faults apply to any endpoint, status polls included."""
    import_id = await submit(http, sim, body([{"key": "1", "json": {}}]))
    sim.faults.server_errors = 1
    status, _, _ = await get(http, f"{sim.base_url}{IMPORT}/{import_id}")
    assert status == 500
    await wait_done(http, sim, import_id)


async def test_slow_fault_delays_the_answer(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The slow fault delays the next answers by slow_delay_s."""
    sim.faults.slow_responses = 1
    sim.faults.slow_delay_s = 0.2
    started = time.monotonic()
    await submit(http, sim, body([{"key": "1", "json": {}}]))
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    await submit(http, sim, body([{"key": "2", "json": {}}]))
    assert time.monotonic() - started < 0.2


async def test_lost_response_import_still_runs(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A dropped 202 reaches the client as a disconnect, yet the import exists and finishes."""
    # aiohttp resends an idempotent PUT once on a dropped connection, so drop both attempts.
    sim.faults.resets_after_accept = 2
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await put(http, sim, body([{"key": "1", "json": {"v": 1}}]))
    imports = list(sim.stats.imports.values())
    assert len(imports) == 2
    assert all(stats.lost_response for stats in imports)
    assert sim.stats.lost_responses == 2
    assert 202 not in sim.stats.status_counts
    for stats in imports:
        done = await wait_done(http, sim, stats.import_id)
        assert done["status"] == "Finished"
    assert sim.collections["Orders"] == {"1": {"key": "1", "json": {"v": 1}}}


async def test_aiohttp_resends_a_put_whose_response_was_lost(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """One lost response becomes two imports: aiohttp silently resends the PUT once."""
    sim.faults.resets_after_accept = 1
    status, _, _ = await put(http, sim, body([{"key": "1", "json": {}}]))
    assert status == 202
    assert [stats.lost_response for stats in sim.stats.imports.values()] == [True, False]


async def test_failed_import_applies_nothing(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The failed-import fault ends the next import Failed with no records applied."""
    sim.faults.failed_imports = 1
    failed = await wait_done(http, sim, await submit(http, sim, body([{"key": "1", "json": {}}])))
    assert failed["status"] == "Failed"
    assert "summary" not in failed
    assert "Orders" not in sim.collections
    ok = await wait_done(http, sim, await submit(http, sim, body([{"key": "2", "json": {}}])))
    assert ok["status"] == "Finished"
    assert list(sim.collections["Orders"]) == ["2"]


async def test_per_record_failures(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Unknown contacts, nested arrays, bad field names and duplicate keys fail one by one."""
    records = [
        contact("ok@x.io", "good"),
        contact("nobody@unknown.invalid", "k-email"),
        contact("42.invalid", "k-id", identifier="contactId"),
        contact("+44.invalid", "k-mobile", identifier="mobileNumber"),
        contact("ok@x.io", "k-nested", a=[1, [2]]),
        contact("ok@x.io", "k-deep-nested", a=[{"b": {"c": [[1]]}}]),
        contact("ok@x.io", "k-name", **{"bad name": 1}),
        contact("ok@x.io", "k-deep-name", a={"b": [{"c.d": 1}]}),
        contact("ok@x.io", "dup", v=1),
        contact("ok@x.io", "dup", v=2),
        contact("other@x.io", "dup", v=3),
    ]
    done = await wait_done(http, sim, await submit(http, sim, body(records, scope="contact")))
    assert done["status"] == "Finished"
    assert done["summary"] == {"totalRecords": 11, "totalImported": 3, "totalRejected": 8}
    reasons = {failure["key"]: failure["failureReason"] for failure in done["failures"]}
    assert reasons == {
        "k-email": "ContactEmailDoesNotExist",
        "k-id": "ContactIdDoesNotExist",
        "k-mobile": "InvalidContactIdentifier",
        "k-nested": "JsonContainsNestedArray",
        "k-deep-nested": "JsonContainsNestedArray",
        "k-name": "JsonKeyInvalidCharacters",
        "k-deep-name": "JsonKeyInvalidCharacters",
        "dup": "DuplicateKey",
    }
    duplicate = next(f for f in done["failures"] if f["key"] == "dup")
    assert duplicate["json"] == {"v": 1}
    assert duplicate["collectionOwner"] == {
        "ownerType": "contact",
        "contactIdentity": {"identifier": "email", "value": "ok@x.io"},
    }
    assert all(failure["details"] for failure in done["failures"])
    stored = sim.collections["Orders"]
    assert stored[("email", "ok@x.io", "dup")]["json"] == {"v": 2}
    assert stored[("email", "other@x.io", "dup")]["json"] == {"v": 3}
    assert ("email", "ok@x.io", "good") in stored
    assert sim.stats.imports[done["importId"]].rejected == 8


async def test_account_scope_failures_name_the_account(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Account-scope failures carry ownerType account and no contact identity."""
    records = [{"key": "1", "json": {"a": [[1]]}}, {"key": "1", "json": {"a": 2}}]
    done = await wait_done(http, sim, await submit(http, sim, body(records)))
    assert done["failures"] == [
        {
            "collectionOwner": {"ownerType": "account"},
            "failureReason": "DuplicateKey",
            "details": done["failures"][0]["details"],
            "key": "1",
            "json": {"a": [[1]]},
        }
    ]
    assert sim.collections["Orders"] == {"1": {"key": "1", "json": {"a": 2}}}


async def test_explicit_contact_book(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """set_contacts makes only the given values known; None restores the default rule."""
    sim.set_contacts(["known@x.io"])
    records = [contact("known@x.io", "1"), contact("stranger@x.io", "2")]
    done = await wait_done(http, sim, await submit(http, sim, body(records, scope="contact")))
    assert [f["key"] for f in done["failures"]] == ["2"]
    sim.set_contacts(None)
    done = await wait_done(http, sim, await submit(http, sim, body(records, scope="contact")))
    assert done["failures"] == []


async def test_later_finishing_import_wins(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Records apply in completion order: the import finishing last holds the key."""
    sim.config.min_processing_s = 0.3
    slow = await submit(http, sim, body([{"key": "k", "json": {"v": "old-but-slow"}}]))
    sim.config.min_processing_s = 0.0
    fast = await submit(http, sim, body([{"key": "k", "json": {"v": "new-but-fast"}}]))
    await wait_done(http, sim, fast)
    assert sim.collections["Orders"]["k"]["json"] == {"v": "new-but-fast"}
    await wait_done(http, sim, slow)
    assert sim.collections["Orders"]["k"]["json"] == {"v": "old-but-slow"}


async def test_reject_status_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The status-rejection fault answers 404 importNotFound for a known id, once."""
    import_id = await submit(http, sim, body([{"key": "1", "json": {}}]))
    sim.faults.reject_status_calls = 1
    status, answer, _ = await get(http, f"{sim.base_url}{IMPORT}/{import_id}")
    assert (status, answer["errorCode"]) == (404, "insightData:importNotFound")
    await wait_done(http, sim, import_id)
    assert len(sim.stats.imports[import_id].polls) >= 2


async def test_account_info_names_the_endpoint(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The region lookup returns the simulator's base URL as ApiEndpoint."""
    status, info, _ = await get(http, f"{sim.base_url}/v2/account-info")
    assert status == 200
    assert isinstance(info["id"], int)
    endpoint = [p["value"] for p in info["properties"] if p["name"] == "ApiEndpoint"]
    assert endpoint == [sim.base_url]


async def test_unknown_route_and_method(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Unknown paths answer 404 and wrong methods 405, both with JSON error bodies."""
    status, answer, _ = await get(http, f"{sim.base_url}/v3/nothing")
    assert (status, answer["errorCode"]) == (404, "notFound")
    async with http.post(sim.base_url + IMPORT, data=b"{}") as response:
        assert response.status == 405
        assert orjson.loads(await response.read())["errorCode"]


async def test_admin_stats_and_collections(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The admin endpoints expose stats and stored records without auth and uncounted."""
    records = [contact("a@x.io", "1"), contact("b@x.io", "1")]
    import_id = await submit(http, sim, body(records, name="People", scope="contact"))
    await wait_done(http, sim, import_id)
    requests = sim.stats.requests
    async with aiohttp.ClientSession() as anonymous:
        status, stats, _ = await get(anonymous, f"{sim.base_url}/_simulator/stats")
        assert status == 200
        assert stats["requests"] == requests
        assert stats["status_counts"]["202"] == 1
        assert stats["imports"][0]["import_id"] == import_id
        assert stats["imports"][0]["status"] == "Finished"
        assert stats["imports"][0]["polls"]
        assert stats["max_active_seen"] == 1
        assert stats["active"] == 0
        status, stored, _ = await get(anonymous, f"{sim.base_url}/_simulator/collections/People")
        assert status == 200
        assert stored["collectionScope"] == "contact"
        assert stored["count"] == 2
        assert sorted(r["contactIdentity"]["value"] for r in stored["records"]) == [
            "a@x.io",
            "b@x.io",
        ]
        status, listing, _ = await get(anonymous, f"{sim.base_url}/_simulator/collections")
        assert listing == [
            {
                "collectionName": "People",
                "count": 2,
                "collectionScope": "contact",
                "collectionType": "custom",
            }
        ]
        status, _, _ = await get(anonymous, f"{sim.base_url}/_simulator/collections/Nope")
        assert status == 404
    assert sim.stats.requests == requests


async def test_admin_faults_endpoint(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """POST /_simulator/faults sets fault fields from another process; bad input answers 400."""
    url = f"{sim.base_url}/_simulator/faults"
    async with http.post(url, data=orjson.dumps({"server_errors": 1, "slow_delay_s": 0})) as r:
        assert r.status == 200
        assert orjson.loads(await r.read())["server_errors"] == 1
    assert sim.faults.server_errors == 1
    status, _, _ = await put(http, sim, body([{"key": "1", "json": {}}]))
    assert status == 500
    for bad in (
        {"nope": 1},
        {"server_errors": -1},
        {"server_errors": 1.5},
        {"server_errors": True},
        [1],
    ):
        async with http.post(url, data=orjson.dumps(bad)) as r:
            assert r.status == 400, bad
    async with http.post(url, data=b"{") as r:
        assert r.status == 400
    status, faults, _ = await get(http, url)
    assert status == 200
    assert faults["server_errors"] == 0


async def test_admin_contacts_endpoint(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """POST /_simulator/contacts sets or clears the contact book."""
    url = f"{sim.base_url}/_simulator/contacts"
    async with http.post(url, data=orjson.dumps({"contacts": ["a@x.io"]})) as r:
        assert r.status == 200
    assert sim.state.contacts == frozenset({"a@x.io"})
    async with http.post(url, data=orjson.dumps({"contacts": None})) as r:
        assert r.status == 200
    assert sim.state.contacts is None
    async with http.post(url, data=orjson.dumps({"contacts": [1]})) as r:
        assert r.status == 400


async def test_large_body_is_accepted_while_polls_are_served(
    http: aiohttp.ClientSession,
) -> None:
    """A multi-megabyte body of many records is parsed off the loop and imported whole."""
    async with Simulator(fast_config(records_per_second=500_000.0)) as sim:
        records = [{"key": str(n), "json": {"pad": "x" * 200, "n": n}} for n in range(20_000)]
        raw = orjson.dumps(body(records))
        assert len(raw) > 4_000_000
        async with http.put(sim.base_url + IMPORT, data=io.BytesIO(raw)) as response:
            assert response.status == 202
            import_id = orjson.loads(await response.read())["importId"]
        done = await wait_done(http, sim, import_id)
        assert done["summary"]["totalImported"] == 20_000
        assert len(sim.collections["Orders"]) == 20_000
        assert sim.stats.imports[import_id].body_bytes == len(raw)


async def test_serve_runs_until_cancelled(http: aiohttp.ClientSession) -> None:
    """serve() binds, reports the running simulator, answers, and stops on cancellation."""
    started: asyncio.Queue[Simulator] = asyncio.Queue()
    task = asyncio.get_running_loop().create_task(
        serve(fast_config(), host="0.0.0.0", port=0, on_started=started.put_nowait)
    )
    try:
        running = await asyncio.wait_for(started.get(), 5)
        assert running.base_url.startswith("http://127.0.0.1:")
        status, _, _ = await get(http, f"{running.base_url}/v2/account-info")
        assert status == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_seed_makes_import_ids_reproducible(http: aiohttp.ClientSession) -> None:
    """Two simulators with the same seed hand out the same import ids."""
    ids = []
    for _ in range(2):
        async with Simulator(fast_config(seed=123)) as sim:
            ids.append(await submit(http, sim, body([{"key": "1", "json": {}}])))
    assert ids[0] == ids[1]


async def test_base_url_needs_a_running_simulator() -> None:
    """base_url before start is a mistake that says how to fix it; close is idempotent."""
    sim = Simulator()
    with pytest.raises(RuntimeError, match="async with"):
        _ = sim.base_url
    await sim.close()


@pytest.mark.parametrize(
    "changes",
    [
        {"records_per_second": 0},
        {"min_processing_s": -1},
        {"jitter": 1.0},
        {"max_active_imports": 0},
        {"max_body_bytes": 0},
    ],
)
def test_config_rejects_nonsense(changes: dict[str, Any]) -> None:
    """Impossible settings are refused at construction."""
    with pytest.raises(ValueError, match=next(iter(changes))):
        SimulatorConfig(**changes)


def test_config_repr_hides_the_password() -> None:
    """The config's repr never shows the password or the integration token."""
    text = repr(SimulatorConfig(password="s3cret", integration_token="t0ken"))
    assert "s3cret" not in text
    assert "t0ken" not in text


_json_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def _reference_problem(value: Any, in_array: bool = False) -> set[str]:
    """Every problem in a JSON value, found the slow and obvious way."""
    if isinstance(value, list):
        found = {"JsonContainsNestedArray"} if in_array else set()
        for item in value:
            found |= _reference_problem(item, in_array=True)
        return found
    if isinstance(value, dict):
        found = set()
        for name, item in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                found.add("JsonKeyInvalidCharacters")
            found |= _reference_problem(item)
        return found
    return set()


@given(st.dictionaries(st.text(max_size=4), _json_values, max_size=4))
def test_deep_checks_match_a_reference(value: dict[str, Any]) -> None:
    """A record fails exactly when a slow reference walk finds a problem, with one of its."""
    analysis = analyse_records(
        [{"key": "k", "json": value}], contact_scope=False, contact_exists=default_contact_exists
    )
    expected = _reference_problem(value)
    if expected:
        assert [failure.reason in expected for failure in analysis.failures] == [True]
        assert analysis.upserts == {}
    else:
        assert analysis.failures == []
        assert list(analysis.upserts) == ["k"]


def _first_problem(value: dict[str, Any]) -> str | None:
    """The first problem of a JSON object in document order, found the slow way."""
    for name, item in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            return "JsonKeyInvalidCharacters"
        found = _first_problem_in(item, in_array=False)
        if found is not None:
            return found
    return None


def _first_problem_in(value: Any, *, in_array: bool) -> str | None:
    if isinstance(value, dict):
        return _first_problem(value)
    if isinstance(value, list):
        if in_array:
            return "JsonContainsNestedArray"
        for item in value:
            found = _first_problem_in(item, in_array=True)
            if found is not None:
                return found
    return None


_names = st.sampled_from(["a", "b", "c-1", "d_2", "e f", "g.h", ""])


@given(
    st.lists(
        st.dictionaries(
            _names,
            st.recursive(
                st.integers(0, 3),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner),
                max_leaves=8,
            ),
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_deep_checks_report_the_first_problem_in_document_order(
    values: list[dict[str, Any]],
) -> None:
    """With names learned from earlier records, the reason is still the first problem in order."""
    analysis = analyse_records(
        [{"key": f"k{i}", "json": value} for i, value in enumerate(values)],
        contact_scope=False,
        contact_exists=default_contact_exists,
    )
    reasons = {failure.index: failure.reason for failure in analysis.failures}
    assert reasons == {
        i: problem
        for i, value in enumerate(values)
        if (problem := _first_problem(value)) is not None
    }


def test_parsing_a_body_leaves_the_collector_as_it_was() -> None:
    """The collector, paused while a body is parsed, is on again after; off stays off."""
    body = orjson.dumps(
        {
            "collectionName": "Orders",
            "collectionScope": "account",
            "collectionType": "custom",
            "records": [{"key": "k", "json": {"a": [1]}}],
        }
    )
    assert gc.isenabled()
    assert _parse(body)[3] == [{"key": "k", "json": {"a": [1]}}]
    assert gc.isenabled()
    gc.disable()
    try:
        with _collector_paused():
            _parse(body)
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_simulators_own_process_freezes_what_a_parse_made() -> None:
    """In serve's own process a parsed body's objects leave the collector's walks; elsewhere the
    simulator leaves the collector alone."""
    body = orjson.dumps(
        {
            "collectionName": "Orders",
            "collectionScope": "account",
            "collectionType": "custom",
            "records": [{"key": f"k{i}", "json": {"a": [i]}} for i in range(100)],
        }
    )
    before = gc.get_freeze_count()
    _parse(body)
    assert gc.get_freeze_count() == before  # embedded: nothing moved
    _collector_paused.own_process = True
    try:
        records = _parse(body)[3]
        assert gc.get_freeze_count() >= before + len(records)
        assert gc.isenabled()
    finally:
        _collector_paused.own_process = False
        gc.unfreeze()

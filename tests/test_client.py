"""Tests of the API client, against the bundled simulator over loopback."""

from __future__ import annotations

import email.utils
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from orchestrator.client import (
    REGIONS,
    ClientSettings,
    InsightClient,
    RetryPolicy,
    _jittered_backoff,
    _rate_limit_wait,
    is_loopback_url,
    region_of,
    same_api_root,
)
from orchestrator.errors import (
    AccountFullError,
    ApiError,
    ApiErrorDetail,
    AuthenticationError,
    BadRequestError,
    BodyTooLargeError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransientError,
    TransportError,
)
from orchestrator.logs import capture_events
from orchestrator.simulator import Simulator, SimulatorConfig
from orchestrator.wire import ImportState, ImportStatus, import_state, parse_error_body
from tests.conftest import sim_client_settings

PASSWORD = "s3cret-Pa55word"


def body_of(
    records: list[dict[str, Any]], *, name: str = "Orders", scope: str = "account"
) -> bytes:
    return orjson.dumps(
        {
            "collectionName": name,
            "collectionScope": scope,
            "collectionType": "custom",
            "records": records,
        }
    )


def account_records(count: int, *, pad: int = 0) -> list[dict[str, Any]]:
    return [{"key": f"k{i}", "json": {"n": i, "pad": "x" * pad}} for i in range(count)]


def settings_for(sim: Simulator, **overrides: Any) -> ClientSettings:
    return sim_client_settings(sim, **overrides)


@pytest.fixture
async def sim(anyio_backend: str) -> AsyncIterator[Simulator]:
    config = SimulatorConfig(password=PASSWORD, records_per_second=1e6, jitter=0.0, seed=7)
    async with Simulator(config) as server:
        yield server


async def wait_finished(client: InsightClient, import_id: str) -> ImportStatus:
    with anyio.fail_after(5):
        while True:
            status = await client.import_status(import_id)
            if status.state is not ImportState.RUNNING:
                return status
            await anyio.sleep(0.01)


# --- success and parsing -------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_and_poll_to_succeeded_with_failures_parsed(sim: Simulator) -> None:
    """A contact-scope import finishes; summary and per-record failures are parsed without json."""
    records = [
        {
            "key": "a",
            "contactIdentity": {"identifier": "email", "value": "a@x.io"},
            "json": {"total": 1},
        },
        {
            "key": "b",
            "contactIdentity": {"identifier": "email", "value": "b@nobody.invalid"},
            "json": {"total": 2},
        },
        {
            "key": "c",
            "contactIdentity": {"identifier": "email", "value": "c@x.io"},
            "json": {"items": [[1, 2]]},
        },
    ]
    async with InsightClient(settings_for(sim)) as client:
        receipt = await client.submit_import(body_of(records, scope="contact"))
        status = await wait_finished(client, receipt.import_id)
    assert (receipt.attempts, receipt.lost_responses) == (1, 0)
    assert status.import_id == receipt.import_id
    assert (status.status, status.state) == ("Finished", ImportState.SUCCEEDED)
    assert status.summary is not None
    assert (status.summary.total_records, status.summary.total_imported) == (3, 1)
    assert status.summary.total_rejected == 2
    by_key = {failure.key: failure for failure in status.failures}
    assert by_key["b"].reason == "ContactEmailDoesNotExist"
    assert by_key["b"].contact_identity == ("email", "b@nobody.invalid")
    assert by_key["c"].reason == "JsonContainsNestedArray"
    assert not hasattr(by_key["b"], "json")
    assert len(sim.collections["Orders"]) == 1


@pytest.mark.anyio
async def test_failed_import_maps_to_failed_state(sim: Simulator) -> None:
    """An import the API ends as ``Failed`` is reported FAILED."""
    sim.faults.failed_imports = 1
    async with InsightClient(settings_for(sim)) as client:
        receipt = await client.submit_import(body_of(account_records(2)))
        status = await wait_finished(client, receipt.import_id)
    assert (status.status, status.state) == ("Failed", ImportState.FAILED)


@pytest.mark.anyio
async def test_large_body_is_sent_without_warning(sim: Simulator) -> None:
    """A multi-megabyte body goes out as is, without aiohttp's ResourceWarning (fatal here)."""
    body = body_of(account_records(3_000, pad=1_000))
    assert len(body) > 3_000_000
    async with InsightClient(settings_for(sim)) as client:
        receipt = await client.submit_import(body)
    assert sim.stats.imports[receipt.import_id].body_bytes == len(body)


@pytest.mark.anyio
async def test_account_api_endpoint_reads_the_property(sim: Simulator) -> None:
    """The region lookup returns the account's ApiEndpoint."""
    async with InsightClient(settings_for(sim)) as client:
        assert await client.account_api_endpoint() == sim.base_url


@pytest.mark.parametrize(
    ("word", "state"),
    [
        ("Finished", ImportState.SUCCEEDED),
        ("Complete", ImportState.SUCCEEDED),
        ("Failed", ImportState.FAILED),
        ("RejectedByWatchdog", ImportState.FAILED),
        ("InvalidFileFormat", ImportState.FAILED),
        ("Unknown", ImportState.FAILED),
        ("ExceedsAllowedContactLimit", ImportState.FAILED),
        ("NotAvailableInThisVersion", ImportState.FAILED),
        ("NotStarted", ImportState.RUNNING),
        ("Processing", ImportState.RUNNING),
    ],
)
def test_status_words_fold_into_states(word: str, state: ImportState) -> None:
    """Each documented status word maps to its state."""
    assert import_state(word) is state


def test_unknown_status_word_is_running_and_logged_once() -> None:
    """An unknown status word counts as running and is logged once per process."""
    word = f"Pondering{uuid.uuid4().hex}"
    with capture_events() as logs:
        assert import_state(word) is ImportState.RUNNING
        assert import_state(word) is ImportState.RUNNING
    events = [entry for entry in logs if entry["event"] == "status.unknown_word"]
    assert [entry["status"] for entry in events] == [word]


# --- retryable faults ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_errors_are_retried(sim: Simulator) -> None:
    """Two 5xx answers are retried, then the submit succeeds."""
    sim.faults.server_errors = 2
    async with InsightClient(settings_for(sim)) as client:
        receipt = await client.submit_import(body_of(account_records(1)))
        assert (receipt.attempts, receipt.lost_responses, client.calls) == (3, 0, 3)
    assert len(sim.stats.imports) == 1


@pytest.mark.anyio
async def test_server_errors_beyond_attempts_raise_server_error(sim: Simulator) -> None:
    """5xx answers outliving the attempts raise ServerError with the last status and code."""
    sim.faults.server_errors = 5
    settings = settings_for(sim, retry=RetryPolicy.immediate(attempts=2))
    async with InsightClient(settings) as client:
        with pytest.raises(ServerError) as caught:
            await client.import_status(str(uuid.uuid4()))
        assert client.calls == 2
    assert isinstance(caught.value, TransientError)
    assert caught.value.status == 502
    assert caught.value.error_code == "badGateway"
    assert "2 time(s)" in str(caught.value)


@pytest.mark.anyio
async def test_connection_refused_raises_transport_error(anyio_backend: str) -> None:
    """A port nobody listens on fails every attempt with a TransportError, not an ApiError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ClientSettings(
        username="u",
        password=PASSWORD,
        base_url=f"http://127.0.0.1:{port}",
        retry=RetryPolicy.immediate(attempts=3),
    )
    async with InsightClient(settings) as client:
        with pytest.raises(TransportError) as caught:
            await client.submit_import(b"{}")
        assert (client.calls, client.lost_responses) == (3, 0)
    assert isinstance(caught.value, TransientError)
    assert not isinstance(caught.value, ApiError)


@pytest.mark.anyio
async def test_slow_status_answer_times_out_then_succeeds(sim: Simulator) -> None:
    """A status answer slower than request_timeout is retried."""
    async with InsightClient(settings_for(sim, request_timeout=0.2)) as client:
        receipt = await client.submit_import(body_of(account_records(1)))
        sim.faults.slow_responses, sim.faults.slow_delay_s = 1, 0.5
        status = await client.import_status(receipt.import_id)
        assert client.calls == 3
    assert status.import_id == receipt.import_id


@pytest.mark.anyio
async def test_slow_put_counts_a_lost_response(sim: Simulator) -> None:
    """A PUT that times out after its body was sent is re-sent and counted as a lost response."""
    sim.faults.slow_responses, sim.faults.slow_delay_s = 1, 0.4
    async with InsightClient(settings_for(sim, request_timeout=0.15)) as client:
        receipt = await client.submit_import(body_of(account_records(1)))
    # Whether the timed-out attempt started an import is unknown to the client: it counts it.
    assert (receipt.attempts, receipt.lost_responses) == (2, 1)
    assert receipt.import_id in sim.stats.imports


@pytest.mark.anyio
async def test_lost_response_is_retried_and_counted(sim: Simulator) -> None:
    """A dropped 202 is re-sent once, counted, logged, and leaves two imports in the simulator."""
    sim.faults.resets_after_accept = 1
    with capture_events() as logs:
        async with InsightClient(settings_for(sim)) as client:
            receipt = await client.submit_import(body_of(account_records(3)))
            assert (client.calls, client.lost_responses) == (2, 1)
    assert (receipt.attempts, receipt.lost_responses) == (2, 1)
    assert len(sim.stats.imports) == 2
    assert [s.lost_response for s in sim.stats.imports.values()] == [True, False]
    assert not sim.stats.imports[receipt.import_id].lost_response
    failed = [entry for entry in logs if entry["event"] == "api.call_failed"]
    assert len(failed) == 1
    assert "lost response" in failed[0]["reason"]


# --- 429: account full and rate limits -----------------------------------------------------


@pytest.mark.anyio
async def test_account_full_raises_at_once(sim: Simulator) -> None:
    """A 429 tooManyActiveImports raises AccountFullError without a retry."""
    sim.config.max_active_imports = 1
    sim.faults.foreign_active_imports = 1
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(AccountFullError) as caught:
            await client.submit_import(body_of(account_records(1)))
        assert client.calls == 1
    assert caught.value.status == 429
    assert caught.value.error_code == "insightData:tooManyActiveImports"
    assert sim.stats.rejected_too_many_active == 1


@pytest.mark.anyio
async def test_rate_limit_waits_retry_after_then_succeeds(sim: Simulator) -> None:
    """A rate limit waits the Retry-After the API sends, then the call succeeds."""
    sim.faults.rate_limit_calls, sim.faults.rate_limit_reset_s = 1, 0.15
    with capture_events() as logs:
        async with InsightClient(settings_for(sim)) as client:
            started = time.monotonic()
            receipt = await client.submit_import(body_of(account_records(1)))
            elapsed = time.monotonic() - started
    assert receipt.attempts == 2
    assert elapsed >= 0.14
    limited = [entry for entry in logs if entry["event"] == "api.rate_limited"]
    assert [(entry["wait_s"], entry["scope"]) for entry in limited] == [(0.15, "account")]


@pytest.mark.anyio
async def test_rate_limit_beyond_the_time_budget_raises_at_once(sim: Simulator) -> None:
    """A rate-limit wait past the remaining budget raises RateLimitedError without waiting."""
    sim.faults.rate_limit_calls, sim.faults.rate_limit_reset_s = 1, 30.0
    settings = settings_for(sim, retry=RetryPolicy.immediate(timeout=1.0))
    async with InsightClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as caught:
            await client.import_status(str(uuid.uuid4()))
        assert time.monotonic() - started < 1.0
        assert client.calls == 1
    assert caught.value.retry_after == 30.0
    assert caught.value.status == 429


@pytest.mark.anyio
async def test_a_rate_limit_holds_every_call_of_the_client_until_the_reset(sim: Simulator) -> None:
    """After one call's 429 rate limit, no call of the same client reaches the API in the window."""
    async with InsightClient(settings_for(sim)) as client:
        ids = [
            (await client.submit_import(body_of(account_records(1)))).import_id for _ in range(2)
        ]
        sim.faults.rate_limit_calls, sim.faults.rate_limit_reset_s = 1, 0.4
        with pytest.raises(RateLimitedError):
            await client.import_status(ids[0], retry=False)
        limited_at, requests = time.monotonic(), sim.stats.requests
        finished: list[float] = []

        async def call(work: Callable[[], Awaitable[object]]) -> None:
            await work()
            finished.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, lambda: client.import_status(ids[1], retry=False))
            tg.start_soon(call, lambda: client.import_status(ids[0]))
            tg.start_soon(call, lambda: client.submit_import(body_of(account_records(1))))
            await anyio.sleep(0.3)
            assert sim.stats.requests == requests  # all three held back, none sent
    assert sim.stats.requests == requests + 3
    assert all(at - limited_at >= 0.39 for at in finished)
    polls = sim.stats.imports[ids[0]].polls + sim.stats.imports[ids[1]].polls
    assert sorted(polls)[-2] - sorted(polls)[-3] >= 0.39  # the two after the 429 came after it


@pytest.mark.anyio
async def test_account_full_holds_no_other_call(sim: Simulator) -> None:
    """A 429 too many active imports is not a rate limit: the next call goes at once."""
    sim.config.max_active_imports = 1
    sim.faults.foreign_active_imports = 1
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(AccountFullError):
            await client.submit_import(body_of(account_records(1)))
        started = time.monotonic()
        with pytest.raises(NotFoundError):
            await client.import_status(str(uuid.uuid4()))
        assert time.monotonic() - started < 0.2
    assert sim.stats.requests == 2


@pytest.mark.anyio
async def test_a_call_that_cannot_wait_out_the_rate_limit_raises_without_calling(
    sim: Simulator,
) -> None:
    """A call whose time budget ends before the account's reset raises RateLimitedError at once."""
    sim.faults.rate_limit_calls, sim.faults.rate_limit_reset_s = 1, 30.0
    settings = settings_for(sim, retry=RetryPolicy.immediate(timeout=1.0))
    async with InsightClient(settings) as client:
        with pytest.raises(RateLimitedError):
            await client.import_status(str(uuid.uuid4()))
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as caught:
            await client.account_api_endpoint()
        assert time.monotonic() - started < 0.5
    assert sim.stats.requests == 1
    assert caught.value.retry_after > 29


@pytest.mark.anyio
async def test_rate_limit_beyond_the_attempts_raises(sim: Simulator) -> None:
    """Rate limits on every attempt end in RateLimitedError once the attempts are spent."""
    sim.faults.rate_limit_calls, sim.faults.rate_limit_reset_s = 10, 0.01
    settings = settings_for(sim, retry=RetryPolicy.immediate(attempts=3))
    async with InsightClient(settings) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.account_api_endpoint()
        assert client.calls == 3
    assert caught.value.retry_after == pytest.approx(0.01)


# --- errors that are not retried -----------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_password_raises_authentication_error(sim: Simulator) -> None:
    """A 401 names the environment variables and never the password, in messages or logs."""
    wrong = "not-the-Pa55word"
    with capture_events() as logs:
        async with InsightClient(settings_for(sim, password=wrong)) as client:
            with pytest.raises(AuthenticationError) as caught:
                await client.submit_import(body_of(account_records(1)))
            assert client.calls == 1
    message = str(caught.value)
    assert "DOTDIGITAL_API_USER" in message
    assert "DOTDIGITAL_API_PASSWORD" in message
    assert caught.value.status == 401
    for text in (message, repr(caught.value), repr(logs)):
        assert wrong not in text
        assert PASSWORD not in text


class _LoopbackResolver(AbstractResolver):
    """Resolve every host name to 127.0.0.1, so a regional host name reaches the simulator."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


@pytest.mark.anyio
async def test_wrong_region_raises_forbidden_naming_the_root(sim: Simulator) -> None:
    """A call to another region's host answers 403: 'wrong region?' and the api_root are named."""
    base_url = f"http://r2-api.dotdigital.com:{sim.port}"
    connector = aiohttp.TCPConnector(resolver=_LoopbackResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        async with InsightClient(settings_for(sim, base_url=base_url), session=session) as client:
            with pytest.raises(ForbiddenError) as caught:
                await client.submit_import(body_of(account_records(1)))
            # account-info answers on every region's host: that is how the region is found.
            assert await client.account_api_endpoint() == sim.base_url
        assert not session.closed  # a session given to the client stays the caller's
    assert "wrong region?" in str(caught.value)
    assert "region / base_url settings" in str(caught.value)
    assert "--" not in str(caught.value)  # flags are the command's business
    assert base_url in str(caught.value)
    assert caught.value.status == 403


@pytest.mark.anyio
async def test_unknown_import_id_raises_not_found(sim: Simulator) -> None:
    """A status of an unknown id raises NotFoundError with the API's error code."""
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(NotFoundError) as caught:
            await client.import_status(str(uuid.uuid4()))
    assert caught.value.error_code == "insightData:importNotFound"


@pytest.mark.anyio
async def test_malformed_import_id_raises_bad_request(sim: Simulator) -> None:
    """A malformed id answers 400 invalidId; a slash in it cannot reach another path."""
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.import_status("not-a-uuid/../x")
    assert caught.value.error_code == "insightData:invalidId"


@pytest.mark.anyio
async def test_refused_body_raises_bad_request_with_details(sim: Simulator) -> None:
    """A body the API refuses raises BadRequestError with the details parsed, without a retry."""
    body = orjson.dumps(
        {
            "collectionName": "1bad",
            "collectionScope": "account",
            "collectionType": "custom",
            "records": [],
        }
    )
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.submit_import(body)
        assert client.calls == 1
    error = caught.value
    assert (error.status, error.error_code) == (400, "insightData:badJson")
    assert error.description
    assert error.details
    assert all(isinstance(detail, ApiErrorDetail) for detail in error.details)
    assert all(detail.description for detail in error.details)


@pytest.mark.anyio
async def test_body_over_the_limit_raises_body_too_large(sim: Simulator) -> None:
    """A body over the API's limit raises BodyTooLargeError without a retry."""
    sim.config.max_body_bytes = 2_000
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(BodyTooLargeError) as caught:
            await client.submit_import(body_of(account_records(100)))
        assert client.calls == 1
    assert caught.value.status == 413


@pytest.mark.anyio
async def test_integration_token_is_sent_on_every_call(sim: Simulator) -> None:
    """With a token set, calls carry x-ddg-integration-token; without it the simulator refuses."""
    sim.config.integration_token = "7f3c0e7e-token"
    async with InsightClient(settings_for(sim)) as client:
        with pytest.raises(AuthenticationError):
            await client.account_api_endpoint()
    async with InsightClient(settings_for(sim, integration_token="7f3c0e7e-token")) as client:
        receipt = await client.submit_import(body_of(account_records(1)))
        status = await wait_finished(client, receipt.import_id)
    assert status.state is ImportState.SUCCEEDED


# --- answers the simulator never gives -----------------------------------------------------


Canned = tuple[int, bytes]  # status, body (served as text/html, without rate-limit headers)


@asynccontextmanager
async def canned_server(*, put: Canned, status: Canned, account: Canned) -> AsyncIterator[str]:
    """Serve fixed answers on the three API paths; yields the base URL."""

    def answer(canned: Canned) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=canned[0], body=canned[1], content_type="text/html")

        return handler

    app = web.Application()
    app.router.add_put("/insightData/v3/import", answer(put))
    app.router.add_get("/insightData/v3/import/{id}", answer(status))
    app.router.add_get("/v2/account-info", answer(account))
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def plain_settings(base_url: str) -> ClientSettings:
    return ClientSettings(
        username="u", password=PASSWORD, base_url=base_url, retry=RetryPolicy.immediate(attempts=2)
    )


@pytest.mark.anyio
async def test_odd_error_answers_are_tolerated(anyio_backend: str) -> None:
    """A headerless 429 on a PUT is account full, on a GET a rate limit; non-JSON is tolerated."""
    html = b"<html>slow down</html>"
    server = canned_server(put=(429, html), status=(429, html), account=(200, b"<html>hi</html>"))
    async with server as base_url, InsightClient(plain_settings(base_url)) as client:
        with pytest.raises(AccountFullError) as full:
            await client.submit_import(b"{}")
        assert client.calls == 1
        with pytest.raises(RateLimitedError):
            await client.import_status(str(uuid.uuid4()))
        assert client.calls == 3
        with pytest.raises(ApiError) as not_json:
            await client.account_api_endpoint()
    assert (full.value.error_code, full.value.description, full.value.details) == (None, None, ())
    assert "<html>" not in str(full.value)
    assert not_json.value.status == 200


@pytest.mark.anyio
async def test_answers_missing_their_fields_raise_api_error(anyio_backend: str) -> None:
    """A 202 without importId, a status without a word or account-info without ApiEndpoint fail."""
    server = canned_server(
        put=(202, b'{"id": "x"}'), status=(200, b'{"importId": "x"}'), account=(200, b"{}")
    )
    async with server as base_url, InsightClient(plain_settings(base_url)) as client:
        with pytest.raises(ApiError, match="importId"):
            await client.submit_import(b"{}")
        with pytest.raises(ApiError, match="status word"):
            await client.import_status(str(uuid.uuid4()))
        with pytest.raises(ApiError, match="ApiEndpoint"):
            await client.account_api_endpoint()
        assert client.calls == 3


@pytest.mark.anyio
async def test_unexpected_status_raises_plain_api_error(anyio_backend: str) -> None:
    """A status the API does not document raises a plain ApiError carrying it."""
    teapot = (418, b'{"errorCode": "teapot", "message": "short and stout"}')
    server = canned_server(put=teapot, status=teapot, account=teapot)
    async with server as base_url, InsightClient(plain_settings(base_url)) as client:
        with pytest.raises(ApiError) as caught:
            await client.submit_import(b"{}")
    assert type(caught.value) is ApiError
    assert (caught.value.status, caught.value.error_code) == (418, "teapot")
    assert caught.value.description == "short and stout"


@pytest.mark.anyio
async def test_hidden_resend_of_a_given_session_is_counted(sim: Simulator) -> None:
    """aiohttp's own re-send on a caller's session still shows in attempts and lost responses."""
    sim.faults.resets_after_accept = 1
    async with (
        aiohttp.ClientSession() as session,
        InsightClient(settings_for(sim), session=session) as client,
    ):
        receipt = await client.submit_import(body_of(account_records(1)))
        assert client.calls == 2
    assert (receipt.attempts, receipt.lost_responses) == (2, 1)
    assert len(sim.stats.imports) == 2


@pytest.mark.anyio
async def test_closed_given_session_raises_config_error(anyio_backend: str) -> None:
    """A closed session given to the client is reported, not silently replaced."""
    session = aiohttp.ClientSession()
    await session.close()
    client = InsightClient(ClientSettings(username="u", password="p"), session=session)
    with pytest.raises(ConfigError, match="closed"):
        await client.account_api_endpoint()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2.5", "X-RateLimit-Reset": "9"}, 2.5),
        ({"x-ratelimit-reset": "7"}, 7.0),
        ({"X-RATELIMIT-RESET": "{epoch+100}"}, 100.0),
        ({"Retry-After": "{date+50}"}, 50.0),
        ({"Retry-After": "soon", "X-RateLimit-Reset": "3"}, 3.0),
        ({"X-RateLimit-Reset": "later"}, None),
        ({"X-RateLimit-Reset": "nan"}, None),
        ({"X-RateLimit-Limit": "35"}, None),
    ],
)
def test_rate_limit_wait_reads_the_headers(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After wins, else x-ratelimit-reset as seconds or as an epoch, case-insensitively."""
    now = time.time()
    stamps = {
        "{epoch+100}": f"{now + 100:.3f}",
        "{date+50}": email.utils.formatdate(now + 50, usegmt=True),
    }
    wait = _rate_limit_wait(CIMultiDict({k: stamps.get(v, v) for k, v in headers.items()}))
    if expected is None:
        assert wait is None
    else:
        assert wait == pytest.approx(expected, abs=1.5)


# --- error body parser ---------------------------------------------------------------------


def test_parse_error_body_reads_description_details() -> None:
    """Details written with ``description`` are parsed."""
    raw = orjson.dumps(
        {
            "errorCode": "insightData:badJson",
            "description": "The body is not valid.",
            "details": [{"item": "records[0].key", "description": "must be a string"}],
        }
    )
    assert parse_error_body(raw) == (
        "insightData:badJson",
        "The body is not valid.",
        (ApiErrorDetail(item="records[0].key", description="must be a string"),),
    )


def test_parse_error_body_reads_error_details() -> None:
    """Details written with ``error`` instead of ``description`` are parsed too."""
    raw = orjson.dumps(
        {"errorCode": "insightData:badJson", "details": [{"item": "name", "error": "too short"}]}
    )
    assert parse_error_body(raw) == (
        "insightData:badJson",
        None,
        (ApiErrorDetail(item="name", description="too short"),),
    )


@pytest.mark.parametrize("raw", [b"", b"<html>oops</html>", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_parse_error_body_tolerates_other_bodies(raw: bytes) -> None:
    """Empty, non-JSON or non-object bodies parse to nothing instead of failing."""
    assert parse_error_body(raw) == (None, None, ())


# --- settings ------------------------------------------------------------------------------


def test_password_and_token_never_show_in_repr_or_str() -> None:
    """The password and the integration token are hidden from repr and str."""
    settings = ClientSettings(
        username="apiuser-x@apiconnector.com", password=PASSWORD, integration_token="tok-0123456789"
    )
    for text in (repr(settings), str(settings)):
        assert PASSWORD not in text
        assert "tok-0123456789" not in text
        assert "apiuser-x@apiconnector.com" in text
    assert PASSWORD not in repr(InsightClient(settings))


def test_from_env_reads_the_credentials() -> None:
    """from_env takes the user, password and token from the environment; overrides win."""
    environ = {
        "DOTDIGITAL_API_USER": "apiuser-env@apiconnector.com",
        "DOTDIGITAL_API_PASSWORD": PASSWORD,
        "DOTDIGITAL_INTEGRATION_TOKEN": "tok-env",
    }
    settings = ClientSettings.from_env(environ, region="r3")
    assert settings.username == "apiuser-env@apiconnector.com"
    assert settings.password == PASSWORD
    assert settings.integration_token == "tok-env"
    assert settings.api_root == "https://r3-api.dotdigital.com"
    no_token = ClientSettings.from_env({**environ, "DOTDIGITAL_INTEGRATION_TOKEN": ""})
    assert no_token.integration_token is None
    assert ClientSettings.from_env({}, username="u", password="p").username == "u"


@pytest.mark.parametrize("missing", ["DOTDIGITAL_API_USER", "DOTDIGITAL_API_PASSWORD"])
def test_from_env_without_credentials_raises_config_error(missing: str) -> None:
    """A missing credential variable is a ConfigError naming the variable."""
    environ = {"DOTDIGITAL_API_USER": "u", "DOTDIGITAL_API_PASSWORD": PASSWORD}
    del environ[missing]
    with pytest.raises(ConfigError, match=missing) as caught:
        ClientSettings.from_env(environ)
    assert PASSWORD not in str(caught.value)


def test_from_env_rejects_unknown_settings() -> None:
    """An unknown override is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="colour"):
        ClientSettings.from_env({}, username="u", password="p", colour="red")


def test_api_root_comes_from_base_url_or_region() -> None:
    """base_url wins over region; the region picks its regional host."""
    assert ClientSettings(username="u", password="p").api_root == REGIONS["r1"]
    assert ClientSettings(username="u", password="p", region="r2").api_root == (
        "https://r2-api.dotdigital.com"
    )
    explicit = ClientSettings(username="u", password="p", base_url="http://127.0.0.1:9/")
    assert explicit.api_root == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "overrides",
    [
        {"username": ""},
        {"username": "a:b"},
        {"password": ""},
        {"region": "r9"},
        {"base_url": "ftp://example.com"},
        {"request_timeout": 0},
        {"connect_timeout": float("nan")},
    ],
)
def test_invalid_client_settings_raise_config_error(overrides: dict[str, Any]) -> None:
    """Each invalid client setting is refused with a ConfigError that hides the password."""
    values: dict[str, Any] = {"username": "u", "password": PASSWORD, **overrides}
    with pytest.raises(ConfigError) as caught:
        ClientSettings(**values)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"timeout": 0},
        {"wait_initial": -1},
        {"wait_max": float("inf")},
        {"wait_jitter": True},
    ],
)
def test_invalid_retry_policy_raises_config_error(overrides: dict[str, Any]) -> None:
    """Each invalid retry setting is refused with a ConfigError."""
    with pytest.raises(ConfigError):
        RetryPolicy(**overrides)


def test_immediate_policy_has_no_waits() -> None:
    """RetryPolicy.immediate() keeps attempts but waits zero seconds."""
    policy = RetryPolicy.immediate(attempts=3)
    assert (policy.attempts, policy.wait_initial, policy.wait_max, policy.wait_jitter) == (
        3,
        0.0,
        0.0,
        0.0,
    )


durations = st.floats(min_value=0.0, max_value=100.0)


@given(
    initial=durations,
    cap=durations,
    jitter=durations,
    retry_number=st.integers(min_value=1, max_value=40),
)
@example(initial=1.0, cap=100.0, jitter=0.0, retry_number=3)
@example(initial=0.5, cap=30.0, jitter=1.0, retry_number=5_000)  # 2 ** 4999 overflows a float
def test_backoff_doubles_from_initial_adds_jitter_and_stays_under_the_cap(
    initial: float, cap: float, jitter: float, retry_number: int
) -> None:
    """Each backoff lies between the doubled initial wait and that plus the jitter, capped."""
    policy = RetryPolicy(wait_initial=initial, wait_max=cap, wait_jitter=jitter)
    wait = _jittered_backoff(policy, retry_number)
    try:
        base = initial * 2.0 ** (retry_number - 1)
    except OverflowError:
        base = float("inf")
    assert min(cap, base) <= wait <= min(cap, base + jitter)


@pytest.mark.anyio
async def test_retries_back_off_by_the_policy(sim: Simulator) -> None:
    """Two 5xx answers are retried after waits of wait_initial, then twice it."""
    sim.faults.server_errors = 2
    policy = RetryPolicy(attempts=3, wait_initial=0.1, wait_max=1.0, wait_jitter=0.0)
    async with InsightClient(settings_for(sim, retry=policy)) as client:
        started = time.monotonic()
        receipt = await client.submit_import(body_of(account_records(1)))
        elapsed = time.monotonic() - started
    assert receipt.attempts == 3
    assert 0.3 <= elapsed < 1.0


# --- first contact -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_access_returns_the_account_api_root(sim: Simulator) -> None:
    """check_access answers the account's own API root in one call."""
    async with InsightClient(settings_for(sim)) as client:
        assert await client.check_access() == sim.base_url
        assert client.calls == 1


@pytest.mark.anyio
async def test_check_access_refuses_a_wrong_password_in_one_call(sim: Simulator) -> None:
    """A wrong password is an AuthenticationError on the first call, before any import."""
    async with InsightClient(settings_for(sim, password="wrong-one")) as client:
        with pytest.raises(AuthenticationError):
            await client.check_access()
        assert client.calls == 1
    assert sim.stats.imports == {}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("scheme", "cause"), [("http", "connection refused"), ("https", "TLS handshake failed")]
)
async def test_an_unreachable_first_contact_fails_at_once_naming_host_and_cause(
    sim: Simulator, scheme: str, cause: str
) -> None:
    """Refused or TLS-failed first contact: one attempt, the host and the cause in the message."""
    if scheme == "http":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            host = f"127.0.0.1:{probe.getsockname()[1]}"
    else:  # TLS spoken to a plain HTTP server
        host = sim.base_url.removeprefix("http://")
    settings = settings_for(sim, base_url=f"{scheme}://{host}", retry=RetryPolicy(timeout=60.0))
    async with InsightClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(TransientError) as caught:
            await client.check_access()
        assert time.monotonic() - started < 2.0
        assert client.calls == 1
    assert f"cannot reach the API at {host}: {cause}" in str(caught.value)


@pytest.mark.anyio
async def test_a_call_that_outlives_its_retries_names_the_host(sim: Simulator) -> None:
    """The give-up message of a call names the API host, not only the path."""
    sim.faults.server_errors = 10
    settings = settings_for(sim, retry=RetryPolicy.immediate(attempts=2))
    async with InsightClient(settings) as client:
        with pytest.raises(TransientError) as caught:
            await client.import_status(str(uuid.uuid4()))
    assert sim.base_url.removeprefix("http://") in str(caught.value)


@pytest.mark.parametrize(
    ("url", "loopback", "region"),
    [
        ("http://127.0.0.1:8787", True, None),
        ("http://localhost:1", True, None),
        ("http://[::1]:9", True, None),
        ("https://r2-api.dotdigital.com", False, "r2"),
        ("https://R3-API.dotdigital.com/", False, "r3"),
        ("https://proxy.example.com", False, None),
    ],
)
def test_hosts_are_told_apart(url: str, loopback: bool, region: str | None) -> None:
    """Loopback hosts and regional hosts are recognised from the URL."""
    assert is_loopback_url(url) is loopback
    assert region_of(url) == region


def test_same_api_root_ignores_case_slashes_and_loopback_names() -> None:
    """The same server written two ways is the same root; another port or host is not."""
    assert same_api_root("https://r1-api.dotdigital.com/", "https://R1-api.dotdigital.com")
    assert same_api_root("http://localhost:8787", "http://127.0.0.1:8787")
    assert not same_api_root("http://127.0.0.1:8787", "http://127.0.0.1:8788")
    assert not same_api_root("https://r1-api.dotdigital.com", "https://r2-api.dotdigital.com")
